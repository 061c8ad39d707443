"""The OpenAPI 3.1 document of every endpoint, its bodies and its errors."""

from __future__ import annotations

from typing import Any

from app.events import (
    FIELD_NAME_PATTERN,
    MAX_DURATION,
    MAX_FIELDS,
    MAX_URL_LENGTH,
    MAX_VALUE_LENGTH,
    PHONE_PATTERN,
    SESSION_ID_PATTERN,
    STATUSES,
    TEXT_PATTERN,
    URL_PATTERN,
)

_TIME = {"type": "string", "format": "date-time"}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _anchored(pattern: str) -> str:
    return f"^(?:{pattern})$"


_AT_TEXT = {"type": "string", "maxLength": MAX_VALUE_LENGTH, "pattern": _anchored(TEXT_PATTERN)}
_WEBHOOK_FIELDS = {
    "type": "object",
    "description": "The seed page's fields, or Africa's Talking's own (isActive, direction, callerNumber, "
                   "destinationNumber, durationInSeconds, callSessionState, hangupCause, ...): see "
                   "app/africastalking.py for how they map. Every field is kept with the event.",
    "anyOf": [{"required": ["sessionId", "status"]}, {"required": ["sessionId", "isActive"]}],
    "maxProperties": MAX_FIELDS,
    "propertyNames": {"pattern": _anchored(FIELD_NAME_PATTERN)},
    "properties": {
        "sessionId": {"type": "string", "pattern": _anchored(SESSION_ID_PATTERN)},
        "phoneNumber": {"type": "string", "pattern": _anchored(f"(?:{PHONE_PATTERN})?"),
                        "description": "E.164; empty means none"},
        "recordingUrl": {"type": "string", "maxLength": MAX_URL_LENGTH, "pattern": _anchored(f"(?:{URL_PATTERN})?"),
                         "description": "absolute http(s) URL; empty means no recording"},
        "duration": {"type": "integer", "minimum": 0, "maximum": MAX_DURATION},
        "status": {**_AT_TEXT, "description": f"one of {', '.join(STATUSES)}; or AT's own values (Completed, "
                   "NotAnswered, ...) in a payload with AT's fields"},
        "isActive": {"type": "string", "enum": ["0", "1"], "description": "1 while the call is live"},
        "direction": {**_AT_TEXT, "description": "Inbound or Outbound"},
        "callerNumber": {"type": "string", "pattern": _anchored(f"(?:{PHONE_PATTERN})?")},
        "destinationNumber": {"type": "string", "pattern": _anchored(f"(?:{PHONE_PATTERN})?")},
        "durationInSeconds": {"type": "integer", "minimum": 0, "maximum": MAX_DURATION},
        "callSessionState": _AT_TEXT,
        "hangupCause": _AT_TEXT,
    },
    "additionalProperties": {
        "anyOf": [_AT_TEXT, {"type": ["number", "boolean", "null"]}],
        "description": "any other field is kept with the event as received",
    },
}

