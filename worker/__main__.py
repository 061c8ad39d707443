"""``python -m worker [options]``: Celery's worker command, without the ``celery`` umbrella command.

It takes the options of ``celery -A worker worker`` (``--pool``, ``--concurrency``, ``--queues``,
``--loglevel``, ...). The umbrella command imports every subcommand and plugin as it starts (its
shell's prompt toolkit and Flower's Tornado among them), and every worker process, pool processes
included, would carry those modules, about 10 MB, for nothing (``bench/worker_memory.py``).
"""

from __future__ import annotations

import os

from celery.bin.base import CLIContext
from celery.bin.worker import worker

from worker import celery_app


def main(argv: list[str] | None = None) -> None:
    """Run the worker until it stops; exits the process with the worker's exit code."""
    # What the umbrella command hands its subcommands (its own --no-color also reads NO_COLOR).
    context = CLIContext(app=celery_app, no_color=bool(os.environ.get("NO_COLOR")), workdir=None, quiet=False)
    worker.params.extend(celery_app.user_options.get("worker", []))
    worker.main(args=argv, prog_name="python -m worker", obj=context, auto_envvar_prefix="CELERY_WORKER")


if __name__ == "__main__":
    main()
