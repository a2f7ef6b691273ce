// Types for herald.js (checked by `tsc` in the tests: clients/js/test/types-check.ts).

export declare const BEARER_SUBPROTOCOL: "herald.bearer";
export declare const FATAL_CLOSE_CODES: readonly number[];

export type SocketState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

/** Fields herald adds to every published message. */
export interface Sequenced {
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
  timestamp: string;
}

export interface RecoveredMessage {
  type: "system";
  status: "recovered";
  recovered: boolean;
  missed: number;
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

export type SystemMessage = WelcomeMessage | RecoveredMessage | RefreshedMessage;

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

export interface CloseInfo {
  code: number;
  reason: string;
  willReconnect: boolean;
  /** Milliseconds until the next attempt, when willReconnect. */
  delayMs?: number;
}

export declare class HeraldError extends Error {
  constructor(message: string, details?: { code?: number; error?: string; status?: number });
  /** WebSocket close code, when the error is a close. */
  code?: number;
  /** herald's error code, e.g. `invalid_json` or `bad_request`. */
  error?: string;
  /** HTTP status, for errors of the HTTP API. */
  status?: number;
}

/** The constructor of a WebSocket: the browser's, Node 22's, or the `ws` package's. */
export interface WebSocketConstructor {
  new (url: string, protocols?: string | string[]): {
    readyState: number;
    send(data: string): void;
    close(code?: number, reason?: string): void;
    onmessage: ((event: { data: unknown }) => void) | null;
    onclose: ((event: { code: number; reason: string }) => void) | null;
    onerror: ((event: unknown) => void) | null;
  };
}

export interface HeraldSocketOptions {
  /** The user's JWT. */
  token?: string | null;
  /** Returns a fresh token: called before the first connect when there is no token, after a 4001, and before the token expires. */
  getToken?: () => string | Promise<string>;
  /** A WebSocket implementation (required on Node 20, e.g. `import WebSocket from "ws"`). */
  WebSocket?: WebSocketConstructor | (new (url: string, protocols?: string | string[]) => unknown);
  /** Where the token goes: the `herald.bearer` subprotocol (default) or the `token` query parameter. */
  tokenTransport?: "subprotocol" | "query";
  /** Resume with since/epoch on reconnect (default true). */
  resume?: boolean;
  /** Start from this position: `since: 0` replays the channel's history. */
  since?: number;
  epoch?: string;
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
  onMessage?: (message: PublishedMessage) => void;
  onOpen?: (welcome: WelcomeMessage) => void;
  onClose?: (info: CloseInfo) => void;
  onStateChange?: (state: SocketState, detail: Record<string, unknown>) => void;
  onRecovered?: (message: RecoveredMessage) => void;
  onSystem?: (message: SystemMessage) => void;
  onError?: (error: HeraldError) => void;
  onAuthError?: (error: HeraldError) => void;
}

export declare function backoffDelay(
  attempt: number,
  options: { initialMs: number; maxMs: number; factor: number },
  random?: () => number,
): number;

export declare function tokenExpiry(token: string): number | undefined;

export declare const DEFAULTS: Readonly<Required<Pick<HeraldSocketOptions,
  | "backoffInitialMs"
  | "backoffMaxMs"
  | "backoffFactor"
  | "shutdownDelayMaxMs"
  | "heartbeatIntervalMs"
  | "heartbeatTimeoutMs"
  | "refreshBeforeExpiryMs"
  | "tokenTransport"
  | "resume">>>;

export declare class HeraldSocket {
  constructor(url: string, options?: HeraldSocketOptions);
  readonly url: URL;
  state: SocketState;
  token: string | null;
  epoch: string | null;
  offset: number | null;
  attempt: number;
  welcome: WelcomeMessage | null;
  readonly position: { epoch: string | null; offset: number | null };
  connect(): this;
  close(code?: number, reason?: string): void;
  send(message: { type: "ping" } | { type: "heartbeat" } | { type: "refresh"; token: string }): void;
  refresh(token: string): void;
  onMessage: (message: PublishedMessage) => void;
  onOpen: (welcome: WelcomeMessage) => void;
  onClose: (info: CloseInfo) => void;
  onStateChange: (state: SocketState, detail: Record<string, unknown>) => void;
  onRecovered: (message: RecoveredMessage) => void;
  onError: (error: HeraldError) => void;
  onAuthError: (error: HeraldError) => void;
}

export interface SecureLLMWebSocketOptions
  extends Omit<HeraldSocketOptions, "onMessage" | "onStateChange" | "onError" | "onAuthError"> {
  /** herald's HTTP origin, e.g. `http://127.0.0.1:8000` (default: the page's origin). */
  baseUrl?: string;
  userId: string;
  fetch?: typeof fetch;
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
  onConnectionChange?: (state: SocketState, detail: Record<string, unknown>) => void;
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
  readonly socket: HeraldSocket;
  readonly baseUrl: string;
  readonly userId: string;
  readonly state: SocketState;
  connect(): this;
  close(): void;
  generate(request: GenerateRequest): Promise<TaskReceipt>;
  cancel(taskId: string): Promise<TaskReceipt>;
}
