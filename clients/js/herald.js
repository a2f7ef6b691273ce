// herald.js: the browser (and Node >= 20) client for herald.
//
// One ES module with no dependencies and no build step. herald serves this exact file
// at /client/herald.js; types are in herald.d.ts next to it.
//
//   import { HeraldSocket, SecureLLMWebSocket } from "/client/herald.js";
//
// - HeraldSocket: one herald WebSocket (notifications, org events or a frame stream)
//   that stays connected: it sends the token in the `herald.bearer` subprotocol,
//   reconnects with capped exponential backoff and full jitter, asks `getToken()` for a
//   fresh token after a 4001, stops on 4003/4000/1003/1009, resumes with
//   `since`/`epoch` so no message is lost or repeated across reconnects, and sends a
//   heartbeat to notice dead connections.
// - SecureLLMWebSocket: a user's LLM frame stream with typed callbacks
//   (onStatusUpdate, onFrameUpdate, onToken, onFinalResponse, onError, onAuthError),
//   and `generate()` to start an answer through herald's user API.
//
// Node 20 has no global WebSocket: pass one in, e.g.
//   import WebSocket from "ws";
//   new HeraldSocket(url, { WebSocket, token });
// Node 22 and later, and browsers, have one built in.

export const BEARER_SUBPROTOCOL = "herald.bearer";

/** Close codes after which reconnecting cannot help (a programming or permission error). */
export const FATAL_CLOSE_CODES = Object.freeze([4000, 4003, 1003, 1009]);

/** Default options of HeraldSocket. */
export const DEFAULTS = Object.freeze({
  backoffInitialMs: 500,
  backoffMaxMs: 30000,
  backoffFactor: 2,
  shutdownDelayMaxMs: 3000,
  heartbeatIntervalMs: 25000,
  heartbeatTimeoutMs: 10000,
  refreshBeforeExpiryMs: 60000,
  tokenTransport: "subprotocol",
  resume: true,
});

/** An error herald reported, or a connection that cannot go on. */
export class HeraldError extends Error {
  constructor(message, details = {}) {
    super(message);
    this.name = "HeraldError";
    /** WebSocket close code, when the error is a close. */
    this.code = details.code;
    /** herald's error code (`invalid_json`, `unsupported_message`, `bad_request`, …). */
    this.error = details.error;
    /** HTTP status, for errors of the HTTP API. */
    this.status = details.status;
  }
}

const noop = () => {};

function resolveWebSocket(impl) {
  const WS = impl ?? globalThis.WebSocket;
  if (typeof WS !== "function") {
    throw new HeraldError(
      "no WebSocket implementation: this runtime has no global WebSocket (Node 20); " +
        'pass one in the options, e.g. import WebSocket from "ws" and new HeraldSocket(url, { WebSocket })',
    );
  }
  return WS;
}

/** Turns a path or http(s) URL into an absolute ws(s) URL. */
function toWebSocketUrl(url) {
  const base = globalThis.location?.href;
  let parsed;
  try {
    parsed = base ? new URL(url, base) : new URL(url);
  } catch {
    throw new HeraldError(`${url} is not a valid URL: give an absolute ws:// or wss:// URL`);
  }
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  if (parsed.protocol === "https:") parsed.protocol = "wss:";
  if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
    throw new HeraldError(`${url} is not a WebSocket URL: use ws:// or wss://`);
  }
  return parsed;
}

