"""The ASGI application daphne serves: Django for HTTP, Channels consumers for WebSockets."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402
from django.urls import path  # noqa: E402

django_application = get_asgi_application()

from . import consumers  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_application,
        "websocket": URLRouter(
            [
                path("ws/notifications/", consumers.NotificationConsumer.as_asgi()),
                path("ws/events/<str:org_id>/", consumers.OrgEventConsumer.as_asgi()),
                path("ws/frame-stream/<str:user_id>/", consumers.FrameStreamConsumer.as_asgi()),
            ]
        ),
    }
)
