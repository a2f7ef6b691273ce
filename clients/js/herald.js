// herald.js: the browser (and Node >= 20) client for herald.
//
// One ES module with no dependencies and no build step. herald serves this exact file
// at /client/herald.js; types are in herald.d.ts next to it, and `tsc` checks this file
// against them (checkJs: clients/js/tsconfig.checkjs.json).
//
//   import { HeraldClient, SecureLLMWebSocket } from "/client/herald.js";
//
// - HeraldClient: one socket to herald's `/ws/` endpoint that carries many channels
//   (a tab's notifications, its orgs' events and its LLM answers). `subscribe(channel)`
//   returns a Subscription with its own state, events and since/epoch position; after a
//   reconnect every subscription is renewed from where it left off.
// - HeraldSocket: one socket to one channel's endpoint (`/ws/notifications/`,
//   `/ws/events/{org}/`, `/ws/frame-stream/{user}/`).
// - SecureLLMWebSocket: a user's LLM answers with typed callbacks (onStatusUpdate,
//   onFrameUpdate, onToken, onFinalResponse, onError, onAuthError) and `generate()`;
//   on its own socket, or riding on a shared HeraldClient (`client` option).
//
// Both sockets send the token in the `herald.bearer` subprotocol, reconnect with capped
// exponential backoff and full jitter, ask `getToken()` for a fresh token after a 4001,
// stop on 4003/4000/1003/1009, resume with `since`/`epoch` so no message is lost or
// repeated across reconnects, and send a heartbeat to notice dead connections.
//
// Node 20 has no global WebSocket: pass one in, e.g.
//   import WebSocket from "ws";
//   new HeraldClient(url, { WebSocket, token });
// Node 22 and later, and browsers, have one built in.

/**
 * @typedef {import("./herald.js").SocketState} SocketState
 * @typedef {import("./herald.js").SubscriptionState} SubscriptionState
 * @typedef {import("./herald.js").ConnectionOptions} ConnectionOptions
 * @typedef {import("./herald.js").HeraldSocketOptions} HeraldSocketOptions
 * @typedef {import("./herald.js").HeraldClientOptions} HeraldClientOptions
 * @typedef {import("./herald.js").HeraldClientEvents} HeraldClientEvents
 * @typedef {import("./herald.js").SubscribeOptions} SubscribeOptions
 * @typedef {import("./herald.js").SubscriptionEvents} SubscriptionEvents
 * @typedef {import("./herald.js").SecureLLMWebSocketOptions} SecureLLMWebSocketOptions
 * @typedef {import("./herald.js").WebSocketConstructor} WebSocketConstructor
 * @typedef {import("./herald.js").WebSocketLike} WebSocketLike
 * @typedef {import("./herald.js").WelcomeMessage} WelcomeMessage
 * @typedef {import("./herald.js").ClientWelcomeMessage} ClientWelcomeMessage
 * @typedef {import("./herald.js").RecoveredMessage} RecoveredMessage
 * @typedef {import("./herald.js").SystemMessage} SystemMessage
 * @typedef {import("./herald.js").PublishedMessage} PublishedMessage
 * @typedef {import("./herald.js").ChannelMessage} ChannelMessage
 * @typedef {import("./herald.js").SubscribedMessage} SubscribedMessage
 * @typedef {import("./herald.js").SubscribeErrorMessage} SubscribeErrorMessage
 * @typedef {import("./herald.js").UnsubscribedMessage} UnsubscribedMessage
 * @typedef {import("./herald.js").ClientMessage} ClientMessage
 * @typedef {import("./herald.js").CloseInfo} CloseInfo
 * @typedef {import("./herald.js").StateDetail} StateDetail
 * @typedef {import("./herald.js").UnsubscribeInfo} UnsubscribeInfo
 * @typedef {import("./herald.js").LlmStatusMessage} LlmStatusMessage
 * @typedef {import("./herald.js").LlmFrameMessage} LlmFrameMessage
 * @typedef {import("./herald.js").LlmResponseMessage} LlmResponseMessage
 * @typedef {import("./herald.js").LlmErrorMessage} LlmErrorMessage
 * @typedef {import("./herald.js").GenerateRequest} GenerateRequest
 * @typedef {import("./herald.js").TaskReceipt} TaskReceipt
 * @typedef {import("./herald.js").HeraldClient} SharedClient
 * @typedef {import("./herald.js").Subscription} SharedSubscription
 */

export const BEARER_SUBPROTOCOL = /** @type {const} */ ("herald.bearer");

/** Close codes after which reconnecting cannot help (a programming or permission error). */
export const FATAL_CLOSE_CODES = Object.freeze([4000, 4003, 1003, 1009]);

/** Default options of HeraldSocket and HeraldClient. */
export const DEFAULTS = Object.freeze({
  backoffInitialMs: 500,
  backoffMaxMs: 30000,
  backoffFactor: 2,
  shutdownDelayMaxMs: 3000,
  heartbeatIntervalMs: 25000,
  heartbeatTimeoutMs: 10000,
  refreshBeforeExpiryMs: 60000,
  tokenTransport: /** @type {"subprotocol" | "query"} */ ("subprotocol"),
  resume: /** @type {boolean} */ (true),
});

/** An error herald reported, or a connection that cannot go on. */
export class HeraldError extends Error {
  /**
   * @param {string} message
   * @param {{ code?: number, error?: string, status?: number, channel?: string }} [details]
   */
  constructor(message, details = {}) {
    super(message);
    this.name = "HeraldError";
    /** WebSocket close code, or a subscription's refusal code (4000, 4003, 4429). */
    this.code = details.code;
    /** herald's error code (`invalid_json`, `unsupported_message`, `forbidden`, …). */
    this.error = details.error;
    /** HTTP status, for errors of the HTTP API. */
    this.status = details.status;
    /** The channel, for errors of one subscription. */
    this.channel = details.channel;
  }
}

