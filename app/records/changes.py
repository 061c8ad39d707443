"""The change feed: every recording in the order its latest change committed, read with a cursor.

Each change moves its recording to a new *position*, taken inside the writing transaction:

- PostgreSQL: the transaction's own id (``pg_current_xact_id()``, an ``xid8`` that never wraps).
  Ids are handed out in one order and committed in another, so a reader passes only positions
  below its snapshot's horizon: the oldest transaction its snapshot saw running, leaving out those
  known to belong to another database (ids are shared by the whole server, but another database's
  transaction cannot write this one's recordings). Any transaction that commits later has an id at
  or above that horizon, so nothing can ever appear behind a cursor the feed has given out. A long
  transaction in this database holds the feed back; it loses nothing.
- SQLite: one writer at a time (BEGIN IMMEDIATE), so a counter taken under that lock commits in
  the order it is taken, and every committed position is safe to pass.

A recording changed several times sits only at its latest position, so a consumer sees it again
with its latest state and never sees an older state after a newer one.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from typing import Any

from sqlalchemy import BigInteger, Text, cast, func, literal_column, select, tuple_
from sqlalchemy.orm import Session, selectinload

from app.base.errors import BadRequest, Unavailable
from app.records.models import VoiceRecording
from app.records.views import recording_view

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

# A hot standby knows of a primary's transaction only from the WAL it has replayed: one that took
# its id (the position it will write) but whose WAL has not arrived is missing from the standby's
# snapshot, so a horizon computed there can pass a position that commits later, behind a cursor
# already given out. The feed is read on the primary only (a connection left on a standby, after
# a failover or through a replica's address, is refused rather than trusted).
STANDBY_REFUSED = "the change feed is served only by the primary database, and this connection reached a standby: retry"

Position = tuple[int, str]  # (change position, recording id): a total order over the feed
START: Position = (-1, "")  # before every recording (positions start at 0)


def mark_changed(session: Session, recording: VoiceRecording) -> None:
    """Move a recording to the feed's end, in the transaction that changes it (evaluated at flush)."""
    recording.change_position = next_position(session.connection().dialect.name)  # type: ignore[assignment]


@functools.cache
def next_position(dialect: str) -> Any:
    """The SQL a change's position is (built once per dialect: an expression is immutable)."""
    if dialect == "postgresql":
        return cast(cast(func.pg_current_xact_id(), Text), BigInteger)
    # An alias, so the subquery reads the whole table instead of correlating with the updated row.
    latest = VoiceRecording.__table__.alias("latest")
    return select(func.coalesce(func.max(latest.c.change_position), 0) + 1).scalar_subquery()


def read_changes(session: Session, after: Position, limit: int) -> list[tuple[Position, dict[str, Any]]]:
    """Up to ``limit`` recordings past ``after``, each with its position, oldest change first.
    On a PostgreSQL standby, refused with :class:`Unavailable` (see ``STANDBY_REFUSED``)."""
    postgresql = session.get_bind().dialect.name == "postgresql"
    if postgresql:
        # One snapshot for the recordings, their participants and the horizon, so an item is never
        # a mix of two commits (the participants are loaded by a second statement).
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        if session.scalar(select(func.pg_is_in_recovery())):
            session.rollback()
            raise Unavailable(STANDBY_REFUSED)
    query = select(VoiceRecording).options(selectinload(VoiceRecording.participants))
    query = query.where(tuple_(VoiceRecording.change_position, VoiceRecording.id) > tuple_(*after))
    if postgresql:
        query = query.where(VoiceRecording.change_position < literal_column(_HORIZON))
    query = query.order_by(VoiceRecording.change_position, VoiceRecording.id).limit(limit)
    page = [((r.change_position, r.id), recording_view(r)) for r in session.scalars(query)]
    session.rollback()  # ends the read's snapshot; nothing was written
    return page


# The oldest transaction running in this snapshot that may be this database's (one whose id shows
# in pg_stat_activity under another database cannot be; one that ended since the snapshot is
# counted, to be safe); with none, the snapshot's xmax.
_HORIZON = """(COALESCE(
  (SELECT min(running) FROM pg_snapshot_xip(pg_current_snapshot()) AS running
   WHERE running::xid NOT IN (SELECT backend_xid FROM pg_stat_activity
                              WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database())),
  pg_snapshot_xmax(pg_current_snapshot()))::text::bigint)"""


def encode_cursor(position: Position) -> str:
    text = json.dumps(list(position), separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        change_position, recording_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if (type(change_position) is not int or not -1 <= change_position < 2**63
                or not isinstance(recording_id, str) or not _printable(recording_id)):
            raise ValueError("not a feed position")
        return change_position, recording_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("after is not a cursor this feed issued") from None


def _printable(text: str) -> bool:
    return len(text) <= 128 and text.isprintable()


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer between 1 and {MAX_LIMIT}")
    return int(raw)
