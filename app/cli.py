"""``flask voice ...``: operate on dead letters and the pending set."""

from __future__ import annotations

import json

import click
from sqlalchemy import select

from app.delivery import drain_redis_dead_letters, pending_count, replay, sweep_pending
from app.extensions import db
from app.models import DeadLetter
from app.queues import REPLAY_QUEUE
from app.timeutil import to_rfc3339


@click.group()
def voice() -> None:
    """Voice webhook operations."""


@voice.command("dead-letters")
@click.option("--all", "show_all", is_flag=True, help="Include dead letters already replayed.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dead_letters(show_all: bool, as_json: bool) -> None:
    """List events that gave up after their last retry."""
    drain_redis_dead_letters()
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
    replayed = replay(None if replay_all else list(letter_ids), REPLAY_QUEUE)
    missing = sorted(set(letter_ids) - set(replayed))
    click.echo(f"replayed {len(replayed)} dead letter(s)" + (f"; not found: {missing}" if missing else ""))
    if missing:
        raise SystemExit(1)


@voice.command("sweep")
def sweep() -> None:
    """Send again, now, every pending event that is due (what the periodic sweeper does)."""
    sent = sweep_pending()
    click.echo(f"re-sent {sent} pending event(s); {pending_count()} pending")