const noop = () => {};

/**
 * @param {unknown} impl
 * @returns {WebSocketConstructor}
 */
function resolveWebSocket(impl) {
  const WS = impl ?? /** @type {any} */ (globalThis).WebSocket;
  if (typeof WS !== "function") {
    throw new HeraldError(
      "no WebSocket implementation: this runtime has no global WebSocket (Node 20); " +
        'pass one in the options, e.g. import WebSocket from "ws" and new HeraldClient(url, { WebSocket })',
    );
  }
  return /** @type {WebSocketConstructor} */ (WS);
}

/**
 * Turns a path or http(s) URL into an absolute ws(s) URL.
 * @param {string} url
 * @returns {URL}
 */
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

/**
 * The `exp` claim of a JWT, in milliseconds, or undefined.
 * @param {string} token
 * @returns {number | undefined}
 */
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
 * @param {number} attempt
 * @param {{ initialMs: number, maxMs: number, factor: number }} options
 * @param {() => number} [random]
 * @returns {number}
 */
export function backoffDelay(attempt, { initialMs, maxMs, factor }, random = Math.random) {
  const ceiling = Math.min(maxMs, initialMs * factor ** attempt);
  return Math.floor(random() * ceiling);
}

/**
 * Calls a callback that must not break the connection logic if it throws: the error is
 * rethrown on its own task, so it still shows in the console.
 * @template {any[]} A
 * @param {((...args: A) => unknown) | undefined} callback
 * @param {A} args
 */
function safely(callback, ...args) {
  if (!callback) return;
  try {
    callback(...args);
  } catch (err) {
    setTimeout(() => {
      throw err;
    }, 0);
  }
}

/** @param {WebSocketLike} ws */
function detach(ws) {
  ws.onmessage = null;
  ws.onclose = null;
  // A socket closed while still connecting reports an error; once detached it is
  // nobody's, and with no handler Node's `ws` would throw it as an uncaught error.
  ws.onerror = noop;
}

/**
 * Listeners by event name, for HeraldClient and Subscription (`on`/`off`).
 * @template {{ [K in keyof E]: (...args: any[]) => void }} E
 */
class Listeners {
  constructor() {
    /** @type {Map<keyof E, Set<(...args: any[]) => void>>} */
    this.byEvent = new Map();
  }

  /**
   * @template {keyof E} K
   * @param {K} event
   * @param {E[K]} listener
   */
  add(event, listener) {
    if (typeof listener !== "function") throw new HeraldError(`the listener for "${String(event)}" must be a function`);
    let set = this.byEvent.get(event);
    if (!set) this.byEvent.set(event, (set = new Set()));
    set.add(listener);
  }

  /**
   * @template {keyof E} K
   * @param {K} event
   * @param {E[K]} listener
   */
  remove(event, listener) {
    this.byEvent.get(event)?.delete(listener);
  }

  /**
   * @template {keyof E} K
   * @param {K} event
   * @param {Parameters<E[K]>} args
   */
  emit(event, ...args) {
    const set = this.byEvent.get(event);
    if (!set) return;
    for (const listener of [...set]) safely(listener, ...args);
  }
}

/**
 * An async iterator over values pushed into it, ended by `end()`. Values wait in a queue
 * until read; `return()` (a `break` out of `for await`) detaches it.
 * @template T
 * @param {(push: (value: T) => void, end: () => void) => () => void} attach
 *   starts feeding the iterator and returns the function that stops it
 * @returns {AsyncIterableIterator<T>}
 */
function feed(attach) {
  /** @type {T[]} */
  const queue = [];
  /** @type {((result: IteratorResult<T, undefined>) => void)[]} */
  const waiting = [];
  let done = false;
  const end = () => {
    if (done) return;
    done = true;
    detachFeed();
    for (const resolve of waiting.splice(0)) resolve({ value: undefined, done: true });
  };
  /** @param {T} value */
  const push = (value) => {
    if (done) return;
    const resolve = waiting.shift();
    if (resolve) resolve({ value, done: false });
    else queue.push(value);
  };
  const detachFeed = attach(push, end);
  if (done) detachFeed();
  /** @type {AsyncIterableIterator<T>} */
  const iterator = {
    next() {
      if (queue.length > 0) return Promise.resolve({ value: /** @type {T} */ (queue.shift()), done: false });
      if (done) return Promise.resolve({ value: undefined, done: true });
      return new Promise((resolve) => waiting.push(resolve));
    },
    return() {
      queue.length = 0;
      end();
      return Promise.resolve({ value: undefined, done: true });
    },
    [Symbol.asyncIterator]() {
      return iterator;
    },
  };
  return iterator;
}

/**
 * What HeraldSocket and HeraldClient share: the token, the socket's lifecycle, close
 * codes, backoff, heartbeats and token refresh. Subclasses say what the URL is and what
 * to do with the welcome and with the other messages.
 */
class Connection {
  /**
   * @param {string} url
   * @param {ConnectionOptions} options
   */
  constructor(url, options) {
    this.url = toWebSocketUrl(url);
    this.options = { ...DEFAULTS, ...options };
    this.WebSocket = resolveWebSocket(options.WebSocket);
    /** @type {() => number} */
    this.random = options.random ?? Math.random;
    /** @type {string | null} */
    this.token = options.token ?? null;
    /** @type {(() => string | Promise<string>) | null} */
    this.getToken = options.getToken ?? null;
    /** How many reconnects in a row have not reached the welcome. */
    this.attempt = 0;
    /** @type {SocketState} */
    this.state = "idle";
    /** @type {WebSocketLike | null} */
    this._ws = null;
    /** @type {Set<ReturnType<typeof setTimeout>>} */
    this._timers = new Set();
    this._stopped = false;
    this._generation = 0;
    this._lastReceived = 0;
    this._welcomed = false;
  }

