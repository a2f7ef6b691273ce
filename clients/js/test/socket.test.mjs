// HeraldSocket and SecureLLMWebSocket against a real herald: token transports, close
// codes (4001 with and without getToken, 4003, 4000, 4429), capped exponential backoff
// with full jitter, resume with since/epoch across server-side closes, heartbeats,
// refresh, and an LLM answer resumed mid-stream.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:net";

import { HeraldSocket, SecureLLMWebSocket, backoffDelay, tokenExpiry } from "../herald.js";
import { HERALD_URL, env, post, sleep, spyWebSocket, token, user, waitFor, wsUrl, WebSocket } from "./helpers.mjs";

/** A herald whose sockets are closed by the server every second (max connection age). */
const AGE_URL = env("HERALD_AGE_URL");

function collect(socket) {
  const seen = { messages: [], closes: [], states: [], recovered: [], errors: [], authErrors: [], system: [] };
  socket.onMessage = (m) => seen.messages.push(m);
  socket.onClose = (c) => seen.closes.push(c);
  socket.onStateChange = (s) => seen.states.push(s);
  socket.onRecovered = (r) => seen.recovered.push(r);
  socket.onError = (e) => seen.errors.push(e);
  socket.onAuthError = (e) => seen.authErrors.push(e);
  socket.onSystem = (m) => seen.system.push(m);
  return seen;
}

test("backoffDelay is full jitter over a capped exponential", () => {
  const options = { initialMs: 100, maxMs: 1000, factor: 2 };
  assert.deepEqual(
    [0, 1, 2, 3, 4, 5].map((n) => backoffDelay(n, options, () => 0.5)),
    [50, 100, 200, 400, 500, 500],
  );
  assert.equal(backoffDelay(7, options, () => 0), 0);
  for (let n = 0; n < 50; n += 1) {
    const delay = backoffDelay(n, options);
    assert.ok(delay >= 0 && delay < Math.min(1000, 100 * 2 ** n), `delay ${delay} for attempt ${n}`);
  }
});

test("tokenExpiry reads exp from a JWT", () => {
  const t = token("x", 60);
  const exp = tokenExpiry(t);
  assert.ok(Math.abs(exp - (Date.now() + 60000)) < 2000);
  assert.equal(tokenExpiry("not a jwt"), undefined);
});

test("without a WebSocket implementation on Node 20 the error says what to pass", { skip: typeof globalThis.WebSocket === "function" ? "this Node has a global WebSocket" : false }, () => {
  assert.throws(() => new HeraldSocket("ws://127.0.0.1:1/ws/notifications/"), /pass one in the options/);
});

test("connects with the token in the subprotocol, receives a notification with its offset", async () => {
  const alice = user("sub");
  const spy = spyWebSocket();
  const socket = new HeraldSocket(wsUrl(HERALD_URL, "/ws/notifications/"), { WebSocket: spy.WebSocket, token: token(alice) });
  const seen = collect(socket);
  socket.connect();
  await waitFor(() => socket.state === "open", "the welcome");
  assert.equal(socket.welcome.user_id, alice);
  assert.equal(socket.welcome.channel, `notifications:${alice}`);
  assert.deepEqual(seen.states, ["connecting", "open"]);
  const receipt = await post(HERALD_URL, `/api/v1/notifications/${alice}`, { title: "Hi", body: "there" });
  await waitFor(() => seen.messages.length === 1, "the notification");
  assert.equal(seen.messages[0].type, "notification");
  assert.deepEqual(seen.messages[0].notification, { title: "Hi", body: "there" });
  assert.equal(seen.messages[0].offset, receipt.offset);
  assert.deepEqual(socket.position, { epoch: socket.welcome.epoch, offset: receipt.offset });
  socket.close();
  assert.equal(socket.state, "closed");
  await sleep(200);
  assert.equal(spy.opened, 1, "close() must not reconnect");
});

test("the token can go in the query string instead", async () => {
  const bob = user("query");
  const socket = new HeraldSocket(wsUrl(HERALD_URL, "/ws/notifications/"), { WebSocket, token: token(bob), tokenTransport: "query" });
  socket.connect();
  await waitFor(() => socket.state === "open", "the welcome");
  assert.equal(socket.welcome.user_id, bob);
  socket.close();
});

test("4001: getToken() gives a fresh token and the socket reconnects", async () => {
  const carol = user("expired");
  let asked = 0;
  const socket = new HeraldSocket(wsUrl(HERALD_URL, "/ws/notifications/"), {
    WebSocket,
    token: token(carol, -3600),
    getToken: async () => {
      asked += 1;
      return token(carol);
    },
    backoffInitialMs: 50,
  });
  const seen = collect(socket);
  socket.connect();
  await waitFor(() => socket.state === "open", "a connection with the fresh token");
  assert.equal(asked, 1);
  assert.equal(seen.closes[0].code, 4001);
  assert.equal(seen.closes[0].willReconnect, true);
  assert.equal(seen.authErrors.length, 0);
  socket.close();
});