/** The `exp` claim of a JWT, in milliseconds, or undefined. */
export function tokenExpiry(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = payload + "=".repeat((4 - (payload.length % 4)) % 4);
    const claims = JSON.parse(atob(padded));
    return typeof claims.exp === "number" ? claims.exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The delay before reconnect attempt `attempt` (0-based): full jitter over a capped
 * exponential, `random() * min(maxMs, initialMs * factor ** attempt)`.
 */
export function backoffDelay(attempt, { initialMs, maxMs, factor }, random = Math.random) {
  const ceiling = Math.min(maxMs, initialMs * factor ** attempt);
  return Math.floor(random() * ceiling);
}

/**
 * One herald WebSocket that stays connected and resumes where it left off.
 *
 * States: "idle" (before connect), "connecting", "open" (welcome received),
 * "reconnecting" (waiting to try again), "closed" (by close() or a fatal close code).
 */
export class HeraldSocket {
  constructor(url, options = {}) {
    this.url = toWebSocketUrl(url);
    this.options = { ...DEFAULTS, ...options };
    this.WebSocket = resolveWebSocket(options.WebSocket);
    this.random = options.random ?? Math.random;
    this.token = options.token ?? null;
    this.getToken = options.getToken ?? null;
    this.onMessage = options.onMessage ?? noop;
    this.onOpen = options.onOpen ?? noop;
    this.onClose = options.onClose ?? noop;
    this.onStateChange = options.onStateChange ?? noop;
    this.onRecovered = options.onRecovered ?? noop;
    this.onError = options.onError ?? noop;
    this.onAuthError = options.onAuthError ?? noop;
    this.onSystem = options.onSystem ?? noop;
    /** The channel's epoch and the last offset delivered to onMessage. */
    this.epoch = options.epoch ?? null;
    this.offset = options.since ?? null;
    /** How many reconnects in a row have not reached the welcome. */
    this.attempt = 0;
    this.state = "idle";
    this.welcome = null;
    this._ws = null;
    this._timers = new Set();
    this._heartbeat = null;
    this._stopped = false;
    this._generation = 0;
    this._resuming = false;
    this._lastReceived = 0;
    this._fetchingToken = false;
  }

  /** The position to resume from: `{ epoch, offset }` (null before any message). */
  get position() {
    return { epoch: this.epoch, offset: this.offset };
  }

  /** Opens the socket (and keeps it open until close()). Returns this. */
  connect() {
    if (this.state !== "idle" && this.state !== "closed") return this;
    this._stopped = false;
    this.attempt = 0;
    this._open();
    return this;
  }

  /** Closes the socket for good: no reconnect. */
  close(code = 1000, reason = "client closed") {
    this._stopped = true;
    this._clearTimers();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      detach(ws);
      try {
        ws.close(code, reason);
      } catch {
        // Already closing.
      }
    }
    this._setState("closed", { code, reason });
  }

  /** Sends a JSON message (only ping, heartbeat and refresh are allowed by herald). */
  send(message) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) {
      throw new HeraldError("the socket is not open; wait for the open state before sending");
    }
    ws.send(JSON.stringify(message));
  }

  /** Sends a new token over the open socket (herald answers `refreshed`) and keeps it
   * for later reconnects. */
  refresh(token) {
    this.token = token;
    this.send({ type: "refresh", token });
  }

  _setState(state, detail = {}) {
    if (this.state === state) return;
    this.state = state;
    safely(this.onStateChange, state, detail);
  }

  _later(ms, fn) {
    const id = setTimeout(() => {
      this._timers.delete(id);
      fn();
    }, ms);
    this._timers.add(id);
    return id;
  }

  _clearTimers() {
    for (const id of this._timers) clearTimeout(id);
    this._timers.clear();
    this._heartbeat = null;
  }

  async _open() {
    const generation = ++this._generation;
    this._setState(this.welcome ? "reconnecting" : "connecting");
    if (!this.token && this.getToken) {
      try {
        this._fetchingToken = true;
        this.token = await this.getToken();
      } catch (err) {
        if (generation !== this._generation || this._stopped) return;
        safely(this.onError, new HeraldError(`getToken failed: ${err?.message ?? err}`));
        this._retry({ code: 4001, reason: "getToken failed" }, this._backoff());
        return;
      } finally {
        this._fetchingToken = false;
      }
      if (generation !== this._generation || this._stopped) return;
    }
    const url = new URL(this.url);
    this._resuming = false;
    if (this.options.resume && this.offset !== null && this.offset !== undefined) {
      url.searchParams.set("since", String(this.offset));
      if (this.epoch) url.searchParams.set("epoch", this.epoch);
      this._resuming = true;
    }
    let protocols;
    if (this.token) {
      if (this.options.tokenTransport === "query") {
        url.searchParams.set("token", this.token);
      } else {
        protocols = [BEARER_SUBPROTOCOL, this.token];
      }
    }
    let ws;
    try {
      ws = protocols ? new this.WebSocket(url.toString(), protocols) : new this.WebSocket(url.toString());
    } catch (err) {
      safely(this.onError, new HeraldError(`cannot open ${url.origin}${url.pathname}: ${err?.message ?? err}`));
      this._retry({ code: 1006, reason: "cannot open" }, this._backoff());
      return;
    }
    this._ws = ws;
    this._welcomed = false;
    ws.onmessage = (event) => {
      if (this._ws !== ws) return;
      this._receive(event.data);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._disconnected(event.code, event.reason ?? "");
    };
    ws.onerror = noop;
  }

  _receive(data) {
    this._lastReceived = Date.now();
    const text = typeof data === "string" ? data : new TextDecoder().decode(data);
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      safely(this.onError, new HeraldError("herald sent a message that is not JSON"));
      return;
    }
    switch (message.type) {
      case "system":
        this._system(message);
        return;
      case "pong":
      case "heartbeat_ack":
        return;
      case "error":
        safely(this.onError, new HeraldError(message.message ?? message.error, { error: message.error }));
        return;
      default:
        this._published(message);
    }
  }

  _system(message) {
    if (message.status === "connected") {
      this.welcome = message;
      this._welcomed = true;
      this.attempt = 0;
      if (!this._resuming) {
        this.epoch = message.epoch;
        this.offset = message.offset;
      }
      this._setState("open", { welcome: message });
      this._startHeartbeat();
      this._scheduleRefresh();
      safely(this.onOpen, message);
    } else if (message.status === "recovered") {
      this._resuming = false;
      if (message.recovered) {
        this.epoch = message.epoch ?? this.epoch;
        if (typeof message.offset === "number" && message.offset > (this.offset ?? -1)) {
          this.offset = message.offset;
        }
      } else if (typeof message.epoch === "string" && typeof message.offset === "number") {
        // The gap cannot be filled (at resume, or in band when the channel's sequence
        // was lost under an open socket): continue from the position the server gives;
        // the app must reload its state (onRecovered tells it).
        this.epoch = message.epoch;
        this.offset = message.offset;
      } else if (this.welcome) {
        this.epoch = this.welcome.epoch;
        this.offset = this.welcome.offset;
      }
      safely(this.onRecovered, message);
    }
    safely(this.onSystem, message);
  }

  _published(message) {
    if (typeof message.offset === "number" && typeof message.epoch === "string") {
      if (message.epoch === this.epoch && this.offset !== null && message.offset <= this.offset) {
        return; // Already delivered: never hand the app a message twice.
      }
      this.epoch = message.epoch;
      this.offset = message.offset;
    }
    safely(this.onMessage, message);
  }

  _startHeartbeat() {
    const every = this.options.heartbeatIntervalMs;
    if (!every || every <= 0) return;
    const beat = () => {
      const ws = this._ws;
      if (!ws || ws.readyState !== 1) return;
      const sentAt = Date.now();
      try {
        ws.send(JSON.stringify({ type: "heartbeat" }));
      } catch {
        return;
      }
      this._later(this.options.heartbeatTimeoutMs, () => {
        if (this._ws !== ws || this._lastReceived >= sentAt) return;
        // No answer: the connection is dead even if the browser has not noticed.
        this._ws = null;
        detach(ws);
        try {
          ws.close(4000, "heartbeat timeout");
        } catch {
          // Already closing.
        }
        this._disconnected(1006, "heartbeat timeout");
      });
      this._heartbeat = this._later(every, beat);
    };
    this._heartbeat = this._later(every, beat);
  }

  _scheduleRefresh() {
    if (!this.getToken || !this.token) return;
    const expiry = tokenExpiry(this.token);
    if (!expiry) return;
    const wait = expiry - Date.now() - this.options.refreshBeforeExpiryMs;
    if (wait > 2 ** 31 - 1) return;
    const ws = this._ws;
    this._later(Math.max(0, wait), async () => {
      if (this._ws !== ws) return;
      try {
        const token = await this.getToken();
        if (this._ws === ws && ws.readyState === 1) this.refresh(token);
      } catch (err) {
        safely(this.onError, new HeraldError(`getToken failed: ${err?.message ?? err}`));
      }
    });
  }

  _backoff() {
    const delay = backoffDelay(
      this.attempt,
      {
        initialMs: this.options.backoffInitialMs,
        maxMs: this.options.backoffMaxMs,
        factor: this.options.backoffFactor,
      },
      this.random,
    );
    this.attempt += 1;
    return delay;
  }

  _disconnected(code, reason) {
    this._clearTimers();
    if (this._stopped) return;
    const welcomed = this._welcomed;
    this._welcomed = false;
    if (code === 4003) {
      this._stop({ code, reason });
      safely(this.onAuthError, new HeraldError(`forbidden (4003): ${reason}`, { code }));
      return;
    }
    if (FATAL_CLOSE_CODES.includes(code)) {
      this._stop({ code, reason });
      safely(this.onError, new HeraldError(`herald closed the socket with ${code} (${reason}); not reconnecting`, { code }));
      return;
    }
    if (code === 4001) {
      if (!this.getToken) {
        this._stop({ code, reason });
        safely(this.onAuthError, new HeraldError(`unauthorized (4001): ${reason}; give a getToken option to refresh tokens`, { code }));
        return;
      }
      this.token = null; // The next attempt asks getToken() for a fresh one.
      this._retry({ code, reason }, this._backoff());
      return;
    }
    let delay = welcomed ? 0 : this._backoff();
    if (code === 1001) {
      // The server is going away: spread the reconnects of all its clients.
      delay = Math.max(delay, Math.floor(this.random() * this.options.shutdownDelayMaxMs));
    }
    this._retry({ code, reason }, delay);
  }

  _stop(detail) {
    this._stopped = true;
    safely(this.onClose, { ...detail, willReconnect: false });
    this._setState("closed", detail);
  }

  _retry(detail, delayMs) {
    safely(this.onClose, { ...detail, willReconnect: true, delayMs });
    this._setState("reconnecting", { ...detail, delayMs });
    this._later(delayMs, () => {
      if (!this._stopped) this._open();
    });
  }
}

