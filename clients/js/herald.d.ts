// Types for herald.js. The tests check them two ways: `tsc -p clients/js` compiles
// test/types-check.ts (documented uses compile, wrong ones do not), and
// `tsc -p clients/js/tsconfig.checkjs.json` type-checks herald.js itself (checkJs, its
// JSDoc names these types) and compares every export of herald.js with its declaration
// here (test/impl-check.ts).

export declare const BEARER_SUBPROTOCOL: "herald.bearer";
export declare const FATAL_CLOSE_CODES: readonly number[];

export type SocketState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

/** A HeraldClient subscription's state; "unsubscribed" is for good. */
export type SubscriptionState = "subscribing" | "subscribed" | "unsubscribed";

/** Fields herald adds to every published message. */
export interface Sequenced {
  /** The channel's name (`notifications:alice`, `org:acme`, `frames:alice`). */
  channel: string;
  id: string;
  offset: number;
  epoch: string;
  timestamp: string;
}

export interface WelcomeMessage {
  type: "system";
  status: "connected";
  message: string;
  connection_id: string;
  user_id: string;
  channel: string;
  org_id?: string;
  epoch: string;
  offset: number;
  /** The user's read offset in the channel (0 when none is kept for its epoch). */
  read_offset: number;
  timestamp: string;
}

/** The welcome of the `/ws/` endpoint (HeraldClient): it subscribes to nothing yet. */
export interface ClientWelcomeMessage {
  type: "system";
  status: "connected";
  message?: string;
  connection_id: string;
  user_id: string;
  timestamp: string;
}

/**
 * After a resume: `recovered: true` once the missed messages were replayed; `false`
 * when they cannot be (the app must reload its state). Also sent in band, with the new
 * `epoch` and `offset`, when a channel's sequence was lost under an open socket. On
 * `/ws/` it names its `channel`.
 */
export interface RecoveredMessage {
  type: "system";
  status: "recovered";
  channel?: string;
  recovered: boolean;
  missed?: number;
  epoch: string;
  offset: number;
  timestamp: string;
}

export interface RefreshedMessage {
  type: "system";
  status: "refreshed";
  expires_at: string;
  timestamp: string;
}

export type SystemMessage = WelcomeMessage | ClientWelcomeMessage | RecoveredMessage | RefreshedMessage;

export interface NotificationMessage extends Sequenced {
  type: "notification";
  notification: Record<string, unknown>;
}

export interface OrgEventMessage extends Sequenced {
  type: "org_event";
  org_id: string;
  event_type: string;
  data: Record<string, unknown>;
}

export type LlmStatus =
  | "started"
  | "processing"
  | "thinking"
  | "streaming"
  | "restarted"
  | "completed"
  | "failed"
  | "cancelled";

interface LlmBase extends Sequenced {
  user_id: string;
  chat_id: string;
  task_id?: string;
}

export interface LlmStatusMessage extends LlmBase {
  type: "llm_status";
  status: LlmStatus;
  message: string;
}

export interface ThinkingFrame {
  status: "thinking";
  message: string;
  progress: "indeterminate";
}

export interface StreamingFrame {
  status: "streaming";
  delta: string;
  index: number;
}

export type Frame = ThinkingFrame | StreamingFrame;

export interface LlmFrameMessage extends LlmBase {
  type: "llm_frame";
  frame: Frame;
}

export interface LlmResponseData {
  event: "response_generated";
  user_id: string;
  chat_id: string;
  response: string;
  model: string;
  usage: { prompt_tokens: number; completion_tokens: number } | null;
  timestamp: string;
}

export interface LlmResponseMessage extends LlmBase {
  type: "llm_response";
  data: LlmResponseData;
}

export interface LlmErrorMessage extends LlmBase {
  type: "llm_error";
  error: string;
}

export type LlmMessage = LlmStatusMessage | LlmFrameMessage | LlmResponseMessage | LlmErrorMessage;

/**
 * A message published to a channel. Messages from the generic publish API
 * (`POST /api/v1/publish`) are whatever object was published: cast them to
 * `GenericMessage` or your own type.
 */
export type PublishedMessage = NotificationMessage | OrgEventMessage | LlmMessage;

/** A message from the generic publish API: the published object plus the sequence fields. */
export type GenericMessage = Sequenced & { [key: string]: unknown };

/** `subscribe` accepted: the channel's `epoch` and last `offset`, and the user's read offset. */
export interface SubscribedMessage {
  type: "subscribed";
  channel: string;
  id: string;
  epoch: string;
  offset: number;
  read_offset?: number;
}

