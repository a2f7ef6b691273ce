// HeraldClient against a real herald's `/ws/` endpoint (SPEC §11): one socket carrying a
// user's notifications, an org's events and their LLM stream; refusals that leave the
// socket open (4003 not a member, 4000 bad channel); unsubscribe; a membership removed
// under an open subscription (unsubscribed 4003); every subscription resumed from its
// own position across server-side closes; `since: 0`; a SecureLLMWebSocket riding on
// the shared client. Started by the Rust test `clients::js_client_against_real_herald`.
import { test } from "node:test";
import assert from "node:assert/strict";

import { HeraldClient, HeraldError, SecureLLMWebSocket } from "../herald.js";
import { API_KEY, HERALD_URL, env, post, sleep, spyWebSocket, token, user, waitFor, wsUrl } from "./helpers.mjs";

/** A herald whose sockets are closed by the server every second (max connection age). */
const AGE_URL = env("HERALD_AGE_URL");

async function call(base, method, path) {
  const response = await fetch(base + path, { method, headers: { Authorization: `Bearer ${API_KEY}` } });
  if (!response.ok) throw new Error(`${method} ${path} answered ${response.status}: ${await response.text()}`);
}
const addMember = (base, org, who) => call(base, "PUT", `/api/v1/orgs/${org}/members/${who}`);
const removeMember = (base, org, who) => call(base, "DELETE", `/api/v1/orgs/${org}/members/${who}`);

function sentBy(spy) {
  return spy.sent.map((text) => JSON.parse(text));
}

test("one socket carries notifications, org events and the LLM stream", async () => {
  const ann = user("multi");
  const org = user("org");
  await addMember(HERALD_URL, org, ann);
  const spy = spyWebSocket();
  const client = new HeraldClient(wsUrl(HERALD_URL, "/ws/"), { WebSocket: spy.WebSocket, token: token(ann) });
  const states = [];
  client.on("state", (state) => states.push(state));
  const all = [];
  client.on("message", (message, subscription) => all.push([subscription.channel, message.type]));
  client.connect();
  const welcome = await client.connected();
  assert.equal(welcome.user_id, ann);
  assert.deepEqual(states, ["connecting", "open"]);

  const notifications = client.subscribe(`notifications:${ann}`);
  const events = client.subscribe(`org:${org}`);
  const frames = client.subscribe(`frames:${ann}`);
  await waitFor(() => client.subscriptions.every((s) => s.state === "subscribed"), "three subscriptions");
  const iterated = [];
  const reading = (async () => {
    for await (const message of events) iterated.push(message.event_type);
  })();

  const n = await post(HERALD_URL, `/api/v1/notifications/${ann}`, { title: "Hi" });
  const e = await post(HERALD_URL, `/api/v1/orgs/${org}/events`, { event_type: "resource.created", data: { id: 1 } });
  const f = await post(HERALD_URL, `/api/v1/frame-stream/${ann}`, { type: "llm_status", chat_id: "c1", status: "started", message: "Task started" });
  await waitFor(() => all.length === 3, "one message on each channel");
  assert.deepEqual(all.sort(), [
    [`frames:${ann}`, "llm_status"],
    [`notifications:${ann}`, "notification"],
    [`org:${org}`, "org_event"],
  ]);
  assert.equal(notifications.offset, n.offset);
  assert.equal(events.offset, e.offset);
  assert.equal(frames.offset, f.offset);
  await waitFor(() => iterated.length === 1, "the iterator");
  assert.deepEqual(iterated, ["resource.created"]);
  assert.equal(spy.opened, 1, "one socket for the three channels");
  events.unsubscribe();
  await reading;
  client.close();
});

