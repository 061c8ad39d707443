"""``flask voice ...``: operate on dead letters, the pending set and event retention."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
from flask import current_app
from sqlalchemy import select

from app.applying.deadletters import drain_broker, replay
from app.applying.deadletters import drain_redis as drain_redis_dead_letters
from app.applying.retention import prune
from app.base.extensions import db
from app.base.timeutil import to_rfc3339
from app.operating.simulator import Reader, simulate, table, verify
from app.plumbing import pending
from app.plumbing.publish import resend_due
from app.plumbing.queues import REPLAY_QUEUE
from app.records.models import DeadLetter
from config import ConfigError, check_retention_days


@click.group()
def voice() -> None:
    """Voice webhook operations."""


@voice.command("dead-letters")
@click.option("--all", "show_all", is_flag=True, help="Include dead letters already replayed.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dead_letters(show_all: bool, as_json: bool) -> None:
    """List events that gave up after their last retry."""
    drain_redis_dead_letters()
    drain_broker()
    query = select(DeadLetter).order_by(DeadLetter.id)
    if not show_all:
        query = query.where(DeadLetter.replayed_at.is_(None))
    letters = list(db.session.scalars(query))
    for letter in letters:
        row = {
            "id": letter.id,
            "session_id": letter.session_id,
            "failed_at": to_rfc3339(letter.failed_at),
            "attempts": letter.attempts,
            "replayed_at": to_rfc3339(letter.replayed_at),
            "error": letter.error,
        }
        if as_json:
            click.echo(json.dumps(row))
        else:
            click.echo(
                f"{row['id']:>6}  {row['failed_at']}  {row['session_id']}  attempts={row['attempts']}  {row['error']}"
            )
    if not as_json:
        click.echo(f"{len(letters)} dead letter(s)")


@voice.command("replay")
@click.argument("letter_ids", nargs=-1, type=int)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter not replayed yet.")
def replay_command(letter_ids: tuple[int, ...], replay_all: bool) -> None:
    """Send dead letters (by ID, or --all) to the replay queue; each applies once."""
    if bool(letter_ids) == replay_all:
        raise click.UsageError("give dead-letter IDs or --all, not both")
    drain_redis_dead_letters()
    drain_broker()
    replayed = replay(None if replay_all else list(letter_ids), REPLAY_QUEUE)
    missing = sorted(set(letter_ids) - set(replayed))
    click.echo(f"replayed {len(replayed)} dead letter(s)" + (f"; not found: {missing}" if missing else ""))
    if missing:
        raise SystemExit(1)


@voice.command("simulate")
@click.option("--url", required=True, help="The webhook URL, e.g. http://127.0.0.1:8000/api/v1/voice/webhook")
@click.option("--calls", default=10, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--participants", default=2, show_default=True, type=click.IntRange(1, 20))
@click.option("--duplicates", default=0.2, show_default=True, type=click.FloatRange(0, 1),
              help="Share of final requests AT delivers twice.")
@click.option("--secret", default=None, help="Sign each body (hex HMAC-SHA256) with this secret.")
@click.option("--token", default=None, help="Send this token as ?token= (AT's own way).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option("--expected", "show_expected", is_flag=True, help="Also print what each recording should become.")
@click.option("--verify", "check", is_flag=True,
              help="Once the queue drains, read every recording back (needs --api-key) and print a pass/fail table.")
@click.option("--api-key", default=None, envvar="VOICE_API_KEY", help="Bearer key for the read API (or VOICE_API_KEY).")
@click.option("--api-url", default=None, help="Base URL of the read API, if not the webhook URL's host.")
@click.option("--verify-timeout", default=300.0, show_default=True, type=click.FloatRange(1, 86400),
              help="Seconds to wait for every recording to hold what was sent.")
def simulate_command(url: str, calls: int, participants: int, duplicates: float, secret: str | None,
                     token: str | None, seed: int, concurrency: int, show_expected: bool, check: bool,
                     api_key: str | None, api_url: str | None, verify_timeout: float) -> None:
    """Play realistic Africa's Talking call sequences against a deployment (progress on stderr)."""
    if secret and token:
        raise click.UsageError("give --secret or --token, not both")
    if check and not api_key:
        raise click.UsageError("--verify reads the recordings back through the read API: give --api-key")
    try:
        reader = Reader(url, api_key, api_url) if check and api_key else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    with progress_bar(calls, "calls sent") as advance:
        report = simulate(url, calls, participants, duplicates, secret=secret, token=token, seed=seed,
                          concurrency=concurrency,
                          signature_header=current_app.extensions["settings"].webhook_signature_header,
                          progress=advance)
    summary = report.summary()
    if show_expected:
        summary["expected"] = report.expected
    failed = bool(report.failed_requests)
    if reader is not None:
        click.echo(f"reading {len(report.expected)} recording(s) back once the queue drains…", err=True)
        try:
            checks = verify(reader, report.expected, timeout=verify_timeout, concurrency=concurrency)
        except (OSError, PermissionError) as exc:
            raise click.ClickException(f"--verify could not read the recordings: {exc}") from None
        click.echo(table(checks))
        passed = sum(c.ok for c in checks)
        summary["verified"] = {"passed": passed, "failed": len(checks) - passed}
        failed = failed or passed != len(checks)
    click.echo(json.dumps(summary))
    if failed:
        raise SystemExit(1)


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """Progress on stderr: click's bar on a terminal; elsewhere (a CI log) a line every 10% or 10 s."""
    if sys.stderr.isatty():
        with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
            yield bar.update
        return
    done, shown, last = 0, 0, time.monotonic()

    def advance(n: int) -> None:
        nonlocal done, shown, last
        done += n
        if done == total or done - shown >= max(1, total // 10) or time.monotonic() - last >= 10:
            click.echo(f"{label}: {done}/{total}", err=True)
            shown, last = done, time.monotonic()

    yield advance


@voice.command("sweep")
def sweep() -> None:
    """Send again, now, every pending event that is due (what the periodic sweeper does)."""
    sent = resend_due()
    click.echo(f"re-sent {sent} pending event(s); {pending.count()} pending")


@voice.command("prune")
@click.option("--older-than", "older_than", type=int, default=None, metavar="DAYS",
              help="Delete events received more than DAYS ago (default: EVENT_RETENTION_DAYS).")
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
def prune_command(older_than: int | None, dry_run: bool) -> None:
    """Delete stored events older than the retention window, in short batches."""
    settings = current_app.extensions["settings"]
    if older_than is None and not settings.event_retention_days:
        raise click.UsageError("retention is off (EVENT_RETENTION_DAYS=0): give --older-than DAYS")
    days = settings.event_retention_days if older_than is None else older_than
    try:
        check_retention_days(days, settings.dedup_ttl_seconds, "--older-than")
        if days <= 0:  # 0 means "keep forever" in the setting; as a window it would delete everything
            raise ConfigError("--older-than must be a number of days of at least 7")
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    report = prune(db.session, days, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {report.deleted} event(s) received before {to_rfc3339(report.cutoff)}"
               + ("" if dry_run else f" in {report.batches} batch(es)"))