test("4001 without getToken stops and calls onAuthError", async () => {
  const spy = spyWebSocket();
  const socket = new HeraldSocket(wsUrl(HERALD_URL, "/ws/notifications/"), { WebSocket: spy.WebSocket, token: "not-a-jwt" });
  const seen = collect(socket);
  socket.connect();
  await waitFor(() => seen.authErrors.length === 1, "onAuthError");
  assert.equal(seen.authErrors[0].code, 4001);
  assert.equal(socket.state, "closed");
  await sleep(300);
  assert.equal(spy.opened, 1, "no reconnect after 4001 without getToken");
});

test("4003: another user's frame stream stops for good and calls onAuthError", async () => {
  const dave = user("forbidden");
  const spy = spyWebSocket();
  let asked = 0;
  const socket = new HeraldSocket(wsUrl(HERALD_URL, `/ws/frame-stream/${user("someone-else")}/`), {
    WebSocket: spy.WebSocket,
    token: token(dave),
    getToken: () => {
      asked += 1;
      return token(dave);
    },
  });
  const seen = collect(socket);
  socket.connect();
  await waitFor(() => seen.authErrors.length === 1, "onAuthError");
  assert.equal(seen.authErrors[0].code, 4003);
  assert.deepEqual(seen.closes.map((c) => [c.code, c.willReconnect]), [[4003, false]]);
  await sleep(300);
  assert.equal(spy.opened, 1, "no reconnect after 4003");
  assert.equal(asked, 0);
  assert.equal(socket.state, "closed");
});

test("4000: a malformed org id is a programming error: onError, no reconnect", async () => {
  const spy = spyWebSocket();
  const socket = new HeraldSocket(wsUrl(HERALD_URL, "/ws/events/bad%20org/"), { WebSocket: spy.WebSocket, token: token(user("bad")) });
  const seen = collect(socket);
  socket.connect();
  await waitFor(() => socket.state === "closed", "the socket to stop");
  assert.equal(seen.errors.at(-1).code, 4000);
  await sleep(300);
  assert.equal(spy.opened, 1);
});

test("4429: too many sockets backs off, then connects once a slot frees", async () => {
  // This herald allows 2 sockets per user.
  const erin = user("limit");
  const url = wsUrl(HERALD_URL, "/ws/notifications/");
  const held = [];
  for (let i = 0; i < 2; i += 1) {
    const ws = new WebSocket(url, ["herald.bearer", token(erin)]);
    await new Promise((resolve, reject) => {
      ws.once("message", resolve);
      ws.once("error", reject);
    });
    held.push(ws);
  }
  const socket = new HeraldSocket(url, { WebSocket, token: token(erin), backoffInitialMs: 40, backoffMaxMs: 400, random: () => 0.999 });
  const seen = collect(socket);
  socket.connect();
  await waitFor(() => seen.closes.length >= 3, "three refusals");
  assert.ok(seen.closes.every((c) => c.code === 4429 && c.willReconnect), JSON.stringify(seen.closes));
  const delays = seen.closes.slice(0, 3).map((c) => c.delayMs);
  assert.deepEqual(delays, [39, 79, 159], "exponential backoff from 40 ms");
  held[0].close();
  await waitFor(() => socket.state === "open", "a connection once a slot is free");
  socket.close();
  held[1].close();
});

