// The demo page in headless Chromium (Debian's `chromium`, driven by playwright-core),
// against real `herald serve` processes:
//
// 1. dev mode: the page mints a token for a typed user name and two orgs and opens one
//    socket to /ws/ with four subscriptions (notifications, both orgs' events, the LLM
//    stream); a notification and events of both orgs published over HTTP appear, and so
//    do the page's own test notification and test events;
// 2. a prompt typed in the chat box streams token by token, and the final answer is
//    the echo provider's;
// 2b. a second tab as the same user, with the default HERALD_MAX_CONNECTIONS_PER_USER
//    of 3: both tabs receive a notification, an org event and a streamed answer;
// 3. a rolling restart: two nodes share a private Redis. The page and its sockets are on
//    node A; its chat call goes to node B (the test routes it there, as a load balancer
//    in front of an API tier would; herald's task queue is still per node). Mid-answer,
//    node A gets SIGTERM and closes the sockets with 1001; node A is started again on
//    the same port; the client reconnects, resumes with since/epoch from the shared
//    history, and completes the answer with every token exactly once;
// 4. the README's browser snippet runs as written on the page's origin;
// 5. with configured secrets, the page takes a pasted token and /dev/… is 404; while
//    the user's connection slots are all taken, the page's socket is refused (4429)
//    and Send stays disabled until a slot frees and the LLM stream is subscribed;
// 6. cross-origin: a page served by another server (another port, so another origin,
//    listed in HERALD_ALLOWED_ORIGINS) imports the client from herald and streams an
//    answer with SecureLLMWebSocket.generate(), whose POST needs a CORS preflight.
//
// A screenshot is saved in $ARTIFACT_DIR (printed at the end).
//
// Environment: HERALD_BIN (the herald binary), ARTIFACT_DIR, and optionally CHROMIUM
// (default /usr/bin/chromium) and REDIS_SERVER (default redis-server on PATH).
import { spawn } from "node:child_process";
import { createServer as createHttpServer } from "node:http";
import { mkdtempSync, readFileSync, rmSync, mkdirSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";

import { chromium } from "playwright-core";
import WebSocket from "ws";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../../..");
const HERALD_BIN = required("HERALD_BIN");
const ARTIFACT_DIR = required("ARTIFACT_DIR");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const REDIS_SERVER = process.env.REDIS_SERVER || "redis-server";

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`${name} is not set: run this through \`cargo test -p herald --test it clients\``);
    process.exit(2);
  }
  return value;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const started = Date.now();
const step = (text) => console.log(`[browser ${((Date.now() - started) / 1000).toFixed(1)}s] ${text}`);

async function waitFor(predicate, what, timeoutMs = 15000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(25);
  }
}

function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

const children = new Set();
function cleanup() {
  for (const child of children) child.kill("SIGKILL");
}
process.on("exit", cleanup);

/** Starts a process and collects its output; `lines` grows as it prints. */
function start(name, command, args, options) {
  const child = spawn(command, args, { ...options, stdio: ["ignore", "pipe", "pipe"] });
  const proc = { name, child, lines: [], stderr: "", exited: null };
  children.add(child);
  let partial = "";
  child.stdout.on("data", (chunk) => {
    partial += chunk;
    const parts = partial.split("\n");
    partial = parts.pop();
    proc.lines.push(...parts);
  });
  child.stderr.on("data", (chunk) => {
    proc.stderr += chunk;
  });
  child.on("exit", (code, signal) => {
    children.delete(child);
    proc.exited = { code, signal };
  });
  child.on("error", (err) => {
    proc.exited = { code: -1, signal: null, error: err.message };
  });
  return proc;
}

const dir = mkdtempSync(join(tmpdir(), "herald-browser-"));
const redisPort = await freePort();
const portA = await freePort();
const portB = await freePort();
const originA = `http://127.0.0.1:${portA}`;
const originB = `http://127.0.0.1:${portB}`;

function serve(name, port) {
  const env = {
    PATH: process.env.PATH,
    HOME: process.env.HOME,
    HERALD_LISTEN: `127.0.0.1:${port}`,
    HERALD_REDIS_URL: `redis://127.0.0.1:${redisPort}`,
    // Both nodes run in `dir`: with an in-memory database the dev secrets file is in the
    // working directory, so they share one generated secret and API key (dev mode).
    HERALD_DATABASE_URL: "sqlite::memory:",
    // The dev token names the org; with claims membership every node accepts it.
    HERALD_MEMBERSHIP: "claims",
    HERALD_ALLOWED_ORIGINS: originA,
    HERALD_SHUTDOWN_DRAIN: "1",
    // HERALD_MAX_CONNECTIONS_PER_USER is left at its default (3): a tab holds one socket.
    HERALD_LOG: "info",
  };
  const proc = start(name, HERALD_BIN, ["serve"], { cwd: dir, env });
  return proc;
}

