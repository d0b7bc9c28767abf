from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import User
from django.test import Client

from inference.services import api_token_create

pytestmark = pytest.mark.django_db


def _client(user: User) -> tuple[Client, dict]:
    _, raw = api_token_create(user=user, name="test")
    return Client(), {"HTTP_AUTHORIZATION": f"Bearer {raw}"}


def _post(client: Client, headers: dict, body: object):  # type: ignore[no-untyped-def]
    return client.post("/v1/chat/completions", json.dumps(body), content_type="application/json", **headers)


def test_it_refuses_requests_without_a_valid_token(db, version):
    client = Client()
    assert client.get("/v1/models").status_code == 401
    response = client.get("/v1/models", HTTP_AUTHORIZATION="Bearer slm_wrong")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_models_lists_only_what_the_user_can_access(owner, outsider, version):
    client, headers = _client(owner)
    data = client.get("/v1/models", **headers).json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == [version.api_id]
    client, headers = _client(outsider)
    assert client.get("/v1/models", **headers).json()["data"] == []


def test_an_outsider_cannot_use_the_model(outsider, version):
    client, headers = _client(outsider)
    response = _post(
        client, headers, {"model": version.api_id, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_a_completion_has_usage_and_sources(owner, version):
    client, headers = _client(owner)
    body = {
        "model": version.api_id,
        "messages": [{"role": "user", "content": "What does error E-4021 mean?"}],
        "temperature": 0,
        "max_tokens": 40,
    }
    data = _post(client, headers, body).json()
    assert data["object"] == "chat.completion" and data["model"] == version.api_id
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert data["sources"][0]["document_id"] == 1001


def test_a_streamed_completion_follows_the_wire_format(owner, version):
    client, headers = _client(owner)
    body = {
        "model": version.api_id,
        "messages": [{"role": "user", "content": "How many vacation days?"}],
        "temperature": 0,
        "max_tokens": 24,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = _post(client, headers, body)
    raw = b"".join(response.streaming_content).decode()
    lines = [line[len("data: ") :] for line in raw.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text.strip()


@pytest.mark.parametrize(
    "body, message",
    [
        ("not json", "not valid JSON"),
        ({"model": "x/v1", "messages": []}, "does not exist"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "does not exist"),
    ],
)
def test_bad_requests_get_openai_style_errors(owner, version, body, message):
    client, headers = _client(owner)
    payload = body if isinstance(body, str) else json.dumps(body)
    response = client.post("/v1/chat/completions", payload, content_type="application/json", **headers)
    assert response.status_code in (400, 404) and message in response.json()["error"]["message"]


def test_the_last_message_must_be_a_question(owner, version):
    client, headers = _client(owner)
    response = _post(
        client, headers, {"model": version.api_id, "messages": [{"role": "assistant", "content": "x"}]}
    )
    assert response.status_code == 400
