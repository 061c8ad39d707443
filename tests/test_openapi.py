"""The OpenAPI document, generated from the declarations validation uses: it says what the service
accepts, as a JSON Schema validator reads it (jsonschema_rs, the one schemathesis checks with)."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest

from app.base.errors import InvalidPayload
from app.payload.events import parse_event
from app.payload.openapi import openapi_document

URL_2048 = "https://voice.example/" + "a" * (2048 - len("https://voice.example/"))


def every(node: Any, key: str) -> list[Any]:
    """Every value of ``key`` anywhere in a JSON document."""
    if isinstance(node, list):
        return [found for item in node for found in every(item, key)]
    if not isinstance(node, dict):
        return []
    return [*([node[key]] if key in node else []), *(found for value in node.values() for found in every(value, key))]


def test_every_reference_resolves_and_every_pattern_is_json_schemas() -> None:
    document = openapi_document()
    schemas = document["components"]["schemas"]
    for ref in every(document, "$ref"):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    patterns = every(document, "pattern")
    assert patterns  # the webhook body's rules are there
    for pattern in patterns:  # Python's \Z is not JSON Schema's; a published value pattern is anchored
        assert pattern.startswith("^") and pattern.endswith("$") and "\\Z" not in pattern, pattern


def test_the_webhook_body_is_one_schema_for_form_and_json() -> None:
    document = openapi_document()
    content = document["paths"]["/api/v1/voice/webhook"]["post"]["requestBody"]["content"]
    assert content == {media: {"schema": {"$ref": "#/components/schemas/WebhookPayload"}}
                       for media in ("application/x-www-form-urlencoded", "application/json")}


@pytest.fixture(scope="module")
def body_schema() -> Any:
    document = openapi_document()
    return jsonschema_rs.validator_for({"$ref": "#/components/schemas/WebhookPayload", **document})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        *[("sessionId", v) for v in ("A", "x" * 128, "x" * 129, "", "two words", "tab\there", "S\n", "no\u00a0break")],
        *[("phoneNumber", v) for v in ("+12345678", "+123456789012345", "+1234567", "+1234567890123456", "",
                                       "254712345678", "+254712345678\n", "+254 712 345 678")],
        *[("recordingUrl", v) for v in ("https://voice.example/a.mp3", "http://10.0.0.5:8080/r?id=7#t", URL_2048,
                                        URL_2048 + "a", "", "ftp://voice.example/a.mp3", "https://voice.example/a.mp3\n",
                                        "https://voice.example:65536/a", "https://", "//voice.example/a.mp3")],
        *[("duration", v) for v in (0, 420, 604800, 420.0, -1, 604801, 4.5, True)],
        *[("status", v) for v in ("completed", "no-answer", "rejected")],
        *[("note", v) for v in ("text", "", 3, 2.5, False, None, "a\x01b", "line\n", "x" * 2048, "x" * 2049, [1],
                                {"a": 1})],
        *[(name, "x") for name in ("x[0]", "a.b-c_d", "bad name", "x" * 64, "x" * 65, "name\n")],
    ],
)
def test_the_document_and_the_validator_agree_on_a_field(body_schema: Any, name: str, value: Any) -> None:
    """A value of the kind the document gives each field (a form sends its text) is accepted by the
    service exactly when the document allows it."""
    fields = {"sessionId": "S1", "status": "completed", name: value}
    try:
        parse_event(fields)
        accepted = True
    except InvalidPayload:
        accepted = False
    assert body_schema.is_valid(fields) == accepted
