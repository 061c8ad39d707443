"""Log lines: phone numbers masked and secrets scrubbed, whatever the value looks like."""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from app.base import logs


def scrubbed_slowly(text: str) -> str:
    """Both substitutions, always: what scrub_text gives once its quick search found something."""
    text = logs._TOKEN_IN_TEXT.sub(r"\1[redacted]", text)
    return logs._PHONE_IN_TEXT.sub(lambda m: logs.mask_phone("+" + m.group(1)) or "", text)


def test_tokens_and_phones_in_free_text_are_scrubbed() -> None:
    url = "https://hooks.example/cb?token=s3cr3t&to=%2B254712345678 from +254712345678"
    assert logs.scrub_text(url) == "https://hooks.example/cb?token=[redacted]&to=+254******678 from +254******678"
    assert logs.scrub_text("session ATVoice_1 ok") == "session ATVoice_1 ok"


TEXT = st.text(alphabet=st.sampled_from(list("+%2Bbtoken=&? 0123456789aZ")), max_size=40)


@given(st.one_of(TEXT, st.text(max_size=40), TEXT.map(lambda t: t + "+254712345678"),
                 TEXT.map(lambda t: "?TOKEN=" + t)))
def test_the_quick_search_skips_only_texts_with_nothing_to_scrub(text: str) -> None:
    assert logs.scrub_text(text) == scrubbed_slowly(text)


def test_redact_masks_phone_keys_and_drops_secret_keys() -> None:
    line = logs.redact(None, "info", {"event": "x", "phoneNumber": "+254712345678", "token": "abc",
                                      "nested": {"callerNumber": "+254787654321"}, "timestamp": "+254712345678"})
    assert line["phoneNumber"] == "+254******678" and line["token"] == "[redacted]"
    assert line["nested"] == {"callerNumber": "+254******321"}
    assert line["timestamp"] == "+254712345678"  # the processor's own keys are left as they are
    assert not re.search(r"\d{9}", str({k: v for k, v in line.items() if k != "timestamp"}))


class CountingStream(io.StringIO):
    """A stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_held_lines_are_written_together_when_the_block_ends_however_it_ends(monkeypatch: Any) -> None:
    stream = CountingStream()
    logs.configure_logging("INFO", "json")
    monkeypatch.setattr(logs, "_handler", logging.StreamHandler(stream))
    log = structlog.get_logger("test")
    with pytest.raises(RuntimeError), logs.lines_held():
        log.info("first", phone_number="+254712345678")
        with logs.lines_held():  # nested: written with the outer block
            log.info("second")
        assert stream.getvalue() == ""
        raise RuntimeError("the batch failed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["first", "second"]
    assert lines[0]["phone_number"] == "+254******678"
    assert stream.writes == 1
    log.info("third")  # outside a block: written at once
    assert json.loads(stream.getvalue().splitlines()[-1])["event"] == "third"
    assert stream.writes == 2


def redacted_slowly(event_dict: dict[str, Any]) -> dict[str, Any]:
    """Every value through _redact, the search and the substitutions each text's own."""

    def one(value: Any, key: str) -> Any:
        lowered = key.lower()
        if lowered in logs._SECRET_KEYS:
            return "[redacted]"
        if lowered in logs._PHONE_KEYS and isinstance(value, str):
            return logs.mask_phone(value)
        if isinstance(value, str):
            return scrubbed_slowly(value)
        if isinstance(value, dict):
            return {k: one(v, str(k)) for k, v in value.items()}
        return value

    return {key: value if key in {"timestamp", "level", "logger"} else one(value, key)
            for key, value in event_dict.items()}


LINE_KEYS = st.sampled_from(["event", "session_id", "phone_number", "PhoneNumber", "callerNumber", "token", "API_KEY",
                             "url", "error", "timestamp", "level", "logger", "duration"])
VALUES = st.one_of(TEXT, st.text(max_size=20), TEXT.map(lambda t: t + "+254712345678"), st.integers(), st.none(),
                   st.lists(TEXT, max_size=2), st.dictionaries(LINE_KEYS, TEXT, max_size=3))


@given(st.dictionaries(LINE_KEYS, VALUES, max_size=8))
def test_a_line_is_redacted_as_each_value_on_its_own_would_be(event_dict: dict[str, Any]) -> None:
    assert logs.redact(None, "info", event_dict) == redacted_slowly(event_dict)
