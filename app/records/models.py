"""Database tables. The schema itself is made only by the Alembic migrations in ``migrations/``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.base.extensions import db


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, on SQLite (which keeps no offset) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; the service stores UTC-aware times only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class VoiceRecording(db.Model):
    """One call session. Its fields are derived from the distinct events received for it."""

    __tablename__ = "voice_recordings"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    status: Mapped[str] = mapped_column(String(32))
    duration: Mapped[int | None] = mapped_column(Integer)
    recording_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    processed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Order keys (see app.base.timeutil.order_key) of the events that set status and recording_url,
    # so that events applied out of order still leave the state arrival order gives.
    status_key: Mapped[str] = mapped_column(String(100))
    url_key: Mapped[str | None] = mapped_column(String(100))
    # Where the recording's latest change sits in the change feed (see app.records.changes): the writing
    # transaction's id on PostgreSQL, a counter taken under the single writer on SQLite.
    change_position: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    participants: Mapped[list[Participant]] = relationship(
        back_populates="recording", order_by="Participant.id", cascade="all, delete-orphan"
    )

    __table_args__ = (
        Index("ix_voice_recordings_created_at_id", "created_at", "id"),
        Index("ix_voice_recordings_change_position_id", "change_position", "id"),
    )


class Participant(db.Model):
    """The latest known state of one phone number on a recording."""

    __tablename__ = "participants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    recording_id: Mapped[str] = mapped_column(ForeignKey("voice_recordings.id", ondelete="CASCADE"))
    phone_number: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(32))
    status_key: Mapped[str] = mapped_column(String(100))
    duration: Mapped[int | None] = mapped_column(Integer)
    duration_key: Mapped[str | None] = mapped_column(String(100))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    recording: Mapped[VoiceRecording] = relationship(back_populates="participants")

    __table_args__ = (UniqueConstraint("recording_id", "phone_number", name="uq_participants_recording_phone"),)


class WebhookEvent(db.Model):
    """A distinct webhook event; identical deliveries share one fingerprint and one row."""

    __tablename__ = "webhook_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    recording_id: Mapped[str] = mapped_column(ForeignKey("voice_recordings.id", ondelete="CASCADE"), index=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    phone_number: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(32))
    duration: Mapped[int | None] = mapped_column(Integer)
    recording_url: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (Index("ix_webhook_events_received_at", "received_at"),)


class DeadLetter(db.Model):
    """An event whose processing gave up; replayed by ``flask voice replay``."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Who filed it: the task id of the message that gave up, or of the broker's dead-lettered
    # message. Unique, so that filing one twice (two drainers, a drainer that died half-way)
    # keeps it once. Empty on rows filed before it existed.
    letter_key: Mapped[str | None] = mapped_column(String(200))
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    session_id: Mapped[str] = mapped_column(String(128))
    message: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    failed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    replayed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (UniqueConstraint("letter_key", name="uq_dead_letters_letter_key"),)


class HookOutbox(db.Model):
    """A ready-hook task to send: written with the change it announces, deleted once the broker has it."""

    __tablename__ = "hook_outbox"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    recording_id: Mapped[str] = mapped_column(String(128), index=True)
    task_id: Mapped[str] = mapped_column(String(36))
    recording: Mapped[dict[str, Any]] = mapped_column(JSON)  # the recording as the single GET showed it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
