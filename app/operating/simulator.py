"""Plays realistic Africa's Talking call sequences against a deployment (``flask voice simulate``).

Each call: a live request (``isActive=1``), sometimes a second one with DTMF digits, then one final
request (``isActive=0``) per participant with AT's fields; a share of the finals is delivered twice,
as AT does when it retries. A call's requests go in order; calls run concurrently. A request
answered 503 or not answered is retried, as AT would. The report says what was sent and what each
recording should end as under the contract's rules.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

OUR_NUMBER = "+254711082000"
# (status, callSessionState, hangupCause, contract status it maps to, answered)
OUTCOMES = [
    ("Completed", "Completed", "NORMAL_CLEARING", "completed", True),
    ("NotAnswered", "NotAnswered", "NO_ANSWER", "no-answer", False),
    ("NotAnswered", "NotAnswered", "SUBSCRIBER_ABSENT", "no-answer", False),
    ("NotAnswered", "NotAnswered", "USER_BUSY", "busy", False),
    ("NotAnswered", "NotAnswered", "CALL_REJECTED", "rejected", False),
    ("Failed", "Failed", "UNALLOCATED_NUMBER", "failed", False),
]
CAUSE_STATUS = {cause: status for _, _, cause, status, _ in OUTCOMES}
MAX_ATTEMPTS = 5


@dataclass
class Report:
    calls: int = 0
    requests: int = 0  # distinct requests
    deliveries: int = 0  # including retries of the same request
    answers: Counter[str] = field(default_factory=Counter)
    failed_requests: int = 0  # never answered 200 after MAX_ATTEMPTS
    expected: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, **increments: int) -> None:
        with self.lock:
            for name, n in increments.items():
                setattr(self, name, getattr(self, name) + n)

    def answered(self, status: int) -> None:
        with self.lock:
            self.deliveries += 1
            self.answers[str(status)] += 1

    def summary(self) -> dict[str, Any]:
        return {"calls": self.calls, "requests": self.requests, "deliveries": self.deliveries,
                "answers": dict(self.answers), "failed_requests": self.failed_requests}


def plan(calls: int, participants: int, seed: int, prefix: str) -> list[list[dict[str, str]]]:
    """Every call's requests, in the order AT sends them."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test traffic, not a secret
    sequences = []
    for n in range(calls):
        session_id = f"{prefix}_{seed}_{n}"
        inbound = participants == 1 and rng.random() < 0.5
        started = f"2026-03-06 14:{n % 60:02d}:00"
        numbers = [f"+2547{rng.randrange(10**7, 10**8)}" for _ in range(participants)]
        first = numbers[0]
        live = {"isActive": "1", "sessionId": session_id, "direction": "Inbound" if inbound else "Outbound",
                "callerNumber": first if inbound else OUR_NUMBER,
                "destinationNumber": OUR_NUMBER if inbound else first, "callStartTime": started}
        requests = [live]
        if rng.random() < 0.3:
            requests.append({**live, "dtmfDigits": str(rng.randrange(10, 99))})
        for number in numbers:
            status, state, cause, _, answered = rng.choice(OUTCOMES)
            duration = rng.randrange(5, 900) if answered else 0
            final = {
                "isActive": "0", "sessionId": session_id, "direction": "Inbound" if inbound else "Outbound",
                "callerNumber": number if inbound else OUR_NUMBER,
                "destinationNumber": OUR_NUMBER if inbound else number,
                "durationInSeconds": str(duration), "currencyCode": "KES",
                "amount": f"{duration * 0.0125:.4f}", "callSessionState": state, "status": status,
                "hangupCause": cause, "callStartTime": started,
                "recordingUrl": f"https://voice.africastalking.com/recordings/{session_id}-{number[1:]}.mp3"
                if answered else "",
            }
            requests.append(final)
        sequences.append(requests)
    return sequences


def expected_recording(requests: list[dict[str, str]]) -> dict[str, Any]:
    """What the contract's rules make of one call's requests, sent in order."""
    finals = [r for r in requests if r["isActive"] == "0"]
    statuses = [CAUSE_STATUS[r["hangupCause"]] for r in finals]
    participants = {}
    for r, status in zip(finals, statuses, strict=True):
        number = r["callerNumber"] if r["direction"] == "Inbound" else r["destinationNumber"]
        participants[number] = status
    urls = [r["recordingUrl"] for r, s in zip(finals, statuses, strict=True) if s == "completed" and r["recordingUrl"]]
    return {
        "status": "completed" if "completed" in statuses else statuses[-1],
        "duration": max(int(r["durationInSeconds"]) for r in finals),
        "recording_url": urls[-1] if urls else None,
        "participants": participants,
    }


