// Compiled by `tsc -p clients/js` in the tests: the declarations in herald.d.ts must
// accept the documented uses and reject wrong ones (the @ts-expect-error lines fail
// the build if they stop being errors).
import {
  HeraldClient,
  HeraldSocket,
  type ChannelMessage,
  type Subscription,
  type SubscriptionState,
  SecureLLMWebSocket,
  backoffDelay,
  BEARER_SUBPROTOCOL,
  type PublishedMessage,
  type CloseInfo,
  type LlmResponseData,
} from "../herald.js";

const socket = new HeraldSocket("ws://127.0.0.1:8000/ws/notifications/", {
  token: "t",
  getToken: async () => "fresh",
  since: 0,
  onMessage: (message: PublishedMessage) => {
    if (message.type === "notification") {
      const title: unknown = message.notification["title"];
      void title;
    }
    const offset: number = message.offset;
    void offset;
  },
  onClose: (info: CloseInfo) => {
    const again: boolean = info.willReconnect;
    void again;
  },
  onStateChange: (state) => {
    if (state === "open" || state === "reconnecting") return;
  },
});
socket.connect().close();
socket.send({ type: "heartbeat" });
// @ts-expect-error herald accepts only ping, heartbeat and refresh
socket.send({ type: "subscribe", channel: "x" });
const where: number | null = socket.position.offset;
void where;

const llm = new SecureLLMWebSocket({
  baseUrl: "http://127.0.0.1:8000",
  userId: "alice",
  token: "t",
  onStatusUpdate: (status) => {
    // @ts-expect-error not an llm_status status
    if (status === "done") return;
  },
  onToken: (delta: string, index: number) => void [delta, index],
  onRestart: (taskId: string) => void taskId.length,
  onFinalResponse: (response: string, data: LlmResponseData) => void [response, data.model, data.usage?.completion_tokens],
  onError: (error: string) => void error,
});
llm.connect();
void llm.generate({ chatId: "c1", prompt: "hi" }).then((receipt) => receipt.task_id.toUpperCase());
// @ts-expect-error chatId is required
void llm.generate({ prompt: "hi" });
// @ts-expect-error userId is required
new SecureLLMWebSocket({ baseUrl: "http://x" });

const delay: number = backoffDelay(3, { initialMs: 100, maxMs: 1000, factor: 2 });
const protocol: "herald.bearer" = BEARER_SUBPROTOCOL;
void [delay, protocol];

// One socket, many channels.
const herald = new HeraldClient("wss://herald.example.com/ws/", { getToken: () => "t" });
herald.on("state", (state) => void state.toUpperCase());
herald.on("message", (message: ChannelMessage, subscription: Subscription) => void [message.type, subscription.channel]);
// @ts-expect-error not an event of HeraldClient
herald.on("frame", () => {});
// @ts-expect-error a close listener gets CloseInfo, not a string
herald.on("close", (info: string) => void info);
void herald.connect().connected().then((welcome) => welcome.user_id.toUpperCase());
const org: Subscription = herald.subscribe("org:acme", {
  since: 41,
  epoch: "e",
  onMessage: (message) => {
    if (message.type === "org_event") void message.data["resource_id"];
  },
  onUnsubscribed: ({ code, reason }) => void [code + 1, reason.length],
});
const state: SubscriptionState = org.state;
// @ts-expect-error since is a number
herald.subscribe("org:other", { since: "41" });
org.on("recovered", (message) => void message.recovered);
org.on("error", (error) => void error.code);
org.unsubscribe();
herald.send({ type: "subscribe", channel: "org:acme", id: "s9", since: 3 });
// @ts-expect-error subscribe needs an id
herald.send({ type: "subscribe", channel: "org:acme" });
async function readAll(): Promise<number> {
  let n = 0;
  for await (const message of herald) n += message.channel.length;
  for await (const message of org) n += message.type.length;
  return n;
}
void [state, readAll];
const shared = new SecureLLMWebSocket({ client: herald, userId: "alice", onToken: (delta) => void delta });
const sharedSocket: HeraldSocket | null = shared.socket;
void [shared.connect().subscription?.state, sharedSocket];