async function listening(proc) {
  await waitFor(
    () => {
      if (proc.exited) {
        throw new Error(`${proc.name} exited (${JSON.stringify(proc.exited)}) before listening; stderr:\n${proc.stderr}`);
      }
      return proc.lines.some((line) => line.startsWith("herald listening on http://"));
    },
    `${proc.name} to print its banner`,
    30000,
  );
}

/** Waits until the page's socket is open and its subscriptions are all subscribed. */
async function subscribedAll(p, timeout = 15000) {
  await p.waitForFunction(() => document.getElementById("state-socket").textContent === "open", null, { timeout });
  for (const name of ["notifications", "events", "events2", "frames"]) {
    await p.waitForFunction((id) => document.getElementById(id).textContent === "subscribed", `state-${name}`, { timeout });
  }
  assert.equal(await p.isDisabled("#send"), false, "Send is enabled once the LLM stream is subscribed");
}

let browser;
try {
  const redis = start("redis-server", REDIS_SERVER, ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { cwd: dir });
  await waitFor(() => {
    if (redis.exited) throw new Error(`redis-server exited: ${redis.stderr}`);
    return redis.lines.some((line) => line.includes("Ready to accept connections"));
  }, "redis-server to start");

  let nodeA = serve("herald node A", portA);
  await listening(nodeA);
  const nodeB = serve("herald node B", portB);
  await listening(nodeB);
  const apiKey = JSON.parse(readFileSync(join(dir, "herald-dev-secrets.json"), "utf8")).api_key;
  step(`herald nodes A (${originA}) and B (${originB}) share redis on port ${redisPort}`);

  async function api(origin, path, body) {
    const response = await fetch(origin + path, {
      method: "POST",
      headers: { Authorization: `Bearer ${apiKey}`, "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const text = await response.text();
    assert.equal(response.status, 202, `${path}: ${text}`);
    return JSON.parse(text);
  }

  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-dev-shm-usage",
    ],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const consoleLines = [];
  page.on("console", (message) => consoleLines.push(message.text()));
  page.on("pageerror", (err) => consoleLines.push(`pageerror: ${err.message}`));

  // 1. Connect in dev mode.
  await page.goto(`${originA}/`);
  assert.match(await page.textContent("#provider"), /echo/, "the page names the live LLM provider");
  assert.equal(await page.isVisible("#mint"), true, "dev mode offers to mint a token");
  const user = `alice${Date.now() % 100000}`;
  await page.fill("#user", user);
  await page.fill("#org", "acme");
  await page.fill("#org2", "globex");
  await page.click("#mint");
  await subscribedAll(page);
  step(`page connected as ${user}: one socket, four subscriptions`);

  await api(originA, `/api/v1/notifications/${user}`, { title: "From curl", body: "published over HTTP" });
  await page.waitForFunction(() => document.getElementById("notifications").textContent.includes("From curl"), null, { timeout: 10000 });
  await page.click("#test-notification");
  await page.waitForFunction((u) => document.getElementById("notifications").textContent.includes(`a test notification for ${u}`), user, { timeout: 10000 });
  await api(originA, "/api/v1/orgs/acme/events", { event_type: "resource.created", data: { resource_id: "r1" } });
  await page.waitForFunction(() => document.getElementById("events").textContent.includes("resource.created"), null, { timeout: 10000 });
  await page.click("#test-event");
  await page.waitForFunction(() => document.getElementById("events").textContent.includes("demo.ping"), null, { timeout: 10000 });
  await api(originA, "/api/v1/orgs/globex/events", { event_type: "invoice.paid", data: { invoice: "i1" } });
  await page.waitForFunction(() => document.getElementById("events").textContent.includes("invoice.paid"), null, { timeout: 10000 });
  await page.click("#test-event2");
  await page.waitForFunction(() => window.heraldDemo.events.some((e) => e.org_id === "globex" && e.event_type === "demo.ping"), null, { timeout: 10000 });
  step("notifications and both orgs' events appear");

  // 2. A prompt streams token by token.
  const prompt = "Hello from the browser test";
  await page.fill("#prompt", prompt);
  await page.press("#prompt", "Enter");
  const first = await page.waitForFunction(() => {
    const demo = window.heraldDemo;
    const answer = demo.lastTask && demo.answers[demo.lastTask];
    return answer && answer.response !== null && answer.statuses.includes("completed") ? answer.el.dataset.taskId : null;
  }, null, { timeout: 15000 });
  const firstTask = await first.jsonValue();
  const answer1 = await page.evaluate((id) => {
    const a = window.heraldDemo.answers[id];
    return { response: a.response, tokens: a.tokens, text: a.el.querySelector(".text").textContent, statuses: a.statuses };
  }, firstTask);
  assert.equal(answer1.response, `Echo: ${prompt}`);
  assert.equal(answer1.text, answer1.response, "the page shows the streamed answer");
  assert.ok(answer1.tokens.length >= 5, "the answer came in several tokens");
  assert.deepEqual(answer1.tokens.map((t) => t.index), answer1.tokens.map((_, i) => i));
  assert.deepEqual(answer1.statuses, ["started", "thinking", "streaming", "completed"]);
  step(`answer streamed in ${answer1.tokens.length} tokens`);

  // 2b. A second tab as the same user: one socket each, so the default limit of 3 holds.
  const tab2 = await context.newPage();
  tab2.on("console", (message) => consoleLines.push(`tab2: ${message.text()}`));
  tab2.on("pageerror", (err) => consoleLines.push(`pageerror: tab2: ${err.message}`));
  await tab2.goto(`${originA}/`);
  await tab2.fill("#user", user);
  await tab2.fill("#org", "acme");
  await tab2.fill("#org2", "globex");
  await tab2.click("#mint");
  await subscribedAll(tab2);
  const tabs = [page, tab2];
  const before = await Promise.all(tabs.map((p) => p.evaluate(() => ({ n: window.heraldDemo.notifications.length, e: window.heraldDemo.events.length }))));
  await api(originA, `/api/v1/notifications/${user}`, { title: "Both tabs", body: "to every tab" });
  await api(originA, "/api/v1/orgs/globex/events", { event_type: "both.tabs", data: {} });
  for (const [i, p] of tabs.entries()) {
    await p.waitForFunction(([n, e]) => {
      const demo = window.heraldDemo;
      return demo.notifications.slice(n).some((m) => m.notification.title === "Both tabs") && demo.events.slice(e).some((m) => m.event_type === "both.tabs");
    }, [before[i].n, before[i].e], { timeout: 10000 });
  }
  const twoTabPrompt = "Hello from the second tab";
  await tab2.fill("#prompt", twoTabPrompt);
  await tab2.press("#prompt", "Enter");
  const tab2Task = await (await tab2.waitForFunction((previous) => {
    const demo = window.heraldDemo;
    return demo.lastTask && demo.lastTask !== previous ? demo.lastTask : null;
  }, firstTask, { timeout: 15000 })).jsonValue();
  for (const p of tabs) {
    const done = await p.waitForFunction((id) => {
      const answer = window.heraldDemo.answers[id];
      return answer && answer.response !== null && answer.statuses.includes("completed")
        ? { response: answer.response, text: answer.el.querySelector(".text").textContent, indexes: answer.tokens.map((t) => t.index) }
        : null;
    }, tab2Task, { timeout: 15000 });
    const seen = await done.jsonValue();
    assert.equal(seen.response, `Echo: ${twoTabPrompt}`);
    assert.equal(seen.text, seen.response, "each tab shows the streamed answer");
    assert.deepEqual(seen.indexes, seen.indexes.map((_, i) => i));
  }
  const closes = await Promise.all(tabs.map((p) => p.evaluate(() => window.heraldDemo.closes.length)));
  assert.deepEqual(closes, [0, 0], "neither tab's socket was refused or closed");
  const stats = await (await fetch(`${originA}/api/v1/stats`, { headers: { Authorization: `Bearer ${apiKey}` } })).json();
  assert.equal(stats.nodes[0].connections.open, 2, `one socket per tab on node A: ${JSON.stringify(stats.nodes[0].connections)}`);
  await tab2.close();
  step("a second tab as the same user: both tabs got the notification, the org event and the streamed answer");

  // 3. Rolling restart of node A mid-answer.
  await page.route("**/api/chat/generate-response/", async (route) => {
    const response = await route.fetch({ url: `${originB}/api/chat/generate-response/` });
    await route.fulfill({ response });
  });
  const words = Array.from({ length: 250 }, (_, i) => `word${i}`);
  const longPrompt = words.join(" ");
  const closesBefore = await page.evaluate(() => window.heraldDemo.closes.length);
  await page.fill("#prompt", longPrompt);
  await page.press("#prompt", "Enter");
  const taskHandle = await page.waitForFunction((previous) => {
    const demo = window.heraldDemo;
    const answer = demo.lastTask && demo.lastTask !== previous && demo.answers[demo.lastTask];
    return answer && answer.tokens.length >= 10 ? demo.lastTask : null;
  }, firstTask, { timeout: 15000 });
  const longTask = await taskHandle.jsonValue();
  step("answer is streaming; SIGTERM to node A");
  nodeA.child.kill("SIGTERM");
  const cut = await page.waitForFunction(([before, id]) => {
    const demo = window.heraldDemo;
    const close = demo.closes.slice(before).find((c) => c.socket === "socket");
    if (!close) return null;
    const answer = demo.answers[id];
    return { code: close.code, willReconnect: close.willReconnect, tokens: answer.tokens.length, complete: answer.response !== null };
  }, [closesBefore, longTask], { timeout: 10000 });
  const atCut = await cut.jsonValue();
  assert.equal(atCut.code, 1001, `node A closed the socket with 1001 (got ${JSON.stringify(atCut)})`);
  assert.equal(atCut.willReconnect, true);
  assert.equal(atCut.complete, false, "the socket was closed mid-answer");
  step(`the socket closed with 1001 after ${atCut.tokens} tokens`);
  await waitFor(() => nodeA.exited, "node A to finish draining and exit", 15000);
  assert.equal(nodeA.exited.code, 0, `node A exits 0 after draining; stderr:\n${nodeA.stderr}`);
  nodeA = serve("herald node A (restarted)", portA);
  await listening(nodeA);
  step("node A restarted on the same port");

  const doneHandle = await page.waitForFunction((id) => {
    const answer = window.heraldDemo.answers[id];
    return answer.response !== null && answer.statuses.includes("completed");
  }, longTask, { timeout: 45000 });
  await doneHandle.dispose();
  const answer2 = await page.evaluate((id) => {
    const a = window.heraldDemo.answers[id];
    return { response: a.response, tokens: a.tokens, text: a.el.querySelector(".text").textContent };
  }, longTask);
  assert.equal(answer2.response, `Echo: ${longPrompt}`);
  assert.deepEqual(answer2.tokens.map((t) => t.index), answer2.tokens.map((_, i) => i), "no token lost or repeated");
  assert.equal(answer2.tokens.map((t) => t.delta).join(""), answer2.response);
  assert.equal(answer2.text, answer2.response);
  assert.ok(atCut.tokens < answer2.tokens.length, "tokens arrived after the reconnect");
  const frameOffsets = answer2.tokens.map((t) => t.offset);
  assert.deepEqual(frameOffsets, [...frameOffsets].sort((a, b) => a - b));
  assert.equal(new Set(frameOffsets).size, frameOffsets.length);
  await subscribedAll(page, 30000);
  await api(originA, `/api/v1/notifications/${user}`, { title: "After restart", body: "through the restarted node" });
  await page.waitForFunction(() => document.getElementById("notifications").textContent.includes("After restart"), null, { timeout: 10000 });
  step(`answer completed across the restart: ${answer2.tokens.length} tokens, each once`);

  mkdirSync(ARTIFACT_DIR, { recursive: true });
  const shot = join(ARTIFACT_DIR, "demo-page.png");
  await page.screenshot({ path: shot, fullPage: true });

  // 4. The README's browser snippet, as written, on herald's origin.
  const readme = readFileSync(join(repo, "README.md"), "utf8");
  const section = readme.split("## From a browser")[1] ?? "";
  const snippet = /```js\n([\s\S]*?)```/.exec(section)?.[1];
  assert.ok(snippet, "README.md has a ```js block under `## From a browser`");
  const snippetUser = `snippet${Date.now() % 100000}`;
  const page2 = await context.newPage();
  const snippetConsole = [];
  page2.on("console", (message) => snippetConsole.push(message.text()));
  page2.on("pageerror", (err) => snippetConsole.push(`pageerror: ${err.message}`));
  await page2.goto(`${originA}/`);
  await page2.evaluate((u) => {
    // The app's own token endpoint; here herald's dev endpoint stands in for it.
    window.fetchTokenFromYourBackend = async () => {
      const response = await fetch("/dev/token", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ user_id: u, org_id: "acme" }) });
      return (await response.json()).token;
    };
  }, snippetUser);
  await page2.addScriptTag({ type: "module", content: snippet.replaceAll("127.0.0.1:8000", `127.0.0.1:${portA}`) });
  await waitFor(() => snippetConsole.some((line) => line.includes("herald: open")), "the snippet's socket to open", 15000);
  // The snippet subscribes once connected: publish until its subscriptions are in place.
  async function publishUntilLogged(path, body, logged, what) {
    const deadline = Date.now() + 10000;
    while (!snippetConsole.some(logged)) {
      if (Date.now() > deadline) throw new Error(`the snippet did not log ${what}; console:\n${snippetConsole.join("\n")}`);
      await api(originA, path, body);
      await sleep(300);
    }
  }
  await publishUntilLogged(`/api/v1/notifications/${snippetUser}`, { title: "Hello", body: "from herald" }, (line) => line.startsWith("notification") && line.includes("from herald"), "the notification");
  await publishUntilLogged("/api/v1/orgs/acme/events", { event_type: "snippet.event", data: { ok: true } }, (line) => line.startsWith("org event snippet.event"), "the org event");
  assert.ok(!snippetConsole.some((line) => line.startsWith("pageerror")), snippetConsole.join("\n"));
  step("README browser snippet ran as written");

  // 5. With configured secrets (not dev mode) the page takes a pasted token, and the
  //    dev endpoints do not exist.
  const portC = await freePort();
  const originC = `http://127.0.0.1:${portC}`;
  const portApp = await freePort();
  const appOrigin = `http://127.0.0.1:${portApp}`;
  const configured = {
    PATH: process.env.PATH,
    HOME: process.env.HOME,
    HERALD_LISTEN: `127.0.0.1:${portC}`,
    HERALD_DATABASE_URL: "sqlite::memory:",
    HERALD_JWT_SECRET: "browser-test-secret-0123456789",
    HERALD_API_KEYS: "browser-test-key",
    HERALD_ALLOWED_ORIGINS: `${originC},${appOrigin}`,
  };
  const nodeC = start("herald node C (configured secrets)", HERALD_BIN, ["serve"], { cwd: dir, env: configured });
  await listening(nodeC);
  const minted = start("herald token", HERALD_BIN, ["token", "--sub", "pasted"], { cwd: dir, env: configured });
  await waitFor(() => minted.exited, "herald token to print a token");
  assert.equal(minted.exited.code, 0, minted.stderr);
  const page3 = await context.newPage();
  await page3.goto(`${originC}/`);
  assert.equal(await page3.isVisible("#mint"), false, "no token minting without dev mode");
  assert.equal(await page3.isVisible("#test-notification"), false);
  const devStatus = await page3.evaluate(async () => (await fetch("/dev/token", { method: "POST", headers: { "Content-Type": "application/json" }, body: "{\"user_id\":\"x\"}" })).status);
  assert.equal(devStatus, 404, "the dev endpoints do not exist with configured secrets");
  // Every connection slot of the user is taken (the default 3), so the page's socket is
  // refused with 4429 and retries: Send must stay disabled meanwhile.
  const pastedToken = minted.lines[0].trim();
  const held = [];
  for (let i = 0; i < 3; i += 1) {
    const ws = new WebSocket(`ws://127.0.0.1:${portC}/ws/notifications/`, ["herald.bearer", pastedToken]);
    await new Promise((resolveOpen, reject) => {
      ws.once("message", resolveOpen);
      ws.once("error", reject);
    });
    held.push(ws);
  }
  await page3.fill("#token", pastedToken);
  await page3.click("#connect");
  await page3.waitForFunction(() => window.heraldDemo.closes.some((c) => c.code === 4429), null, { timeout: 15000 });
  assert.equal(await page3.isDisabled("#send"), true, "a refused socket leaves Send disabled");
  await sleep(300);
  assert.equal(await page3.isDisabled("#send"), true, "still disabled while it retries");
  for (const ws of held) ws.close();
  for (const name of ["notifications", "frames"]) {
    await page3.waitForFunction((id) => document.getElementById(id).textContent === "subscribed", `state-${name}`, { timeout: 45000 });
  }
  assert.equal(await page3.isDisabled("#send"), false, "Send is enabled once the LLM stream is subscribed");
  const response = await fetch(`${originC}/api/v1/notifications/pasted`, {
    method: "POST",
    headers: { Authorization: "Bearer browser-test-key", "Content-Type": "application/json" },
    body: JSON.stringify({ title: "Pasted", body: "token from herald token" }),
  });
  assert.equal(response.status, 202);
  await page3.waitForFunction(() => document.getElementById("notifications").textContent.includes("token from herald token"), null, { timeout: 10000 });
  step("without dev mode the page connects with a pasted token, and Send waited for a slot");

  // 6. Another origin: an app's page imports the client from herald and streams an answer.
  const mintedApp = start("herald token", HERALD_BIN, ["token", "--sub", "crossorigin"], { cwd: dir, env: configured });
  await waitFor(() => mintedApp.exited, "herald token to print a token");
  assert.equal(mintedApp.exited.code, 0, mintedApp.stderr);
  const appToken = mintedApp.lines[0].trim();
  const appPage = `<!doctype html>
<meta charset="utf-8"><title>an app on another origin</title>
<script type="module">
  import { SecureLLMWebSocket } from "${originC}/client/herald.js";
  const result = (window.result = { tokens: [], final: null, errors: [], task: null });
  const llm = new SecureLLMWebSocket({
    baseUrl: "${originC}",
    userId: "crossorigin",
    getToken: async () => ${JSON.stringify(appToken)},
    onToken: (delta, index) => result.tokens.push({ delta, index }),
    onFinalResponse: (response) => { result.final = response; },
    onError: (error) => result.errors.push(String(error?.message ?? error)),
    onOpen: () => {
      if (result.task) return;
      result.task = "starting";
      llm.generate({ chatId: "cross-origin", prompt: "Hello from another origin" })
        .then((answer) => { result.task = answer.task_id; })
        .catch((error) => result.errors.push("generate: " + String(error?.message ?? error)));
    },
  });
  llm.connect();
</script>`;
  const appServer = createHttpServer((request, response) => {
    response.writeHead(request.url === "/" ? 200 : 404, { "Content-Type": "text/html; charset=utf-8" });
    response.end(request.url === "/" ? appPage : "");
  });
  await new Promise((resolveListen) => appServer.listen(portApp, "127.0.0.1", resolveListen));
  try {
    const page4 = await context.newPage();
    const appConsole = [];
    page4.on("console", (message) => appConsole.push(message.text()));
    page4.on("pageerror", (err) => appConsole.push(`pageerror: ${err.message}`));
    await page4.goto(`${appOrigin}/`);
    const crossHandle = await page4.waitForFunction(
      () => (window.result && (window.result.final !== null || window.result.errors.length > 0) ? window.result : null),
      null,
      { timeout: 20000 },
    ).catch(async (err) => {
      throw new Error(`the cross-origin page did not finish: ${err.message}; console:\n${appConsole.join("\n")}`);
    });
    const cross = await crossHandle.jsonValue();
    assert.deepEqual(cross.errors, [], `cross-origin errors; console:\n${appConsole.join("\n")}`);
    assert.equal(cross.final, "Echo: Hello from another origin");
    assert.ok(cross.tokens.length >= 3, "the answer streamed in several tokens");
    assert.deepEqual(cross.tokens.map((t) => t.index), cross.tokens.map((_, i) => i));
    assert.equal(cross.tokens.map((t) => t.delta).join(""), cross.final);
    step(`a page on ${appOrigin} imported the client from ${originC} and streamed an answer (${cross.tokens.length} tokens)`);
  } finally {
    appServer.close();
  }

  assert.ok(!consoleLines.some((line) => line.startsWith("pageerror")), consoleLines.join("\n"));
  console.log(`screenshot: ${shot}`);
  await browser.close();
  nodeA.child.kill("SIGTERM");
  nodeB.child.kill("SIGTERM");
  redis.child.kill("SIGTERM");
  console.log("browser test passed");
} catch (err) {
  console.error(`browser test failed: ${err.stack ?? err}`);
  try {
    if (browser) {
      const pages = browser.contexts().flatMap((c) => c.pages());
      if (pages[0]) {
        mkdirSync(ARTIFACT_DIR, { recursive: true });
        const shot = join(ARTIFACT_DIR, "demo-page-failure.png");
        await pages[0].screenshot({ path: shot, fullPage: true });
        console.error(`screenshot of the failure: ${shot}`);
      }
      await browser.close();
    }
  } catch {
    // Best effort.
  }
  process.exitCode = 1;
} finally {
  cleanup();
  rmSync(dir, { recursive: true, force: true });
}
