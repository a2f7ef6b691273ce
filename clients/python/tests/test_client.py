"""herald-client against a real herald: every call, sync and async, the exact LLM stream
shapes, and the exceptions for each kind of failure."""

import asyncio
import socket

import httpx
import pytest

import herald_client
from herald_client import (
    AsyncHeraldClient,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    FrameStreamer,
    HeraldClient,
    HeraldConnectionError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)

SEQUENCE_FIELDS = {"channel", "id", "offset", "epoch", "timestamp"}


def strip(message):
    return {k: v for k, v in message.items() if k not in SEQUENCE_FIELDS}


@pytest.fixture
def client(herald_url, api_key):
    with HeraldClient(herald_url, api_key) as client:
        yield client


def test_broadcast_notification(client, user_id, history):
    receipt = client.broadcast_notification(user_id, {"title": "Task Complete", "body": "Your export is ready"})
    assert receipt["channel"] == f"notifications:{user_id}"
    assert receipt["offset"] == 1
    [message] = history(f"notifications:{user_id}")
    assert strip(message) == {
        "type": "notification",
        "notification": {"title": "Task Complete", "body": "Your export is ready"},
    }
    assert message["id"] == receipt["id"]


def test_broadcast_org_event(client, history):
    org = "acme-py"
    before = len(history(f"org:{org}"))
    receipt = client.broadcast_org_event(org, "resource.created", {"resource_id": "r1"})
    assert receipt["channel"] == f"org:{org}"
    message = history(f"org:{org}")[before]
    assert strip(message) == {
        "type": "org_event",
        "org_id": org,
        "event_type": "resource.created",
        "data": {"resource_id": "r1"},
    }


def test_publish_and_publish_many(client, user_id, history):
    channel = f"notifications:{user_id}"
    first = client.publish(channel, {"type": "custom", "n": 1})
    assert first["offset"] == 1
    receipts = client.publish_many([(channel, {"type": "custom", "n": 2}), (channel, {"type": "custom", "n": 3})])
    assert [r["offset"] for r in receipts] == [2, 3]
    assert [m["n"] for m in history(channel)] == [1, 2, 3]


def test_frame_streamer_sends_herald_workers_exact_messages(client, user_id, history):
    streamer = FrameStreamer(user_id, "chat-1", client=client, model="my-model")
    streamer.notify_task_started("Say hello")
    streamer.notify_llm_thinking()
    streamer.notify_frame("Hel")
    streamer.notify_frame("lo")
    streamer.notify_task_completed("Hello", usage={"prompt_tokens": 2, "completion_tokens": 2})
    messages = history(f"frames:{user_id}")
    common = {"user_id": user_id, "chat_id": "chat-1", "task_id": streamer.task_id}
    response = messages[6]["data"]
    assert response.pop("timestamp").endswith("Z")
    assert [strip(m) for m in messages] == [
        {"type": "llm_status", "status": "started", "message": "Task started", **common},
        {"type": "llm_status", "status": "thinking", "message": "LLM is generating response...", **common},
        {
            "type": "llm_frame",
            "frame": {"status": "thinking", "message": "LLM is generating response...", "progress": "indeterminate"},
            **common,
        },
        {"type": "llm_status", "status": "streaming", "message": "Streaming response", **common},
        {"type": "llm_frame", "frame": {"status": "streaming", "delta": "Hel", "index": 0}, **common},
        {"type": "llm_frame", "frame": {"status": "streaming", "delta": "lo", "index": 1}, **common},
        {
            "type": "llm_response",
            "data": {
                "event": "response_generated",
                "user_id": user_id,
                "chat_id": "chat-1",
                "response": "Hello",
                "model": "my-model",
                "usage": {"prompt_tokens": 2, "completion_tokens": 2},
            },
            **common,
        },
        {"type": "llm_status", "status": "completed", "message": "Response completed", **common},
    ]
    assert [m["offset"] for m in messages] == list(range(1, 9))


def test_frame_streamer_error(client, user_id, history):
    streamer = client.frame_streamer(user_id, "chat-2")
    streamer.notify_task_started("x")
    streamer.notify_error("LLM processing failed: rate limit exceeded")
    messages = [strip(m) for m in history(f"frames:{user_id}")]
    assert [(m["type"], m.get("status"), m.get("error")) for m in messages] == [
        ("llm_status", "started", None),
        ("llm_error", None, "LLM processing failed: rate limit exceeded"),
        ("llm_status", "failed", None),
    ]


