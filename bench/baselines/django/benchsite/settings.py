"""Settings of the Django Channels baseline; the channel layer is channels_redis with its
default capacity and expiry, as the original app ran it."""

import os

SECRET_KEY = "herald-bench-django-baseline"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["channels"]
MIDDLEWARE = []
ROOT_URLCONF = "benchsite.urls"
ASGI_APPLICATION = "benchsite.asgi.application"
DATABASES = {}
USE_TZ = True
LOGGING_CONFIG = None

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")]},
    }
}

BENCH_JWT_SECRET = os.environ.get("BENCH_JWT_SECRET", "")
BENCH_API_KEY = os.environ.get("BENCH_API_KEY", "")
