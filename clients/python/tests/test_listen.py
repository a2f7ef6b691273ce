"""HeraldListener and AsyncHeraldListener against a real herald's ``/ws/`` endpoint: several
channels over one socket, refusals that leave the socket open, ``since`` replays, resume
across server-side closes, and the close codes that stop the listener."""

import asyncio
import base64
import hashlib
import hmac
import json
import os
import threading
import time
import uuid

import httpx
import pytest

from herald_client import AsyncHeraldListener, HeraldListener, HeraldSocketError, listen
from herald_client._listen import _Follow


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(sub: str, ttl: int = 3600) -> str:
    """An HS256 token signed with the test herald's secret."""
    secret = os.environ.get("HERALD_JWT_SECRET")
    if not secret:
        pytest.exit("HERALD_JWT_SECRET is not set: run these tests through `cargo test -p herald --test it clients`", 2)
    now = int(time.time())
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + _b64(
        json.dumps({"sub": sub, "iat": now, "exp": now + ttl}).encode()
    )
    signature = hmac.new(secret.encode(), head.encode(), hashlib.sha256).digest()
    return head + "." + _b64(signature)


def ws_url(base: str) -> str:
    return base.replace("http", "ws", 1) + "/ws/"


def service(base: str, api_key: str, method: str, path: str, body=None):
    response = httpx.request(method, base + path, json=body, headers={"Authorization": f"Bearer {api_key}"})
    response.raise_for_status()
    return response.json() if response.content else None


def publish_later(action, delay=0.3):
    """Publishes from another thread once the listener has had time to subscribe."""
    timer = threading.Timer(delay, action)
    timer.start()
    return timer


def test_one_socket_follows_a_users_notifications_and_two_orgs(herald_url, api_key, user_id):
    org_a, org_b = f"pa-{uuid.uuid4().hex[:8]}", f"pb-{uuid.uuid4().hex[:8]}"
    for org in (org_a, org_b):
        service(herald_url, api_key, "PUT", f"/api/v1/orgs/{org}/members/{user_id}")
    channels = [f"notifications:{user_id}", f"org:{org_a}", f"org:{org_b}"]

    def publish():
        service(herald_url, api_key, "POST", f"/api/v1/notifications/{user_id}", {"title": "Hi"})
        service(herald_url, api_key, "POST", f"/api/v1/orgs/{org_a}/events", {"event_type": "a.done", "data": {}})
        service(herald_url, api_key, "POST", f"/api/v1/orgs/{org_b}/events", {"event_type": "b.done", "data": {}})

    seen = []
    timer = publish_later(publish)
    with HeraldListener(herald_url, token(user_id), channels) as listener:
        for message in listener:
            seen.append(message)
            if sum(1 for m in seen if "offset" in m and m["type"] in ("notification", "org_event")) == 3:
                break
        assert listener.position(f"org:{org_a}")[1] == 1
    timer.join()
    assert seen[0]["type"] == "system" and seen[0]["status"] == "connected"
    assert sorted(m["channel"] for m in seen if m["type"] == "subscribed") == sorted(channels)
    published = {m["channel"]: m for m in seen if m["type"] in ("notification", "org_event")}
    assert published[f"notifications:{user_id}"]["notification"] == {"title": "Hi"}
    assert published[f"org:{org_a}"]["event_type"] == "a.done"
    assert published[f"org:{org_b}"]["event_type"] == "b.done"


def test_a_refused_channel_is_dropped_and_the_others_go_on(herald_url, api_key, user_id):
    forbidden = f"org:not-{uuid.uuid4().hex[:8]}"
    timer = publish_later(
        lambda: service(herald_url, api_key, "POST", f"/api/v1/notifications/{user_id}", {"after": "refusal"})
    )
    seen = []
    with HeraldListener(herald_url, token(user_id), [forbidden, f"notifications:{user_id}"]) as listener:
        for message in listener:
            seen.append(message)
            if message["type"] == "notification":
                break
        assert listener.channels == [f"notifications:{user_id}"]
    timer.join()
    [refusal] = [m for m in seen if m["type"] == "subscribe_error"]
    assert refusal["channel"] == forbidden
    assert refusal["code"] == 4003
    assert seen[-1]["notification"] == {"after": "refusal"}