test("backoff against a port with nothing listening: capped, and close() stops it", async () => {
  const port = await new Promise((resolve) => {
    const server = createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
  const spy = spyWebSocket();
  const socket = new HeraldSocket(`ws://127.0.0.1:${port}/ws/notifications/`, {
    WebSocket: spy.WebSocket,
    token: token("nobody"),
    backoffInitialMs: 20,
    backoffMaxMs: 160,
    random: () => 0.999,
  });
  const seen = collect(socket);
  socket.connect();
  await waitFor(() => seen.closes.length >= 6, "six failed attempts");
  assert.deepEqual(seen.closes.slice(0, 6).map((c) => c.delayMs), [19, 39, 79, 159, 159, 159]);
  assert.equal(socket.state, "reconnecting");
  socket.close();
  const opened = spy.opened;
  await sleep(400);
  assert.equal(spy.opened, opened, "no attempt after close()");
});

test("resume: messages published while the server keeps closing the socket arrive once each, in order", async () => {
  // AGE_URL closes every socket after about a second (HERALD_MAX_CONNECTION_AGE=1).
  const frank = user("resume");
  const socket = new HeraldSocket(wsUrl(AGE_URL, "/ws/notifications/"), { WebSocket, token: token(frank), backoffInitialMs: 20 });
  const seen = collect(socket);
  socket.connect();
  await waitFor(() => socket.state === "open", "the welcome");
  const total = 60;
  for (let i = 1; i <= total; i += 1) {
    await post(AGE_URL, `/api/v1/notifications/${frank}`, { n: i });
    await sleep(50);
  }
  await waitFor(() => seen.messages.length >= total, `${total} notifications`, 15000);
  await sleep(200);
  assert.deepEqual(seen.messages.map((m) => m.notification.n), Array.from({ length: total }, (_, i) => i + 1));
  assert.deepEqual(seen.messages.map((m) => m.offset), Array.from({ length: total }, (_, i) => i + 1));
  const ageCloses = seen.closes.filter((c) => c.code === 1000);
  assert.ok(ageCloses.length >= 2, `the server closed the socket at least twice (closes: ${JSON.stringify(seen.closes)})`);
  assert.ok(seen.recovered.length >= 2 && seen.recovered.every((r) => r.recovered), JSON.stringify(seen.recovered));
  socket.close();
});

test("since: 0 replays the channel's history on the first connect", async () => {
  const gina = user("history");
  for (let i = 1; i <= 3; i += 1) await post(HERALD_URL, `/api/v1/notifications/${gina}`, { n: i });
  const socket = new HeraldSocket(wsUrl(HERALD_URL, "/ws/notifications/"), { WebSocket, token: token(gina), since: 0 });
  const seen = collect(socket);
  socket.connect();
  await waitFor(() => seen.recovered.length === 1, "the recovered message");
  assert.deepEqual(seen.messages.map((m) => m.notification.n), [1, 2, 3]);
  assert.equal(seen.recovered[0].missed, 3);
  assert.equal(socket.offset, 3);
  socket.close();
});

test("heartbeats are answered, and refresh swaps the token in place", async () => {
  const hank = user("heartbeat");
  const spy = spyWebSocket();
  const socket = new HeraldSocket(wsUrl(HERALD_URL, "/ws/notifications/"), {
    WebSocket: spy.WebSocket,
    token: token(hank),
    heartbeatIntervalMs: 250,
    heartbeatTimeoutMs: 1000,
  });
  const seen = collect(socket);
  socket.connect();
  await waitFor(() => spy.received.filter((m) => JSON.parse(m).type === "heartbeat_ack").length >= 3, "three heartbeat acks");
  assert.equal(socket.state, "open");
  assert.equal(spy.opened, 1, "heartbeats keep one connection");
  const fresh = token(hank, 7200);
  socket.refresh(fresh);
  await waitFor(() => seen.system.some((m) => m.status === "refreshed"), "the refreshed message");
  assert.equal(socket.token, fresh);
  socket.close();
});

test("SecureLLMWebSocket streams an answer token by token with the seed's callbacks", async () => {
  const ivy = user("llm");
  const statuses = [];
  const frames = [];
  const tokens = [];
  let final = null;
  const llm = new SecureLLMWebSocket({
    baseUrl: HERALD_URL,
    userId: ivy,
    token: token(ivy),
    WebSocket,
    onStatusUpdate: (status) => statuses.push(status),
    onFrameUpdate: (frame) => frames.push(frame),
    onToken: (delta, index) => tokens.push([index, delta]),
    onFinalResponse: (response, data) => {
      final = { response, data };
    },
  });
  llm.connect();
  await waitFor(() => llm.state === "open", "the frame stream");
  const prompt = "hello from the node test";
  const receipt = await llm.generate({ chatId: "chat-1", prompt });
  assert.equal(receipt.status, "queued");
  await waitFor(() => statuses.includes("completed"), "the completed status");
  assert.equal(final.response, `Echo: ${prompt}`);
  assert.equal(final.data.event, "response_generated");
  assert.deepEqual(tokens.map(([i]) => i), tokens.map((_, i) => i));
  assert.equal(tokens.map(([, d]) => d).join(""), final.response);
  assert.deepEqual(statuses, ["started", "thinking", "streaming", "completed"]);
  assert.deepEqual(frames[0], { status: "thinking", message: "LLM is generating response...", progress: "indeterminate" });
  llm.close();
});

test("SecureLLMWebSocket resumes mid-answer across server closes with no lost or repeated token", async () => {
  // On AGE_URL the socket is closed every second; a 150-word echo takes about 3 s.
  const jill = user("llm-resume");
  const tokens = [];
  const closes = [];
  let final = null;
  const llm = new SecureLLMWebSocket({
    baseUrl: AGE_URL,
    userId: jill,
    token: token(jill),
    WebSocket,
    backoffInitialMs: 20,
    onToken: (delta, index) => tokens.push([index, delta]),
    onFinalResponse: (response) => {
      final = response;
    },
    onClose: (info) => closes.push(info),
  });
  llm.connect();
  await waitFor(() => llm.state === "open", "the frame stream");
  const words = Array.from({ length: 150 }, (_, i) => `w${i}`);
  await llm.generate({ chatId: "long", prompt: words.join(" ") });
  await waitFor(() => final !== null, "the final response", 20000);
  const closesBeforeEnd = closes.filter((c) => c.code === 1000).length;
  assert.ok(closesBeforeEnd >= 2, `the stream was cut at least twice (${JSON.stringify(closes)})`);
  assert.equal(final, `Echo: ${words.join(" ")}`);
  assert.deepEqual(tokens.map(([i]) => i), Array.from({ length: tokens.length }, (_, i) => i), "every index once, in order");
  assert.equal(tokens.map(([, d]) => d).join(""), final);
  llm.close();
});

test("SecureLLMWebSocket starts an answer again from index 0 after llm_status restarted", async () => {
  const lee = user("llm-restart");
  const tokens = [];
  const restarts = [];
  let final = null;
  const llm = new SecureLLMWebSocket({
    baseUrl: HERALD_URL,
    userId: lee,
    token: token(lee),
    WebSocket,
    onToken: (delta, index) => tokens.push([index, delta]),
    onRestart: (taskId) => restarts.push(taskId),
    onFinalResponse: (response) => {
      final = response;
    },
  });
  llm.connect();
  await waitFor(() => llm.state === "open", "the frame stream");
  // As a worker that took the task over with a different answer sends it.
  const base = { chat_id: "c", task_id: "t1" };
  const frame = (index, delta) => ({ ...base, type: "llm_frame", frame: { status: "streaming", delta, index } });
  for (const message of [
    { ...base, type: "llm_status", status: "streaming", message: "Streaming response" },
    frame(0, "Old"),
    frame(1, " start"),
    { ...base, type: "llm_status", status: "restarted", message: "The answer was interrupted and starts again" },
    frame(0, "New"),
    frame(1, " answer"),
    { ...base, type: "llm_response", data: { event: "response_generated", response: "New answer" } },
  ]) {
    await post(HERALD_URL, `/api/v1/frame-stream/${lee}`, message);
  }
  await waitFor(() => final !== null, "the final response");
  assert.deepEqual(restarts, ["t1"]);
  assert.deepEqual(tokens, [[0, "Old"], [1, " start"], [0, "New"], [1, " answer"]]);
  assert.equal(tokens.slice(2).map(([, d]) => d).join(""), final);
  llm.close();
});

test("the token is refreshed in place before it expires", async () => {
  const kim = user("refresh");
  let asked = 0;
  const spy = spyWebSocket();
  const socket = new HeraldSocket(wsUrl(HERALD_URL, "/ws/notifications/"), {
    WebSocket: spy.WebSocket,
    token: token(kim, 3),
    // Ask for a new token 2.5 s before the 3 s token expires.
    refreshBeforeExpiryMs: 2500,
    getToken: () => {
      asked += 1;
      return token(kim, 3600);
    },
  });
  const seen = collect(socket);
  socket.connect();
  await waitFor(() => seen.system.some((m) => m.status === "refreshed"), "a refresh before expiry", 5000);
  assert.equal(asked, 1);
  assert.equal(spy.opened, 1, "refreshed without reconnecting");
  const refreshed = seen.system.find((m) => m.status === "refreshed");
  assert.ok(Date.parse(refreshed.expires_at) > Date.now() + 3000_000, refreshed.expires_at);
  socket.close();
});

test("a server that stops answering heartbeats is treated as gone and reconnected", async () => {
  // Not herald: a WebSocket server that welcomes and then never answers, as a dead
  // network path looks to a browser (no close frame, no error).
  const { WebSocketServer } = await import("ws");
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0, handleProtocols: () => "herald.bearer" });
  await new Promise((resolve) => server.once("listening", resolve));
  let connections = 0;
  server.on("connection", (ws) => {
    connections += 1;
    ws.send(JSON.stringify({ type: "system", status: "connected", epoch: "e", offset: 0 }));
  });
  const socket = new HeraldSocket(`ws://127.0.0.1:${server.address().port}/ws/notifications/`, {
    WebSocket,
    token: token("silent"),
    heartbeatIntervalMs: 100,
    heartbeatTimeoutMs: 200,
  });
  const seen = collect(socket);
  socket.connect();
  await waitFor(() => connections >= 2, "a reconnect after the heartbeat timeout", 5000);
  assert.deepEqual(seen.closes[0], { code: 1006, reason: "heartbeat timeout", willReconnect: true, delayMs: 0 });
  socket.close();
  await new Promise((resolve) => server.close(resolve));
});
