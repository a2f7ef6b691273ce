"""Runs the original Django Channels app's helpers against a channels_redis layer, for tests/it/django.rs.

    python send.py '<JSON list of steps>'

Environment: HERALD_TEST_REDIS_URL, HERALD_TEST_LAYER (core or pubsub), optionally
HERALD_TEST_KEYS (comma list: symmetric_encryption_keys). Steps:
  {"call": "broadcast_notification", "args": [user_id, notification]}
  {"call": "broadcast_org_event", "args": [org_id, event_type, data]}
  {"call": "group_send", "args": [group, message]}        raw group_send
  {"call": "celery", "task": "export_report" | "generate_response", "args": [...]}
  {"call": "wait_member", "args": [group]}   waits until a herald channel is in the group
  {"call": "wait_psubscribed"}              waits until some client PSUBSCRIBEs (herald)
Prints one line per step, then "done".
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import django  # noqa: E402
from django.conf import settings  # noqa: E402

LAYERS = {
    "core": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}

config = {"hosts": [os.environ["HERALD_TEST_REDIS_URL"]]}
if os.environ.get("HERALD_TEST_KEYS"):
    config["symmetric_encryption_keys"] = os.environ["HERALD_TEST_KEYS"].split(",")
settings.configure(
    INSTALLED_APPS=["channels"],
    CHANNEL_LAYERS={"default": {"BACKEND": LAYERS[os.environ["HERALD_TEST_LAYER"]], "CONFIG": config}},
)
django.setup()

from asgiref.sync import async_to_sync  # noqa: E402
from channels.layers import get_channel_layer  # noqa: E402

from seed_app import broadcast, tasks  # noqa: E402


def wait_member(group):
    import redis

    client = redis.Redis.from_url(os.environ["HERALD_TEST_REDIS_URL"])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if any(m.startswith(b"herald") for m in client.zrange(f"asgi:group:{group}", 0, -1)):
                return
        except redis.ConnectionError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"no herald channel joined {group} within 20 s")


def wait_psubscribed():
    import redis

    client = redis.Redis.from_url(os.environ["HERALD_TEST_REDIS_URL"])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if client.pubsub_numpat() > 0:
                return
        except redis.ConnectionError:
            pass
        time.sleep(0.05)
    raise SystemExit("nobody PSUBSCRIBEd within 20 s")


for step in json.loads(sys.argv[1]):
    call = step["call"]
    args = step.get("args", [])
    if call == "broadcast_notification":
        broadcast.broadcast_notification(*args)
    elif call == "broadcast_org_event":
        broadcast.broadcast_org_event(*args)
    elif call == "group_send":
        async_to_sync(get_channel_layer().group_send)(*args)
    elif call == "celery":
        tasks.run_in_worker(getattr(tasks, step["task"]), *args)
    elif call == "wait_member":
        wait_member(*args)
    elif call == "wait_psubscribed":
        wait_psubscribed()
    else:
        raise SystemExit(f"unknown step {call!r}")
    print(call, flush=True)
print("done", flush=True)
