"""deploy/nginx/voice-webhooks.conf in front of a real stack: slow clients do not starve anyone,
X-Forwarded-For is what TRUSTED_PROXY_COUNT=1 expects, /metrics stays inside, bodies are capped."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.payload.events import FORM
from config import Settings
from tests.e2e.frontdoor import SITE, Nginx, get, post_webhook, probe_under_slow_clients
from tests.e2e.stack import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Nginx]]:
    workdir = Path(tmp_path_factory.mktemp("nginx"))
    stack = Stack(workdir, f"sqlite:///{workdir / 'voice.db'}", TRUSTED_PROXY_COUNT="1",
                  WEBHOOK_ALLOWED_IPS="127.0.0.1/32")
    nginx = Nginx(workdir / "nginx", stack.port)
    try:
        stack.start()
        nginx.start()
        yield stack, nginx
    finally:
        nginx.stop()
        stack.stop()


def test_the_body_limit_is_the_services_max_content_length() -> None:
    match = re.search(r"client_max_body_size (\d+)k;", SITE.read_text())
    assert match is not None and int(match.group(1)) * 1024 == Settings().max_content_length


def test_two_hundred_slow_clients_do_not_slow_anyone_else_down(front: tuple[Stack, Nginx]) -> None:
    stack, nginx = front
    # 12 s: longer than nginx's 10 s header timeout, so its closing them (and their reconnecting) is in it.
    health, webhook, slow = probe_under_slow_clients(nginx.port, connections=200, seconds=13, timeout=5,
                                                     prefix="slow_nginx")
    print(f"\nthrough nginx, 200 slow connections: /healthz {health.summary()}; webhook {webhook.summary()}; "
          f"{slow.reconnects} reconnects, {slow.open_at_peak} open at peak")
    assert slow.open_at_peak == 200
    assert len(health.seconds) >= 10 and len(webhook.seconds) >= 10
    assert health.failures == 0 and webhook.failures == 0
    assert max(health.seconds) < 1.0 and max(webhook.seconds) < 1.0
    assert slow.reconnects > 0  # nginx cut them off at its header timeout, not gunicorn
    stack.wait_until_idle()
    assert stack.recording("slow_nginx_0") is not None


def test_the_client_address_is_nginxs_view_not_what_the_client_claims(front: tuple[Stack, Nginx]) -> None:
    stack, nginx = front
    forged = {"X-Forwarded-For": "203.0.113.9"}
    # Directly, the one trusted hop is whatever the client wrote: why the web must sit behind nginx.
    assert post_webhook(stack.port, "xff_direct", headers=forged)[0] == 403
    # Through nginx the header is replaced by the address nginx saw (127.0.0.1, allowed).
    assert post_webhook(nginx.port, "xff_nginx", headers=forged)[0] == 200


def test_metrics_are_not_served_through_nginx(front: tuple[Stack, Nginx]) -> None:
    stack, nginx = front
    assert get(nginx.port, "/metrics")[0] == 404
    assert get(stack.port, "/metrics")[0] == 200
    assert get(nginx.port, "/readyz")[0] == 200


def test_a_body_over_the_limit_is_refused_by_nginx_in_json(front: tuple[Stack, Nginx]) -> None:
    _, nginx = front
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=10)
    try:
        conn.request("POST", "/api/v1/voice/webhook", b"sessionId=S&status=busy&x=" + b"a" * 70_000,
                     {"Content-Type": FORM})
        response = conn.getresponse()
        status, body = response.status, response.read()
    finally:
        conn.close()
    assert status == 413
    assert json.loads(body)["status"] == "webhook_error"
