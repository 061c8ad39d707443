"""The service's Redis client: one server (``redis://``), the master a Sentinel group names, or a
Redis Cluster (``redis+cluster://``, the dedup cache only: RabbitMQ is then the broker).

Both fail fast and never retry on their own (a failed call surfaces at once, and callers decide:
503, or the task's retry). The Sentinel client asks the sentinels for the master whenever it
opens a connection, so after a failover it follows the promoted replica without a restart;
while there is no master, every call fails fast with a connection error.

The cluster client cannot do without retries: it follows MOVED and ASK (a slot moved or moving to
another master), and after a connection error it learns the layout again and tries again, so that
a call made just after a replica took over reaches it. Those retries are bounded (CLUSTER_RETRIES,
each attempt bounded by the socket timeouts); a call made while a master is down and not yet
replaced fails within about a second, and the worker lets the database's fingerprint decide.
"""

from __future__ import annotations

import threading
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from config import Settings, parse_cluster_url, parse_sentinel_url

# Attempts after the first on a connection error, CLUSTERDOWN or an uncovered slot (each learns the
# layout again first): enough to reach a replica that has just taken over, few enough that a
# call during the failover itself gives up in about a second.
CLUSTER_RETRIES = 3


def client_options(settings: Settings) -> dict[str, Any]:
    return {
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_socket_timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 30,
    }


def redis_client(settings: Settings) -> redis.Redis:
    options = client_options(settings)
    if settings.redis_is_cluster:
        return LazyCluster(settings)  # type: ignore[return-value] - the calls the service makes
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


def cluster_client(settings: Settings) -> RedisCluster:
    """A cluster client that learns the layout from the URL's nodes (any one that answers)."""
    url = parse_cluster_url(settings.redis_url)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in url.nodes],
        username=url.username,
        password=url.password,
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_socket_timeout,
        retry=Retry(NoBackoff(), CLUSTER_RETRIES),
    )


class LazyCluster:
    """The cluster client, made on first use. Making one asks a node for the cluster's layout, and
    on RabbitMQ the service must start, accept and apply without its cache (as it does without a
    plain Redis, whose client connects on first use too): until a node answers, every call raises
    the cluster client's own error (RedisClusterException), and the next call tries again."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()

    def _get(self) -> RedisCluster:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = cluster_client(self._settings)
                client = self._client
        return client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def close(self) -> None:
        """Close the client if one was made (closing must not connect)."""
        if self._client is not None:
            self._client.close()