test("refusals leave the socket open: 4003 for an org the user is not in, 4000 for a bad channel", async () => {
  const ben = user("refused");
  const client = new HeraldClient(wsUrl(HERALD_URL, "/ws/"), { WebSocket: spyWebSocket().WebSocket, token: token(ben) });
  client.connect();
  await client.connected();
  const errors = [];
  const forbidden = client.subscribe(`org:${user("not-mine")}`, { onError: (err) => errors.push(err) });
  const other = client.subscribe(`notifications:${user("someone-else")}`, { onError: (err) => errors.push(err) });
  const bad = client.subscribe("nonsense:x", { onError: (err) => errors.push(err) });
  const mine = client.subscribe(`notifications:${ben}`);
  await waitFor(() => [forbidden, other, bad].every((s) => s.state === "unsubscribed"), "the refusals");
  assert.equal(forbidden.ended.code, 4003);
  assert.equal(other.ended.code, 4003, "another user's notifications are forbidden");
  assert.equal(bad.ended.code, 4000);
  assert.ok(errors.every((err) => err instanceof HeraldError));
  await waitFor(() => mine.state === "subscribed", "the allowed subscription");
  assert.equal(client.state, "open");
  const received = [];
  mine.on("message", (m) => received.push(m));
  try {
    await post(HERALD_URL, `/api/v1/notifications/${ben}`, { still: "open" });
    await waitFor(() => received.length === 1, "the notification");
    assert.deepEqual(received[0].notification, { still: "open" });
  } finally {
    client.close();
  }
});

test("unsubscribe stops a channel; a removed membership ends only that subscription", async () => {
  const cat = user("unsub");
  const orgA = user("orga");
  const orgB = user("orgb");
  await addMember(HERALD_URL, orgA, cat);
  await addMember(HERALD_URL, orgB, cat);
  const spy = spyWebSocket();
  const client = new HeraldClient(wsUrl(HERALD_URL, "/ws/"), { WebSocket: spy.WebSocket, token: token(cat) });
  client.connect();
  const seen = [];
  const a = client.subscribe(`org:${orgA}`, { onMessage: (m) => seen.push(["a", m.data.n]) });
  const b = client.subscribe(`org:${orgB}`, { onMessage: (m) => seen.push(["b", m.data.n]) });
  const notes = client.subscribe(`notifications:${cat}`, { onMessage: (m) => seen.push(["n", m.notification.n]) });
  await waitFor(() => client.subscriptions.every((s) => s.state === "subscribed"), "three subscriptions");

  a.unsubscribe();
  await waitFor(() => spy.received.some((text) => JSON.parse(text).type === "unsubscribed"), "herald's answer to unsubscribe");
  const answer = spy.received.map((text) => JSON.parse(text)).find((m) => m.type === "unsubscribed");
  assert.equal(answer.channel, `org:${orgA}`);
  await post(HERALD_URL, `/api/v1/orgs/${orgA}/events`, { event_type: "x", data: { n: 1 } });
  await post(HERALD_URL, `/api/v1/orgs/${orgB}/events`, { event_type: "x", data: { n: 2 } });
  await waitFor(() => seen.length === 1, "org B's event");
  assert.deepEqual(seen, [["b", 2]], "nothing of org A after unsubscribe");

  const ended = [];
  b.on("unsubscribed", (info) => ended.push(info));
  await removeMember(HERALD_URL, orgB, cat);
  await waitFor(() => b.state === "unsubscribed", "herald to end the org B subscription");
  assert.equal(ended[0].code, 4003);
  assert.equal(client.state, "open", "the socket stays open");
  assert.equal(notes.state, "subscribed");
  await post(HERALD_URL, `/api/v1/notifications/${cat}`, { n: 3 });
  await waitFor(() => seen.length === 2, "the notification");
  assert.deepEqual(seen[1], ["n", 3]);
  assert.equal(spy.opened, 1);
  client.close();
});

