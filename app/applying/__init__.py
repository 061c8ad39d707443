"""Applying an event to its recording: the tasks, the worker's duplicate fast path, the merge rules,
the ready hooks, dead letters and retention."""
