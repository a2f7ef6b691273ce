"""Following channels over one WebSocket to herald's ``/ws/`` endpoint (docs/protocol.md,
"One connection, many channels"), sync and async.

``_Follow`` holds the protocol (which channels, each one's position, what to send after
a welcome, what to hand the app) without any I/O; ``HeraldListener`` and
``AsyncHeraldListener`` drive it over the ``websockets`` package's sync and asyncio
clients, so both behave the same.
"""

import asyncio
import json
import random
import time
from typing import Any, AsyncIterator, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union
from urllib.parse import urlsplit, urlunsplit

from ._errors import ConfigurationError, HeraldError

# Close codes after which reconnecting cannot help (docs/protocol.md, close codes).
FATAL_CLOSE_CODES = (4000, 4003, 1003, 1009)
# Subscription refusals that are final; 4429 is asked again after a backoff.
FATAL_SUBSCRIBE_CODES = (4000, 4003)

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0

Message = Dict[str, Any]
TokenSource = Union[str, Callable[[], str]]


class HeraldSocketError(HeraldError):
    """herald closed the socket with a code after which the listener stops (4000, 4003,
    1003, 1009, or 4001 with no way to get a fresh token)."""

    def __init__(self, message: str, code: int, reason: str = ""):
        super().__init__(message)
        self.code = code
        self.reason = reason


def _websockets():
    try:
        import websockets
        import websockets.asyncio.client
        import websockets.exceptions
        import websockets.sync.client
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ConfigurationError(
            "following channels needs the websockets package (13 or later): pip install 'herald-client[ws]'"
        ) from err
    return websockets


def _endpoint(url: str) -> str:
    """herald's ``/ws/`` URL from ``url``: http(s) becomes ws(s), and a URL with no path gets ``/ws/``."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ConfigurationError(f"herald URL {url!r} must start with ws://, wss://, http:// or https://")
    path = parts.path if parts.path not in ("", "/") else "/ws/"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def backoff_delay(attempt: int, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX) -> float:
    """Full jitter over a capped exponential: ``uniform(0, min(maximum, initial * 2**attempt))``."""
    return random.uniform(0, min(maximum, initial * (2**attempt)))


class _Channel:
    def __init__(self, name: str, since: Optional[int], epoch: Optional[str]):
        self.name = name
        self.offset = since
        self.epoch = epoch
        self.request_id: Optional[str] = None
        self.subscribed: Optional[Message] = None
        self.resuming = False
        self.refusals = 0


class _Follow:
    """The channels of one listener and their positions; no I/O."""

    def __init__(self, channels: Iterable[Union[str, Tuple[str, Optional[int], Optional[str]]]]):
        self.channels: Dict[str, _Channel] = {}
        self._ids = 0
        for item in channels:
            name, since, epoch = (item, None, None) if isinstance(item, str) else item
            if not isinstance(name, str) or not name:
                raise ValueError("each channel must be a non-empty string, e.g. 'notifications:alice'")
            self.channels[name] = _Channel(name, since, epoch)
        if not self.channels:
            raise ValueError("give at least one channel to follow, e.g. channels=['notifications:alice']")

    def position(self, channel: str) -> Tuple[Optional[str], Optional[int]]:
        """``(epoch, offset)`` of the last message of ``channel`` handed to the app."""
        state = self.channels[channel]
        return state.epoch, state.offset

    def subscribe(self, channel: _Channel) -> Message:
        self._ids += 1
        message: Message = {"type": "subscribe", "channel": channel.name, "id": f"s{self._ids}"}
        channel.resuming = channel.offset is not None
        if channel.offset is not None:
            message["since"] = channel.offset
            if channel.epoch:
                message["epoch"] = channel.epoch
        channel.request_id = message["id"]
        return message

    def on_welcome(self) -> List[Message]:
        """The ``subscribe`` messages to send on a new socket, each from its channel's position."""
        return [self.subscribe(channel) for channel in self.channels.values()]

    def on_message(self, message: Message) -> Tuple[bool, Optional[Tuple[float, str]]]:
        """Whether to hand ``message`` to the app, and ``(delay, channel)`` when a refused
        subscription is to be asked again after ``delay`` seconds."""
        kind = message.get("type")
        channel = self.channels.get(message.get("channel")) if isinstance(message.get("channel"), str) else None
        if kind == "subscribed":
            if channel and message.get("id") == channel.request_id:
                channel.subscribed = message
                channel.refusals = 0
                if not channel.resuming:
                    channel.epoch, channel.offset = message.get("epoch"), message.get("offset")
            return True, None
        if kind == "subscribe_error":
            if not channel or message.get("id") != channel.request_id:
                return False, None
            if message.get("code") in FATAL_SUBSCRIBE_CODES:
                del self.channels[channel.name]
                return True, None
            delay = backoff_delay(channel.refusals)
            channel.refusals += 1
            return True, (delay, channel.name)
        if kind == "unsubscribed":
            if channel and "id" not in message:
                del self.channels[channel.name]
            return True, None
        if kind == "system" and message.get("status") == "recovered" and channel:
            channel.resuming = False
            epoch, offset = message.get("epoch"), message.get("offset")
            if message.get("recovered"):
                if isinstance(offset, int) and offset > (channel.offset if channel.offset is not None else -1):
                    channel.offset = offset
                channel.epoch = epoch or channel.epoch
            elif isinstance(epoch, str) and isinstance(offset, int):
                channel.epoch, channel.offset = epoch, offset
            elif channel.subscribed:
                channel.epoch, channel.offset = channel.subscribed.get("epoch"), channel.subscribed.get("offset")
            return True, None
        offset, epoch = message.get("offset"), message.get("epoch")
        if channel and isinstance(offset, int) and isinstance(epoch, str):
            if epoch == channel.epoch and channel.offset is not None and offset <= channel.offset:
                return False, None  # Replayed again: the app has it already.
            channel.epoch, channel.offset = epoch, offset
        elif isinstance(message.get("channel"), str) and channel is None:
            return False, None  # A channel no longer followed.
        return kind not in ("pong", "heartbeat_ack"), None