function detach(ws) {
  ws.onmessage = null;
  ws.onclose = null;
  // A socket closed while still connecting reports an error; once detached it is
  // nobody's, and with no handler Node's `ws` would throw it as an uncaught error.
  ws.onerror = noop;
}

function safely(callback, ...args) {
  try {
    callback(...args);
  } catch (err) {
    // A throwing callback must not break the connection logic.
    setTimeout(() => {
      throw err;
    }, 0);
  }
}

function httpBase(baseUrl) {
  const base = baseUrl ?? globalThis.location?.origin;
  if (!base) {
    throw new HeraldError("baseUrl is required outside a browser, e.g. http://127.0.0.1:8000");
  }
  return base.replace(/\/+$/, "");
}

/**
 * A user's LLM answers, streamed from `/ws/frame-stream/{userId}/`, with the seed's
 * callbacks:
 *
 * - onStatusUpdate(status, message, raw): `llm_status` (started, thinking, streaming,
 *   restarted, completed, failed, cancelled);
 * - onFrameUpdate(frame, raw): every `llm_frame` (thinking and streaming);
 * - onToken(delta, index, raw): each streamed piece of the answer, once, in order;
 * - onRestart(taskId, raw): `llm_status restarted`: the answer starts again from index 0
 *   (a task taken over from a stopped worker got a different answer); drop the text
 *   received so far for that task. The tokens that follow are the new answer's;
 * - onFinalResponse(response, data, raw): `llm_response`;
 * - onError(error, raw): `llm_error` text, or a connection error (raw.type "connection");
 * - onAuthError(error): the token was refused for good (4003, or 4001 without getToken).
 */
