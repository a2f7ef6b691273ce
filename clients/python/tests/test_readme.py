"""The README's Celery task runs as written: the ```python block holding `@shared_task` is
executed with Celery and the OpenAI SDK installed, against a fake OpenAI-compatible server
(through OPENAI_BASE_URL, as the SDK reads it) and the real herald, and the user's frame
stream must then hold the answer as herald's own workers would stream it."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[3] / "README.md"
DELTAS = ["Hel", "lo", " from", " Celery"]


def celery_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [block for block in blocks if "@shared_task" in block]
    assert len(found) == 1, "README.md must have exactly one ```python block with @shared_task (the Celery example)"
    return found[0]


class FakeOpenAI(BaseHTTPRequestHandler):
    """Streams DELTAS as chat.completion.chunk server-sent events, then [DONE]."""

    requests = []

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        FakeOpenAI.requests.append((self.path, json.loads(self.rfile.read(length))))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for delta in DELTAS + [None]:
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": delta} if delta else {},
                        "finish_reason": None if delta else "stop",
                    }
                ],
            }
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_openai(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    yield
    server.shutdown()


def test_readme_celery_task_runs_as_written(monkeypatch, fake_openai, herald_url, api_key, user_id, history):
    import herald_client

    monkeypatch.setenv("HERALD_URL", herald_url)
    monkeypatch.setenv("HERALD_API_KEY", api_key)
    monkeypatch.setattr(herald_client._client, "_default", None)
    namespace = {"__name__": "readme_tasks"}
    exec(compile(celery_snippet(), str(README), "exec"), namespace)
    tasks = [v for v in namespace.values() if hasattr(v, "delay") and hasattr(v, "run")]
    assert len(tasks) == 1, "the snippet defines one Celery task"
    # A direct call runs the task body in this process, as a worker would.
    tasks[0](user_id, "chat-celery", "Say hello")

    path, body = FakeOpenAI.requests[-1]
    assert path == "/v1/chat/completions" and body["stream"] is True
    assert body["messages"][-1]["content"] == "Say hello"
    messages = history(f"frames:{user_id}")
    kinds = [(m["type"], m.get("status") or m.get("frame", {}).get("status")) for m in messages]
    assert kinds == [
        ("llm_status", "started"),
        ("llm_status", "thinking"),
        ("llm_frame", "thinking"),
        ("llm_status", "streaming"),
        *[("llm_frame", "streaming")] * len(DELTAS),
        ("llm_response", None),
        ("llm_status", "completed"),
    ]
    streamed = [m["frame"] for m in messages if m["type"] == "llm_frame" and m["frame"]["status"] == "streaming"]
    assert [f["delta"] for f in streamed] == DELTAS
    assert [f["index"] for f in streamed] == list(range(len(DELTAS)))
    assert messages[-2]["data"]["response"] == "".join(DELTAS)
    assert all(m["chat_id"] == "chat-celery" and m["user_id"] == user_id for m in messages)
