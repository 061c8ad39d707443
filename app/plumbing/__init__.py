"""Redis and the broker: the clients, the Redis transport, the queues, the pending set, the dedup
claims and the publisher. Knows messages and keys, not recordings."""
