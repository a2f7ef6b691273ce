"""The publish API, the generate call with an echo stream, and a health check."""

import asyncio
import json
import uuid

from channels.layers import get_channel_layer
from django.http import JsonResponse

from .auth import bearer, service_key_ok, user_from_token
from .consumers import now

# The pause before each echo delta, as herald's echo provider (50 tokens a second).
ECHO_INTERVAL = 0.020

# Running echo tasks, kept so they are not garbage-collected.
_tasks = set()


async def healthz(request):
    return JsonResponse({"status": "ok"})


def _body(request):
    try:
        return json.loads(request.body or b"{}")
    except ValueError:
        return None


async def publish_notification(request, user_id):
    if request.method != "POST":
        return JsonResponse({"error": "method"}, status=405)
    if not service_key_ok(request.headers):
        return JsonResponse({"error": "unauthorized"}, status=401)
    body = _body(request)
    if not isinstance(body, dict):
        return JsonResponse({"error": "bad_request"}, status=400)
    message_id = str(uuid.uuid4())
    await get_channel_layer().group_send(
        f"user_{user_id}",
        {"type": "send.notification", "notification": body, "id": message_id, "timestamp": now()},
    )
    return JsonResponse({"id": message_id}, status=202)


async def publish_org_event(request, org_id):
    if request.method != "POST":
        return JsonResponse({"error": "method"}, status=405)
    if not service_key_ok(request.headers):
        return JsonResponse({"error": "unauthorized"}, status=401)
    body = _body(request)
    if not isinstance(body, dict) or not body.get("event_type"):
        return JsonResponse({"error": "bad_request"}, status=400)
    message_id = str(uuid.uuid4())
    await get_channel_layer().group_send(
        f"org_{org_id}",
        {
            "type": "org.event",
            "org_id": org_id,
            "event_type": body["event_type"],
            "data": body.get("data") or {},
            "id": message_id,
            "timestamp": now(),
        },
    )
    return JsonResponse({"id": message_id}, status=202)


async def _echo_stream(user, chat_id, task_id, prompt):
    layer = get_channel_layer()
    group = f"llm_{user}"

    async def send(message):
        message.update({"user_id": user, "chat_id": chat_id, "task_id": task_id, "timestamp": now()})
        await layer.group_send(group, {"type": "llm.message", "message": message})

    await send({"type": "llm_status", "status": "started", "message": "task started"})
    await send({"type": "llm_status", "status": "thinking", "message": "thinking"})
    await send(
        {
            "type": "llm_frame",
            "frame": {"status": "thinking", "message": "LLM is generating response...", "progress": "indeterminate"},
        }
    )
    await send({"type": "llm_status", "status": "streaming", "message": "streaming"})
    reply = "Echo: " + prompt.strip()
    loop = asyncio.get_running_loop()
    start = loop.time()
    for index, word in enumerate(reply.split(" ")):
        delay = start + (index + 1) * ECHO_INTERVAL - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        delta = word if index == 0 else " " + word
        await send({"type": "llm_frame", "frame": {"status": "streaming", "delta": delta, "index": index}})
    await send({"type": "llm_response", "data": {"event": "response_generated", "response": reply}})
    await send({"type": "llm_status", "status": "completed", "message": "completed"})


async def generate_response(request):
    if request.method != "POST":
        return JsonResponse({"error": "method"}, status=405)
    found = user_from_token(bearer(request.headers))
    if found is None:
        return JsonResponse({"error": "unauthorized"}, status=401)
    user, _orgs = found
    body = _body(request)
    if not isinstance(body, dict) or body.get("user_id") != user or not body.get("prompt"):
        return JsonResponse({"error": "bad_request"}, status=400)
    task_id = str(uuid.uuid4())
    task = asyncio.get_running_loop().create_task(
        _echo_stream(user, str(body.get("chat_id", "chat")), task_id, body["prompt"])
    )
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return JsonResponse({"task_id": task_id, "chat_id": body.get("chat_id"), "status": "queued"}, status=202)
