"""The sync and async clients and the frame streamers.

Each call builds a request (method, path, JSON body) with the shared helpers below,
then the sync or the async client sends it, so both speak exactly the same protocol.
"""

import asyncio
import os
import random
import re
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, List, Optional, Tuple
from urllib.parse import quote

import httpx

from ._errors import ConfigurationError, HeraldConnectionError, error_for

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 10.0

# A publish is tried again this many times after a connection error or a 503, with the
# same Idempotency-Key, so herald publishes it at most once (docs/protocol.md).
DEFAULT_RETRIES = 3
# The first wait before a retry, in seconds; doubled each time (with jitter), at most
# MAX_BACKOFF.
DEFAULT_BACKOFF = 0.25
MAX_BACKOFF = 5.0

# The exact texts herald's own LLM workers publish (docs/protocol.md), so a browser
# cannot tell an external worker's stream from herald's.
THINKING_MESSAGE = "LLM is generating response..."
STATUS_MESSAGES = {
    "started": "Task started",
    "thinking": THINKING_MESSAGE,
    "streaming": "Streaming response",
    "completed": "Response completed",
    "failed": "Task failed",
}

_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")

# (method, path, JSON body, Idempotency-Key)
Request = Tuple[str, str, Any, Optional[str]]


def _check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(
            f"{kind} {value!r} is not a valid herald identifier: use 1-128 characters of A-Z a-z 0-9 _ . : @ -"
        )
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _key(idempotency_key: Optional[str]) -> str:
    """The caller's Idempotency-Key, or a fresh one: every publish has one."""
    if idempotency_key is None:
        return uuid.uuid4().hex
    if not isinstance(idempotency_key, str) or not 1 <= len(idempotency_key) <= 128:
        raise ValueError("idempotency_key must be a string of 1 to 128 characters")
    return idempotency_key


def _notification(user_id: str, notification: Dict[str, Any], key: Optional[str]) -> Request:
    _check_id("user_id", user_id)
    if not isinstance(notification, dict):
        raise TypeError("notification must be a dict (a JSON object)")
    return ("POST", f"/api/v1/notifications/{quote(user_id, safe='')}", notification, _key(key))


def _org_event(org_id: str, event_type: str, data: Optional[Dict[str, Any]], key: Optional[str]) -> Request:
    _check_id("org_id", org_id)
    if not isinstance(event_type, str) or not 1 <= len(event_type) <= 128:
        raise ValueError("event_type must be a string of 1 to 128 characters")
    body = {"event_type": event_type, "data": {} if data is None else data}
    return ("POST", f"/api/v1/orgs/{quote(org_id, safe='')}/events", body, _key(key))


def _publish(channel: str, data: Dict[str, Any], key: Optional[str]) -> Request:
    if not isinstance(data, dict):
        raise TypeError("data must be a dict (a JSON object)")
    return ("POST", "/api/v1/publish", {"channel": channel, "data": data}, _key(key))


def _publish_many(items: Iterable[Tuple[str, Dict[str, Any]]], key: Optional[str]) -> Request:
    body = [{"channel": channel, "data": data} for channel, data in items]
    return ("POST", "/api/v1/publish", body, _key(key))


def _frame(user_id: str, message: Dict[str, Any], key: Optional[str]) -> Request:
    return ("POST", f"/api/v1/frame-stream/{quote(user_id, safe='')}", message, _key(key))


def _retryable(response: httpx.Response) -> bool:
    """A 503: herald could not publish now. Retrying with the same key is safe."""
    return response.status_code == 503


def _delay(attempt: int, backoff: float) -> float:
    """The wait before retry number ``attempt`` (0-based): doubling, jittered, capped."""
    return min(MAX_BACKOFF, backoff * (2**attempt)) * random.uniform(0.5, 1.0)


