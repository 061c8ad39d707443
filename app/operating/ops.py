"""Operations endpoints: liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, jsonify
from redis.cluster import RedisCluster
from sqlalchemy import text

from app.base.extensions import db
from app.operating import scrape
from app.payload.openapi import openapi_document

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process answers; no dependency is asked."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Each dependency answers, with its latency; 503 names the ones that did not.

    With RabbitMQ as the broker Redis is only the dedup cache: webhooks are still accepted and
    applied once without it, so its failure is reported as degraded and the answer stays 200.
    """
    checks = {"database": _check(_database), "redis": _check(_redis), "broker": _check(_broker)}
    optional = set() if current_app.extensions["settings"].broker_is_redis else {"redis"}
    failed = [name for name, check in checks.items() if not check["ok"] and name not in optional]
    degraded = [name for name, check in checks.items() if not check["ok"] and name in optional]
    status = "unavailable" if failed else "degraded" if degraded else "ready"
    body: dict[str, Any] = {"status": status, "checks": checks}
    if failed:
        body["failed"] = failed
    if degraded:
        body["degraded"] = degraded
    return jsonify(body), 503 if failed else 200


def _check(probe: Callable[[], None]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        probe()
    except Exception as exc:  # any failure means not ready; the type says which kind
        return {"ok": False, "error": type(exc).__name__, "latency_ms": _ms(started)}
    return {"ok": True, "latency_ms": _ms(started)}


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _database() -> None:
    try:
        db.session.execute(text("SELECT 1"))
    finally:
        db.session.rollback()


def _redis() -> None:
    if current_app.extensions["settings"].redis_is_cluster:
        # A plain PING reaches one node: the cache is whole only while every slot's master answers.
        current_app.extensions["redis"].ping(target_nodes=RedisCluster.PRIMARIES)
        return
    current_app.extensions["redis"].ping()


def _broker() -> None:
    with current_app.extensions["celery"].connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=1)


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    payload, content_type = scrape.render(current_app._get_current_object())  # type: ignore[attr-defined]
    return Response(payload, content_type=content_type)


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document())
