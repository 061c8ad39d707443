"""Who may call: the webhook's address allow-list and authentication, the read API's bearer keys.

Every secret comparison is constant-time, and every refusal is the same answer whatever failed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import time

from werkzeug.wrappers import Request

from app.base.errors import Forbidden, NotAuthorized, Unauthenticated
from config import Settings, key_digest


def check_client_address(settings: Settings, request: Request) -> None:
    """403 unless the client (as ProxyFix resolved it from trusted hops) is allowed."""
    if not settings.webhook_allowed_ips:
        return
    try:
        address = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        raise Forbidden("client address not allowed") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if not any(address in network for network in settings.webhook_allowed_ips):
        raise Forbidden("client address not allowed")


def check_webhook_auth(settings: Settings, request: Request, body: bytes, now: float | None = None) -> str | None:
    """401 unless the request carries a valid token or signature (when any is configured).

    Returns the Standard Webhooks ``webhook-id`` when that scheme authenticated the request: the
    event's idempotency key.
    """
    if not settings.webhook_auth_configured:
        return None
    if settings.webhook_tokens and _token_ok(settings.webhook_tokens, request.args.get("token", "")):
        return None
    if settings.hmac_secrets and _signature_ok(
        settings.hmac_secrets, request.headers.get(settings.webhook_signature_header, ""), body
    ):
        return None
    keys = settings.standard_webhook_keys
    if keys and "webhook-signature" in request.headers:
        webhook_id = _standard_webhook_id(keys, request, body, time.time() if now is None else now)
        if webhook_id is not None:
            return webhook_id
    raise Unauthenticated("webhook authentication failed")


def _token_ok(tokens: tuple[str, ...], given: str) -> bool:
    given_bytes = given.encode()
    # Compare against every token, so timing does not tell which one (or whether any) matched.
    matches = [hmac.compare_digest(given_bytes, token.encode()) for token in tokens]
    return bool(given) and any(matches)


def _signature_ok(secrets: tuple[str, ...], header: str, body: bytes) -> bool:
    given = header.strip().removeprefix("sha256=").lower().encode()
    expected = [hmac.new(secret.encode(), body, hashlib.sha256).hexdigest().encode() for secret in secrets]
    matches = [hmac.compare_digest(given, digest) for digest in expected]
    return bool(given) and any(matches)


STANDARD_WEBHOOK_TOLERANCE_SECONDS = 300


def _standard_webhook_id(keys: tuple[bytes, ...], request: Request, body: bytes, now: float) -> str | None:
    """Standard Webhooks: ``v1,<base64 HMAC-SHA256>`` over ``id.timestamp.body``, within 5 minutes."""
    webhook_id = request.headers.get("webhook-id", "")
    timestamp = request.headers.get("webhook-timestamp", "")
    if not webhook_id or len(webhook_id) > 256 or not (timestamp.isascii() and timestamp.isdigit()):
        return None
    if abs(now - int(timestamp)) > STANDARD_WEBHOOK_TOLERANCE_SECONDS:
        return None  # too old (a replay) or too far ahead
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    expected = [base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()) for key in keys]
    given = [part.partition(",")[2].encode() for part in request.headers["webhook-signature"].split()
             if part.startswith("v1,")]
    matches = [hmac.compare_digest(g, e) for g in given for e in expected]
    return webhook_id if any(matches) else None


def check_bearer(settings: Settings, request: Request) -> None:
    """401 unless ``Authorization: Bearer <key>`` names a key in API_KEYS; none set means closed."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise NotAuthorized("missing bearer token")
    digest = key_digest(key.strip())
    matches = [hmac.compare_digest(digest, allowed) for allowed in settings.api_key_digests]
    if not any(matches):
        raise NotAuthorized("invalid bearer token")
