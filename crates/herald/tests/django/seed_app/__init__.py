"""The backend side of the Django Channels app herald replaces: the helpers views, signals and
Celery tasks call to push to sockets. herald's bridge must deliver these unchanged."""
