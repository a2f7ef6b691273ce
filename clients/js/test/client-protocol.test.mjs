// HeraldClient's side of the `/ws/` protocol (SPEC §11) against a scripted WebSocket
// server, for the answers a real herald gives only under faults or limits: a
// subscription refused with 4429 and asked again with backoff, `recovered:false` in band
// (a channel's sequence lost under an open socket), a late `unsubscribed` for an old
// subscription, and the exact `subscribe` each subscription sends after a reconnect.
// The same client against a real herald is in client.test.mjs.
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket, { WebSocketServer } from "ws";

import { HeraldClient, HeraldError } from "../herald.js";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitFor(predicate, what, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(5);
  }
}

/**
 * A server speaking the shapes of SPEC §11. `onMessage(socket, message)` answers each
 * client message; `sent` records what clients sent, `sockets` the open ones.
 */
async function scriptedServer(onMessage) {
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0, handleProtocols: () => "herald.bearer" });
  await new Promise((resolve) => server.once("listening", resolve));
  const state = { sent: [], sockets: [], connections: 0 };
  server.on("connection", (ws) => {
    state.connections += 1;
    state.sockets.push(ws);
    ws.send(JSON.stringify({ type: "system", status: "connected", connection_id: `c${state.connections}`, user_id: "u1", timestamp: new Date().toISOString() }));
    ws.on("message", (data) => {
      const message = JSON.parse(String(data));
      state.sent.push(message);
      onMessage(ws, message, state);
    });
  });
  state.url = `ws://127.0.0.1:${server.address().port}/ws/`;
  state.close = () => new Promise((resolve) => server.close(resolve));
  state.send = (ws, message) => ws.send(JSON.stringify(message));
  return state;
}

/** Accepts every subscription at (epoch "e1", offset 10). */
function accept(ws, message) {
  if (message.type === "subscribe") {
    ws.send(JSON.stringify({ type: "subscribed", channel: message.channel, id: message.id, epoch: "e1", offset: 10, read_offset: 4 }));
  } else if (message.type === "unsubscribe") {
    ws.send(JSON.stringify({ type: "unsubscribed", channel: message.channel, id: message.id }));
  }
}

const published = (channel, offset, epoch = "e1") => ({
  type: "notification",
  notification: { n: offset },
  channel,
  id: `m${offset}`,
  offset,
  epoch,
  timestamp: new Date().toISOString(),
});

test("each subscription resumes from its own position after a reconnect", async () => {
  const server = await scriptedServer(accept);
  const client = new HeraldClient(server.url, { WebSocket, token: "t", backoffInitialMs: 10 });
  const a = client.subscribe("notifications:u1");
  const b = client.subscribe("org:acme", { since: 3, epoch: "e0" });
  client.connect();
  await waitFor(() => a.state === "subscribed" && b.state === "subscribed", "both subscribed");
  assert.deepEqual(
    server.sent.filter((m) => m.type === "subscribe").map(({ id, ...rest }) => rest),
    [{ type: "subscribe", channel: "notifications:u1" }, { type: "subscribe", channel: "org:acme", since: 3, epoch: "e0" }],
  );
  assert.deepEqual(a.position, { epoch: "e1", offset: 10 }, "a fresh subscription starts at subscribed's position");
  assert.deepEqual(b.position, { epoch: "e0", offset: 3 }, "a resuming one keeps its own until the replay");
  assert.equal(a.readOffset, 4);
  server.send(server.sockets[0], published("notifications:u1", 11));
  server.send(server.sockets[0], published("org:acme", 4, "e0"));
  server.send(server.sockets[0], { type: "system", status: "recovered", channel: "org:acme", recovered: true, missed: 1, epoch: "e0", offset: 4 });
  await waitFor(() => a.offset === 11 && b.offset === 4, "both positions to move");
  server.sent.length = 0;
  server.sockets[0].close(1000, "max connection age");
  await waitFor(() => server.sent.filter((m) => m.type === "subscribe").length === 2, "both subscriptions renewed");
  assert.deepEqual(
    server.sent.map(({ id, ...rest }) => rest).sort((x, y) => x.channel.localeCompare(y.channel)),
    [
      { type: "subscribe", channel: "notifications:u1", since: 11, epoch: "e1" },
      { type: "subscribe", channel: "org:acme", since: 4, epoch: "e0" },
    ],
  );
  assert.equal(server.connections, 2);
  client.close();
  await server.close();
});

