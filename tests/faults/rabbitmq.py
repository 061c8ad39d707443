"""Fault scenarios on RabbitMQ as the broker, where Redis is only the dedup cache.

The broker is a virtual host of the scenario's own on the machine's RabbitMQ (which is never
stopped); Redis and PostgreSQL are servers of the scenario's own.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from tests.faults.scenarios import Attempt, Tally, fault_stack, make_events, post_all, post_once, status_counts, tally
from tests.faults.scenarios import wait_until_applied as wait_until_stored
from tests.support import queued_on_rabbitmq, rabbitmq_vhost, wait_for


def redis_down_on_rabbitmq(workdir: Path, seed: int = 9) -> Tally:
    """Stop the dedup cache's Redis while webhooks and their duplicates keep coming: every one is
    answered 200, /readyz stays 200 naming Redis as degraded, and each event is applied once (the
    database fingerprint decides). Redis comes back empty: duplicates sent after it are still
    turned away by the database."""
    rng = random.Random(seed)
    events = make_events(sessions=40, participants=2, per_session=3, seed=seed, prefix="rmq")
    before, during, after = events[:40], events[40:80], events[80:]
    with rabbitmq_vhost() as broker_url, fault_stack(workdir, CELERY_BROKER_URL=broker_url) as (stack, _pg):
        answers = post_all(stack, before)
        wait_until_stored(stack, before, timeout=60)
        stack.redis.stop()
        outage_started = time.monotonic()
        # New events, each posted twice, and copies of events applied before the outage.
        outage_stream = during + rng.sample(during, 20) + rng.sample(before, 20)
        rng.shuffle(outage_stream)
        outage: list[Attempt] = [post_once(stack, fields) for fields in outage_stream]
        ready_status, ready = stack.get("/readyz")
        wait_until_stored(stack, during, timeout=90)
        outage_s = round(time.monotonic() - outage_started, 1)
        stack.redis.start()  # empty: every dedup key is gone
        answers += post_all(stack, after + rng.sample(before + during, 40))
        wait_until_stored(stack, events, timeout=90)
        wait_for(lambda: queued_on_rabbitmq(broker_url) == 0, timeout=60, interval=0.5)  # duplicates too
        return tally(stack, "Redis down, RabbitMQ broker", events, answers=status_counts([*answers, outage]),
                     deliveries=len(before) + len(outage_stream) + len(after) + 40,
                     during_outage_200=f"{sum(1 for a in outage if a.status == 200)}/{len(outage)}",
                     readyz_during_outage=(ready_status, ready.get("status"), ready.get("degraded")),
                     outage_s=outage_s)
