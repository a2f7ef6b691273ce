"""The original Django Channels app's broadcast helpers, as written for Django Channels + channels_redis.

Consumers joined `user_{id}` (NotificationConsumer) and `org_{id}` (OrgEventConsumer);
these helpers reach them from sync code (views, signals, Celery tasks) with
`async_to_sync(channel_layer.group_send)`. Nothing here knows about herald.
"""

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer


def broadcast_notification(user_id, notification):
    channel_layer = get_channel_layer()
    async_to_sync(channel_layer.group_send)(
        f"user_{user_id}",
        {"type": "send_notification", "notification": notification},
    )


def broadcast_org_event(org_id, event_type, data):
    channel_layer = get_channel_layer()
    async_to_sync(channel_layer.group_send)(
        f"org_{org_id}",
        {"type": "org_event", "event_type": event_type, "data": data},
    )


class FrameStreamer:
    """Pushes an LLM task's progress to the user's frame-stream consumer (group
    `frames_{user_id}`), whose handlers forward each event to the browser as is."""

    def __init__(self, user_id, chat_id):
        self.group = f"frames_{user_id}"
        self.chat_id = chat_id
        self.index = 0
        self.channel_layer = get_channel_layer()

    def _send(self, event):
        event["chat_id"] = self.chat_id
        async_to_sync(self.channel_layer.group_send)(self.group, event)

    def notify_task_started(self, prompt):
        self._send({"type": "llm.status", "status": "started", "message": "Task started"})

    def notify_llm_thinking(self):
        self._send(
            {
                "type": "llm.frame",
                "frame": {
                    "status": "thinking",
                    "message": "LLM is generating response...",
                    "progress": "indeterminate",
                },
            }
        )

    def notify_frame(self, delta):
        self._send(
            {"type": "llm.frame", "frame": {"status": "streaming", "delta": delta, "index": self.index}}
        )
        self.index += 1

    def notify_task_completed(self, response):
        self._send({"type": "llm.status", "status": "completed", "message": response})