test("subscribe_error 4429 is asked again with backoff; 4003 ends the subscription and leaves the socket open", async () => {
  let refusals = 0;
  const server = await scriptedServer((ws, message) => {
    if (message.type !== "subscribe") return;
    if (message.channel === "org:busy" && refusals < 2) {
      refusals += 1;
      ws.send(JSON.stringify({ type: "subscribe_error", channel: message.channel, id: message.id, code: 4429, error: "too_many_subscriptions", message: "too many" }));
    } else if (message.channel === "org:other") {
      ws.send(JSON.stringify({ type: "subscribe_error", channel: message.channel, id: message.id, code: 4003, error: "forbidden", message: "not a member of other" }));
    } else {
      accept(ws, message);
    }
  });
  const client = new HeraldClient(server.url, { WebSocket, token: "t", backoffInitialMs: 40, random: () => 0.999 });
  const clientErrors = [];
  client.on("error", (e) => clientErrors.push(e));
  client.connect();
  await client.connected();
  const busyErrors = [];
  const started = Date.now();
  const busy = client.subscribe("org:busy", { onError: (e) => busyErrors.push(e) });
  const forbidden = client.subscribe("org:other");
  const ended = [];
  forbidden.on("unsubscribed", (info) => ended.push(info));
  await waitFor(() => busy.state === "subscribed", "the busy subscription to go through");
  assert.ok(Date.now() - started >= 39 + 79, "it waited 39 then 79 ms before asking again");
  assert.deepEqual(busyErrors.map((e) => e.code), [4429, 4429]);
  assert.ok(busyErrors[0] instanceof HeraldError);
  assert.equal(busyErrors[0].channel, "org:busy");
  await waitFor(() => forbidden.state === "unsubscribed", "the forbidden subscription to end");
  assert.deepEqual(ended, [{ code: 4003, reason: "not a member of other", error: "forbidden" }]);
  assert.equal(client.subscription("org:other"), undefined);
  assert.equal(client.state, "open", "a refusal leaves the socket open");
  assert.ok(clientErrors.some((e) => e.code === 4003 && e.channel === "org:other"));
  client.close();
  await server.close();
});

test("recovered:false in band moves the subscription to the new epoch and tells the app", async () => {
  const server = await scriptedServer(accept);
  const client = new HeraldClient(server.url, { WebSocket, token: "t", backoffInitialMs: 10, shutdownDelayMaxMs: 20 });
  const seen = [];
  const recovered = [];
  const sub = client.subscribe("org:acme", { onMessage: (m) => seen.push([m.epoch, m.offset]), onRecovered: (m) => recovered.push(m) });
  client.connect();
  await waitFor(() => sub.state === "subscribed", "subscribed");
  const ws = server.sockets[0];
  server.send(ws, published("org:acme", 11));
  server.send(ws, published("org:acme", 11)); // a repeat is dropped
  server.send(ws, { type: "system", status: "recovered", recovered: false, channel: "org:acme", epoch: "e2", offset: 0 });
  server.send(ws, published("org:acme", 1, "e2"));
  await waitFor(() => seen.length === 2, "two messages");
  assert.deepEqual(seen, [["e1", 11], ["e2", 1]]);
  assert.equal(recovered.length, 1);
  assert.equal(recovered[0].recovered, false);
  assert.deepEqual(sub.position, { epoch: "e2", offset: 1 });
  server.sent.length = 0;
  ws.close(1001, "going away");
  await waitFor(() => server.sent.some((m) => m.type === "subscribe"), "the renewed subscription");
  assert.deepEqual(server.sent.find((m) => m.type === "subscribe").since, 1);
  assert.deepEqual(server.sent.find((m) => m.type === "subscribe").epoch, "e2");
  client.close();
  await server.close();
});

