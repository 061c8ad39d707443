"""Queue and task names. The Procfile's worker consumes every queue (a test checks); senders name
tasks by these constants instead of importing the task functions."""

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