class _Settings:
    def __init__(self, base_url: Optional[str], api_key: Optional[str]):
        self.base_url = (base_url or os.environ.get("HERALD_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("HERALD_API_KEY")
        if not self.api_key:
            raise ConfigurationError(
                "no herald API key: set the HERALD_API_KEY environment variable or pass api_key= "
                "(one of herald's HERALD_API_KEYS; in dev mode, the api_key in herald-dev-secrets.json)"
            )
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"herald URL {self.base_url!r} must start with http:// or https://, e.g. {DEFAULT_URL}"
            )

    def headers(self) -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def _result(response: httpx.Response, method: str, path: str) -> Any:
    if response.status_code >= 400:
        error, message, outcome = None, response.text.strip() or response.reason_phrase, None
        try:
            body = response.json()
            if isinstance(body, dict):
                error = body.get("error")
                message = body.get("message", message)
                outcome = body.get("outcome")
        except ValueError:
            pass
        raise error_for(response.status_code, error, message, method, path, outcome)
    if not response.content:
        return None
    return response.json()


def _unreachable(base_url: str, err: Exception, attempts: int) -> HeraldConnectionError:
    tries = f" (tried {attempts} times with the same Idempotency-Key)" if attempts > 1 else ""
    return HeraldConnectionError(
        f"cannot reach herald at {base_url}{tries}: {err.__class__.__name__}: {err}; "
        "is herald running, and is HERALD_URL right?"
    )


class HeraldClient:
    """Publishes to herald's service API (sync). Thread-safe; reuse one per process.

    Every publish carries an ``Idempotency-Key`` (a fresh UUID unless the call names
    one) and is tried again up to ``retries`` times after a connection error or a 503,
    with the same key, waiting ``backoff`` seconds, then twice that, and so on: herald
    publishes it at most once however often it is sent.
    """

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
        transport: Optional[httpx.BaseTransport] = None,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
    ):
        self.retries = retries
        self.backoff = backoff
        self._settings = _Settings(base_url, api_key)
        self.base_url = self._settings.base_url
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._settings.headers(), timeout=timeout, transport=transport
        )

    def __enter__(self) -> "HeraldClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, request: Request) -> Any:
        method, path, body, key = request
        headers = {"Idempotency-Key": key} if key else {}
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, json=body, headers=headers)
            except httpx.TransportError as err:
                if attempt >= self.retries:
                    raise _unreachable(self.base_url, err, attempt + 1) from err
            else:
                if not _retryable(response) or attempt >= self.retries:
                    return _result(response, method, path)
            time.sleep(_delay(attempt, self.backoff))
            attempt += 1

    def broadcast_notification(
        self, user_id: str, notification: Dict[str, Any], idempotency_key: Optional[str] = None
    ) -> Dict[str, Any]:
        """Publishes ``notification`` to ``notifications:{user_id}``; returns ``{"id","channel","offset"}``."""
        return self._send(_notification(user_id, notification, idempotency_key))

    def broadcast_org_event(
        self,
        org_id: str,
        event_type: str,
        data: Optional[Dict[str, Any]] = None,
        idempotency_key: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Publishes an org event to ``org:{org_id}``; returns ``{"id","channel","offset"}``."""
        return self._send(_org_event(org_id, event_type, data, idempotency_key))

    def publish(self, channel: str, data: Dict[str, Any], idempotency_key: Optional[str] = None) -> Dict[str, Any]:
        """Publishes ``data`` as is to ``channel`` (``notifications:…``, ``org:…`` or ``frames:…``)."""
        return self._send(_publish(channel, data, idempotency_key))[0]

    def publish_many(
        self, items: Iterable[Tuple[str, Dict[str, Any]]], idempotency_key: Optional[str] = None
    ) -> List[Dict[str, Any]]:
        """Publishes ``(channel, data)`` pairs in one request, in order; one key covers them all."""
        return self._send(_publish_many(items, idempotency_key))

    def send_frame(
        self, user_id: str, message: Dict[str, Any], idempotency_key: Optional[str] = None
    ) -> Dict[str, Any]:
        """Publishes one ``llm_*`` message (with ``chat_id``) to ``frames:{user_id}``."""
        return self._send(_frame(user_id, message, idempotency_key))

    def frame_streamer(self, user_id: str, chat_id: str, **kwargs: Any) -> "FrameStreamer":
        return FrameStreamer(user_id, chat_id, client=self, **kwargs)


class AsyncHeraldClient:
    """Publishes to herald's service API (asyncio). Reuse one per event loop."""

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
        transport: Optional[httpx.AsyncBaseTransport] = None,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
    ):
        self.retries = retries
        self.backoff = backoff
        self._settings = _Settings(base_url, api_key)
        self.base_url = self._settings.base_url
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._settings.headers(), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> "AsyncHeraldClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, request: Request) -> Any:
        method, path, body, key = request
        headers = {"Idempotency-Key": key} if key else {}
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, json=body, headers=headers)
            except httpx.TransportError as err:
                if attempt >= self.retries:
                    raise _unreachable(self.base_url, err, attempt + 1) from err
            else:
                if not _retryable(response) or attempt >= self.retries:
                    return _result(response, method, path)
            await asyncio.sleep(_delay(attempt, self.backoff))
            attempt += 1

    async def broadcast_notification(
        self, user_id: str, notification: Dict[str, Any], idempotency_key: Optional[str] = None
    ) -> Dict[str, Any]:
        return await self._send(_notification(user_id, notification, idempotency_key))

    async def broadcast_org_event(
        self,
        org_id: str,
        event_type: str,
        data: Optional[Dict[str, Any]] = None,
        idempotency_key: Optional[str] = None,
    ) -> Dict[str, Any]:
        return await self._send(_org_event(org_id, event_type, data, idempotency_key))

    async def publish(
        self, channel: str, data: Dict[str, Any], idempotency_key: Optional[str] = None
    ) -> Dict[str, Any]:
        return (await self._send(_publish(channel, data, idempotency_key)))[0]

    async def publish_many(
        self, items: Iterable[Tuple[str, Dict[str, Any]]], idempotency_key: Optional[str] = None
    ) -> List[Dict[str, Any]]:
        return await self._send(_publish_many(items, idempotency_key))

    async def send_frame(
        self, user_id: str, message: Dict[str, Any], idempotency_key: Optional[str] = None
    ) -> Dict[str, Any]:
        return await self._send(_frame(user_id, message, idempotency_key))

    def frame_streamer(self, user_id: str, chat_id: str, **kwargs: Any) -> "AsyncFrameStreamer":
        return AsyncFrameStreamer(user_id, chat_id, client=self, **kwargs)


