// close() on a socket that is still connecting. Its own file, so its Node process has
// nothing else running: an uncaught error from the abandoned handshake fails it.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:net";
import WebSocket from "ws";

import { HeraldSocket } from "../herald.js";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

test("close() while the socket is still connecting raises nothing", async () => {
  // A server that accepts the TCP connection and never answers the upgrade.
  const server = createServer(() => {});
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const socket = new HeraldSocket(`ws://127.0.0.1:${server.address().port}/ws/notifications/`, {
    WebSocket,
    token: "not.a.token",
  });
  socket.connect();
  await sleep(100);
  socket.close();
  await sleep(200);
  assert.equal(socket.state, "closed");
  server.close();
});
