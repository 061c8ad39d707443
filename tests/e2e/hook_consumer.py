"""A downstream system's own Celery worker: the ready hook's consumer in the end-to-end tests.

``celery -A tests.e2e.hook_consumer worker -Q <VOICE_HOOK_QUEUE>``: it shares nothing with the
service but the broker, and writes every task it receives (id and argument) to ``HOOK_LOG``.
"""

from __future__ import annotations

import json
import os

from celery import Celery, Task

app = Celery("hook_consumer", broker=os.environ["REDIS_URL"])
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(bind=True, name=os.environ.get("VOICE_HOOK_TASK", "crm.tasks.recording_ready"))
def recording_ready(self: Task, recording: dict) -> None:
    with open(os.environ["HOOK_LOG"], "a") as log:
        log.write(json.dumps({"task_id": self.request.id, "recording": recording}) + "\n")