/** `subscribe` refused; the socket stays open. 4003 and 4000 are for good, 4429 is retried. */
export interface SubscribeErrorMessage {
  type: "subscribe_error";
  channel: string;
  id: string;
  code: number;
  error: string;
  message: string;
}

/** The answer to `unsubscribe` (with its `id`), or herald ending a subscription (`code` 4003: membership lost). */
export interface UnsubscribedMessage {
  type: "unsubscribed";
  channel: string;
  id?: string;
  code?: number;
  reason?: string;
}

/** Presence of an org's members (subscriptions with `presence: true`); no offset, not in history. */
export interface PresenceMessage {
  type: "presence";
  channel: string;
  users: Array<{ user_id: string; connections: number }>;
}

export interface PresenceChangeMessage {
  type: "presence_join" | "presence_leave";
  channel: string;
  user_id: string;
}

/** The user read `channel` up to `offset` on another socket. */
export interface ReadMessage {
  type: "read";
  channel: string;
  offset: number;
}

/** What a HeraldClient subscription hands the app. */
export type ChannelMessage = PublishedMessage | PresenceMessage | PresenceChangeMessage | ReadMessage;

/** What a client may send to herald. */
export type ClientMessage =
  | { type: "ping" }
  | { type: "heartbeat" }
  | { type: "refresh"; token: string }
  | { type: "subscribe"; channel: string; id: string; since?: number; epoch?: string; presence?: boolean }
  | { type: "unsubscribe"; channel: string; id: string }
  | { type: "read"; channel: string; offset: number };

export interface CloseInfo {
  code: number;
  reason: string;
  willReconnect: boolean;
  /** Milliseconds until the next attempt, when willReconnect. */
  delayMs?: number;
}

/** What a state change carries: the close code and reason, the welcome, the delay, … */
export type StateDetail = { [key: string]: unknown };

/** How a subscription ended. */
export interface UnsubscribeInfo {
  /** 1000 by `unsubscribe()`; 4003 when herald ended it (membership lost) or refused it; 4000 for a bad channel; the client's close code when the client closed. */
  code: number;
  reason: string;
  /** herald's error code, when it refused the subscription. */
  error?: string;
}

export declare class HeraldError extends Error {
  constructor(message: string, details?: { code?: number; error?: string; status?: number; channel?: string });
  /** WebSocket close code, or a subscription's refusal code (4000, 4003, 4429). */
  code: number | undefined;
  /** herald's error code, e.g. `invalid_json` or `forbidden`. */
  error: string | undefined;
  /** HTTP status, for errors of the HTTP API. */
  status: number | undefined;
  /** The channel, for errors of one subscription. */
  channel: string | undefined;
}

/** A WebSocket as herald.js uses it: the browser's, Node 22's, or the `ws` package's. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

/** The constructor of a WebSocket. */
export interface WebSocketConstructor {
  new (url: string, protocols?: string | string[]): WebSocketLike;
}

/** What HeraldSocket and HeraldClient share. */
export interface ConnectionOptions {
  /** The user's JWT. */
  token?: string | null;
  /** Returns a fresh token: called before the first connect when there is no token, after a 4001, and before the token expires. */
  getToken?: () => string | Promise<string>;
  /** A WebSocket implementation (required on Node 20, e.g. `import WebSocket from "ws"`). */
  WebSocket?: WebSocketConstructor | (new (url: string, protocols?: string | string[]) => unknown);
  /** Where the token goes: the `herald.bearer` subprotocol (default) or the `token` query parameter. */
  tokenTransport?: "subprotocol" | "query";
  backoffInitialMs?: number;
  backoffMaxMs?: number;
  backoffFactor?: number;
  /** The most a reconnect after 1001 (server shutting down) waits. */
  shutdownDelayMaxMs?: number;
  /** 0 turns the heartbeat off. */
  heartbeatIntervalMs?: number;
  heartbeatTimeoutMs?: number;
  /** How long before the token's `exp` getToken() is asked for a new one, sent with `refresh`. */
  refreshBeforeExpiryMs?: number;
  /** Random source in [0, 1) for jitter (tests pass a fixed one). */
  random?: () => number;
}

export interface HeraldSocketOptions extends ConnectionOptions {
  /** Resume with since/epoch on reconnect (default true). */
  resume?: boolean;
  /** Start from this position: `since: 0` replays the channel's history. */
  since?: number;
  epoch?: string;
  onMessage?: (message: PublishedMessage) => void;
  onOpen?: (welcome: WelcomeMessage) => void;
  onClose?: (info: CloseInfo) => void;
  onStateChange?: (state: SocketState, detail: StateDetail) => void;
  onRecovered?: (message: RecoveredMessage) => void;
  onSystem?: (message: SystemMessage) => void;
  onError?: (error: HeraldError) => void;
  onAuthError?: (error: HeraldError) => void;
}