export class SecureLLMWebSocket {
  constructor(options = {}) {
    if (!options.userId) throw new HeraldError("userId is required");
    this.baseUrl = httpBase(options.baseUrl);
    this.userId = options.userId;
    this.fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    this.onStatusUpdate = options.onStatusUpdate ?? noop;
    this.onFrameUpdate = options.onFrameUpdate ?? noop;
    this.onToken = options.onToken ?? noop;
    this.onRestart = options.onRestart ?? noop;
    this.onFinalResponse = options.onFinalResponse ?? noop;
    this.onError = options.onError ?? noop;
    this.onAuthError = options.onAuthError ?? noop;
    this.onConnectionChange = options.onConnectionChange ?? noop;
    this._nextIndex = new Map();
    const path = `/ws/frame-stream/${encodeURIComponent(options.userId)}/`;
    this.socket = new HeraldSocket(this.baseUrl + path, {
      ...options,
      onMessage: (message) => this._dispatch(message),
      onStateChange: (state, detail) => safely(this.onConnectionChange, state, detail),
      onError: (error) => safely(this.onError, error.message, { type: "connection", error }),
      onAuthError: (error) => safely(this.onAuthError, error),
      onOpen: options.onOpen,
      onClose: options.onClose,
      onRecovered: options.onRecovered,
    });
  }

