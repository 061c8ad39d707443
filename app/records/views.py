"""How a recording is shown: one shape for the single GET, the list, the change feed and the ready hook."""

from __future__ import annotations

from typing import Any

from app.base.timeutil import to_rfc3339
from app.records.models import VoiceRecording


def recording_view(recording: VoiceRecording) -> dict[str, Any]:
    return {
        "recording_id": recording.id,
        "status": recording.status,
        "duration": recording.duration,
        "recording_url": recording.recording_url,
        "created_at": to_rfc3339(recording.created_at),
        "processed_at": to_rfc3339(recording.processed_at),
        "participants": [
            {
                "phone_number": p.phone_number,
                "status": p.status,
                "duration": p.duration,
                "updated_at": to_rfc3339(p.updated_at),
            }
            for p in recording.participants
        ],
    }
