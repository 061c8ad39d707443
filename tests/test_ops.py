"""Operations endpoints and the OpenAPI document."""

from __future__ import annotations

import dataclasses

import pytest
from flask import Flask
from flask.testing import FlaskClient

from config import Settings
from tests.support import free_port


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


def test_healthz_asks_no_dependency(make_app, settings: Settings) -> None:
    client = make_app(dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")).test_client()
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_readyz_reports_each_dependency(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"database", "redis", "broker"}
    assert all(check["ok"] and check["latency_ms"] >= 0 for check in body["checks"].values())


def test_readyz_names_what_failed(make_app, settings: Settings) -> None:
    client = make_app(dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")).test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["failed"] == ["redis", "broker"]  # Redis is the broker too here
    assert body["checks"]["database"]["ok"] is True


def test_readyz_names_a_separate_broker_that_failed(make_app, settings: Settings) -> None:
    broker = f"redis://127.0.0.1:{free_port()}/0"
    client = make_app(dataclasses.replace(settings, celery_broker_url=broker)).test_client()
    body = client.get("/readyz").get_json()
    assert body["failed"] == ["broker"]


def test_metrics_count_webhooks(client: FlaskClient) -> None:
    client.post("/api/v1/voice/webhook", data="sessionId=S&status=busy", content_type="text/plain")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    text = response.get_data(as_text=True)
    assert 'voice_webhooks_total{outcome="refused",reason="unsupported_media_type"}' in text
    assert "voice_webhook_ack_seconds_bucket" in text


def test_openapi_documents_every_route(app: Flask, client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    assert document["openapi"].startswith("3.1")
    routes = {
        rule.rule.replace("<path:recording_id>", "{recording_id}")
        for rule in app.url_map.iter_rules()
    }
    assert routes == set(document["paths"])
    for path, item in document["paths"].items():
        for method in item:
            assert method in {"get", "post"}, path
            assert item[method]["responses"], path


def test_openapi_error_bodies_are_documented(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    webhook = document["paths"]["/api/v1/voice/webhook"]["post"]["responses"]
    assert set(webhook) == {"200", "400", "401", "403", "408", "413", "415", "503"}
    assert "Retry-After" in webhook["503"]["headers"]
    recording = document["paths"]["/api/v1/voice/recordings/{recording_id}"]["get"]["responses"]
    assert set(recording) == {"200", "401", "404", "503"}
    for path in ("/api/v1/voice/recordings", "/api/v1/voice/recordings/{recording_id}",
                 "/api/v1/voice/recordings/{recording_id}/events", "/api/v1/voice/changes"):
        unavailable = document["paths"][path]["get"]["responses"]["503"]
        assert "Retry-After" in unavailable["headers"], path  # what a read answers while the database cannot
