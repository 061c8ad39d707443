"""Retention: the window's bounds, batched pruning of old events, the CLI and the periodic task."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from app.applying import retention
from app.applying.domain import apply_event
from app.base.extensions import db
from app.celery_app import celery_config
from app.payload.events import Event
from app.records.models import Participant, VoiceRecording, WebhookEvent
from config import ConfigError, Settings

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"EVENT_RETENTION_DAYS": "3"}, "EVENT_RETENTION_DAYS must be 0 (keep forever) or at least 7 days"),
        ({"EVENT_RETENTION_DAYS": "-1"}, "EVENT_RETENTION_DAYS must be between 0 and 36500"),
        ({"EVENT_RETENTION_DAYS": "week"}, "EVENT_RETENTION_DAYS must be an integer"),
        ({"EVENT_RETENTION_DAYS": "7", "DEDUP_TTL_SECONDS": str(30 * 86400)},
         "EVENT_RETENTION_DAYS must be 0 (keep forever) or at least 30 days"),
        ({"EVENT_RETENTION_DAYS": "10", "DEDUP_TTL_SECONDS": str(10 * 86400 + 1)},
         "EVENT_RETENTION_DAYS must be 0 (keep forever) or at least 11 days"),
        ({"VOICE_HOOK_TASK": "crm tasks"}, "VOICE_HOOK_TASK must be a Celery task name"),
        ({"VOICE_HOOK_TASK": "crm.ready", "VOICE_HOOK_QUEUE": "a queue"}, "VOICE_HOOK_QUEUE must be a queue name"),
    ],
)
def test_bad_settings_are_refused_naming_the_variable(env: dict, error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(env)


def test_good_settings() -> None:
    assert Settings.from_env({}).event_retention_days == 0
    assert Settings.from_env({}).voice_hook_queue == "voice-hooks"
    settings = Settings.from_env({"EVENT_RETENTION_DAYS": "30", "DEDUP_TTL_SECONDS": str(30 * 86400),
                                  "VOICE_HOOK_TASK": "crm.tasks.recording_ready", "VOICE_HOOK_QUEUE": "crm"})
    assert (settings.event_retention_days, settings.voice_hook_task, settings.voice_hook_queue) == (
        30, "crm.tasks.recording_ready", "crm")


def test_the_periodic_prune_is_scheduled_only_when_retention_is_on() -> None:
    assert "prune-events" not in celery_config(Settings())["beat_schedule"]
    schedule = celery_config(Settings(event_retention_days=7))["beat_schedule"]["prune-events"]
    assert schedule["task"] == "voice.prune_events"


def seed(app: Flask, ages_in_days: list[float]) -> None:
    """One event per age, on a few recordings, each with its own participant."""
    with app.app_context():
        for n, age in enumerate(ages_in_days):
            phone = f"+2547{n:08}"
            fields = {"sessionId": f"R{n % 3}", "status": "completed", "phoneNumber": phone, "duration": n}
            event = Event(f"R{n % 3}", "completed", phone, None, n, fields)
            apply_event(db.session, event, NOW - timedelta(days=age), clock=lambda: NOW)


def counts(app: Flask) -> tuple[int, int, int]:
    with app.app_context():
        return tuple(db.session.scalar(select(func.count()).select_from(model))  # type: ignore[return-value]
                     for model in (WebhookEvent, VoiceRecording, Participant))


def test_prune_deletes_old_events_in_batches_and_keeps_recordings(app: Flask) -> None:
    ages = [1, 6.9, 7.1, 8, 30, 400, 2, 10, 11]
    seed(app, ages)
    old = sum(1 for age in ages if age > 7)  # 6, by construction
    before = retention.PRUNED._value.get()
    with app.app_context():
        dry = retention.prune(db.session, 7, dry_run=True, now=NOW)
    assert (dry.deleted, counts(app)) == (old, (len(ages), 3, len(ages)))
    with app.app_context():
        report = retention.prune(db.session, 7, batch=4, now=NOW)
    assert (report.deleted, report.batches) == (old, 2)
    assert counts(app) == (len(ages) - old, 3, len(ages))  # recordings and participants stay
    assert retention.PRUNED._value.get() == before + old
    with app.app_context():
        assert retention.prune(db.session, 7, now=NOW).deleted == 0


def run(app: Flask, *args: str) -> Any:
    """``flask voice ...`` as the flask command runs it: inside an app context."""
    with app.app_context():
        return app.test_cli_runner().invoke(args=["voice", *args])


def test_flask_voice_prune(make_app: Any, settings: Settings) -> None:
    app = make_app(replace(settings, event_retention_days=0))
    refused = run(app, "prune")
    assert refused.exit_code == 2 and "retention is off" in refused.output
    for days in ("3", "0"):
        refused = run(app, "prune", "--older-than", days)
        assert refused.exit_code == 2 and "--older-than" in refused.output
    seed(app, [1, 100, 200])
    dry = run(app, "prune", "--older-than", "30", "--dry-run")
    assert dry.exit_code == 0 and dry.output.startswith("would delete 2 event(s) received before ")
    assert counts(app)[0] == 3
    done = run(app, "prune", "--older-than", "30")
    assert done.exit_code == 0 and done.output.startswith("deleted 2 event(s)")
    assert counts(app)[0] == 1


def test_the_setting_is_the_default_window(make_app: Any, settings: Settings) -> None:
    app = make_app(replace(settings, event_retention_days=150))
    seed(app, [1, 100, 200])
    assert run(app, "prune").output.startswith("deleted 1 event(s)")


def test_the_periodic_task_prunes_by_the_setting(make_app: Any, settings: Settings) -> None:
    from app.applying.tasks import prune_events_task

    app = make_app(replace(settings, event_retention_days=0))
    seed(app, [1, 100, 200])
    with app.app_context():
        assert prune_events_task.run() == 0  # retention off: the task does nothing
    assert counts(app)[0] == 3
    app = make_app(replace(settings, event_retention_days=150))
    seed(app, [1, 100, 200])
    with app.app_context():
        assert prune_events_task.run() == 1
    assert counts(app)[0] == 2


def test_a_time_budget_stops_after_the_batch_that_crosses_it(app: Flask) -> None:
    seed(app, [10, 11, 12, 13, 14])
    with app.app_context():
        report = retention.prune(db.session, 7, batch=2, now=NOW, max_seconds=0)
    assert (report.deleted, report.batches, report.finished) == (2, 1, False)
    assert counts(app)[0] == 3