def test_async_client_and_streamer(herald_url, api_key, user_id, history):
    async def main():
        async with AsyncHeraldClient(herald_url, api_key) as client:
            receipt = await client.broadcast_notification(user_id, {"title": "async"})
            await client.broadcast_org_event("acme-async", "ping")
            await client.publish(f"notifications:{user_id}", {"type": "custom"})
            streamer = client.frame_streamer(user_id, "chat-a")
            await streamer.notify_task_started("p")
            await streamer.notify_llm_thinking()
            for delta in ["a", "b", "c"]:
                await streamer.notify_frame(delta)
            await streamer.notify_task_completed("abc")
            return receipt

    receipt = asyncio.run(main())
    assert receipt["offset"] == 1
    notifications = history(f"notifications:{user_id}")
    assert [m["type"] for m in notifications] == ["notification", "custom"]
    frames = history(f"frames:{user_id}")
    deltas = [m["frame"]["delta"] for m in frames if m["type"] == "llm_frame" and m["frame"]["status"] == "streaming"]
    assert deltas == ["a", "b", "c"]
    assert [m["frame"]["index"] for m in frames if m["type"] == "llm_frame" and m["frame"]["status"] == "streaming"] == [0, 1, 2]
    assert frames[-2]["data"]["response"] == "abc"
    assert frames[-1]["status"] == "completed"


def test_module_functions_read_the_environment(monkeypatch, herald_url, api_key, user_id, history):
    monkeypatch.setenv("HERALD_URL", herald_url)
    monkeypatch.setenv("HERALD_API_KEY", api_key)
    monkeypatch.setattr(herald_client._client, "_default", None)
    herald_client.broadcast_notification(user_id, {"title": "from env"})
    herald_client.broadcast_org_event("acme-env", "env.event", {"k": 1})
    herald_client.publish(f"notifications:{user_id}", {"type": "custom"})
    FrameStreamer(user_id, "chat-env").notify_task_started("p")
    assert [m["type"] for m in history(f"notifications:{user_id}")] == ["notification", "custom"]
    assert history(f"frames:{user_id}")[0]["status"] == "started"


def test_wrong_api_key_says_which_setting_to_fix(herald_url, user_id):
    with HeraldClient(herald_url, "not-the-key") as client:
        with pytest.raises(AuthenticationError) as caught:
            client.broadcast_notification(user_id, {"title": "x"})
    assert caught.value.status == 401
    assert caught.value.error == "unauthorized"
    assert "HERALD_API_KEY" in str(caught.value)


def test_bad_requests(client, user_id):
    with pytest.raises(ValueError, match="not a valid herald identifier"):
        client.broadcast_notification("bad user", {"title": "x"})
    with pytest.raises(BadRequestError) as caught:
        client.publish("nochannel", {"type": "x"})
    assert caught.value.status == 400
    with pytest.raises(BadRequestError):
        client.send_frame(user_id, {"type": "llm_status", "status": "started"})  # no chat_id


def test_body_too_large(client, user_id):
    with pytest.raises(PayloadTooLargeError) as caught:
        client.broadcast_notification(user_id, {"blob": "x" * 70_000})
    assert caught.value.status == 413
    assert "64 KiB" in str(caught.value)


def test_wrong_url_is_not_found(herald_url, api_key, user_id):
    with HeraldClient(herald_url + "/not-herald", api_key) as client:
        with pytest.raises(NotFoundError, match="HERALD_URL"):
            client.broadcast_notification(user_id, {"title": "x"})


def test_unreachable_herald(api_key, user_id):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with HeraldClient(f"http://127.0.0.1:{port}", api_key, timeout=2) as client:
        with pytest.raises(HeraldConnectionError, match="cannot reach herald"):
            client.broadcast_notification(user_id, {"title": "x"})

    async def main():
        async with AsyncHeraldClient(f"http://127.0.0.1:{port}", api_key, timeout=2) as client:
            await client.broadcast_notification(user_id, {"title": "x"})

    with pytest.raises(HeraldConnectionError):
        asyncio.run(main())


