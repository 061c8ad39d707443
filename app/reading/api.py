"""The read API: recordings, their participants and their events, behind bearer keys."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import selectinload

from app.base.errors import BadRequest, NotFound
from app.base.extensions import db
from app.base.security import check_bearer
from app.base.timeutil import parse_rfc3339, to_rfc3339
from app.payload.africastalking import IN_PROGRESS
from app.payload.events import STATUSES
from app.records.changes import START, decode_cursor, encode_cursor, parse_limit, read_changes
from app.records.models import VoiceRecording, WebhookEvent
from app.records.views import recording_view

bp = Blueprint("api", __name__, url_prefix="/api/v1/voice")

RECORDING_STATUSES = (*STATUSES, IN_PROGRESS)
DEFAULT_LIMIT = 50
MAX_LIMIT = 500


@bp.before_request
def _authenticate() -> None:
    check_bearer(current_app.extensions["settings"], request)


@bp.get("/recordings/<path:recording_id>/events")
def recording_events(recording_id: str) -> Response:
    if db.session.get(VoiceRecording, recording_id) is None:
        raise NotFound("recording not found")
    events = db.session.scalars(
        select(WebhookEvent)
        .where(WebhookEvent.recording_id == recording_id)
        .order_by(WebhookEvent.received_at, WebhookEvent.id)
    )
    return jsonify(recording_id=recording_id, events=[event_view(e) for e in events])


@bp.get("/recordings/<path:recording_id>")
def recording(recording_id: str) -> Response:
    found = db.session.scalar(
        select(VoiceRecording)
        .where(VoiceRecording.id == recording_id)
        .options(selectinload(VoiceRecording.participants))
    )
    if found is None:
        raise NotFound("recording not found")
    return jsonify(recording_view(found))


@bp.get("/recordings")
def recordings() -> Response:
    """Newest first by creation time; ``since`` keeps those created at or after it."""
    args = request.args
    limit = _limit(args.get("limit"))
    query = select(VoiceRecording).options(selectinload(VoiceRecording.participants))
    if "status" in args:
        if args["status"] not in RECORDING_STATUSES:
            raise BadRequest(f"status must be one of {', '.join(RECORDING_STATUSES)}")
        query = query.where(VoiceRecording.status == args["status"])
    if "since" in args:
        try:
            since = parse_rfc3339(args["since"])
        except ValueError:
            raise BadRequest("since must be an RFC 3339 time with an offset, e.g. 2026-03-06T14:00:00Z") from None
        query = query.where(VoiceRecording.created_at >= since)
    if args.get("cursor"):
        created_at, last_id = _decode_cursor(args["cursor"])
        query = query.where(
            or_(
                VoiceRecording.created_at < created_at,
                and_(VoiceRecording.created_at == created_at, VoiceRecording.id < last_id),
            )
        )
    query = query.order_by(VoiceRecording.created_at.desc(), VoiceRecording.id.desc()).limit(limit + 1)
    rows = list(db.session.scalars(query))
    page, more = rows[:limit], len(rows) > limit
    next_cursor = _encode_cursor(page[-1]) if more else None
    return jsonify(recordings=[recording_view(r) for r in page], next_cursor=next_cursor)


@bp.get("/changes")
def changes() -> Response:
    """Recordings in the order their latest change committed; follow ``next_cursor`` to miss none."""
    after = request.args.get("after")
    position = decode_cursor(after) if after else START
    page = read_changes(db.session, position, parse_limit(request.args.get("limit")))
    next_cursor = encode_cursor(page[-1][0] if page else position)
    return jsonify(changes=[{"cursor": encode_cursor(p), "recording": view} for p, view in page],
                   next_cursor=next_cursor)


def event_view(event: WebhookEvent) -> dict[str, Any]:
    return {
        "received_at": to_rfc3339(event.received_at),
        "phone_number": event.phone_number,
        "status": event.status,
        "duration": event.duration,
        "recording_url": event.recording_url,
        "outcome": event.outcome,
        "payload": event.payload,
    }


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:  # "²" is a digit to isdigit
        raise BadRequest(f"limit must be an integer between 1 and {MAX_LIMIT}")
    return int(raw)


def _encode_cursor(recording: VoiceRecording) -> str:
    text = json.dumps([recording.created_at.isoformat(), recording.id], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[Any, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created_at, last_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        return parse_rfc3339(created_at), str(last_id)
    except (ValueError, TypeError, AttributeError, binascii.Error):
        raise BadRequest("cursor is not one this service issued") from None