class Sender:
    """Posts form requests to one webhook URL, signed or with a token, retrying like AT."""

    def __init__(self, url: str, secret: str | None, token: str | None, signature_header: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        self.parts = parts
        self.path = parts.path or "/"
        query = [q for q in [parts.query, urlencode({"token": token}) if token else ""] if q]
        if query:
            self.path += "?" + "&".join(query)
        self.secret = secret
        self.signature_header = signature_header

    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
        return cls(self.parts.hostname, self.parts.port, timeout=10)

    def post(self, fields: dict[str, str], report: Report) -> bool:
        body = urlencode(fields).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if self.secret:
            headers[self.signature_header] = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        for attempt in range(MAX_ATTEMPTS):
            conn = self._connection()
            try:
                conn.request("POST", self.path, body, headers)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                status = 0
            finally:
                conn.close()
            report.answered(status)
            if status == 200:
                return True
            if status not in (0, 503):
                return False  # refused: retrying the same request cannot help
            time.sleep(min(2.0, 0.2 * 2**attempt))
        return False


def simulate(url: str, calls: int, participants: int, duplicates: float, secret: str | None = None,
             token: str | None = None, seed: int = 0, concurrency: int = 8, prefix: str = "ATVoice_sim",
             signature_header: str = "X-Webhook-Signature",
             progress: Callable[[int], None] | None = None) -> Report:
    """Play the calls; ``progress`` is called with 1 as each call's requests are all sent."""
    sender = Sender(url, secret, token, signature_header)
    sequences = plan(calls, participants, seed, prefix)
    rng = random.Random(seed + 1)  # noqa: S311 - reproducible test traffic
    retried = [[rng.random() < duplicates and r["isActive"] == "0" for r in requests] for requests in sequences]
    report = Report(calls=calls)

    def play(index: int) -> None:
        requests = sequences[index]
        for fields, again in zip(requests, retried[index], strict=True):
            report.count(requests=1)
            if not sender.post(fields, report):
                report.count(failed_requests=1)
            if again:  # AT delivers the same callback once more
                sender.post(fields, report)
        if progress is not None:
            with report.lock:
                progress(1)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(play, range(calls)))
    report.expected = {requests[0]["sessionId"]: expected_recording(requests) for requests in sequences}
    return report


# --- reading the recordings back -------------------------------------------------------------


@dataclass
class Check:
    """One recording: what the rules say it should hold, what the service holds, what differs."""

    session_id: str
    expected: dict[str, Any]
    held: dict[str, Any] | None = None
    differs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.held is not None and not self.differs


def held_state(recording: dict[str, Any]) -> dict[str, Any]:
    """The fields of a recording (as the read API shows it) that the simulator predicts."""
    return {"status": recording["status"], "duration": recording["duration"],
            "recording_url": recording["recording_url"],
            "participants": {p["phone_number"]: p["status"] for p in recording["participants"]}}


def differences(expected: dict[str, Any], held: dict[str, Any] | None) -> list[str]:
    if held is None:
        return ["missing"]
    return [name for name in expected if expected[name] != held.get(name)]


class Reader:
    """Reads recordings through the read API of the deployment the webhooks went to."""

    def __init__(self, webhook_url: str, api_key: str, api_url: str | None = None) -> None:
        parts = urlsplit(api_url or webhook_url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {api_url or webhook_url}")
        self.parts = parts
        self.api_key = api_key

    def recording(self, session_id: str) -> dict[str, Any] | None:
        cls = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.parts.hostname, self.parts.port, timeout=10)
        try:
            conn.request("GET", f"/api/v1/voice/recordings/{quote(session_id, safe='')}",
                         headers={"Authorization": f"Bearer {self.api_key}"})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status == 404:
            return None
        if response.status == 401:
            raise PermissionError("the read API refused the API key (401)")
        if response.status != 200:
            raise OSError(f"GET recording {session_id}: HTTP {response.status}")
        return held_state(json.loads(body))


def verify(reader: Reader, expected: dict[str, dict[str, Any]], timeout: float = 120.0, settle: float = 10.0,
           interval: float = 0.5, concurrency: int = 8) -> list[Check]:
    """Poll every recording until it holds what was expected, or until nothing has changed for
    ``settle`` seconds (the queue has drained), or ``timeout``; then report each one."""
    checks = {session: Check(session, want) for session, want in expected.items()}
    deadline = time.monotonic() + timeout
    last_change = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        while True:
            waiting = [check for check in checks.values() if not check.ok]
            for check, held in zip(waiting, pool.map(lambda c: reader.recording(c.session_id), waiting), strict=True):
                if held != check.held:
                    last_change = time.monotonic()
                check.held, check.differs = held, differences(check.expected, held)
            now = time.monotonic()
            if all(check.ok for check in checks.values()) or now > deadline or now - last_change > settle:
                break
            time.sleep(interval)
    return list(checks.values())


def _shown_state(state: dict[str, Any] | None) -> str:
    if state is None:
        return "(none)"
    url = state["recording_url"]
    participants = ",".join(f"{number[-4:]}:{status}" for number, status in sorted(state["participants"].items()))
    return (f"{state['status']} {state['duration']}s url={'…' + url[-12:] if url else '-'} "
            f"[{participants}]")


def table(checks: list[Check]) -> str:
    """A pass/fail line per recording: expected, held, and the fields that differ."""
    rows = [("session", "expected", "held", "result")]
    for check in checks:
        rows.append((check.session_id, _shown_state(check.expected), _shown_state(check.held),
                     "PASS" if check.ok else "FAIL " + ",".join(check.differs)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows)
