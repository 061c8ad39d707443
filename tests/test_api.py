"""The read API: bearer keys, shapes, 404s, filters and cursor pagination; what a query decides on
both databases, authentication and parameter checks once."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.applying.domain import apply_event
from app.base.extensions import db
from app.payload.events import Event
from config import Settings
from tests.support import sqlite_only

T0 = datetime(2026, 3, 6, 14, 0, tzinfo=UTC)
URL = "https://voice.africastalking.com/recordings/a1b2c3d4e5f6.mp3"


def seed(app: Flask, session: str, status: str, seconds: float, phone: str = "+254712345678",
         duration: int | None = 420, url: str | None = None) -> None:
    fields = {"sessionId": session, "status": status, "phoneNumber": phone}
    if duration is not None:
        fields["duration"] = str(duration)
    if url:
        fields["recordingUrl"] = url
    with app.app_context():
        apply_event(db.session, Event(session, status, phone, url, duration, fields), T0 + timedelta(seconds=seconds),
                    clock=lambda: T0 + timedelta(seconds=seconds + 1))


def test_one_recording_in_the_documented_shape(client: FlaskClient, app: Flask, auth: dict) -> None:
    seed(app, "ATVoice_a1b2c3d4e5f6", "completed", 0, url=URL)
    response = client.get("/api/v1/voice/recordings/ATVoice_a1b2c3d4e5f6", headers=auth)
    assert response.status_code == 200
    assert response.get_json() == {
        "recording_id": "ATVoice_a1b2c3d4e5f6",
        "status": "completed",
        "duration": 420,
        "recording_url": URL,
        "created_at": "2026-03-06T14:00:00Z",
        "processed_at": "2026-03-06T14:00:01Z",
        "participants": [
            {"phone_number": "+254712345678", "status": "completed", "duration": 420,
             "updated_at": "2026-03-06T14:00:01Z"}
        ],
    }


def test_events_oldest_first_with_payload_as_received(client: FlaskClient, app: Flask, auth: dict) -> None:
    seed(app, "S", "completed", 5, url=URL)
    seed(app, "S", "no-answer", 2, phone="+254787654321", duration=None)
    response = client.get("/api/v1/voice/recordings/S/events", headers=auth)
    body = response.get_json()
    assert body["recording_id"] == "S"
    assert [(e["status"], e["received_at"]) for e in body["events"]] == [
        ("no-answer", "2026-03-06T14:00:02Z"),
        ("completed", "2026-03-06T14:00:05Z"),
    ]
    assert body["events"][1]["payload"] == {"sessionId": "S", "status": "completed", "phoneNumber": "+254712345678",
                                            "duration": "420", "recordingUrl": URL}
    assert body["events"][1]["outcome"] == "applied"


@pytest.mark.parametrize("path", ["/api/v1/voice/recordings/nope", "/api/v1/voice/recordings/nope/events"])
def test_unknown_recording_is_404(client: FlaskClient, auth: dict, path: str) -> None:
    response = client.get(path, headers=auth)
    assert response.status_code == 404
    assert response.get_json() == {"error": "recording not found"}


@sqlite_only
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="}, {"Authorization": "Bearer "}],
)
@pytest.mark.parametrize("path", ["/api/v1/voice/recordings", "/api/v1/voice/recordings/S",
                                  "/api/v1/voice/recordings/S/events"])
def test_missing_or_wrong_key_is_401(client: FlaskClient, headers: dict, path: str) -> None:
    response = client.get(path, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert set(response.get_json()) == {"error"}


def test_hashed_keys_and_no_keys(make_app, settings: Settings) -> None:
    digest = hashlib.sha256(b"hashed-key").hexdigest()
    hashed = make_app(dataclasses.replace(settings, api_key_digests=(bytes.fromhex(digest),))).test_client()
    assert hashed.get("/api/v1/voice/recordings", headers={"Authorization": "Bearer hashed-key"}).status_code == 200
    assert hashed.get("/api/v1/voice/recordings", headers={"Authorization": f"Bearer {digest}"}).status_code == 401
    closed = make_app(dataclasses.replace(settings, api_key_digests=())).test_client()
    assert closed.get("/api/v1/voice/recordings", headers={"Authorization": "Bearer "}).status_code == 401
    assert closed.get("/api/v1/voice/recordings", headers={"Authorization": "Bearer x"}).status_code == 401


def test_list_pages_newest_first_with_a_cursor(client: FlaskClient, app: Flask, auth: dict) -> None:
    for n in range(7):
        seed(app, f"S{n}", "completed" if n % 2 else "busy", n)
    seen, cursor = [], None
    while True:
        query = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        body = client.get("/api/v1/voice/recordings", headers=auth, query_string=query).get_json()
        seen.append([r["recording_id"] for r in body["recordings"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [["S6", "S5", "S4"], ["S3", "S2", "S1"], ["S0"]]


def test_list_filters(client: FlaskClient, app: Flask, auth: dict) -> None:
    for n in range(4):
        seed(app, f"S{n}", "completed" if n % 2 else "busy", n * 60)
    def ids(**query: str) -> list[str]:
        body = client.get("/api/v1/voice/recordings", headers=auth, query_string=query).get_json()
        return [r["recording_id"] for r in body["recordings"]]

    assert ids(status="completed") == ["S3", "S1"]
    assert ids(since="2026-03-06T14:01:00Z") == ["S3", "S2", "S1"]
    assert ids(since="2026-03-06T17:01:00+03:00", status="busy") == ["S2"]
    assert ids() == ["S3", "S2", "S1", "S0"]


@sqlite_only
@pytest.mark.parametrize(
    ("query", "error"),
    [
        ({"limit": "0"}, "limit must be"),
        ({"limit": "501"}, "limit must be"),
        ({"limit": "ten"}, "limit must be"),
        ({"status": "done"}, "status must be"),
        ({"since": "yesterday"}, "since must be"),
        ({"since": "2026-03-06T14:00:00"}, "since must be"),
        ({"cursor": "garbage!"}, "cursor is not one"),
        ({"cursor": "WzEsMl0"}, "cursor is not one"),
    ],
)
def test_bad_list_parameters_are_400(client: FlaskClient, auth: dict, query: dict, error: str) -> None:
    response = client.get("/api/v1/voice/recordings", headers=auth, query_string=query)
    assert response.status_code == 400
    assert error in response.get_json()["error"]


@sqlite_only
def test_read_api_answers_503_while_the_database_is_unreachable(settings: Settings, auth: dict) -> None:
    """A failover's seconds without a primary (or any refused connection): the read API says
    "retry" with Retry-After, never a 500, and no stack trace."""
    closed = "postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=1"
    from app import create_app

    app = create_app(dataclasses.replace(settings, database_url=closed))
    try:
        for path in ("/api/v1/voice/recordings", "/api/v1/voice/recordings/x", "/api/v1/voice/changes"):
            answer = app.test_client().get(path, headers=auth)
            assert answer.status_code == 503, (path, answer.status_code, answer.get_data(as_text=True))
            assert answer.headers["Retry-After"] == "5"
            assert answer.get_json() == {"error": "database unavailable: retry"}
    finally:
        app.extensions["redis"].close()


@sqlite_only
def test_a_missing_table_is_still_a_fault_not_unavailability(settings: Settings, auth: dict, tmp_path) -> None:
    """SQLite calls "no such table" an OperationalError as well: that is a 500 (a deployment that
    skipped its migrations), not a 503 asking the caller to retry forever."""
    from app import create_app

    app = create_app(dataclasses.replace(settings, database_url=f"sqlite:///{tmp_path / 'never-migrated.db'}"))
    try:
        answer = app.test_client().get("/api/v1/voice/recordings/x", headers=auth)
        assert answer.status_code == 500
        assert answer.get_json() == {"error": "internal server error"}
    finally:
        app.extensions["redis"].close()
