// The Vercel AI SDK against a real herald (SPEC §10): the `ai` package's own Chat
// (`AbstractChat`, what `useChat` wraps) and `DefaultChatTransport`, unchanged, pointed
// at `/api/chat/ui`. Started by the Rust test `clients::ai_sdk_against_real_herald`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { AbstractChat, DefaultChatTransport } from "ai";
import { HERALD_URL, token, user, waitFor } from "./helpers.mjs";

/** The plain state `useChat` keeps in React state, as the AI SDK's own tests do. */
class State {
  constructor(messages = []) {
    this.status = "ready";
    this.error = undefined;
    this.messages = messages;
  }
  pushMessage(message) {
    this.messages = this.messages.concat(message);
  }
  popMessage() {
    this.messages = this.messages.slice(0, -1);
  }
  replaceMessage(index, message) {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
  }
  snapshot(thing) {
    return structuredClone(thing);
  }
}

class Chat extends AbstractChat {
  constructor({ messages, ...init }) {
    super({ ...init, state: new State(messages) });
  }
}

function transport(sub) {
  return new DefaultChatTransport({
    api: `${HERALD_URL}/api/chat/ui`,
    headers: { Authorization: `Bearer ${token(sub)}` },
  });
}

/** The text of a UI message's text parts. */
const textOf = (message) =>
  message.parts
    .filter((part) => part.type === "text")
    .map((part) => part.text)
    .join("");

const lastAssistantText = (chat) => {
  const last = chat.messages.at(-1);
  return last?.role === "assistant" ? textOf(last) : "";
};

test("useChat's Chat receives a streamed answer from herald", async () => {
  const sub = user("ai");
  const chat = new Chat({ transport: transport(sub) });
  await chat.sendMessage({ text: "Hello from the AI SDK" });
  const finished = chat.messages.at(-1);
  assert.equal(chat.status, "ready");
  assert.equal(chat.error, undefined);
  assert.equal(chat.messages.length, 2);
  assert.equal(finished.role, "assistant");
  assert.equal(textOf(finished), "Echo: Hello from the AI SDK");
});

test("a failed answer is the Chat's error", async () => {
  const sub = user("ai");
  const chat = new Chat({ transport: transport(sub) });
  // An empty prompt is refused before any stream starts: the transport throws.
  await chat.sendMessage({ text: "   " });
  assert.equal(chat.status, "error");
  assert.match(chat.error.message, /no text/);
});

test("a second transport resumes a running answer after the first is dropped", async () => {
  const sub = user("ai");
  const prompt = Array.from({ length: 150 }, (_, i) => `w${i}`).join(" ");
  const expected = `Echo: ${prompt}`;
  const first = new Chat({ transport: transport(sub) });
  const sending = first.sendMessage({ text: prompt });
  // Part of the answer has arrived, then the page goes away mid-answer.
  await waitFor(() => lastAssistantText(first).length > 20, "the first part of the answer");
  await first.stop();
  await sending;
  const partial = lastAssistantText(first);
  assert.ok(partial.length < expected.length, `the first transport was dropped mid-answer (${partial.length} chars)`);
  assert.ok(expected.startsWith(partial), "what the first transport showed is the answer's beginning");

  // The reloaded page: the same chat id, the user's message from its own storage, and
  // `resume: true` (what `useChat` does on mount).
  const userMessage = first.messages.find((message) => message.role === "user");
  const second = new Chat({ id: first.id, messages: [userMessage], transport: transport(sub) });
  await second.resumeStream();
  assert.equal(second.error, undefined);
  assert.equal(second.messages.length, 2);
  assert.equal(lastAssistantText(second), expected, "no lost and no repeated text");

  // Once the answer is complete there is nothing to resume (204): the chat is unchanged.
  const third = new Chat({ id: first.id, messages: [userMessage], transport: transport(sub) });
  await third.resumeStream();
  assert.equal(third.messages.length, 1);
  assert.equal(third.status, "ready");
});
