// Compiled by `tsc -p clients/js/tsconfig.checkjs.json` in the tests. `herald-implementation`
// is herald.js itself (a path mapping: `../herald.js` would resolve to herald.d.ts),
// type-checked with checkJs, its JSDoc naming the types of herald.d.ts. Each export of
// the implementation must be assignable to its declaration, so a declaration that
// promises a member, a parameter or a type the code does not have fails the build.
import * as impl from "herald-implementation";
import * as decl from "../herald.js";

export const checks: {
  [K in keyof typeof decl]: (typeof decl)[K];
} = {
  BEARER_SUBPROTOCOL: impl.BEARER_SUBPROTOCOL,
  FATAL_CLOSE_CODES: impl.FATAL_CLOSE_CODES,
  DEFAULTS: impl.DEFAULTS,
  HeraldError: impl.HeraldError,
  backoffDelay: impl.backoffDelay,
  tokenExpiry: impl.tokenExpiry,
  HeraldSocket: impl.HeraldSocket,
  HeraldClient: impl.HeraldClient,
  Subscription: impl.Subscription,
  SecureLLMWebSocket: impl.SecureLLMWebSocket,
};

// And the other way: the implementation exports nothing the declarations leave out.
export const undeclared: Exclude<keyof typeof impl, keyof typeof decl> extends never ? true : never = true;