def test_missing_api_key(monkeypatch):
    monkeypatch.delenv("HERALD_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="HERALD_API_KEY"):
        HeraldClient("http://127.0.0.1:8000")


class _LoseFirstResponses(httpx.HTTPTransport):
    """Sends each request to herald, but for the first ``lose`` requests drops herald's
    answer and raises a connection error, as a network cut after the request did."""

    def __init__(self, lose: int):
        super().__init__()
        self.lose = lose
        self.keys = []

    def handle_request(self, request):
        self.keys.append(request.headers.get("Idempotency-Key"))
        response = super().handle_request(request)
        if self.lose > 0:
            self.lose -= 1
            response.read()
            response.close()
            raise httpx.ReadError("the answer was lost", request=request)
        return response


class _AsyncLoseFirstResponses(httpx.AsyncHTTPTransport):
    def __init__(self, lose: int):
        super().__init__()
        self.lose = lose
        self.keys = []

    async def handle_async_request(self, request):
        self.keys.append(request.headers.get("Idempotency-Key"))
        response = await super().handle_async_request(request)
        if self.lose > 0:
            self.lose -= 1
            await response.aread()
            await response.aclose()
            raise httpx.ReadError("the answer was lost", request=request)
        return response


def test_a_lost_answer_is_retried_with_the_same_key_and_published_once(herald_url, api_key, user_id, history):
    transport = _LoseFirstResponses(lose=2)
    with HeraldClient(herald_url, api_key, transport=transport, backoff=0.01) as client:
        receipt = client.broadcast_notification(user_id, {"title": "once"})
    assert len(transport.keys) == 3
    assert transport.keys[0] and len(set(transport.keys)) == 1, transport.keys
    messages = history(f"notifications:{user_id}")
    assert [m["notification"] for m in messages] == [{"title": "once"}]
    assert receipt["id"] == messages[0]["id"]

    # Each call has its own key: two calls are two messages.
    with HeraldClient(herald_url, api_key, transport=_LoseFirstResponses(lose=0)) as client:
        client.broadcast_notification(user_id, {"title": "twice"})
        client.broadcast_notification(user_id, {"title": "twice"})
    assert len(history(f"notifications:{user_id}")) == 3


def test_a_caller_chosen_key_publishes_once_across_clients(herald_url, api_key, user_id, history):
    key = f"celery-task-{user_id}"
    with HeraldClient(herald_url, api_key) as client:
        first = client.publish_many(
            [(f"notifications:{user_id}", {"n": 1}), (f"frames:{user_id}", {"n": 2})], idempotency_key=key
        )
    with HeraldClient(herald_url, api_key) as client:
        again = client.publish_many(
            [(f"notifications:{user_id}", {"n": 1}), (f"frames:{user_id}", {"n": 2})], idempotency_key=key
        )
    assert again == first
    assert len(history(f"notifications:{user_id}")) == 1
    assert len(history(f"frames:{user_id}")) == 1
    with pytest.raises(ValueError, match="idempotency_key"):
        HeraldClient(herald_url, api_key).broadcast_notification(user_id, {}, idempotency_key="k" * 129)


def test_async_retries_keep_the_key(herald_url, api_key, user_id, history):
    transport = _AsyncLoseFirstResponses(lose=1)

    async def main():
        async with AsyncHeraldClient(herald_url, api_key, transport=transport, backoff=0.01) as client:
            return await client.broadcast_org_event(user_id, "thing.done", {"n": 1})

    receipt = asyncio.run(main())
    assert len(transport.keys) == 2 and transport.keys[0] == transport.keys[1]
    messages = history(f"org:{user_id}")
    assert len(messages) == 1 and messages[0]["id"] == receipt["id"]


def test_a_503_is_retried_a_bounded_number_of_times_then_raised(api_key, user_id):
    seen = []

    def answer(request):
        seen.append(request.headers["Idempotency-Key"])
        body = {"error": "unavailable", "message": "Redis did not confirm the publish in time", "outcome": "unknown"}
        return httpx.Response(503, json=body)

    transport = httpx.MockTransport(answer)
    with HeraldClient("http://herald.test", api_key, transport=transport, retries=2, backoff=0.01) as client:
        with pytest.raises(ServiceUnavailableError) as raised:
            client.broadcast_notification(user_id, {"title": "x"})
    assert len(seen) == 3 and len(set(seen)) == 1
    assert raised.value.outcome == "unknown"
    assert "same idempotency_key" in str(raised.value)

    # Other errors are not retried.
    seen.clear()
    transport = httpx.MockTransport(lambda request: seen.append(1) or httpx.Response(400, json={"error": "bad_request", "message": "no"}))
    with HeraldClient("http://herald.test", api_key, transport=transport, backoff=0.01) as client:
        with pytest.raises(BadRequestError):
            client.broadcast_notification(user_id, {"title": "x"})
    assert len(seen) == 1