  /** Opens the frame stream. Returns this. */
  connect() {
    this.socket.connect();
    return this;
  }

  /** Closes the frame stream for good. */
  close() {
    this.socket.close();
  }

  get state() {
    return this.socket.state;
  }

  /**
   * Starts an answer: `POST /api/chat/generate-response/`. Resolves to
   * `{task_id, chat_id, status}`; the answer arrives through the callbacks.
   */
  async generate({ chatId, prompt, model } = {}) {
    const body = { user_id: this.userId, chat_id: chatId, prompt };
    if (model) body.model = model;
    return this._api("POST", "/api/chat/generate-response/", body);
  }

  /** Cancels a task: the stream ends with `llm_status cancelled`. */
  async cancel(taskId) {
    return this._api("POST", `/api/chat/tasks/${encodeURIComponent(taskId)}/cancel`);
  }

  async _api(method, path, body) {
    if (!this.fetch) throw new HeraldError("no fetch in this runtime: pass options.fetch");
    if (!this.socket.token && this.socket.getToken) this.socket.token = await this.socket.getToken();
    const headers = { Authorization: `Bearer ${this.socket.token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await this.fetch(this.baseUrl + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch {
      json = null;
    }
    if (!response.ok) {
      const message = json?.message ?? text ?? response.statusText;
      throw new HeraldError(`${method} ${path} failed with ${response.status}: ${message}`, {
        status: response.status,
        error: json?.error,
      });
    }
    return json;
  }

  _dispatch(message) {
    switch (message.type) {
      case "llm_status":
        if (message.status === "restarted") {
          // The answer starts again: its frames count from index 0 once more.
          this._nextIndex.delete(message.task_id ?? message.chat_id);
          safely(this.onRestart, message.task_id ?? message.chat_id, message);
        }
        safely(this.onStatusUpdate, message.status, message.message, message);
        return;
      case "llm_frame": {
        const frame = message.frame ?? {};
        safely(this.onFrameUpdate, frame, message);
        if (frame.status === "streaming" && typeof frame.index === "number") {
          const key = message.task_id ?? message.chat_id;
          const next = this._nextIndex.get(key) ?? 0;
          if (frame.index < next) return; // Already handed to onToken.
          this._nextIndex.set(key, frame.index + 1);
          safely(this.onToken, frame.delta ?? "", frame.index, message);
        }
        return;
      }
      case "llm_response": {
        const data = message.data ?? {};
        safely(this.onFinalResponse, data.response, data, message);
        return;
      }
      case "llm_error":
        safely(this.onError, message.error, message);
        return;
      default:
        return;
    }
  }
}