export type HeraldClientOptions = ConnectionOptions;

export declare function backoffDelay(
  attempt: number,
  options: { initialMs: number; maxMs: number; factor: number },
  random?: () => number,
): number;

export declare function tokenExpiry(token: string): number | undefined;

export declare const DEFAULTS: Readonly<{
  backoffInitialMs: number;
  backoffMaxMs: number;
  backoffFactor: number;
  shutdownDelayMaxMs: number;
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
  refreshBeforeExpiryMs: number;
  tokenTransport: "subprotocol" | "query";
  resume: boolean;
}>;

export declare class HeraldSocket {
  constructor(url: string, options?: HeraldSocketOptions);
  readonly url: URL;
  state: SocketState;
  token: string | null;
  getToken: (() => string | Promise<string>) | null;
  epoch: string | null;
  offset: number | null;
  attempt: number;
  welcome: WelcomeMessage | null;
  readonly position: { epoch: string | null; offset: number | null };
  connect(): this;
  close(code?: number, reason?: string): void;
  send(
    message:
      | { type: "ping" }
      | { type: "heartbeat" }
      | { type: "refresh"; token: string }
      | { type: "read"; channel: string; offset: number },
  ): void;
  /** Tells herald the user has read this socket's channel up to `offset`; needs the welcome. */
  markRead(offset: number): void;
  refresh(token: string): void;
  onMessage: (message: PublishedMessage) => void;
  onOpen: (welcome: WelcomeMessage) => void;
  onClose: (info: CloseInfo) => void;
  onStateChange: (state: SocketState, detail: StateDetail) => void;
  onRecovered: (message: RecoveredMessage) => void;
  onSystem: (message: SystemMessage) => void;
  onError: (error: HeraldError) => void;
  onAuthError: (error: HeraldError) => void;
}

/** The events of a HeraldClient (`client.on(event, listener)`). */
export interface HeraldClientEvents {
  /** idle, connecting, open, reconnecting, closed; `detail` has the close code, the delay, the welcome. */
  state: (state: SocketState, detail: StateDetail) => void;
  /** The socket is open (after every reconnect too); subscriptions are being renewed. */
  open: (welcome: ClientWelcomeMessage) => void;
  /** The socket closed; `willReconnect` says whether it tries again. */
  close: (info: CloseInfo) => void;
  /** A message of any subscription. */
  message: (message: ChannelMessage, subscription: Subscription) => void;
  /** Every `system` message: the welcome, `recovered`, `refreshed`. */
  system: (message: SystemMessage) => void;
  /** herald's `error` answers, refused subscriptions, closes after which it stops (4000, 1003, 1009). */
  error: (error: HeraldError) => void;
  /** The token was refused for good: 4003, or 4001 without getToken. */
  authError: (error: HeraldError) => void;
}

/** The events of a Subscription (`subscription.on(event, listener)`). */
export interface SubscriptionEvents {
  /** A message of this channel, once each, in order, across reconnects. */
  message: (message: ChannelMessage) => void;
  state: (state: SubscriptionState, detail: StateDetail) => void;
  /** herald accepted the subscription (after every reconnect too). */
  subscribed: (message: SubscribedMessage) => void;
  /** The replay after a resume ended; `recovered: false` (also in band): reload this channel's state. */
  recovered: (message: RecoveredMessage) => void;
  /** The subscription ended for good. */
  unsubscribed: (info: UnsubscribeInfo) => void;
  /** herald refused the subscription (`code` 4003, 4000: it ends; 4429: asked again with backoff). */
  error: (error: HeraldError) => void;
}

/** `client.subscribe(channel, options)`: where to start, and listeners to add at once. */
export interface SubscribeOptions {
  /** Start after this offset: `since: 0` replays the channel's history. */
  since?: number;
  /** The epoch `since` belongs to. */
  epoch?: string;
  /** Also receive the org's presence (`presence`, `presence_join`, `presence_leave`). */
  presence?: boolean;
  onMessage?: SubscriptionEvents["message"];
  onStateChange?: SubscriptionEvents["state"];
  onSubscribed?: SubscriptionEvents["subscribed"];
  onRecovered?: SubscriptionEvents["recovered"];
  onUnsubscribed?: SubscriptionEvents["unsubscribed"];
  onError?: SubscriptionEvents["error"];
}

