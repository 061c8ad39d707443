"""Africa's Talking's real voice callbacks, mapped onto the contract's fields.

AT posts every request of a call to one URL with one ``sessionId``. While the call is live the
requests carry ``isActive=1`` (and AT wants call-control XML back); the final request per
participant has ``isActive=0`` with ``direction``, ``callerNumber``, ``destinationNumber``,
``durationInSeconds``, ``callSessionState``/``status``, ``hangupCause``, ``recordingUrl`` and more.

Names:

| AT field | contract field |
|---|---|
| ``durationInSeconds`` | ``duration`` (``duration`` itself wins when both are sent) |
| ``destinationNumber`` on an ``Outbound`` call | the participant's ``phoneNumber`` |
| ``callerNumber`` on an ``Inbound`` call | the participant's ``phoneNumber`` |
| either, when ``direction`` is missing or unknown | ``callerNumber``, else ``destinationNumber`` |

Statuses, first rule that applies:

1. ``isActive=1``: ``in-progress`` (stored, never overriding a terminal status);
2. ``hangupCause`` USER_BUSY: ``busy``; CALL_REJECTED: ``rejected``; NO_ANSWER, NO_USER_RESPONSE,
   SUBSCRIBER_ABSENT: ``no-answer``;
3. ``status`` (else ``callSessionState``): Completed, Answered: ``completed``; NotAnswered, Ringing:
   ``no-answer``; Busy: ``busy``; Rejected: ``rejected``; Failed, Aborted: ``failed``; the
   contract's own five values as they are;
4. ``hangupCause`` NORMAL_CLEARING: ``completed``; any other known cause: ``failed``;
5. nothing known: ``failed``.

A value neither table knows is accepted and kept raw with the event; the web process counts it
(``voice_unknown_at_values_total``) and logs it once.
"""

from __future__ import annotations

from typing import Any

IN_PROGRESS = "in-progress"
CONTRACT_STATUSES = ("completed", "failed", "busy", "no-answer", "rejected")

# Fields only AT's real callbacks carry: their presence switches a payload to these rules.
AT_FIELDS = frozenset(
    {"isActive", "callSessionState", "hangupCause", "direction", "callerNumber", "destinationNumber",
     "durationInSeconds"}
)

DECISIVE_CAUSES = {
    "USER_BUSY": "busy",
    "CALL_REJECTED": "rejected",
    "NO_ANSWER": "no-answer",
    "NO_USER_RESPONSE": "no-answer",
    "SUBSCRIBER_ABSENT": "no-answer",
}
OTHER_CAUSES = {
    "NORMAL_CLEARING": "completed",
    "ORIGINATOR_CANCEL": "failed",
    "UNALLOCATED_NUMBER": "failed",
    "NORMAL_TEMPORARY_FAILURE": "failed",
    "RECOVERY_ON_TIMER_EXPIRE": "failed",
    "SERVICE_UNAVAILABLE": "failed",
    "USER_NOT_REGISTERED": "failed",
    "LOSE_RACE": "failed",
    "UNSPECIFIED": "failed",
}
STATES = {
    "Completed": "completed",
    "Answered": "completed",
    "NotAnswered": "no-answer",
    "Ringing": "no-answer",
    "Busy": "busy",
    "Rejected": "rejected",
    "Failed": "failed",
    "Aborted": "failed",
    **{status: status for status in CONTRACT_STATUSES},
}
DIRECTIONS = {"Inbound": "callerNumber", "Outbound": "destinationNumber"}


def is_at_payload(fields: dict[str, Any]) -> bool:
    return not AT_FIELDS.isdisjoint(fields)


def map_status(fields: dict[str, Any], live: bool) -> tuple[str, list[tuple[str, str]]]:
    """The contract status of an AT request, and the (field, value) pairs the tables do not know."""
    unknown: list[tuple[str, str]] = []

    def known(name: str, table: dict[str, str]) -> str | None:
        value = fields.get(name)
        if value in (None, ""):
            return None
        value = str(value)
        if value not in table:
            unknown.append((name, value))
            return None
        return table[value]

    cause_table = {**DECISIVE_CAUSES, **OTHER_CAUSES}
    cause = known("hangupCause", cause_table)
    state = known("status", STATES)
    session_state = known("callSessionState", STATES)
    if live:
        return IN_PROGRESS, unknown
    raw_cause = fields.get("hangupCause")
    if raw_cause in DECISIVE_CAUSES:
        return DECISIVE_CAUSES[raw_cause], unknown
    for mapped in (state, session_state, cause):
        if mapped is not None:
            return mapped, unknown
    return "failed", unknown


def participant_field(fields: dict[str, Any]) -> tuple[str | None, list[tuple[str, str]]]:
    """Which field names the participant, by call direction; and an unknown direction, if any."""
    direction = fields.get("direction")
    if direction in DIRECTIONS and fields.get(DIRECTIONS[direction]):
        return DIRECTIONS[direction], []
    unknown = [("direction", str(direction))] if direction not in (None, "", *DIRECTIONS) else []
    for name in ("callerNumber", "destinationNumber"):
        if fields.get(name):
            return name, unknown
    return None, unknown
