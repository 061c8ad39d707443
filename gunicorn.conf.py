"""gunicorn settings for ``web``; each can be overridden from the environment."""

import os
import sys


def _env_int(name, default, low, high):
    """An integer setting; a bad one stops gunicorn with a line naming it, not a traceback."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        # SystemExit passes through gunicorn's config loader, which prints a traceback for errors.
        sys.stderr.write(f"{name} must be an integer between {low} and {high}, got {raw!r}\n")
        raise SystemExit(1)
    return value


bind = f"{os.environ.get('HOST', '0.0.0.0')}:{_env_int('PORT', 8000, 1, 65535)}"  # noqa: S104 - a server listens
# gthread: a slow client ties up one thread, not a whole worker process.
worker_class = "gthread"
workers = _env_int("WEB_CONCURRENCY", 2, 1, 64)
threads = _env_int("WEB_THREADS", 4, 1, 256)
timeout = 30
graceful_timeout = 20  # SIGTERM: answer what is in flight, then exit
keepalive = 5
# Bound what a client may send before the app sees it.
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
# Operators steer gunicorn by signals (HUP, TERM, TTIN/TTOU); a shared control socket in the
# home folder would also collide between instances on one machine.
control_socket_disable = True
accesslog = None  # the app logs one structured line per webhook
errorlog = "-"


def on_starting(server):
    """Drop metric files left by processes of an earlier run on this host."""
    from app.base.metrics import prune_dead_process_files

    prune_dead_process_files()


def post_fork(server, worker):
    """Each web process reports its own resident memory (voice_process_resident_memory_bytes)."""
    from app.base.metrics import track_process_memory

    track_process_memory("web")


def post_worker_init(worker):
    """The app is loaded: what start-up made, out of the garbage collector's walks (app.base.heap)."""
    from app.base.heap import freeze_startup_heap

    freeze_startup_heap()


def child_exit(server, worker):
    """Drop a dead worker's live metric files (prometheus_client multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
