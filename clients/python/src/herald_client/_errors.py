"""Exceptions: one class per kind of failure, each saying what went wrong and what to do."""

from typing import Optional


class HeraldError(Exception):
    """Base class of every error this package raises."""


class ConfigurationError(HeraldError):
    """The client is missing a setting (the API key or herald's URL)."""


class HeraldConnectionError(HeraldError):
    """herald could not be reached (refused, timed out, DNS...)."""


class HeraldAPIError(HeraldError):
    """herald answered with an error status.

    ``status`` is the HTTP status, ``error`` herald's error code (``bad_request``,
    ``unauthorized``...) and ``message`` its explanation.
    """

    hint = ""

    def __init__(
        self,
        status: int,
        error: Optional[str],
        message: str,
        method: str,
        path: str,
        outcome: Optional[str] = None,
    ):
        self.status = status
        self.error = error
        self.message = message
        self.method = method
        self.path = path
        self.outcome = outcome
        text = f"herald answered {status}"
        if error:
            text += f" {error}"
        text += f" to {method} {path}: {message}"
        if self.hint:
            text += f" ({self.hint})"
        super().__init__(text)


class BadRequestError(HeraldAPIError):
    """400: a malformed body or identifier."""

    hint = "identifiers are 1-128 characters of A-Z a-z 0-9 _ . : @ -; bodies are JSON objects"


class AuthenticationError(HeraldAPIError):
    """401: no API key, or not one of herald's HERALD_API_KEYS."""

    hint = "set HERALD_API_KEY (or configure(api_key=...)) to one of herald's HERALD_API_KEYS"


class NotFoundError(HeraldAPIError):
    """404: no such endpoint (is the URL herald's?)."""

    hint = "check HERALD_URL: it must be herald's base URL, e.g. http://127.0.0.1:8000"


class PayloadTooLargeError(HeraldAPIError):
    """413: the body is over herald's 64 KiB limit."""

    hint = "herald takes bodies of at most 64 KiB; send less per message"


class RateLimitError(HeraldAPIError):
    """429: too many requests."""

    hint = "slow down and retry later"


class ServiceUnavailableError(HeraldAPIError):
    """503: herald cannot take the message now (its broker is down, or it is shutting down).

    ``outcome`` is ``"not_published"`` when nothing was stored, ``"unknown"`` when the
    message may have been (herald sent it to Redis and got no answer). Either way,
    sending it again with the same ``idempotency_key`` never publishes it twice.
    """

    hint = "retry later with the same idempotency_key, which never publishes twice"


class ServerError(HeraldAPIError):
    """Any other 5xx: a failure inside herald (its logs have the cause)."""

    hint = "herald's logs have the cause; retrying may help"


_BY_STATUS = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_for(
    status: int, error: Optional[str], message: str, method: str, path: str, outcome: Optional[str] = None
) -> HeraldAPIError:
    """The exception for an error answer."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else HeraldAPIError
    return cls(status, error, message, method, path, outcome)
