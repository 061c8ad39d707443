"""The apply task's log context (event_key, task_id...) ends with the task.

``app.applying.tasks.apply_webhook_event`` binds them to structlog's contextvars for its own lines; left
there, they labelled every line the worker logged after it (Celery's, the next message's
strategy) with the last task's event. ``Task.apply`` runs the task body here, through Celery's
tracer, signals included.
"""

from __future__ import annotations

from typing import Any

import pytest
import structlog
from flask import Flask

from app.applying import tasks
from app.applying.delivery import deliver
from app.applying.tasks import apply_webhook_event
from tests.support import sqlite_only

MESSAGE = {"session_id": "CTX", "status": "completed", "phone_number": "+254712345678", "recording_url": None,
           "duration": 7, "payload": {"sessionId": "CTX", "status": "completed", "phoneNumber": "+254712345678",
                                      "duration": "7"}}
RECEIVED = "2026-03-06T14:00:00+00:00"


@sqlite_only
@pytest.mark.parametrize("outcome", ["applied", "dead_lettered"])
def test_the_task_leaves_no_log_context_behind(app: Flask, monkeypatch: pytest.MonkeyPatch, outcome: str) -> None:
    bound: list[dict[str, Any]] = []

    def recording(*args: Any, **kwargs: Any) -> str:
        bound.append(structlog.contextvars.get_contextvars())
        if outcome == "dead_lettered":
            raise ValueError("not something a retry fixes")
        return deliver(*args, **kwargs)

    monkeypatch.setattr(tasks, "deliver", recording)
    result = apply_webhook_event.apply(args=(MESSAGE, RECEIVED, "req-ctx"))
    assert result.get() == outcome
    assert bound and bound[0]["request_id"] == "req-ctx" and bound[0]["task_id"] == result.id
    assert bound[0]["event_key"]  # bound while the task ran...
    assert structlog.contextvars.get_contextvars() == {}  # ...and gone once it returned
