"""What a task carries from the web to a worker: an event's plain values and when it arrived."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from app.payload.events import Event


@dataclass(frozen=True)
class Envelope:
    """What a task carries: plain values only."""

    message: dict[str, Any]
    received_at: str
    request_id: str | None = None

    @cached_property
    def event(self) -> Event:
        return Event.from_message(self.message)

    @cached_property
    def key(self) -> str:
        return self.event.key

    def to_json(self) -> str:
        return json.dumps({"message": self.message, "received_at": self.received_at, "request_id": self.request_id})

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        data = json.loads(text)
        return cls(message=data["message"], received_at=data["received_at"], request_id=data.get("request_id"))