  /** Opens the socket (and keeps it open until close()). Returns this. */
  connect() {
    if (this.state !== "idle" && this.state !== "closed") return this;
    this._stopped = false;
    this.attempt = 0;
    void this._open();
    return this;
  }

  /**
   * Closes the socket for good: no reconnect.
   * @param {number} [code]
   * @param {string} [reason]
   */
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
    this._ended({ code, reason });
  }

  /**
   * Sends a JSON message.
   * @param {ClientMessage} message
   */
  send(message) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) {
      throw new HeraldError("the socket is not open; wait for the open state before sending");
    }
    ws.send(JSON.stringify(message));
  }

  /**
   * Sends a new token over the open socket (herald answers `refreshed`) and keeps it
   * for later reconnects.
   * @param {string} token
   */
  refresh(token) {
    this.token = token;
    this.send({ type: "refresh", token });
  }

  /**
   * @param {SocketState} state
   * @param {StateDetail} [detail]
   */
  _setState(state, detail = {}) {
    if (this.state === state) return;
    this.state = state;
    this._stateChanged(state, detail);
  }

  /**
   * @param {number} ms
   * @param {() => void} fn
   */
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
  }

  async _open() {
    const generation = ++this._generation;
    this._setState(this._hasBeenOpen() ? "reconnecting" : "connecting");
    if (!this.token && this.getToken) {
      try {
        this.token = await this.getToken();
      } catch (err) {
        if (generation !== this._generation || this._stopped) return;
        this._reportError(new HeraldError(`getToken failed: ${/** @type {any} */ (err)?.message ?? err}`));
        this._retry({ code: 4001, reason: "getToken failed" }, this._backoff());
        return;
      }
      if (generation !== this._generation || this._stopped) return;
    }
    const url = new URL(this.url);
    this._prepareUrl(url);
    /** @type {string[] | undefined} */
    let protocols;
    if (this.token) {
      if (this.options.tokenTransport === "query") {
        url.searchParams.set("token", this.token);
      } else {
        protocols = [BEARER_SUBPROTOCOL, this.token];
      }
    }
    /** @type {WebSocketLike} */
    let ws;
    try {
      ws = protocols ? new this.WebSocket(url.toString(), protocols) : new this.WebSocket(url.toString());
    } catch (err) {
      this._reportError(new HeraldError(`cannot open ${url.origin}${url.pathname}: ${/** @type {any} */ (err)?.message ?? err}`));
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

  /** @param {unknown} data */
  _receive(data) {
    this._lastReceived = Date.now();
    const text = typeof data === "string" ? data : new TextDecoder().decode(/** @type {ArrayBuffer} */ (data));
    /** @type {any} */
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      this._reportError(new HeraldError("herald sent a message that is not JSON"));
      return;
    }
    if (message === null || typeof message !== "object") {
      this._reportError(new HeraldError("herald sent a message that is not a JSON object"));
      return;
    }
    switch (message.type) {
      case "system":
        if (message.status === "connected") {
          this._welcomed = true;
          this.attempt = 0;
          this._welcome(message);
          this._startHeartbeat();
          this._scheduleRefresh();
        } else {
          this._system(message);
        }
        return;
      case "pong":
      case "heartbeat_ack":
        return;
      case "error":
        this._reportError(new HeraldError(message.message ?? message.error, { error: message.error }));
        return;
      default:
        this._message(message);
    }
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
      this._later(every, beat);
    };
    this._later(every, beat);
  }

  _scheduleRefresh() {
    const getToken = this.getToken;
    if (!getToken || !this.token) return;
    const expiry = tokenExpiry(this.token);
    if (!expiry) return;
    const wait = expiry - Date.now() - this.options.refreshBeforeExpiryMs;
    if (wait > 2 ** 31 - 1) return;
    const ws = this._ws;
    this._later(Math.max(0, wait), async () => {
      if (this._ws !== ws) return;
      try {
        const token = await getToken();
        if (ws && this._ws === ws && ws.readyState === 1) this.refresh(token);
      } catch (err) {
        this._reportError(new HeraldError(`getToken failed: ${/** @type {any} */ (err)?.message ?? err}`));
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

  /**
   * @param {number} code
   * @param {string} reason
   */
  _disconnected(code, reason) {
    this._clearTimers();
    if (this._stopped) return;
    const welcomed = this._welcomed;
    this._welcomed = false;
    this._lost();
    if (code === 4003) {
      this._stop({ code, reason });
      this._reportAuthError(new HeraldError(`forbidden (4003): ${reason}`, { code }));
      return;
    }
    if (FATAL_CLOSE_CODES.includes(code)) {
      this._stop({ code, reason });
      this._reportError(new HeraldError(`herald closed the socket with ${code} (${reason}); not reconnecting`, { code }));
      return;
    }
    if (code === 4001) {
      if (!this.getToken) {
        this._stop({ code, reason });
        this._reportAuthError(
          new HeraldError(`unauthorized (4001): ${reason}; give a getToken option to refresh tokens`, { code }),
        );
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

  /** @param {{ code: number, reason: string }} detail */
  _stop(detail) {
    this._stopped = true;
    this._reportClose({ ...detail, willReconnect: false });
    this._setState("closed", detail);
    this._ended(detail);
  }

  /**
   * @param {{ code: number, reason: string }} detail
   * @param {number} delayMs
   */
  _retry(detail, delayMs) {
    this._reportClose({ ...detail, willReconnect: true, delayMs });
    this._setState("reconnecting", { ...detail, delayMs });
    this._later(delayMs, () => {
      if (!this._stopped) void this._open();
    });
  }

  // What subclasses fill in.

  /** @returns {boolean} whether a socket has been welcomed before (a retry is a reconnect) */
  _hasBeenOpen() {
    return false;
  }
  /** @param {URL} url */
  _prepareUrl(url) {
    void url;
  }
  /** @param {any} message */
  _welcome(message) {
    void message;
  }
  /** @param {any} message */
  _system(message) {
    void message;
  }
  /** @param {any} message */
  _message(message) {
    void message;
  }
  /** The open socket was lost (it will be retried, or the connection stops). */
  _lost() {}
  /** @param {{ code: number, reason: string }} detail the connection stopped for good */
  _ended(detail) {
    void detail;
  }
  /**
   * @param {SocketState} state
   * @param {StateDetail} detail
   */
  _stateChanged(state, detail) {
    void [state, detail];
  }
  /** @param {CloseInfo} info */
  _reportClose(info) {
    void info;
  }
  /** @param {HeraldError} error */
  _reportError(error) {
    void error;
  }
  /** @param {HeraldError} error */
  _reportAuthError(error) {
    void error;
  }
}

/**
 * One socket to one channel's endpoint that stays connected and resumes where it left off.
 *
 * States: "idle" (before connect), "connecting", "open" (welcome received),
 * "reconnecting" (waiting to try again), "closed" (by close() or a fatal close code).
 */
export class HeraldSocket extends Connection {
  /**
   * @param {string} url
   * @param {HeraldSocketOptions} [options]
   */
  constructor(url, options = {}) {
    super(url, options);
    this.onMessage = options.onMessage ?? noop;
    this.onOpen = options.onOpen ?? noop;
    this.onClose = options.onClose ?? noop;
    this.onStateChange = options.onStateChange ?? noop;
    this.onRecovered = options.onRecovered ?? noop;
    this.onError = options.onError ?? noop;
    this.onAuthError = options.onAuthError ?? noop;
    this.onSystem = options.onSystem ?? noop;
    /** The channel's epoch and the last offset delivered to onMessage. */
    /** @type {string | null} */
    this.epoch = options.epoch ?? null;
    /** @type {number | null} */
    this.offset = options.since ?? null;
    /** @type {WelcomeMessage | null} */
    this.welcome = null;
    this._resuming = false;
  }

  /** The position to resume from: `{ epoch, offset }` (null before any message). */
  get position() {
    return { epoch: this.epoch, offset: this.offset };
  }

  /**
   * Sends a JSON message (only read, ping, heartbeat and refresh are allowed on this endpoint).
   * @param {{ type: "ping" } | { type: "heartbeat" } | { type: "refresh", token: string } | { type: "read", channel: string, offset: number }} message
   */
  send(message) {
    super.send(message);
  }

  /**
   * Tells herald the user has read this socket's channel up to `offset` (shared with
   * their other tabs and devices, which get a `read` message). Needs the welcome.
   * @param {number} offset
   */
  markRead(offset) {
    if (!this.welcome) throw new HeraldError("markRead needs the welcome: wait for the socket to open");
    this.send({ type: "read", channel: this.welcome.channel, offset });
  }

  _hasBeenOpen() {
    return this.welcome !== null;
  }

  /** @param {URL} url */
  _prepareUrl(url) {
    this._resuming = false;
    if (this.options.resume && this.offset !== null && this.offset !== undefined) {
      url.searchParams.set("since", String(this.offset));
      if (this.epoch) url.searchParams.set("epoch", this.epoch);
      this._resuming = true;
    }
  }

  /** @param {WelcomeMessage} message */
  _welcome(message) {
    this.welcome = message;
    if (!this._resuming) {
      this.epoch = message.epoch;
      this.offset = message.offset;
    }
    this._setState("open", { welcome: message });
    safely(this.onOpen, message);
    safely(this.onSystem, message);
  }

  /** @param {SystemMessage} message */
  _system(message) {
    if (message.status === "recovered") {
      this._resuming = false;
      const position = recoveredPosition(message, this, this.welcome);
      this.epoch = position.epoch;
      this.offset = position.offset;
      safely(this.onRecovered, message);
    }
    safely(this.onSystem, message);
  }

  /** @param {PublishedMessage} message */
  _message(message) {
    if (alreadySeen(message, this)) return;
    safely(this.onMessage, message);
  }

  /**
   * @param {SocketState} state
   * @param {StateDetail} detail
   */
  _stateChanged(state, detail) {
    safely(this.onStateChange, state, detail);
  }
  /** @param {CloseInfo} info */
  _reportClose(info) {
    safely(this.onClose, info);
  }
  /** @param {HeraldError} error */
  _reportError(error) {
    safely(this.onError, error);
  }
  /** @param {HeraldError} error */
  _reportAuthError(error) {
    safely(this.onAuthError, error);
  }
}

/**
 * The position to continue from after a `recovered` message: the last offset on
 * success; the server's new position when the gap cannot be filled (at resume, or in
 * band when the channel's sequence was lost under an open socket), and the app must
 * reload its state; else the position the socket joined at.
 * @param {RecoveredMessage} message
 * @param {{ epoch: string | null, offset: number | null }} current
 * @param {{ epoch: string, offset: number } | null} joined
 * @returns {{ epoch: string | null, offset: number | null }}
 */
function recoveredPosition(message, current, joined) {
  if (message.recovered) {
    const epoch = message.epoch ?? current.epoch;
    const offset =
      typeof message.offset === "number" && message.offset > (current.offset ?? -1) ? message.offset : current.offset;
    return { epoch, offset };
  }
  if (typeof message.epoch === "string" && typeof message.offset === "number") {
    return { epoch: message.epoch, offset: message.offset };
  }
  if (joined) return { epoch: joined.epoch, offset: joined.offset };
  return current;
}

/**
 * Whether a published message is at or below the last position handed to the app (it
 * came again through a replay); otherwise moves the position to it.
 * @param {any} message
 * @param {{ epoch: string | null, offset: number | null }} position
 */
function alreadySeen(message, position) {
  if (typeof message.offset === "number" && typeof message.epoch === "string") {
    if (message.epoch === position.epoch && position.offset !== null && message.offset <= position.offset) {
      return true;
    }
    position.epoch = message.epoch;
    position.offset = message.offset;
  }
  return false;
}

/** Subscription refusal codes after which asking again cannot help. */
const FATAL_SUBSCRIBE_CODES = Object.freeze([4000, 4003]);

/**
 * One channel on a HeraldClient's socket. Made by `client.subscribe(channel)`.
 *
 * States: "subscribing" (waiting for the socket, or for herald's `subscribed`),
 * "subscribed", and "unsubscribed" (for good: by `unsubscribe()`, a refusal, a lost
 * membership, or the client closing). Its position (`epoch`, `offset`) is the last
 * message handed to the app; after a reconnect the subscription asks herald for what
 * came after it.
 */
export class Subscription {
  /**
   * @param {HeraldClient} client
   * @param {string} channel
   * @param {SubscribeOptions} options
   */
  constructor(client, channel, options) {
    this.client = client;
    this.channel = channel;
    /** @type {SubscriptionState} */
    this.state = "subscribing";
    /** The id of the last `subscribe` sent for it. */
    /** @type {string | null} */
    this.id = null;
    /** @type {string | null} */
    this.epoch = options.epoch ?? null;
    /** @type {number | null} */
    this.offset = options.since ?? null;
    /** The user's read offset for this channel, from `subscribed` and `read` messages. */
    /** @type {number | null} */
    this.readOffset = null;
    this.presence = options.presence === true;
    /** Refusals in a row (4429), for the backoff before asking again. */
    this.attempt = 0;
    /** How the subscription ended, once unsubscribed. */
    /** @type {UnsubscribeInfo | null} */
    this.ended = null;
    /** @type {Listeners<SubscriptionEvents>} */
    this._listeners = new Listeners();
    /** @type {SubscribedMessage | null} */
    this._subscribed = null;
    this._resuming = false;
    if (options.onMessage) this.on("message", options.onMessage);
    if (options.onStateChange) this.on("state", options.onStateChange);
    if (options.onSubscribed) this.on("subscribed", options.onSubscribed);
    if (options.onRecovered) this.on("recovered", options.onRecovered);
    if (options.onUnsubscribed) this.on("unsubscribed", options.onUnsubscribed);
    if (options.onError) this.on("error", options.onError);
  }

  /** The position to resume from: `{ epoch, offset }` (null before any message). */
  get position() {
    return { epoch: this.epoch, offset: this.offset };
  }

  /**
   * Adds a listener: "message", "state", "subscribed", "recovered", "unsubscribed", "error".
   * @template {keyof SubscriptionEvents} K
   * @param {K} event
   * @param {SubscriptionEvents[K]} listener
   * @returns {this}
   */
  on(event, listener) {
    this._listeners.add(event, listener);
    return this;
  }

  /**
   * Removes a listener added with `on`.
   * @template {keyof SubscriptionEvents} K
   * @param {K} event
   * @param {SubscriptionEvents[K]} listener
   * @returns {this}
   */
  off(event, listener) {
    this._listeners.remove(event, listener);
    return this;
  }

  /**
   * Leaves the channel: herald is told at once if the socket is open, and nothing more
   * of the channel reaches the app. A later `client.subscribe(channel)` starts afresh.
   */
  unsubscribe() {
    if (this.state === "unsubscribed") return;
    const client = this.client;
    if (client._subscriptions.get(this.channel) === this) client._subscriptions.delete(this.channel);
    if (this.id !== null && client.state === "open") {
      try {
        client.send({ type: "unsubscribe", channel: this.channel, id: this.id });
      } catch {
        // The socket is closing: herald drops its subscriptions with it.
      }
    }
    this._end({ code: 1000, reason: "unsubscribed by the client" });
  }

  /** The messages of this channel as an async iterator; it ends when the subscription does. */
  messages() {
    return feed(
      /**
       * @param {(value: ChannelMessage) => void} push
       * @param {() => void} end
       */
      (push, end) => {
        if (this.state === "unsubscribed") {
          end();
          return noop;
        }
        /** @param {SubscriptionState} state */
        const onState = (state) => {
          if (state === "unsubscribed") end();
        };
        this.on("message", push);
        this.on("state", onState);
        return () => {
          this.off("message", push);
          this.off("state", onState);
        };
      },
    );
  }

  [Symbol.asyncIterator]() {
    return this.messages();
  }

  /**
   * @param {SubscriptionState} state
   * @param {StateDetail} [detail]
   */
  _setState(state, detail = {}) {
    if (this.state === state) return;
    this.state = state;
    this._listeners.emit("state", state, detail);
  }

  /** @param {UnsubscribeInfo} info */
  _end(info) {
    if (this.state === "unsubscribed") return;
    this.ended = info;
    this._setState("unsubscribed", { ...info });
    this._listeners.emit("unsubscribed", info);
  }

  /** The `subscribe` message to send now, with this subscription's position. */
  _request() {
    /** @type {{ type: "subscribe", channel: string, id: string, since?: number, epoch?: string, presence?: boolean }} */
    const message = { type: "subscribe", channel: this.channel, id: this.client._nextId() };
    this._resuming = false;
    if (this.offset !== null) {
      message.since = this.offset;
      if (this.epoch) message.epoch = this.epoch;
      this._resuming = true;
    }
    if (this.presence) message.presence = true;
    this.id = message.id;
    return message;
  }

  /** @param {SubscribedMessage} message */
  _onSubscribed(message) {
    this._subscribed = message;
    this.attempt = 0;
    if (!this._resuming) {
      this.epoch = message.epoch;
      this.offset = message.offset;
    }
    if (typeof message.read_offset === "number") this.readOffset = message.read_offset;
    this._setState("subscribed", { subscribed: message });
    this._listeners.emit("subscribed", message);
  }

  /** @param {RecoveredMessage} message */
  _onRecovered(message) {
    this._resuming = false;
    const position = recoveredPosition(message, this, this._subscribed);
    this.epoch = position.epoch;
    this.offset = position.offset;
    this._listeners.emit("recovered", message);
  }

  /** @param {ChannelMessage} message */
  _onMessage(message) {
    if (message.type === "read" && typeof message.offset === "number") {
      this.readOffset = Math.max(this.readOffset ?? 0, message.offset);
    }
    if (alreadySeen(message, this)) return;
    this._listeners.emit("message", message);
    this.client._listeners.emit("message", message, this);
  }
}

/**
 * One socket to herald's `/ws/` endpoint carrying many channels: a browser tab needs
 * one, whatever it follows (`HERALD_MAX_CONNECTIONS_PER_USER` counts tabs).
 *
 * States as HeraldSocket's. Events (`on`/`off`): "state", "open", "close", "message"
 * (every subscription's messages, with the subscription), "system", "error",
 * "authError". `connected()` is a promise for the next welcome; `messages()` (or
 * `for await (const m of client)`) iterates over every subscription's messages.
 */
export class HeraldClient extends Connection {
  /**
   * @param {string} [url] herald's `/ws/` URL; a URL with no path (`https://herald.example.com`)
   *   gets `/ws/`; default: `/ws/` on the page's origin
   * @param {HeraldClientOptions} [options]
   */
  constructor(url = "/ws/", options = {}) {
    super(url, options);
    if (this.url.pathname === "/" || this.url.pathname === "") this.url.pathname = "/ws/";
    /** @type {ClientWelcomeMessage | null} */
    this.welcome = null;
    /** @type {Map<string, Subscription>} */
    this._subscriptions = new Map();
    /** @type {Listeners<HeraldClientEvents>} */
    this._listeners = new Listeners();
    /** @type {{ resolve: (welcome: ClientWelcomeMessage) => void, reject: (error: HeraldError) => void }[]} */
    this._waiters = [];
    this._ids = 0;
  }

  /**
   * Adds a listener: "state", "open", "close", "message", "system", "error", "authError".
   * @template {keyof HeraldClientEvents} K
   * @param {K} event
   * @param {HeraldClientEvents[K]} listener
   * @returns {this}
   */
  on(event, listener) {
    this._listeners.add(event, listener);
    return this;
  }

  /**
   * Removes a listener added with `on`.
   * @template {keyof HeraldClientEvents} K
   * @param {K} event
   * @param {HeraldClientEvents[K]} listener
   * @returns {this}
   */
  off(event, listener) {
    this._listeners.remove(event, listener);
    return this;
  }

  /**
   * Resolves with the welcome once the socket is open (at once if it is); rejects if the
   * client is closed, or stops for good first (close(), or a close code after which it
   * does not reconnect). Call connect() to open it.
   * @returns {Promise<ClientWelcomeMessage>}
   */
  connected() {
    if (this.state === "open" && this.welcome) return Promise.resolve(this.welcome);
    if (this.state === "closed") {
      return Promise.reject(new HeraldError("the client is closed: call connect() first", { code: 1000 }));
    }
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  /**
   * Follows a channel (`notifications:{user}`, `org:{org}`, `frames:{user}`) on this
   * socket: sent now if the socket is open, else once it is, and again after every
   * reconnect from the subscription's own position. `since` (and `epoch`) start from a
   * known position: `since: 0` replays the channel's history.
   * @param {string} channel
   * @param {SubscribeOptions} [options]
   * @returns {Subscription}
   */
  subscribe(channel, options = {}) {
    if (typeof channel !== "string" || channel === "") throw new HeraldError("channel must be a non-empty string");
    if (this._subscriptions.has(channel)) {
      throw new HeraldError(
        `already subscribed to ${channel}: use client.subscription(${JSON.stringify(channel)}), or unsubscribe() it first`,
        { channel },
      );
    }
    const subscription = new Subscription(this, channel, options);
    this._subscriptions.set(channel, subscription);
    if (this.state === "open") this._sendSubscribe(subscription);
    return subscription;
  }

  /**
   * The live subscription to `channel`, if any.
   * @param {string} channel
   * @returns {Subscription | undefined}
   */
  subscription(channel) {
    return this._subscriptions.get(channel);
  }

  /** The live subscriptions. */
  get subscriptions() {
    return [...this._subscriptions.values()];
  }

  /**
   * Sends a JSON message: ping, heartbeat, refresh, subscribe, unsubscribe or read.
   * @param {ClientMessage} message
   */
  send(message) {
    super.send(message);
  }

  /**
   * Tells herald the user has read `channel` up to `offset` (shared with their other tabs).
   * @param {string} channel
   * @param {number} offset
   */
  markRead(channel, offset) {
    this.send({ type: "read", channel, offset });
  }

  /** Every subscription's messages as an async iterator; it ends when the client closes for good. */
  messages() {
    return feed(
      /**
       * @param {(value: ChannelMessage) => void} push
       * @param {() => void} end
       */
      (push, end) => {
        /** @param {ChannelMessage} message */
        const onMessage = (message) => push(message);
        /** @param {SocketState} state */
        const onState = (state) => {
          if (state === "closed") end();
        };
        this.on("message", onMessage);
        this.on("state", onState);
        return () => {
          this.off("message", onMessage);
          this.off("state", onState);
        };
      },
    );
  }

  [Symbol.asyncIterator]() {
    return this.messages();
  }

  _nextId() {
    this._ids += 1;
    return `s${this._ids}`;
  }

  /** @param {Subscription} subscription */
  _sendSubscribe(subscription) {
    try {
      this.send(subscription._request());
    } catch {
      // The socket just closed: the subscription is sent again after the reconnect.
    }
  }

  _hasBeenOpen() {
    return this.welcome !== null;
  }

  /** @param {ClientWelcomeMessage} message */
  _welcome(message) {
    this.welcome = message;
    this._setState("open", { welcome: message });
    for (const subscription of this._subscriptions.values()) this._sendSubscribe(subscription);
    this._listeners.emit("open", message);
    this._listeners.emit("system", message);
    for (const waiter of this._waiters.splice(0)) waiter.resolve(message);
  }

  /** @param {SystemMessage} message */
  _system(message) {
    if (message.status === "recovered" && typeof message.channel === "string") {
      this._subscriptions.get(message.channel)?._onRecovered(message);
    }
    this._listeners.emit("system", message);
  }

  /** @param {any} message */
  _message(message) {
    const subscription = typeof message.channel === "string" ? this._subscriptions.get(message.channel) : undefined;
    switch (message.type) {
      case "subscribed":
        if (subscription && message.id === subscription.id) subscription._onSubscribed(message);
        return;
      case "subscribe_error":
        if (subscription && message.id === subscription.id) this._refused(subscription, message);
        return;
      case "unsubscribed":
        // An answer to our own unsubscribe carries its id (that subscription is gone
        // already); one without an id is herald ending it (membership lost: 4003).
        if (subscription && message.id === undefined) {
          this._subscriptions.delete(subscription.channel);
          subscription._end({ code: message.code ?? 1000, reason: message.reason ?? "unsubscribed by herald" });
        }
        return;
      default:
        // A message of a channel no longer followed (sent before herald took the
        // unsubscribe) is dropped.
        if (subscription && subscription.state === "subscribed") subscription._onMessage(message);
    }
  }

  /**
   * @param {Subscription} subscription
   * @param {SubscribeErrorMessage} message
   */
  _refused(subscription, message) {
    const error = new HeraldError(
      `herald refused the subscription to ${message.channel} (${message.code} ${message.error}): ${message.message}`,
      { code: message.code, error: message.error, channel: message.channel },
    );
    subscription._listeners.emit("error", error);
    this._listeners.emit("error", error);
    if (FATAL_SUBSCRIBE_CODES.includes(message.code)) {
      this._subscriptions.delete(subscription.channel);
      subscription._end({ code: message.code, reason: message.message, error: message.error });
      return;
    }
    // 4429 (too many subscriptions or messages): ask again later, with backoff.
    const delay = backoffDelay(
      subscription.attempt,
      {
        initialMs: this.options.backoffInitialMs,
        maxMs: this.options.backoffMaxMs,
        factor: this.options.backoffFactor,
      },
      this.random,
    );
    subscription.attempt += 1;
    subscription.id = null;
    this._later(delay, () => {
      if (this.state === "open" && this._subscriptions.get(subscription.channel) === subscription) {
        this._sendSubscribe(subscription);
      }
    });
  }

  _lost() {
    for (const subscription of this._subscriptions.values()) {
      subscription.id = null;
      subscription._setState("subscribing", { reason: "the socket closed; subscribing again once it reconnects" });
    }
  }

  /** @param {{ code: number, reason: string }} detail */
  _ended(detail) {
    const error = new HeraldError(`the client closed (${detail.code} ${detail.reason})`, { code: detail.code });
    for (const waiter of this._waiters.splice(0)) waiter.reject(error);
    const subscriptions = [...this._subscriptions.values()];
    this._subscriptions.clear();
    for (const subscription of subscriptions) subscription._end({ code: detail.code, reason: detail.reason });
  }

  /**
   * @param {SocketState} state
   * @param {StateDetail} detail
   */
  _stateChanged(state, detail) {
    this._listeners.emit("state", state, detail);
  }
  /** @param {CloseInfo} info */
  _reportClose(info) {
    this._listeners.emit("close", info);
  }
  /** @param {HeraldError} error */
  _reportError(error) {
    this._listeners.emit("error", error);
  }
  /** @param {HeraldError} error */
  _reportAuthError(error) {
    this._listeners.emit("authError", error);
  }
}

/**
 * @param {string | undefined} baseUrl
 * @returns {string}
 */
function httpBase(baseUrl) {
  const base = baseUrl ?? globalThis.location?.origin;
  if (!base) {
    throw new HeraldError("baseUrl is required outside a browser, e.g. http://127.0.0.1:8000");
  }
  return base.replace(/\/+$/, "");
}

/**
 * The socket state a SecureLLMWebSocket on a shared client reports for its subscription.
 * @param {SubscriptionState} state
 * @param {SocketState} clientState
 * @returns {SocketState}
 */
function subscriptionSocketState(state, clientState) {
  if (state === "subscribed") return "open";
  if (state === "unsubscribed") return "closed";
  return clientState === "reconnecting" || clientState === "closed" ? "reconnecting" : "connecting";
}

/**
 * A user's LLM answers, streamed from `frames:{userId}`, with the seed's callbacks:
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
 *
 * With a `client` (a HeraldClient) it subscribes to `frames:{userId}` on that client's
 * socket instead of opening `/ws/frame-stream/{userId}/` for itself.
 */
export class SecureLLMWebSocket {
  /** @param {SecureLLMWebSocketOptions} options */
  constructor(options) {
    if (!options?.userId) throw new HeraldError("userId is required");
    this.baseUrl = httpBase(options.baseUrl);
    this.userId = options.userId;
    /** @type {typeof fetch | undefined} */
    this.fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    this.onStatusUpdate = options.onStatusUpdate ?? noop;
    this.onFrameUpdate = options.onFrameUpdate ?? noop;
    this.onToken = options.onToken ?? noop;
    this.onRestart = options.onRestart ?? noop;
    this.onFinalResponse = options.onFinalResponse ?? noop;
    this.onError = options.onError ?? noop;
    this.onAuthError = options.onAuthError ?? noop;
    this.onConnectionChange = options.onConnectionChange ?? noop;
    this._options = options;
    /** @type {Map<string, number>} */
    this._nextIndex = new Map();
    /** The shared client this stream rides on, if any. */
    /** @type {SharedClient | null} */
    this.client = options.client ?? null;
    /** Its subscription on the shared client, while connected. */
    /** @type {SharedSubscription | null} */
    this.subscription = null;
    /** @type {SocketState} */
    this._sharedState = "idle";
    /** Its own socket, when it has no shared client. */
    /** @type {HeraldSocket | null} */
    this.socket = null;
    if (!this.client) {
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
  }

  /** Opens the frame stream (on a shared client: subscribes, and connects the client if it is idle). Returns this. */
  connect() {
    if (this.socket) {
      this.socket.connect();
      return this;
    }
    const client = /** @type {SharedClient} */ (this.client);
    if (this.subscription && this.subscription.state !== "unsubscribed") return this;
    const options = this._options;
    const channel = `frames:${this.userId}`;
    const subscription = client.subscribe(channel, {
      since: options.since,
      epoch: options.epoch,
      onMessage: (message) => this._dispatch(message),
      onSubscribed: () => {
        if (client.welcome) safely(options.onOpen, client.welcome);
      },
      onRecovered: (message) => safely(options.onRecovered, message),
      onError: (error) => {
        if (error.code === 4003) safely(this.onAuthError, error);
        else safely(this.onError, error.message, { type: "connection", error });
      },
    });
    /** @param {SubscriptionState | SocketState} _state */
    const report = (_state) => {
      if (this.subscription !== subscription) return;
      const state = subscriptionSocketState(subscription.state, client.state);
      if (state === this._sharedState) return;
      this._sharedState = state;
      safely(this.onConnectionChange, state, { channel });
    };
    /** @param {CloseInfo} info */
    const onClose = (info) => {
      if (this.subscription === subscription) safely(options.onClose, info);
    };
    /** @param {HeraldError} error */
    const onAuthError = (error) => {
      if (this.subscription === subscription) safely(this.onAuthError, error);
    };
    subscription.on("state", report);
    client.on("state", report);
    client.on("close", onClose);
    client.on("authError", onAuthError);
    subscription.on("unsubscribed", () => {
      client.off("state", report);
      client.off("close", onClose);
      client.off("authError", onAuthError);
    });
    this.subscription = subscription;
    report(subscription.state);
    if (client.state === "idle" || client.state === "closed") client.connect();
    return this;
  }

  /** Closes the frame stream for good (on a shared client: unsubscribes; the client stays open). */
  close() {
    if (this.socket) {
      this.socket.close();
      return;
    }
    const subscription = this.subscription;
    if (subscription) {
      subscription.unsubscribe();
      this._sharedState = "closed";
      safely(this.onConnectionChange, "closed", { channel: subscription.channel });
    }
  }

  /** @returns {SocketState} */
  get state() {
    if (this.socket) return this.socket.state;
    return this.subscription ? subscriptionSocketState(this.subscription.state, /** @type {SharedClient} */ (this.client).state) : "idle";
  }

  /**
   * Starts an answer: `POST /api/chat/generate-response/`. Resolves to
   * `{task_id, chat_id, status}`; the answer arrives through the callbacks.
   * @param {GenerateRequest} request
   * @returns {Promise<TaskReceipt>}
   */
  async generate({ chatId, prompt, model }) {
    /** @type {Record<string, string>} */
    const body = { user_id: this.userId, chat_id: chatId, prompt };
    if (model) body.model = model;
    return this._api("POST", "/api/chat/generate-response/", body);
  }

  /**
   * Cancels a task: the stream ends with `llm_status cancelled`.
   * @param {string} taskId
   * @returns {Promise<TaskReceipt>}
   */
  async cancel(taskId) {
    return this._api("POST", `/api/chat/tasks/${encodeURIComponent(taskId)}/cancel`);
  }

  /** The token of the socket (own or shared), asking getToken() if there is none yet. */
  async _token() {
    const connection = /** @type {{ token: string | null, getToken: (() => string | Promise<string>) | null }} */ (this.socket ?? this.client);
    if (!connection.token && connection.getToken) connection.token = await connection.getToken();
    return connection.token;
  }

  /**
   * @param {string} method
   * @param {string} path
   * @param {unknown} [body]
   */
  async _api(method, path, body) {
    if (!this.fetch) throw new HeraldError("no fetch in this runtime: pass options.fetch");
    /** @type {Record<string, string>} */
    const headers = { Authorization: `Bearer ${await this._token()}` };
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

  /** @param {any} message */
  _dispatch(message) {
    switch (message.type) {
      case "llm_status": {
        const raw = /** @type {LlmStatusMessage} */ (message);
        if (raw.status === "restarted") {
          // The answer starts again: its frames count from index 0 once more.
          const key = raw.task_id ?? raw.chat_id;
          this._nextIndex.delete(key);
          safely(this.onRestart, key, raw);
        }
        safely(this.onStatusUpdate, raw.status, raw.message, raw);
        return;
      }
      case "llm_frame": {
        const raw = /** @type {LlmFrameMessage} */ (message);
        const frame = raw.frame ?? {};
        safely(this.onFrameUpdate, frame, raw);
        if (frame.status === "streaming" && typeof frame.index === "number") {
          const key = raw.task_id ?? raw.chat_id;
          const next = this._nextIndex.get(key) ?? 0;
          if (frame.index < next) return; // Already handed to onToken.
          this._nextIndex.set(key, frame.index + 1);
          safely(this.onToken, frame.delta ?? "", frame.index, raw);
        }
        return;
      }
      case "llm_response": {
        const raw = /** @type {LlmResponseMessage} */ (message);
        const data = raw.data ?? {};
        safely(this.onFinalResponse, data.response, data, raw);
        return;
      }
      case "llm_error": {
        const raw = /** @type {LlmErrorMessage} */ (message);
        safely(this.onError, raw.error, raw);
        return;
      }
      default:
        return;
    }
  }
}