test("after server closes, every subscription resumes from its own position: each message once, in order", async () => {
  // AGE_URL closes every socket after about a second (HERALD_MAX_CONNECTION_AGE=1).
  const dan = user("resume");
  const org = user("resume-org");
  await addMember(AGE_URL, org, dan);
  const spy = spyWebSocket();
  const client = new HeraldClient(wsUrl(AGE_URL, "/ws/"), { WebSocket: spy.WebSocket, token: token(dan), backoffInitialMs: 20 });
  const closes = [];
  client.on("close", (info) => closes.push(info));
  const notes = [];
  const events = [];
  client.subscribe(`notifications:${dan}`, { onMessage: (m) => notes.push(m) });
  client.subscribe(`org:${org}`, { onMessage: (m) => events.push(m) });
  client.connect();
  await waitFor(() => client.subscriptions.every((s) => s.state === "subscribed"), "both subscriptions");
  const total = 40;
  for (let i = 1; i <= total; i += 1) {
    await post(AGE_URL, `/api/v1/notifications/${dan}`, { n: i });
    if (i % 2 === 0) await post(AGE_URL, `/api/v1/orgs/${org}/events`, { event_type: "tick", data: { n: i / 2 } });
    await sleep(50);
  }
  await waitFor(() => notes.length >= total && events.length >= total / 2, "every message", 15000);
  await sleep(200);
  assert.deepEqual(notes.map((m) => m.notification.n), Array.from({ length: total }, (_, i) => i + 1));
  assert.deepEqual(events.map((m) => m.data.n), Array.from({ length: total / 2 }, (_, i) => i + 1));
  assert.ok(closes.filter((c) => c.code === 1000).length >= 2, `herald closed the socket at least twice: ${JSON.stringify(closes)}`);
  const resumed = sentBy(spy).filter((m) => m.type === "subscribe" && m.since !== undefined);
  assert.ok(resumed.length >= 4, "each reconnect renewed both subscriptions with since");
  assert.ok(resumed.every((m) => typeof m.epoch === "string"), "and with their epoch");
  client.close();
});

test("since: 0 replays a channel's history, then recovered", async () => {
  const eve = user("history");
  for (let i = 1; i <= 3; i += 1) await post(HERALD_URL, `/api/v1/notifications/${eve}`, { n: i });
  const client = new HeraldClient(wsUrl(HERALD_URL, "/ws/"), { WebSocket: spyWebSocket().WebSocket, token: token(eve) });
  const seen = [];
  const recovered = [];
  const sub = client.subscribe(`notifications:${eve}`, { since: 0, onMessage: (m) => seen.push(m.notification.n), onRecovered: (m) => recovered.push(m) });
  client.connect();
  await waitFor(() => recovered.length === 1, "recovered");
  assert.deepEqual(seen, [1, 2, 3]);
  assert.equal(recovered[0].recovered, true);
  assert.equal(recovered[0].channel, `notifications:${eve}`);
  assert.equal(sub.offset, 3);
  client.close();
});

test("SecureLLMWebSocket rides on a shared client: an answer streams beside the notifications", async () => {
  const fay = user("shared-llm");
  const spy = spyWebSocket();
  const client = new HeraldClient(wsUrl(HERALD_URL, "/ws/"), { WebSocket: spy.WebSocket, token: token(fay) });
  const notes = [];
  client.subscribe(`notifications:${fay}`, { onMessage: (m) => notes.push(m) });
  const tokens = [];
  const statuses = [];
  const connection = [];
  let final = null;
  const llm = new SecureLLMWebSocket({
    client,
    baseUrl: HERALD_URL,
    userId: fay,
    onToken: (delta, index) => tokens.push([index, delta]),
    onStatusUpdate: (status) => statuses.push(status),
    onFinalResponse: (response) => {
      final = response;
    },
    onConnectionChange: (state) => connection.push(state),
  });
  assert.equal(llm.socket, null);
  llm.connect();
  await waitFor(() => llm.state === "open", "the frame subscription");
  assert.deepEqual(connection, ["connecting", "open"]);
  const prompt = "hello over a shared socket";
  await llm.generate({ chatId: "shared", prompt });
  await post(HERALD_URL, `/api/v1/notifications/${fay}`, { during: "the answer" });
  await waitFor(() => statuses.includes("completed"), "the completed status");
  assert.equal(final, `Echo: ${prompt}`);
  assert.deepEqual(tokens.map(([i]) => i), tokens.map((_, i) => i));
  assert.equal(tokens.map(([, d]) => d).join(""), final);
  await waitFor(() => notes.length === 1, "the notification");
  assert.equal(spy.opened, 1, "the answer and the notification came over one socket");
  llm.close();
  assert.equal(llm.state, "closed");
  assert.equal(client.state, "open", "closing the stream leaves the shared client open");
  assert.equal(client.subscription(`frames:${fay}`), undefined);
  client.close();
});
