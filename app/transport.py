"""kombu's Redis transport, with one client per channel for its synchronous calls.

kombu builds a new ``redis.Redis`` object for every publish; with redis-py 8 building one (its
response-callback tables) costs as much as the LPUSH it is made for. A client over the channel's
connection pool holds no connection of its own and is thread-safe, so the channel keeps one. The
asynchronous (BRPOP) client a worker consumes with is left as kombu makes it.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        if self._sync_client is None:
            self._sync_client = super()._create_client()
        return self._sync_client


class Transport(kombu_redis.Transport):
    Channel = Channel