export declare class Subscription implements AsyncIterable<ChannelMessage> {
  private constructor(client: HeraldClient, channel: string, options: SubscribeOptions);
  readonly client: HeraldClient;
  readonly channel: string;
  state: SubscriptionState;
  /** The id of the last `subscribe` sent for it. */
  id: string | null;
  epoch: string | null;
  offset: number | null;
  readonly position: { epoch: string | null; offset: number | null };
  /** The user's read offset for this channel (from `subscribed` and `read`). */
  readOffset: number | null;
  presence: boolean;
  attempt: number;
  /** How it ended, once unsubscribed. */
  ended: UnsubscribeInfo | null;
  on<K extends keyof SubscriptionEvents>(event: K, listener: SubscriptionEvents[K]): this;
  off<K extends keyof SubscriptionEvents>(event: K, listener: SubscriptionEvents[K]): this;
  unsubscribe(): void;
  messages(): AsyncIterableIterator<ChannelMessage>;
  [Symbol.asyncIterator](): AsyncIterableIterator<ChannelMessage>;
}

export declare class HeraldClient implements AsyncIterable<ChannelMessage> {
  /** `url`: herald's `/ws/` URL (a URL with no path gets `/ws/`); default `/ws/` on the page's origin. */
  constructor(url?: string, options?: HeraldClientOptions);
  readonly url: URL;
  state: SocketState;
  token: string | null;
  getToken: (() => string | Promise<string>) | null;
  attempt: number;
  welcome: ClientWelcomeMessage | null;
  readonly subscriptions: Subscription[];
  connect(): this;
  close(code?: number, reason?: string): void;
  /** Resolves with the welcome once open (at once if open); rejects if the client stops for good first. */
  connected(): Promise<ClientWelcomeMessage>;
  on<K extends keyof HeraldClientEvents>(event: K, listener: HeraldClientEvents[K]): this;
  off<K extends keyof HeraldClientEvents>(event: K, listener: HeraldClientEvents[K]): this;
  /** Throws if `channel` is already subscribed on this client. */
  subscribe(channel: string, options?: SubscribeOptions): Subscription;
  subscription(channel: string): Subscription | undefined;
  send(message: ClientMessage): void;
  refresh(token: string): void;
  markRead(channel: string, offset: number): void;
  messages(): AsyncIterableIterator<ChannelMessage>;
  [Symbol.asyncIterator](): AsyncIterableIterator<ChannelMessage>;
}

export interface SecureLLMWebSocketOptions
  extends Omit<HeraldSocketOptions, "onMessage" | "onStateChange" | "onError" | "onAuthError" | "onOpen"> {
  /** herald's HTTP origin, e.g. `http://127.0.0.1:8000` (default: the page's origin). */
  baseUrl?: string;
  userId: string;
  /** Ride on this client's socket (subscribing to `frames:{userId}`) instead of opening one. */
  client?: HeraldClient;
  fetch?: typeof fetch;
  /** The stream is open: the frame stream's welcome, or (on a shared client) the client's, once subscribed. */
  onOpen?: (welcome: WelcomeMessage | ClientWelcomeMessage) => void;
  onStatusUpdate?: (status: LlmStatus, message: string, raw: LlmStatusMessage) => void;
  onFrameUpdate?: (frame: Frame, raw: LlmFrameMessage) => void;
  onToken?: (delta: string, index: number, raw: LlmFrameMessage) => void;
  /**
   * `llm_status restarted`: the answer of this task (its `task_id`, else `chat_id`)
   * starts again from index 0; drop the text received for it so far.
   */
  onRestart?: (taskId: string, raw: LlmStatusMessage) => void;
  onFinalResponse?: (response: string, data: LlmResponseData, raw: LlmResponseMessage) => void;
  /** An `llm_error` text, or a connection error (`raw.type === "connection"`). */
  onError?: (error: string, raw: LlmErrorMessage | { type: "connection"; error: HeraldError }) => void;
  onAuthError?: (error: HeraldError) => void;
  onConnectionChange?: (state: SocketState, detail: StateDetail) => void;
}

export interface GenerateRequest {
  chatId: string;
  prompt: string;
  model?: string;
}

export interface TaskReceipt {
  task_id: string;
  chat_id: string;
  status: "queued" | "running" | "completed" | "failed" | "cancelled";
  response?: string;
  error?: string;
}

export declare class SecureLLMWebSocket {
  constructor(options: SecureLLMWebSocketOptions);
  /** Its own socket; null when it rides on a shared client. */
  readonly socket: HeraldSocket | null;
  /** The shared client, if any. */
  readonly client: HeraldClient | null;
  /** Its subscription on the shared client, once connected. */
  readonly subscription: Subscription | null;
  readonly baseUrl: string;
  readonly userId: string;
  readonly state: SocketState;
  connect(): this;
  close(): void;
  generate(request: GenerateRequest): Promise<TaskReceipt>;
  cancel(taskId: string): Promise<TaskReceipt>;
}
