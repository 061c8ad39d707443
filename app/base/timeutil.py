"""UTC time helpers: every time the service stores or shows is timezone-aware UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_rfc3339(moment: datetime | None) -> str | None:
    """RFC 3339 with a ``Z`` suffix; microseconds only when there are any."""
    if moment is None:
        return None
    moment = moment.astimezone(UTC)
    text = moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 time; a time without an offset is refused, not guessed."""
    value = datetime.fromisoformat(text.strip().replace("z", "Z").replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError("time has no UTC offset")
    return value.astimezone(UTC)


def stamp(moment: datetime) -> str:
    """UTC in one fixed width, so that two stamps compare as strings as the times do."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


def order_key(received_at: datetime, fingerprint: str) -> str:
    """A string that sorts events by arrival, with the fingerprint breaking exact ties."""
    return f"{stamp(received_at)}|{fingerprint}"
