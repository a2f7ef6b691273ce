"""herald-client: publish to herald from Django, Celery or any Python backend.

Sync::

    from herald_client import broadcast_notification, broadcast_org_event, FrameStreamer

    broadcast_notification("alice", {"title": "Task Complete", "body": "Your export is ready"})
    broadcast_org_event("acme", "resource.created", {"resource_id": "r1"})

    streamer = FrameStreamer("alice", "chat-1")
    streamer.notify_task_started(prompt)
    streamer.notify_llm_thinking()
    streamer.notify_frame("Hel")
    streamer.notify_frame("lo")
    streamer.notify_task_completed("Hello")

Async: the same names on ``AsyncHeraldClient`` and ``AsyncFrameStreamer``, awaited.

Following channels (with ``pip install 'herald-client[ws]'``): ``HeraldListener`` and
``AsyncHeraldListener`` hold one socket to herald's ``/ws/`` endpoint for several
channels, reconnect, and resume each channel where it left off::

    for message in listen("ws://127.0.0.1:8000/ws/", token, ["notifications:alice", "org:acme"]):
        print(message["type"], message.get("channel"))

The module-level functions use a default client configured from the environment:
``HERALD_URL`` (default ``http://127.0.0.1:8000``) and ``HERALD_API_KEY``, or from
``configure(base_url=..., api_key=...)``.
"""

from ._client import (
    AsyncFrameStreamer,
    AsyncHeraldClient,
    FrameStreamer,
    HeraldClient,
    broadcast_notification,
    broadcast_org_event,
    configure,
    default_client,
    publish,
)
from ._listen import AsyncHeraldListener, HeraldListener, HeraldSocketError, listen
from ._errors import (
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    HeraldAPIError,
    HeraldConnectionError,
    HeraldError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
)

__all__ = [
    "AsyncFrameStreamer",
    "AsyncHeraldClient",
    "AsyncHeraldListener",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "FrameStreamer",
    "HeraldAPIError",
    "HeraldClient",
    "HeraldConnectionError",
    "HeraldError",
    "HeraldListener",
    "HeraldSocketError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
    "broadcast_notification",
    "broadcast_org_event",
    "configure",
    "default_client",
    "listen",
    "publish",
]