def test_since_zero_replays_history_then_recovered(herald_url, api_key, user_id):
    for n in (1, 2):
        service(herald_url, api_key, "POST", f"/api/v1/notifications/{user_id}", {"n": n})
    seen = []
    for message in listen(ws_url(herald_url), token(user_id), [(f"notifications:{user_id}", 0, None)]):
        seen.append(message)
        if message.get("status") == "recovered":
            break
    assert [m["notification"]["n"] for m in seen if m["type"] == "notification"] == [1, 2]
    assert seen[-1]["recovered"] is True
    assert seen[-1]["channel"] == f"notifications:{user_id}"


def test_async_listener_resumes_every_channel_across_server_closes(api_key):
    # HERALD_AGE_URL closes every socket after about a second.
    base = os.environ.get("HERALD_AGE_URL")
    if not base:
        pytest.exit("HERALD_AGE_URL is not set: run these tests through `cargo test -p herald --test it clients`", 2)
    user = f"py-{uuid.uuid4().hex[:12]}"
    org = f"po-{uuid.uuid4().hex[:8]}"
    service(base, api_key, "PUT", f"/api/v1/orgs/{org}/members/{user}")
    total = 30

    async def run():
        async def publish():
            await asyncio.sleep(0.3)
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}) as http:
                for n in range(1, total + 1):
                    (await http.post(f"{base}/api/v1/notifications/{user}", json={"n": n})).raise_for_status()
                    body = {"event_type": "tick", "data": {"n": n}}
                    (await http.post(f"{base}/api/v1/orgs/{org}/events", json=body)).raise_for_status()
                    await asyncio.sleep(0.08)

        publisher = asyncio.ensure_future(publish())
        notes, events, welcomes = [], [], 0
        async with AsyncHeraldListener(base, lambda: token(user), [f"notifications:{user}", f"org:{org}"]) as listener:
            async for message in listener:
                if message.get("status") == "connected":
                    welcomes += 1
                elif message["type"] == "notification":
                    notes.append(message["notification"]["n"])
                elif message["type"] == "org_event":
                    events.append(message["data"]["n"])
                if len(notes) == total and len(events) == total:
                    break
        await publisher
        return notes, events, welcomes

    notes, events, welcomes = asyncio.run(asyncio.wait_for(run(), 30))
    assert notes == list(range(1, total + 1))
    assert events == list(range(1, total + 1))
    assert welcomes >= 2, "herald closed the socket at least once, and the listener came back"


def test_a_refused_token_stops_the_listener(herald_url):
    with pytest.raises(HeraldSocketError) as raised:
        for _ in HeraldListener(herald_url, "not-a-jwt", ["notifications:x"]):
            pass
    assert raised.value.code == 4001
    assert "fresh one" in str(raised.value)


def test_follow_keeps_each_channels_position():
    follow = _Follow(["org:a", ("org:b", 5, "e0")])
    first = follow.on_welcome()
    assert [{k: v for k, v in m.items() if k != "id"} for m in first] == [
        {"type": "subscribe", "channel": "org:a"},
        {"type": "subscribe", "channel": "org:b", "since": 5, "epoch": "e0"},
    ]
    follow.on_message({"type": "subscribed", "channel": "org:a", "id": first[0]["id"], "epoch": "e1", "offset": 9})
    follow.on_message({"type": "subscribed", "channel": "org:b", "id": first[1]["id"], "epoch": "e1", "offset": 9})
    assert follow.position("org:a") == ("e1", 9)
    assert follow.position("org:b") == ("e0", 5), "a resuming channel keeps its position until recovered"
    assert follow.on_message({"type": "org_event", "channel": "org:a", "epoch": "e1", "offset": 10}) == (True, None)
    assert follow.on_message({"type": "org_event", "channel": "org:a", "epoch": "e1", "offset": 10}) == (False, None)
    follow.on_message({"type": "system", "status": "recovered", "recovered": False, "channel": "org:b", "epoch": "e2", "offset": 3})
    assert follow.position("org:b") == ("e2", 3)
    deliver, retry = follow.on_message(
        {"type": "subscribe_error", "channel": "org:b", "id": first[1]["id"], "code": 4429, "error": "x", "message": "x"}
    )
    assert deliver and retry is not None and retry[1] == "org:b" and 0 <= retry[0] <= 0.5
    again = follow.on_welcome()
    assert {m["channel"]: (m.get("since"), m.get("epoch")) for m in again} == {"org:a": (10, "e1"), "org:b": (3, "e2")}
    follow.on_message({"type": "unsubscribed", "channel": "org:a", "code": 4003, "reason": "membership revoked"})
    assert list(follow.channels) == ["org:b"]
