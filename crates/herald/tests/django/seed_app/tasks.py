"""A Celery-style task: plain sync code in a worker thread, calling the helpers through
async_to_sync, as the original Django Channels app's `@shared_task` bodies do (Celery itself is not needed to
exercise that path)."""

from concurrent.futures import ThreadPoolExecutor

from .broadcast import FrameStreamer, broadcast_notification


def export_report(user_id):
    # ... the export work ...
    broadcast_notification(user_id, {"title": "Task Complete", "body": "Your export is ready"})


def generate_response(user_id, chat_id, prompt):
    streamer = FrameStreamer(user_id, chat_id)
    streamer.notify_task_started(prompt)
    streamer.notify_llm_thinking()
    for word in ["Hello", " there"]:
        streamer.notify_frame(word)
    streamer.notify_task_completed("Hello there")


def run_in_worker(task, *args):
    """Runs `task` the way a Celery worker runs a task body: in another thread, with no
    event loop of its own."""
    with ThreadPoolExecutor(max_workers=1) as worker:
        worker.submit(task, *args).result()
