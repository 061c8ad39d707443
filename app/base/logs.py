"""Structured logs: one event per line with key-value context, JSON or console.

Phone numbers are masked and secrets scrubbed in one processor, so no call site can forget.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

_PHONE_KEYS = {"phone_number", "phonenumber", "callernumber", "destinationnumber", "dialdestinationnumber"}
_SECRET_KEYS = {"authorization", "token", "api_key", "secret", "password", "signature"}
_TOKEN_IN_TEXT = re.compile(r"((?:^|[?&;\s])token=)[^&\s\"']*", re.IGNORECASE)
_PHONE_IN_TEXT = re.compile(r"(?:\+|%2B)(\d{8,15})", re.IGNORECASE)


def mask_phone(phone: str | None) -> str | None:
    """+254712345678 -> +254******678: enough to tell calls apart, not to dial."""
    if not phone:
        return phone
    digits = phone.lstrip("+")
    if len(digits) <= 6:
        return "*" * len(phone)
    return ("+" if phone.startswith("+") else "") + digits[:3] + "*" * (len(digits) - 6) + digits[-3:]


def scrub_text(text: str) -> str:
    """Remove tokens and phone numbers from free text such as a URL or an error message."""
    text = _TOKEN_IN_TEXT.sub(r"\1[redacted]", text)
    return _PHONE_IN_TEXT.sub(lambda m: mask_phone("+" + m.group(1)) or "", text)


def _redact(value: Any, key: str) -> Any:
    lowered = key.lower()
    if lowered in _SECRET_KEYS:
        return "[redacted]"
    if lowered in _PHONE_KEYS and isinstance(value, str):
        return mask_phone(value)
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    return value


def redact(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return {key: value if key in {"timestamp", "level", "logger"} else _redact(value, key)
            for key, value in event_dict.items()}


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Send structlog and the standard library (Flask, Celery, gunicorn) through one renderer."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.set_name("voice")
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == "voice":
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # Celery logs every task received and finished, with its arguments; the service's own
    # event_applied line says the same once, with phone numbers masked.
    for chatty in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLevelName(level)))