test("unsubscribed: an old id's answer does not end a new subscription; herald's 4003 does", async () => {
  const server = await scriptedServer((ws, message) => {
    // Answers unsubscribe late, after the next subscribe has been accepted.
    if (message.type === "unsubscribe") {
      setTimeout(() => ws.send(JSON.stringify({ type: "unsubscribed", channel: message.channel, id: message.id })), 50);
    } else {
      accept(ws, message);
    }
  });
  const client = new HeraldClient(server.url, { WebSocket, token: "t" });
  client.connect();
  await client.connected();
  const first = client.subscribe("org:acme");
  await waitFor(() => first.state === "subscribed", "subscribed");
  assert.throws(() => client.subscribe("org:acme"), /already subscribed to org:acme/);
  first.unsubscribe();
  assert.equal(first.state, "unsubscribed");
  assert.deepEqual(first.ended, { code: 1000, reason: "unsubscribed by the client" });
  const second = client.subscribe("org:acme");
  const seen = [];
  second.on("message", (m) => seen.push(m.offset));
  await waitFor(() => second.state === "subscribed", "subscribed again");
  await sleep(100);
  assert.equal(second.state, "subscribed", "the late answer to the first unsubscribe is not the second's");
  server.send(server.sockets[0], published("org:acme", 11));
  await waitFor(() => seen.length === 1, "a message");
  const ended = [];
  second.on("unsubscribed", (info) => ended.push(info));
  server.send(server.sockets[0], { type: "unsubscribed", channel: "org:acme", code: 4003, reason: "membership revoked" });
  await waitFor(() => second.state === "unsubscribed", "herald to end it");
  assert.deepEqual(ended, [{ code: 4003, reason: "membership revoked" }]);
  server.send(server.sockets[0], published("org:acme", 12));
  await sleep(50);
  assert.deepEqual(seen, [11], "nothing after the end");
  client.close();
  await server.close();
});

test("connected() and the async iterators end with the client", async () => {
  const server = await scriptedServer(accept);
  const client = new HeraldClient(server.url, { WebSocket, token: "t" });
  const early = client.connected();
  client.connect();
  const welcome = await early;
  assert.equal(welcome.user_id, "u1");
  assert.equal(await client.connected(), welcome, "at once when open");
  const sub = client.subscribe("notifications:u1");
  await waitFor(() => sub.state === "subscribed", "subscribed");
  const all = [];
  const mine = [];
  const reading = (async () => {
    for await (const message of client) all.push(message.offset);
  })();
  const readingSub = (async () => {
    for await (const message of sub) mine.push(message.offset);
  })();
  for (let offset = 11; offset <= 13; offset += 1) server.send(server.sockets[0], published("notifications:u1", offset));
  await waitFor(() => all.length === 3 && mine.length === 3, "three messages on both iterators");
  client.close();
  await reading;
  await readingSub;
  assert.deepEqual(all, [11, 12, 13]);
  assert.equal(sub.state, "unsubscribed", "closing the client ends its subscriptions");
  await assert.rejects(client.connected(), (err) => err instanceof HeraldError && /closed/.test(err.message), "a closed client is not going to connect");
  await server.close();
});

test("a fatal close rejects connected() and ends every subscription", async () => {
  // A server whose every socket is closed with 4000 right after the welcome.
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0, handleProtocols: () => "herald.bearer" });
  await new Promise((resolve) => wss.once("listening", resolve));
  wss.on("connection", (ws) => ws.close(4000, "bad request"));
  const client = new HeraldClient(`ws://127.0.0.1:${wss.address().port}/ws/`, { WebSocket, token: "t" });
  const sub = client.subscribe("notifications:u1");
  const pending = client.connected();
  client.connect();
  await assert.rejects(pending, /4000/);
  assert.equal(client.state, "closed");
  assert.equal(sub.state, "unsubscribed");
  assert.equal(sub.ended.code, 4000);
  await new Promise((resolve) => wss.close(resolve));
});
