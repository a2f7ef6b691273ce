"""The three WebSocket endpoints, as Django Channels consumers: each joins one group and
serializes every group message it is handed into a JSON text frame."""

import json
from datetime import datetime, timezone
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer

from .auth import user_from_token


def now():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class GroupConsumer(AsyncWebsocketConsumer):
    group_name = None

    def group_for(self, user, orgs):
        raise NotImplementedError

    async def connect(self):
        query = parse_qs(self.scope.get("query_string", b"").decode())
        found = user_from_token((query.get("token") or [None])[0])
        if found is None:
            await self.accept()
            await self.close(code=4001)
            return
        user, orgs = found
        group = self.group_for(user, orgs)
        if group is None:
            await self.accept()
            await self.close(code=4003)
            return
        self.group_name = group
        await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        await self.send(
            text_data=json.dumps(
                {
                    "type": "system",
                    "status": "connected",
                    "message": "WebSocket connection established",
                    "user_id": user,
                    "timestamp": now(),
                }
            )
        )

    async def disconnect(self, code):
        if self.group_name is not None:
            await self.channel_layer.group_discard(self.group_name, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        try:
            message = json.loads(text_data or "")
        except ValueError:
            return
        if message.get("type") == "ping":
            await self.send(text_data=json.dumps({"type": "pong", "timestamp": now()}))


class NotificationConsumer(GroupConsumer):
    def group_for(self, user, orgs):
        return f"user_{user}"

    async def send_notification(self, event):
        await self.send(
            text_data=json.dumps(
                {
                    "type": "notification",
                    "notification": event["notification"],
                    "id": event["id"],
                    "timestamp": event["timestamp"],
                }
            )
        )


class OrgEventConsumer(GroupConsumer):
    def group_for(self, user, orgs):
        org = self.scope["url_route"]["kwargs"]["org_id"]
        return f"org_{org}" if org in orgs else None

    async def org_event(self, event):
        await self.send(
            text_data=json.dumps(
                {
                    "type": "org_event",
                    "org_id": event["org_id"],
                    "event_type": event["event_type"],
                    "data": event["data"],
                    "id": event["id"],
                    "timestamp": event["timestamp"],
                }
            )
        )


class FrameStreamConsumer(GroupConsumer):
    def group_for(self, user, orgs):
        wanted = self.scope["url_route"]["kwargs"]["user_id"]
        return f"llm_{user}" if wanted == user else None

    async def llm_message(self, event):
        await self.send(text_data=json.dumps(event["message"]))
