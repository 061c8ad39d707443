"""The service's Redis client: one server (``redis://``) or the master a Sentinel group names.

Both fail fast and never retry on their own (a failed call surfaces at once, and callers decide:
503, or the task's retry). The Sentinel client asks the sentinels for the master whenever it
opens a connection, so after a failover it follows the promoted replica without a restart;
while there is no master, every call fails fast with a connection error.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from config import Settings, parse_sentinel_url


def client_options(settings: Settings) -> dict[str, Any]:
    return {
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_socket_timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 30,
    }


def redis_client(settings: Settings) -> redis.Redis:
    options = client_options(settings)
    if not settings.redis_is_sentinel:
        return redis.Redis.from_url(settings.redis_url, **options)
    url = parse_sentinel_url(settings.redis_url)
    sentinel = Sentinel(
        list(url.sentinels),
        sentinel_kwargs={"socket_timeout": settings.redis_socket_timeout,
                         "socket_connect_timeout": settings.redis_socket_timeout},
    )
    return sentinel.master_for(settings.redis_sentinel_master, db=url.db, username=url.username,
                               password=url.password, **options)
