"""Structured logs: one event per line with key-value context, JSON or console.

Phone numbers are masked and secrets scrubbed in one processor, so no call site can forget.
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from typing import Any

import structlog

_PHONE_KEYS = {"phone_number", "phonenumber", "callernumber", "destinationnumber", "dialdestinationnumber"}
_SECRET_KEYS = {"authorization", "token", "api_key", "secret", "password", "signature"}
_TOKEN_IN_TEXT = re.compile(r"((?:^|[?&;\s])token=)[^&\s\"']*", re.IGNORECASE)
_PHONE_IN_TEXT = re.compile(r"(?:\+|%2B)(\d{8,15})", re.IGNORECASE)
# What either pattern needs somewhere in a text: most values have neither, and one search is all they cost.
_SUSPECT = re.compile(r"token=|(?:\+|%2B)\d", re.IGNORECASE)


def mask_phone(phone: str | None) -> str | None:
    """+254712345678 -> +254******678: enough to tell calls apart, not to dial."""
    if not phone:
        return phone
    digits = phone.lstrip("+")
    if len(digits) <= 6:
        return "*" * len(phone)
    return ("+" if phone.startswith("+") else "") + digits[:3] + "*" * (len(digits) - 6) + digits[-3:]


REQUEST_ID_HEADER = "X-Request-ID"


def request_id_of(environ: dict[str, Any]) -> str:
    """The id a request's log lines and answer carry: the client's X-Request-ID when it is a sane
    one, else a new one."""
    given = environ.get("HTTP_X_REQUEST_ID", "")
    if 0 < len(given) <= 128 and all(ch.isalnum() or ch in "-_.:" for ch in given):
        return given
    return uuid.uuid4().hex


def scrub_text(text: str) -> str:
    """Remove tokens and phone numbers from free text such as a URL or an error message."""
    if _SUSPECT.search(text) is None:
        return text
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


class _LineWriter:
    """structlog's logger for the service's own lines: each rendered line is written whole to the
    stream of the standard library's handler, under that handler's lock, so that the service's
    lines and Flask's, Celery's and gunicorn's never interleave. The service's lines skip the
    standard library's LogRecord, handler and formatter machinery, which cost more than the rest of
    a line (``python -m bench.profile_ack --breakdown`` times one line alone)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def msg(self, message: str) -> None:
        handler = _handler  # the latest configure_logging's
        with handler.lock:  # type: ignore[union-attr]  # made by Handler.createLock
            handler.stream.write(message + "\n")
            handler.stream.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


_handler = logging.StreamHandler(sys.stderr)


def _add_logger_name(logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict["logger"] = logger.name
    return event_dict


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """The service's lines (structlog) and the standard library's (Flask, Celery, gunicorn) in one
    format, on one stream: the former rendered by structlog alone, the latter through the
    standard library's handler with the same processors."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    global _handler
    handler = _handler = logging.StreamHandler(sys.stderr)
    handler.set_name("voice")
    # The order of a line's keys as before: its own, then event, level, logger, timestamp.
    own = [shared[0], shared[1], _add_logger_name, *shared[2:]]
    structlog.configure(
        processors=[*own, renderer],
        logger_factory=lambda name="", *_args: _LineWriter(name or ""),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        cache_logger_on_first_use=False,  # a later configure_logging's level applies to every logger
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), shared[0], shared[1], structlog.stdlib.add_logger_name,
                           *shared[2:]],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler.setFormatter(formatter)
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
