"""Retention: stored events (their payloads hold phone numbers) older than a window are deleted.

In batches of ``BATCH`` rows, each its own short transaction, so no lock on the events table is
held for long and workers applying new events never wait behind a prune. Recordings and their
participants stay: they are derived state, and the read API keeps serving them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from prometheus_client import Counter
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.base.timeutil import utcnow
from app.records.models import WebhookEvent

log = structlog.get_logger(__name__)

BATCH = 5000

PRUNED = Counter("voice_events_pruned_total", "Stored webhook events deleted by retention.")


@dataclass
class PruneReport:
    cutoff: datetime
    deleted: int = 0
    batches: int = 0
    longest_batch_seconds: float = 0.0
    seconds: float = 0.0
    dry_run: bool = False
    finished: bool = True
    batch_seconds: list[float] = field(default_factory=list, repr=False)


def prune(
    session: Session,
    older_than_days: int,
    *,
    dry_run: bool = False,
    batch: int = BATCH,
    now: datetime | None = None,
    progress: Callable[[PruneReport], None] | None = None,
    max_seconds: float | None = None,
) -> PruneReport:
    """Delete events received before now - ``older_than_days``; a dry run only counts them.

    With ``max_seconds``, stops after the batch that crosses it (``report.finished`` is then False):
    a periodic task must end within its time limit, and the next run goes on where it stopped.
    """
    cutoff = (now or utcnow()) - timedelta(days=older_than_days)
    report = PruneReport(cutoff=cutoff, dry_run=dry_run)
    started = time.monotonic()
    old = WebhookEvent.received_at < cutoff
    if dry_run:
        report.deleted = int(session.scalar(select(func.count()).select_from(WebhookEvent).where(old)) or 0)
        session.rollback()
    else:
        while True:
            began = time.monotonic()
            # Rows a worker holds right now (a duplicate re-timing its event) are skipped, not waited for.
            ids = select(WebhookEvent.id).where(old).order_by(WebhookEvent.received_at).limit(batch)
            ids = ids.with_for_update(skip_locked=True)
            deleted = session.execute(
                delete(WebhookEvent).where(WebhookEvent.id.in_(ids.scalar_subquery())),
                execution_options={"synchronize_session": False},
            ).rowcount
            session.commit()
            took = time.monotonic() - began
            if not deleted:
                break
            report.deleted += deleted
            report.batches += 1
            report.batch_seconds.append(took)
            report.longest_batch_seconds = max(report.longest_batch_seconds, took)
            PRUNED.inc(deleted)
            if progress is not None:
                progress(report)
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                report.finished = False
                break
    report.seconds = time.monotonic() - started
    log.info("events_pruned", deleted=report.deleted, batches=report.batches, dry_run=dry_run, finished=report.finished,
             cutoff=cutoff.isoformat(), older_than_days=older_than_days, seconds=round(report.seconds, 3),
             longest_batch_seconds=round(report.longest_batch_seconds, 3))
    return report
