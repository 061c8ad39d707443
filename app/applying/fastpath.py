"""A duplicate turned away where its message arrives, before Celery builds a task request for it.

The apply task's strategy (``Task.Strategy``: what a worker does with each message it receives)
first runs the event's dedup claim. The claim's script recognises a copy of an event already
applied and, in the process that consumes the message, acknowledges the message in the same round
trip (``app.plumbing.transport``); such a duplicate then costs that round trip, one log line and a counter,
not a task request, its trace, an app context and the task's bookkeeping. Everything else goes to
Celery's own strategy unchanged: when the claim was taken here, the task finds it recorded and does
not claim again (``take_claim``).

Not taken (Celery's path, as before): messages with an ETA (retries wait for their countdown and
claim when they run), workers sending task events (Flower watching must see every task), brokers
other than the project's Redis transport, any error (a Redis error, a message of an unexpected
shape): the task decides, retries or dead-letters as it always did.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

from app.applying.domain import DUPLICATE
from app.base import metrics
from app.base.logs import mask_phone
from app.base.timeutil import parse_rfc3339
from app.payload.envelope import Envelope
from app.plumbing import dedup, pending, transport

log = structlog.get_logger("app.applying.tasks")

_CLAIMED: dict[str, None] = {}  # task ids whose claim this process took in the strategy
_CLAIMED_LIMIT = 1000  # a task that never ran (revoked) must not grow it forever


def take_claim(task_id: str) -> bool:
    """True once if the strategy took this task's claim in this process (the task need not)."""
    try:
        del _CLAIMED[task_id]
    except KeyError:
        return False
    return True


def duplicates_first(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """The strategy: Celery's own, behind the duplicate check (imported here: a worker's module)."""
    from celery.worker.strategy import default

    handle = default(task, app, consumer, **kwargs)
    eventer = consumer.event_dispatcher
    flask_app = app.flask_app
    connection_errors = consumer.connection_errors
    ack_log = logging.getLogger("celery.worker.request")

    def task_events_on() -> bool:
        # The dispatcher is on for the worker's heartbeats alone (groups == {"worker"}); task
        # events are on when it sends every group, or "task" was added (Flower's enable_events).
        return bool(eventer and eventer.enabled and (not eventer.groups or "task" in eventer.groups))

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        if not task_events_on() and _turned_away(flask_app, message):
            ack(ack_log, connection_errors)  # what a request's acknowledge() passes
            return None
        return handle(message, body, ack, reject, callbacks, **kw)

    return task_message_handler


def _turned_away(flask_app: Any, message: Any) -> bool:
    headers = message.headers or {}
    task_id = headers.get("id")
    if not task_id or headers.get("eta") or transport.current_delivery(task_id) is None:
        return False
    try:
        with flask_app.app_context():
            if not pending.in_use():
                return False
            args = message.payload[0]
            envelope = Envelope(args[0], args[1], args[2] if len(args) > 2 else None)
            event = envelope.event
            state = dedup.claim(event.key, task_id, parse_rfc3339(envelope.received_at))
            if state == "claimed":
                if len(_CLAIMED) >= _CLAIMED_LIMIT:
                    _CLAIMED.clear()
                _CLAIMED[task_id] = None
            if state != DUPLICATE:
                return False
            metrics.observe_event(DUPLICATE)
            log.info("event_applied", outcome=DUPLICATE, phone_number=mask_phone(args[0].get("phone_number")),
                     status=args[0].get("status"), request_id=envelope.request_id, task_id=task_id,
                     session_id=args[0].get("session_id"), event_key=event.key, turned_away="on arrival")
            return True
    except Exception:  # a Redis error, a message of an unexpected shape: never the consumer's end
        return False  # Celery's own path sees the same message and decides, as before
