"""Log lines: phone numbers masked and secrets scrubbed, whatever the value looks like."""

from __future__ import annotations

import re

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