class _Stream:
    """The messages of one LLM answer, in herald's order (docs/protocol.md)."""

    def __init__(self, user_id: str, chat_id: str, task_id: Optional[str], model: Optional[str]):
        self.user_id = _check_id("user_id", user_id)
        self.chat_id = _check_id("chat_id", chat_id)
        self.task_id = task_id or uuid.uuid4().hex
        self.model = model
        self.index = 0
        self.streaming = False

    def _message(self, kind: str, **fields: Any) -> Dict[str, Any]:
        return {"type": kind, "chat_id": self.chat_id, "task_id": self.task_id, **fields}

    def status(self, status: str) -> Dict[str, Any]:
        return self._message("llm_status", status=status, message=STATUS_MESSAGES[status])

    def started(self) -> List[Dict[str, Any]]:
        return [self.status("started")]

    def thinking(self) -> List[Dict[str, Any]]:
        frame = {"status": "thinking", "message": THINKING_MESSAGE, "progress": "indeterminate"}
        return [self.status("thinking"), self._message("llm_frame", frame=frame)]

    def frame(self, delta: str) -> List[Dict[str, Any]]:
        if not isinstance(delta, str):
            raise TypeError("delta must be a string")
        messages = []
        if not self.streaming:
            self.streaming = True
            messages.append(self.status("streaming"))
        messages.append(self._message("llm_frame", frame={"status": "streaming", "delta": delta, "index": self.index}))
        self.index += 1
        return messages

    def completed(self, response: str, model: Optional[str], usage: Optional[Dict[str, int]]) -> List[Dict[str, Any]]:
        data = {
            "event": "response_generated",
            "user_id": self.user_id,
            "chat_id": self.chat_id,
            "response": response,
            "model": model or self.model,
            "usage": usage,
            "timestamp": _now(),
        }
        return [self._message("llm_response", data=data), self.status("completed")]

    def error(self, error: str) -> List[Dict[str, Any]]:
        return [self._message("llm_error", error=str(error)), self.status("failed")]


