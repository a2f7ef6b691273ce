"""The backend side of the seeds' Django Channels app: the helpers views, signals and
Celery tasks call to push to sockets. herald's bridge must deliver these unchanged."""