def _token(source: TokenSource) -> str:
    token = source() if callable(source) else source
    if not isinstance(token, str) or not token:
        raise ConfigurationError("the token must be a non-empty string (a user JWT for this herald)")
    return token


class _Policy:
    """What to do after a close: stop (raise) or wait and reconnect."""

    def __init__(self, token: TokenSource):
        self.token = token
        self.attempt = 0

    def after_close(self, code: Optional[int], reason: str, welcomed: bool) -> float:
        if code in FATAL_CLOSE_CODES:
            raise HeraldSocketError(f"herald closed the socket with {code} ({reason}); not reconnecting", code, reason)
        if code == 4001 and not callable(self.token):
            raise HeraldSocketError(
                f"herald refused the token (4001: {reason}); pass token= a function that returns a fresh one",
                code,
                reason,
            )
        if welcomed and code in (1000, None, 1006):
            self.attempt = 0
            return 0.0
        delay = backoff_delay(self.attempt)
        self.attempt += 1
        if code == 1001:
            delay = max(delay, random.uniform(0, 3.0))
        return delay


class _Listener:
    """What the sync and asyncio listeners share: the arguments, the protocol core
    (``_Follow``) and the reconnect policy."""

    def __init__(
        self,
        url: str,
        token: TokenSource,
        channels: Iterable[Union[str, Tuple[str, Optional[int], Optional[str]]]],
        reconnect: bool = True,
    ):
        self.url = _endpoint(url)
        self._follow = _Follow(channels)
        self._policy = _Policy(token)
        self.reconnect = reconnect
        self._ws: Any = None
        self._closed = False

    @property
    def channels(self) -> List[str]:
        return list(self._follow.channels)

    def position(self, channel: str) -> Tuple[Optional[str], Optional[int]]:
        return self._follow.position(channel)


