"""Queue names. The Procfile's worker consumes every one of them (a test checks)."""

WEBHOOK_QUEUE = "voice-webhooks"  # events as they arrive
REPLAY_QUEUE = "voice-replays"  # dead letters sent again, kept apart from live traffic
MAINTENANCE_QUEUE = "voice-maintenance"  # the pending-set sweeper and other housekeeping

ALL_QUEUES = (WEBHOOK_QUEUE, REPLAY_QUEUE, MAINTENANCE_QUEUE)
