"""Shared state read at scrape time: queue depths, pending events, dead letters."""

from __future__ import annotations

from flask import current_app
from kombu.exceptions import ChannelError as KombuChannelError

from app.applying import deadletters, hooks
from app.base.extensions import db
from app.plumbing import pending
from app.plumbing.queues import ALL_QUEUES


def queue_depths() -> dict[str, int]:
    """Messages waiting in each of the service's queues, on whichever broker is configured."""
    depths = {}
    with current_app.extensions["celery"].connection_for_read() as connection:
        channel = connection.default_channel
        for queue in ALL_QUEUES:
            try:
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
            except KombuChannelError:  # not declared yet: nothing was ever sent to it
                depths[queue] = 0
                channel = connection.channel()  # AMQP closes a channel after a failed passive declare
    return depths


def state_counts(name: str) -> int:
    """``pending``: events accepted and not applied; ``dead_letters``: not replayed yet;
    ``hook_backlog``: ready hooks in the outbox."""
    if name == "pending":
        return pending.count()
    if name == "hook_backlog":
        return hooks.backlog(db.session)
    return deadletters.count()
