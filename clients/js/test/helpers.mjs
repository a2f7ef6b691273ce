// Shared helpers for the Node tests: tokens, HTTP calls and waiting, against the real
// herald the Rust test `clients::js_client_against_real_herald` starts (its addresses,
// secret and API key arrive in the environment).
import { createHmac } from "node:crypto";
import WebSocket from "ws";

export function env(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(
      `${name} is not set: these tests run against a real herald; run them through ` +
        "`cargo test -p herald --test it clients` (which starts herald and sets it)",
    );
  }
  return value;
}

export const HERALD_URL = env("HERALD_URL");
export const API_KEY = env("HERALD_API_KEY");
const SECRET = env("HERALD_JWT_SECRET");

const b64 = (value) => Buffer.from(typeof value === "string" ? value : JSON.stringify(value)).toString("base64url");

/** An HS256 token for `sub`, valid `ttl` seconds (negative: already expired). */
export function token(sub, ttl = 3600) {
  const now = Math.floor(Date.now() / 1000);
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, iat: now, exp: now + ttl })}`;
  return `${head}.${createHmac("sha256", SECRET).update(head).digest("base64url")}`;
}

let counter = 0;
/** A user name no other test uses. */
export function user(prefix) {
  counter += 1;
  return `${prefix}-${process.pid}-${counter}-${Date.now() % 100000}`;
}

export function wsUrl(base, path) {
  return base.replace(/^http/, "ws") + path;
}

/** POSTs JSON with the service key; returns the parsed answer, failing on non-2xx. */
export async function post(base, path, body, bearer = API_KEY) {
  const response = await fetch(base + path, {
    method: "POST",
    headers: { Authorization: `Bearer ${bearer}`, "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`POST ${path} answered ${response.status}: ${text}`);
  return text ? JSON.parse(text) : null;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Waits until `predicate()` is truthy, failing with `what` after `timeoutMs`. */
export async function waitFor(predicate, what, timeoutMs = 10000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(10);
  }
}

/** The `ws` WebSocket, counting constructions and recording every text message received and sent. */
export function spyWebSocket() {
  const spy = { opened: 0, received: [], sent: [] };
  spy.WebSocket = class extends WebSocket {
    constructor(...args) {
      super(...args);
      spy.opened += 1;
      this.addEventListener("message", (event) => spy.received.push(String(event.data)));
    }
    send(data, ...rest) {
      spy.sent.push(String(data));
      return super.send(data, ...rest);
    }
  };
  return spy;
}

export { WebSocket };