class AsyncHeraldListener(_Listener):
    """Follows several channels over one socket to herald's ``/ws/`` endpoint (asyncio).

    ::

        async with AsyncHeraldListener("ws://127.0.0.1:8000/ws/", token=token,
                                       channels=["notifications:alice", "org:acme"]) as listener:
            async for message in listener:
                print(message["channel"], message["type"])

    It yields every message herald sends except heartbeat answers: the welcome,
    ``subscribed``, the channels' messages (each once, in order, across reconnects),
    ``recovered``, ``subscribe_error`` and ``unsubscribed``. It reconnects with capped
    exponential backoff and jitter and renews each subscription from its own position
    (``since``/``epoch``). A channel herald refuses with 4003/4000, or ends (membership
    lost), is dropped; 4429 is asked again later. ``token`` is a string or a function
    returning a fresh one (called for every connection). A channel may be given as
    ``(name, since, epoch)`` to start from a known position (``since=0`` replays history).
    """

    def __init__(
        self,
        url: str,
        token: TokenSource,
        channels: Iterable[Union[str, Tuple[str, Optional[int], Optional[str]]]],
        reconnect: bool = True,
    ):
        super().__init__(url, token, channels, reconnect)
        self._retries: "List[asyncio.Task[None]]" = []

    async def __aenter__(self) -> "AsyncHeraldListener":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        for task in self._retries:
            task.cancel()
        if self._ws is not None:
            await self._ws.close()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._messages()

    async def _retry(self, delay: float, channel: str) -> None:
        await asyncio.sleep(delay)
        state = self._follow.channels.get(channel)
        if state is not None and self._ws is not None:
            await self._ws.send(json.dumps(self._follow.subscribe(state)))

    async def _messages(self) -> AsyncIterator[Message]:
        connect = _websockets().asyncio.client.connect
        exceptions = _websockets().exceptions
        while not self._closed:
            welcomed = False
            code: Optional[int] = None
            reason = ""
            try:
                headers = {"Authorization": f"Bearer {_token(self._policy.token)}"}
                async with connect(self.url, additional_headers=headers) as ws:
                    self._ws = ws
                    async for text in ws:
                        message = json.loads(text)
                        if message.get("type") == "system" and message.get("status") == "connected":
                            welcomed = True
                            self._policy.attempt = 0
                            for subscribe in self._follow.on_welcome():
                                await ws.send(json.dumps(subscribe))
                        deliver, retry = self._follow.on_message(message)
                        if retry is not None:
                            self._retries.append(asyncio.ensure_future(self._retry(*retry)))
                        if deliver:
                            yield message
                    code, reason = ws.close_code, ws.close_reason or ""
            except exceptions.ConnectionClosed as err:
                code, reason = (err.rcvd.code, err.rcvd.reason) if err.rcvd else (None, str(err))
            except (OSError, exceptions.InvalidHandshake, asyncio.TimeoutError) as err:
                code, reason = None, f"{err.__class__.__name__}: {err}"
            finally:
                self._ws = None
                for task in self._retries:
                    task.cancel()
                self._retries.clear()
            if self._closed:
                return
            delay = self._policy.after_close(code, reason, welcomed)
            if not self.reconnect:
                return
            await asyncio.sleep(delay)


class HeraldListener(_Listener):
    """``AsyncHeraldListener`` for plain threads: the same arguments and messages, with
    ``for message in listener``. A refused subscription (4429) is asked again once the
    next message arrives after its backoff."""


    def __enter__(self) -> "HeraldListener":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        if self._ws is not None:
            self._ws.close()

    def __iter__(self) -> Iterator[Message]:
        return self._messages()

    def _messages(self) -> Iterator[Message]:
        connect = _websockets().sync.client.connect
        exceptions = _websockets().exceptions
        while not self._closed:
            welcomed = False
            code: Optional[int] = None
            reason = ""
            retries: List[Tuple[float, str]] = []
            try:
                headers = {"Authorization": f"Bearer {_token(self._policy.token)}"}
                with connect(self.url, additional_headers=headers) as ws:
                    self._ws = ws
                    while True:
                        timeout = max(0.0, min(at for at, _ in retries) - time.monotonic()) if retries else None
                        try:
                            text = ws.recv(timeout=timeout)
                        except TimeoutError:
                            text = None
                        now = time.monotonic()
                        for at, channel in [r for r in retries if r[0] <= now]:
                            retries.remove((at, channel))
                            state = self._follow.channels.get(channel)
                            if state is not None:
                                ws.send(json.dumps(self._follow.subscribe(state)))
                        if text is None:
                            continue
                        message = json.loads(text)
                        if message.get("type") == "system" and message.get("status") == "connected":
                            welcomed = True
                            self._policy.attempt = 0
                            for subscribe in self._follow.on_welcome():
                                ws.send(json.dumps(subscribe))
                        deliver, retry = self._follow.on_message(message)
                        if retry is not None:
                            retries.append((time.monotonic() + retry[0], retry[1]))
                        if deliver:
                            yield message
            except exceptions.ConnectionClosed as err:
                code, reason = (err.rcvd.code, err.rcvd.reason) if err.rcvd else (None, str(err))
            except (OSError, exceptions.InvalidHandshake) as err:
                code, reason = None, f"{err.__class__.__name__}: {err}"
            finally:
                self._ws = None
            if self._closed:
                return
            delay = self._policy.after_close(code, reason, welcomed)
            if not self.reconnect:
                return
            time.sleep(delay)


def listen(
    url: str,
    token: TokenSource,
    channels: Iterable[Union[str, Tuple[str, Optional[int], Optional[str]]]],
) -> Iterator[Message]:
    """``for message in listen(url, token, ["notifications:alice", "org:acme"])``: a
    ``HeraldListener`` as a plain generator."""
    with HeraldListener(url, token, channels) as listener:
        yield from listener
