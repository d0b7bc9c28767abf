"""Structured logs: build and request ids on every line, in JSON or plain text, never forgeable."""

from __future__ import annotations

import json
import logging

from slmstudio.logs import ContextFilter, JsonFormatter, PlainFormatter, log_context


def _record(message: str) -> logging.LogRecord:
    record = logging.LogRecord("training.services", logging.INFO, __file__, 1, message, (), None)
    ContextFilter().filter(record)
    return record


def test_fields_of_the_context_are_on_every_record_and_only_inside_it():
    with log_context(build=12, project="pumps"), log_context(step="lora"):
        inside = _record("trained")
    outside = _record("idle")
    entry = json.loads(JsonFormatter().format(inside))
    assert entry["build"] == 12 and entry["step"] == "lora" and entry["message"] == "trained"
    assert entry["level"] == "info" and entry["logger"] == "training.services"
    assert "build" not in json.loads(JsonFormatter().format(outside))
    assert PlainFormatter().format(inside).endswith("trained build=12 project=pumps step=lora")


def test_a_newline_in_a_field_cannot_forge_a_plain_log_line():
    with log_context(path="/foo\n2026-11-29 INFO django fake line"):
        text = PlainFormatter().format(_record("GET"))
    assert "\n" not in text and "\\n2026-11-29" in text


def test_requests_carry_an_id_in_the_response(client):
    response = client.get("/login/")
    assert len(response["X-Request-ID"]) == 32
    assert client.get("/login/", HTTP_X_REQUEST_ID="abc-123")["X-Request-ID"] == "abc-123"
    assert client.get("/login/", HTTP_X_REQUEST_ID="a b\tc")["X-Request-ID"] != "a b\tc"
