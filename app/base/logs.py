"""Structured logs: one event per line with key-value context, JSON or console.

Phone numbers are masked and secrets scrubbed in one processor, so no call site can forget.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import sys
import threading
import uuid
from collections.abc import Iterator
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


def _suspect(text: str) -> bool:
    """Whether either pattern could match: a match needs "=" (a token) or "+" or "%" (a phone
    number), and three substring tests cost less than the search, which most texts skip."""
    return ("=" in text or "+" in text or "%" in text) and _SUSPECT.search(text) is not None


def scrub_text(text: str) -> str:
    """Remove tokens and phone numbers from free text such as a URL or an error message."""
    if not _suspect(text):
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


_KEPT = frozenset({"timestamp", "level", "logger"})
_PLAIN, _SECRET, _PHONE = 0, 1, 2
_KINDS: dict[str, int] = {}  # a line's key -> what its name says its value is
# Joins a line's texts for one search: it is in neither pattern, so no match spans two texts.
_APART = "\x00"


def _kind(key: str) -> int:
    kind = _KINDS.get(key)
    if kind is None:
        lowered = key.lower()
        kind = _SECRET if lowered in _SECRET_KEYS else _PHONE if lowered in _PHONE_KEYS else _PLAIN
        if len(_KINDS) < 4096:  # the keys of the service's lines, and a few of other loggers'
            _KINDS[key] = kind
    return kind


def redact(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Every value as ``_redact`` gives it, but the timestamp, level and logger name. The texts of
    plain keys are searched once, joined: most lines have nothing to scrub."""
    out: dict[str, Any] = {}
    texts: list[str] = []
    for key, value in event_dict.items():
        if key in _KEPT:
            out[key] = value
            continue
        kind = _kind(key)
        if kind == _SECRET:
            out[key] = "[redacted]"
        elif isinstance(value, str):
            if kind == _PHONE:
                out[key] = mask_phone(value)
            else:
                out[key] = value
                texts.append(key)
        elif isinstance(value, dict):
            out[key] = _redact(value, key)
        else:
            out[key] = value
    if texts and _suspect(_APART.join([out[key] for key in texts])):
        for key in texts:
            out[key] = scrub_text(out[key])
    return out


class _LineWriter:
    """structlog's logger for the service's own lines: each rendered line is written whole to the
    stream of the standard library's handler, under that handler's lock, so that the service's
    lines and Flask's, Celery's and gunicorn's never interleave. The service's lines skip the
    standard library's LogRecord, handler and formatter machinery, which cost more than the rest of
    a line (``python -m bench.profile_ack --breakdown`` times one line alone)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def msg(self, message: str) -> None:
        held = _held.lines
        if held is not None:
            held.append(message)
            return
        _write(message + "\n")

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _write(text: str) -> None:
    handler = _handler  # the latest configure_logging's
    with handler.lock:  # type: ignore[union-attr]  # made by Handler.createLock
        handler.stream.write(text)
        handler.stream.flush()


class _Held(threading.local):
    lines: list[str] | None = None


_held = _Held()


@contextlib.contextmanager
def lines_held() -> Iterator[None]:
    """The service's lines this thread logs inside the block are written together, in one write, as
    it ends (however it ends): a worker's batch logs a line per event, and each line's own write
    and flush cost as much as rendering it. Nested blocks write with the outermost."""
    if _held.lines is not None:
        yield
        return
    _held.lines = lines = []
    try:
        yield
    finally:
        _held.lines = None
        if lines:
            _write("".join(line + "\n" for line in lines))


_handler = logging.StreamHandler(sys.stderr)


def _add_logger_name(logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict["logger"] = logger.name
    return event_dict


@functools.lru_cache(maxsize=8)
def _json_encoder(default: Any) -> json.JSONEncoder:
    return json.JSONEncoder(default=default)


def _json_dumps(obj: Any, default: Any = None) -> str:
    """``json.dumps(obj, default=default)``, the line structlog's JSONRenderer renders, with the
    encoder made once: json.dumps given a ``default`` makes a new encoder per call."""
    return _json_encoder(default).encode(obj)


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
        structlog.processors.JSONRenderer(serializer=_json_dumps) if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
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
