from __future__ import annotations

import json

import pytest
from django.urls import reverse

from inference.models import ApiToken, Conversation, Message
from tests.conftest import client_for

pytestmark = pytest.mark.django_db


def _sse_events(response) -> list[tuple[str, object]]:  # type: ignore[no-untyped-def]
    body = b"".join(response.streaming_content).decode()
    events = []
    for block in body.split("\n\n"):
        lines = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":")
        )
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def _ask(client, version, question: str, **extra):  # type: ignore[no-untyped-def]
    url = reverse("inference-ask", args=[version.project.slug, version.number])
    return client.post(
        url, {"question": question, "temperature": 0, "max_tokens": 48, **extra}, HTTP_X_CHAT="1"
    )


def test_a_question_streams_tokens_then_a_cited_answer(owner_client, version):
    asked = _ask(owner_client, version, "How do I reset the P-200 pump?")
    assert asked.status_code == 200
    data = asked.json()
    assert "How do I reset" in data["question_html"]
    response = owner_client.get(data["stream_url"])
    assert response["Content-Type"].startswith("text/event-stream")
    events = _sse_events(response)
    kinds = [k for k, _ in events]
    assert kinds.count("token") >= 3 and kinds[-1] == "done"
    streamed = "".join(v for k, v in events if k == "token")
    answer = Message.objects.get(role="assistant")
    assert answer.content == streamed
    assert answer.usage["completion_tokens"] > 0 and answer.usage["tokens_per_second"] > 0
    # The pump manual is the first source, and the sources are shown with links to the document.
    assert answer.sources[0]["document_id"] == 1001
    html = events[-1][1]["html"]
    assert "P-200 pump manual" in html and f"/documents/1001/#s-{answer.sources[0]['section_index']}" in html


def test_reopening_the_stream_sends_the_saved_answer(owner_client, version):
    data = _ask(owner_client, version, "How many vacation days do I get?").json()
    first = _sse_events(owner_client.get(data["stream_url"]))
    again = _sse_events(owner_client.get(data["stream_url"]))
    assert [k for k, _ in again] == ["done"] and again[0][1] == first[-1][1]
    assert Message.objects.filter(role="assistant").count() == 1


def test_the_conversation_is_kept_and_listed(owner_client, version):
    data = _ask(owner_client, version, "When is the fridge emptied?").json()
    _sse_events(owner_client.get(data["stream_url"]))
    conversation = Conversation.objects.get()
    data2 = _ask(owner_client, version, "And the coffee machine?", conversation=conversation.pk).json()
    assert data2["conversation"] == conversation.pk
    _sse_events(owner_client.get(data2["stream_url"]))
    page = owner_client.get(data["conversation_url"]).content.decode()
    assert "When is the fridge emptied?" in page and "And the coffee machine?" in page
    assert page.count('class="msg msg-assistant"') == 2
    assert (
        owner_client.get(version.get_absolute_url()).content.decode().count("When is the fridge emptied?")
        == 1
    )


def test_search_only_shows_passages_without_generating(owner_client, version):
    url = reverse("inference-retrieve", args=[version.project.slug, version.number])
    page = owner_client.get(url, {"question": "What does E-4021 mean?", "top_k": 2}).content.decode()
    assert "P-200 pump manual" in page and "inlet pressure" in page
    assert not Message.objects.exists()


def test_conversations_are_private_even_inside_a_project(owner_client, member, version):
    data = _ask(owner_client, version, "How do I reset the P-200 pump?").json()
    other = client_for(member)
    assert other.get(data["conversation_url"]).status_code == 404
    assert other.get(data["stream_url"]).status_code == 404
    conversation = Conversation.objects.get()
    assert _ask(other, version, "x", conversation=conversation.pk).status_code == 404


def test_an_empty_question_is_refused(owner_client, version):
    response = _ask(owner_client, version, "   ")
    assert response.status_code == 400 and "question" in response.json()["error"]


def test_tokens_are_created_once_and_revoked(owner_client, owner):
    page = owner_client.post(reverse("inference-settings"), {"name": "helpdesk"}).content.decode()
    token = ApiToken.objects.get(user=owner)
    raw = page.split('id="new-token">')[1].split("<")[0]
    assert raw.startswith("slm_") and ApiToken.hash(raw) == token.token_hash and raw not in token.token_hash
    assert raw not in owner_client.get(reverse("inference-settings")).content.decode()
    owner_client.post(reverse("inference-token-revoke", args=[token.pk]))
    assert not ApiToken.objects.exists()


def test_a_failure_while_answering_reaches_the_page_as_an_event(owner_client, version, tmp_path):
    version.index_dir = str(tmp_path / "missing-index")
    version.save()
    data = _ask(owner_client, version, "How do I reset the P-200 pump?").json()
    events = _sse_events(owner_client.get(data["stream_url"]))
    assert [k for k, _ in events] == ["failure"]
    assert "could not answer" in events[0][1]["message"]
