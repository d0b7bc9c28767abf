"""Answer latency and speed are observed where answers are made (inference.services.answer_start):
a question answered through the chat page moves them; one answered by the evaluation does not."""

from __future__ import annotations

import pytest
from django.urls import reverse

from tests.inference.test_chat import _sse_events

from .helpers import sample, scrape

pytestmark = pytest.mark.django_db


def _counts() -> dict[str, float]:
    samples = scrape()
    return {
        "first": sample(samples, "slmstudio_chat_first_token_seconds_count") or 0,
        "answers": sum(
            v for (name, _), v in samples.items() if name == "slmstudio_chat_answer_seconds_count"
        ),
        "speed": sample(samples, "slmstudio_chat_tokens_per_second_count") or 0,
        "speed_sum": sample(samples, "slmstudio_chat_tokens_per_second_sum") or 0,
        "first_sum": sample(samples, "slmstudio_chat_first_token_seconds_sum") or 0,
    }


def test_answering_on_the_chat_page_observes_first_token_total_and_speed(owner_client, version):
    from inference.models import Message

    before = _counts()
    url = reverse("inference-ask", args=[version.project.slug, version.number])
    asked = owner_client.post(
        url,
        {"question": "How do I reset the P-200 pump?", "temperature": 0, "max_tokens": 24},
        HTTP_X_CHAT="1",
    )
    events = _sse_events(owner_client.get(asked.json()["stream_url"]))
    assert events[-1][0] == "done"
    after = _counts()
    assert after["first"] == before["first"] + 1
    assert after["answers"] == before["answers"] + 1
    assert after["speed"] == before["speed"] + 1
    usage = Message.objects.get(role="assistant").usage
    # The speed is the engine's own; the first token as the asker waited for it, so no sooner
    # than the engine saw it.
    assert after["speed_sum"] - before["speed_sum"] == pytest.approx(usage["tokens_per_second"], rel=0.05)
    assert after["first_sum"] - before["first_sum"] >= usage["first_token_seconds"] - 0.001
    finished = "stop" if usage["finish_reason"] == "stop" else "length"
    assert sample(scrape(), "slmstudio_chat_answer_seconds_count", outcome=finished) >= 1


def test_a_closed_stream_is_observed_once_as_cancelled(version):
    from inference.services import ChatSettings, answer_start

    before = sample(scrape(), "slmstudio_chat_answer_seconds_count", outcome="cancelled") or 0
    answer = answer_start(
        version=version, question="How many vacation days?", history=[], chat=ChatSettings(max_tokens=64)
    )
    next(answer.pieces)
    answer.pieces.close()  # type: ignore[attr-defined]  (the browser went away)
    assert answer.result.finish_reason == "cancelled"
    assert sample(scrape(), "slmstudio_chat_answer_seconds_count", outcome="cancelled") == before + 1


def test_evaluation_answers_are_not_counted_as_chat(version):
    from inference.services import ChatSettings, answer_from

    before = _counts()
    answer = answer_from(
        gguf=version.gguf_file, index=None, question="Hello?", history=[], chat=ChatSettings(max_tokens=8)
    )
    answer.complete()
    assert _counts() == before
