"""The official `openai` client against the live test server, non-streaming and streaming."""

from __future__ import annotations

import pytest
from openai import OpenAI

from inference.services import api_token_create

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_openai_client_works_against_the_api(live_server, owner, version):
    _, raw = api_token_create(user=owner, name="client test")
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key=raw, max_retries=0, timeout=60)

    assert version.api_id in [m.id for m in client.models.list().data]

    question = [{"role": "user", "content": "How do I reset the P-200 pump?"}]
    reply = client.chat.completions.create(
        model=version.api_id, messages=question, temperature=0, max_tokens=40
    )
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0

    stream = client.chat.completions.create(
        model=version.api_id,
        messages=question,
        temperature=0,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert len(pieces) >= 3
    assert usage is not None and usage.completion_tokens > 0
    # Same prompt, temperature 0: streaming and non-streaming give the same answer.
    assert "".join(pieces) == reply.choices[0].message.content


def test_a_wrong_key_raises_the_clients_authentication_error(live_server, version):
    import openai

    client = OpenAI(base_url=f"{live_server.url}/v1", api_key="slm_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
