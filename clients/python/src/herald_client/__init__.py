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
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "FrameStreamer",
    "HeraldAPIError",
    "HeraldClient",
    "HeraldConnectionError",
    "HeraldError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
    "broadcast_notification",
    "broadcast_org_event",
    "configure",
    "default_client",
    "publish",
]