_SCHEMAS: dict[str, Any] = {
    "WebhookPayload": _WEBHOOK_FIELDS,
    "WebhookAccepted": {
        "type": "object",
        "required": ["status", "session_id"],
        "properties": {"status": {"const": "webhook_processed"}, "session_id": {"type": "string"}},
    },
    "WebhookError": {
        "type": "object",
        "required": ["status", "error"],
        "properties": {
            "status": {"const": "webhook_error"},
            "error": {"type": "string"},
            "session_id": {"type": "string"},
        },
    },
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Participant": {
        "type": "object",
        "required": ["phone_number", "status", "duration", "updated_at"],
        "properties": {
            "phone_number": {"type": "string"},
            "status": {"type": "string"},
            "duration": {"type": ["integer", "null"]},
            "updated_at": _TIME,
        },
    },
    "Recording": {
        "type": "object",
        "required": ["recording_id", "status", "duration", "recording_url", "created_at", "processed_at",
                     "participants"],
        "properties": {
            "recording_id": {"type": "string"},
            "status": {"type": "string"},
            "duration": {"type": ["integer", "null"]},
            "recording_url": {"type": ["string", "null"]},
            "created_at": _TIME,
            "processed_at": _NULLABLE_TIME,
            "participants": {"type": "array", "items": _ref("Participant")},
        },
    },
    "RecordingList": {
        "type": "object",
        "required": ["recordings", "next_cursor"],
        "properties": {
            "recordings": {"type": "array", "items": _ref("Recording")},
            "next_cursor": {"type": ["string", "null"]},
        },
    },
    "Change": {
        "type": "object",
        "required": ["cursor", "recording"],
        "properties": {
            "cursor": {"type": "string", "description": "the feed's position just after this item"},
            "recording": _ref("Recording"),
        },
    },
    "ChangeList": {
        "type": "object",
        "required": ["changes", "next_cursor"],
        "properties": {
            "changes": {"type": "array", "items": _ref("Change")},
            "next_cursor": {"type": "string", "description": "pass as `after` next time; an empty page "
                            "returns the cursor it was given"},
        },
    },
    "Event": {
        "type": "object",
        "required": ["received_at", "phone_number", "status", "duration", "recording_url", "outcome", "payload"],
        "properties": {
            "received_at": _TIME,
            "phone_number": {"type": ["string", "null"]},
            "status": {"type": "string"},
            "duration": {"type": ["integer", "null"]},
            "recording_url": {"type": ["string", "null"]},
            "outcome": {"type": "string", "enum": ["applied", "no_effect"]},
            "payload": {"type": "object", "description": "every field as received"},
        },
    },
    "EventList": {
        "type": "object",
        "required": ["recording_id", "events"],
        "properties": {"recording_id": {"type": "string"}, "events": {"type": "array", "items": _ref("Event")}},
    },
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
    "Readiness": {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "degraded", "unavailable"]},
            "checks": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["ok", "latency_ms"],
                    "properties": {
                        "ok": {"type": "boolean"},
                        "latency_ms": {"type": "number"},
                        "error": {"type": "string"},
                    },
                },
            },
            "failed": {"type": "array", "items": {"type": "string"}},
            "degraded": {"type": "array", "items": {"type": "string"},
                         "description": "Down, but not needed to accept and apply webhooks (Redis on RabbitMQ)"},
        },
    },
}

_WEBHOOK_ERROR = _ref("WebhookError")
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds before trying again"}}
_BEARER_FAIL = _json(
    _ref("Error"), "Missing or wrong API key", {"WWW-Authenticate": {"schema": {"type": "string"}}}
)
_BAD_QUERY = _json(_ref("Error"), "A query parameter is malformed")
_NOT_FOUND = _json(_ref("Error"), "Unknown recording")
_RECORDING_ID = {"name": "recording_id", "in": "path", "required": True, "schema": {"type": "string"}}

