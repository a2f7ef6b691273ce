"""The Django Channels stack herald replaces, minimal: Django + channels + daphne + channels_redis, with only what
herald's benchmark scenarios use (bench/baselines/django/README.md)."""