class FrameStreamer:
    """Streams one LLM answer to ``frames:{user_id}`` from a worker (a Celery task, say).

    Call, in order: ``notify_task_started(prompt)``, ``notify_llm_thinking()``,
    ``notify_frame(delta)`` for each piece, then ``notify_task_completed(response)``,
    or ``notify_error(error)`` on failure. Browsers see exactly what herald's own workers
    send: ``llm_status``, ``llm_frame`` (``index`` 0, 1, 2, ...), ``llm_response``,
    ``llm_error``.
    """

    def __init__(
        self,
        user_id: str,
        chat_id: str,
        client: Optional[HeraldClient] = None,
        task_id: Optional[str] = None,
        model: Optional[str] = None,
    ):
        self._stream = _Stream(user_id, chat_id, task_id, model)
        self._client = client or default_client()
        self.user_id = self._stream.user_id
        self.chat_id = self._stream.chat_id
        self.task_id = self._stream.task_id

    def _send(self, messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return [self._client.send_frame(self.user_id, message) for message in messages]

    def notify_task_started(self, prompt: str = "") -> List[Dict[str, Any]]:
        """``llm_status started``. The prompt is not published: the user's page already has it."""
        return self._send(self._stream.started())

    def notify_llm_thinking(self) -> List[Dict[str, Any]]:
        """``llm_status thinking`` and the thinking ``llm_frame``."""
        return self._send(self._stream.thinking())

    def notify_frame(self, delta: str) -> List[Dict[str, Any]]:
        """One streamed piece (``llm_frame``), preceded the first time by ``llm_status streaming``."""
        return self._send(self._stream.frame(delta))

    def notify_task_completed(
        self, response: str, model: Optional[str] = None, usage: Optional[Dict[str, int]] = None
    ) -> List[Dict[str, Any]]:
        """``llm_response`` with the whole answer, then ``llm_status completed``."""
        return self._send(self._stream.completed(response, model, usage))

    def notify_error(self, error: str) -> List[Dict[str, Any]]:
        """``llm_error`` then ``llm_status failed``. Never put a traceback, URL or key in ``error``."""
        return self._send(self._stream.error(error))


class AsyncFrameStreamer:
    """``FrameStreamer`` for asyncio: the same methods, awaited."""

    def __init__(
        self,
        user_id: str,
        chat_id: str,
        client: AsyncHeraldClient,
        task_id: Optional[str] = None,
        model: Optional[str] = None,
    ):
        self._stream = _Stream(user_id, chat_id, task_id, model)
        self._client = client
        self.user_id = self._stream.user_id
        self.chat_id = self._stream.chat_id
        self.task_id = self._stream.task_id

    async def _send(self, messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return [await self._client.send_frame(self.user_id, message) for message in messages]

    async def notify_task_started(self, prompt: str = "") -> List[Dict[str, Any]]:
        return await self._send(self._stream.started())

    async def notify_llm_thinking(self) -> List[Dict[str, Any]]:
        return await self._send(self._stream.thinking())

    async def notify_frame(self, delta: str) -> List[Dict[str, Any]]:
        return await self._send(self._stream.frame(delta))

    async def notify_task_completed(
        self, response: str, model: Optional[str] = None, usage: Optional[Dict[str, int]] = None
    ) -> List[Dict[str, Any]]:
        return await self._send(self._stream.completed(response, model, usage))

    async def notify_error(self, error: str) -> List[Dict[str, Any]]:
        return await self._send(self._stream.error(error))


_default: Optional[HeraldClient] = None
_default_lock = threading.Lock()


def configure(base_url: Optional[str] = None, api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT) -> HeraldClient:
    """Sets the client the module-level functions use (else one from the environment)."""
    global _default
    client = HeraldClient(base_url=base_url, api_key=api_key, timeout=timeout)
    with _default_lock:
        old, _default = _default, client
    if old is not None:
        old.close()
    return client


def default_client() -> HeraldClient:
    """The client of the module-level functions, made from HERALD_URL/HERALD_API_KEY on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = HeraldClient()
        return _default


def broadcast_notification(
    user_id: str, notification: Dict[str, Any], idempotency_key: Optional[str] = None
) -> Dict[str, Any]:
    """Sends ``notification`` to every socket of ``user_id`` (``/ws/notifications/``)."""
    return default_client().broadcast_notification(user_id, notification, idempotency_key)


def broadcast_org_event(
    org_id: str, event_type: str, data: Optional[Dict[str, Any]] = None, idempotency_key: Optional[str] = None
) -> Dict[str, Any]:
    """Sends an event to every member of ``org_id`` connected to ``/ws/events/{org_id}/``."""
    return default_client().broadcast_org_event(org_id, event_type, data, idempotency_key)


def publish(channel: str, data: Dict[str, Any], idempotency_key: Optional[str] = None) -> Dict[str, Any]:
    """Publishes ``data`` as is to ``channel``."""
    return default_client().publish(channel, data, idempotency_key)
