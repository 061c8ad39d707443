"""Queue and task names, and the queues' declarations. The Procfile's worker consumes every queue (a
test checks); senders name tasks by these constants instead of importing the task functions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kombu import Exchange, Queue

if TYPE_CHECKING:
    from config import Settings

WEBHOOK_QUEUE = "voice-webhooks"  # events as they arrive
REPLAY_QUEUE = "voice-replays"  # dead letters sent again, kept apart from live traffic
MAINTENANCE_QUEUE = "voice-maintenance"  # the pending-set sweeper and other housekeeping

ALL_QUEUES = (WEBHOOK_QUEUE, REPLAY_QUEUE, MAINTENANCE_QUEUE)
# RabbitMQ quorum queues only: where the broker dead-letters a message delivered more often than
# the queues' delivery limit. No worker consumes it; the sweeper files its messages as dead letters.
DEAD_LETTER_QUEUE = "voice-dead-letters"

APPLY_EVENT_TASK = "voice.apply_webhook_event"
SWEEP_TASK = "voice.sweep_pending"
PRUNE_TASK = "voice.prune_events"


# Quorum queues: a message delivered this many times (a worker that dies on it every time, or a
# broker that keeps refusing its retry) is dead-lettered to DEAD_LETTER_QUEUE, never dropped
# (RabbitMQ 4 drops it after 20 deliveries unless the queue names a dead-letter exchange).
DELIVERY_LIMIT = 20


def queue_config(settings: Settings) -> dict[str, Any]:
    """The service's queues. Quorum queues (RabbitMQ, replicated) are bound to topic exchanges, so
    that a retry's countdown waits in the broker (Celery's native delayed delivery) instead of
    in a worker holding the message unacknowledged; each has a delivery limit and dead-letters
    at least once (confirmed by the dead-letter queue before it leaves the source) past it."""
    if settings.celery_queue_type != "quorum":
        return {}
    arguments = {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT,
                 "x-dead-letter-exchange": DEAD_LETTER_QUEUE, "x-dead-letter-strategy": "at-least-once",
                 "x-overflow": "reject-publish"}
    return {
        "task_queues": [Queue(name, Exchange(name, type="topic"), routing_key=name, queue_arguments=arguments)
                        for name in ALL_QUEUES],
        "task_default_queue_type": "quorum",
        "task_default_exchange_type": "topic",
        "task_create_missing_queue_type": "quorum",
        "task_create_missing_queue_exchange_type": "topic",
    }


def dead_letter_queue() -> Queue:
    """Where quorum queues dead-letter: a quorum queue of its own, behind a fanout exchange."""
    return Queue(DEAD_LETTER_QUEUE, Exchange(DEAD_LETTER_QUEUE, type="fanout"), routing_key=DEAD_LETTER_QUEUE,
                 queue_arguments={"x-queue-type": "quorum"})
