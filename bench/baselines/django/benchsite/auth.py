"""HS256 user tokens (PyJWT) and the service API key."""

import hmac

import jwt
from django.conf import settings


def user_from_token(token):
    """The token's `sub`, or None when the token is not a valid HS256 token."""
    if not token:
        return None
    try:
        claims = jwt.decode(token, settings.BENCH_JWT_SECRET, algorithms=["HS256"], leeway=30)
    except jwt.PyJWTError:
        return None
    return claims.get("sub"), claims.get("orgs") or []


def bearer(headers):
    value = headers.get("Authorization", "")
    return value[len("Bearer "):] if value.startswith("Bearer ") else None


def service_key_ok(headers):
    return hmac.compare_digest(bearer(headers) or "", settings.BENCH_API_KEY)