_PATHS: dict[str, Any] = {
    "/api/v1/voice/webhook": {
        "post": {
            "summary": "Receive an Africa's Talking voice callback",
            "description": "Validates, queues and acknowledges; the recording is updated by a worker.",
            "operationId": "receiveWebhook",
            "security": [{}, {"webhookToken": []}, {"webhookSignature": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {"schema": _ref("WebhookPayload")},
                    "application/json": {"schema": _ref("WebhookPayload")},
                },
            },
            "responses": {
                "200": {
                    "description": "Queued; the broker holds the task. A live call's request (isActive=1) "
                                   "is answered with the call-control XML of VOICE_ACTIVE_CALL_XML.",
                    "content": {
                        "application/json": {"schema": _ref("WebhookAccepted")},
                        "application/xml": {"schema": {"type": "string"}},
                    },
                },
                "400": _json(_WEBHOOK_ERROR, "Payload invalid; the error names the field"),
                "401": _json(_WEBHOOK_ERROR, "Webhook authentication failed"),
                "403": _json(_WEBHOOK_ERROR, "Client address not allowed"),
                "408": _json(_WEBHOOK_ERROR, "The body stalled (not received within 10 s)"),
                "413": _json(_WEBHOOK_ERROR, "Body larger than MAX_CONTENT_LENGTH"),
                "415": _json(_WEBHOOK_ERROR, "Content type is neither form nor JSON"),
                "503": _json(_WEBHOOK_ERROR, "The queue did not take the task; retry", _RETRY_AFTER),
            },
        }
    },
    "/api/v1/voice/recordings": {
        "get": {
            "summary": "List recordings, newest first",
            "operationId": "listRecordings",
            "security": [{"bearer": []}],
            "parameters": [
                {"name": "status", "in": "query", "schema": {"type": "string", "enum": [*STATUSES, "in-progress"]}},
                {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                {"name": "cursor", "in": "query", "schema": {"type": "string"}},
            ],
            "responses": {
                "200": _json(_ref("RecordingList"), "A page of recordings"),
                "400": _BAD_QUERY,
                "401": _BEARER_FAIL,
            },
        }
    },
    "/api/v1/voice/recordings/{recording_id}": {
        "get": {
            "summary": "One recording with its participants",
            "operationId": "getRecording",
            "security": [{"bearer": []}],
            "parameters": [_RECORDING_ID],
            "responses": {
                "200": _json(_ref("Recording"), "The recording"),
                "401": _BEARER_FAIL,
                "404": _NOT_FOUND,
            },
        }
    },
    "/api/v1/voice/recordings/{recording_id}/events": {
        "get": {
            "summary": "The distinct webhook events of a recording, oldest first",
            "operationId": "listRecordingEvents",
            "security": [{"bearer": []}],
            "parameters": [_RECORDING_ID],
            "responses": {
                "200": _json(_ref("EventList"), "The events"),
                "401": _BEARER_FAIL,
                "404": _NOT_FOUND,
            },
        }
    },
    "/api/v1/voice/changes": {
        "get": {
            "summary": "Recordings in the order their latest change committed",
            "description": "Follow next_cursor (no `after`: from the beginning) to see every recording that "
                           "changed, with its latest state; no committed change is ever passed over. Store "
                           "next_cursor after processing a page, and resume from it after a crash.",
            "operationId": "listChanges",
            "security": [{"bearer": []}],
            "parameters": [
                {"name": "after", "in": "query", "schema": {"type": "string"},
                 "description": "a cursor from a previous page"},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
            ],
            "responses": {
                "200": _json(_ref("ChangeList"), "A page of changes"),
                "400": _BAD_QUERY,
                "401": _BEARER_FAIL,
            },
        }
    },
    "/healthz": {
        "get": {
            "summary": "The process is alive",
            "operationId": "healthz",
            "responses": {"200": _json(_ref("Health"), "Alive")},
        }
    },
    "/readyz": {
        "get": {
            "summary": "The database, Redis and the broker answer (on RabbitMQ, Redis down is only degraded)",
            "operationId": "readyz",
            "responses": {
                "200": _json(_ref("Readiness"), "Ready, or degraded: `degraded` names what is down"),
                "503": _json(_ref("Readiness"), "A dependency failed; `failed` names it"),
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "responses": {
                "200": {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "operationId": "openapi",
            "responses": {
                "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}
            },
        }
    },
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Voice webhook service",
            "version": "1.0.0",
            "description": "Receives Africa's Talking voice callbacks and serves the call recordings they describe.",
        },
        "paths": _PATHS,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "A key from API_KEYS"},
                "webhookToken": {"type": "apiKey", "in": "query", "name": "token", "description": "WEBHOOK_TOKENS"},
                "webhookSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Webhook-Signature",
                    "description": "hex HMAC-SHA256 of the raw body with a WEBHOOK_SECRETS secret",
                },
            },
        },
    }
