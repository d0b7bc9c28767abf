from __future__ import annotations

import pytest
from django.urls import reverse

from training.registry import base_model_default

pytestmark = pytest.mark.django_db

MEASURED = {
    "perplexity": 14.25, "bits_per_byte": 1.02, "kl_divergence": None, "answer_f1": 0.31,
    "tokens_per_second": 96.0, "size_bytes": 98_000_000, "peak_memory_bytes": 180_000_000,
    "rouge_l": 0.2, "embedding_similarity": 0.55, "prompt_tokens_per_second": 300.0,
    "bits_per_weight": 5.1, "eval_tokens": 2048, "eval_bytes": 9000, "eval_pairs": 4, "held_out": True,
}  # fmt: skip


@pytest.fixture
def measured(version):  # type: ignore[no-untyped-def]
    version.base = base_model_default()
    version.metrics = version.metrics | {"evaluate": MEASURED}
    version.save()
    return version


def test_models_page_compares_versions_with_a_chart(owner_client, project, measured) -> None:  # type: ignore[no-untyped-def]
    page = owner_client.get(reverse("inference-models", args=[project.slug])).content.decode()
    assert 'id="compare"' in page and "14.25" in page and "96 tok/s" in page
    assert "<svg" in page and "<circle" in page  # one measured version: one point
    assert reverse("inference-model-detail", args=[project.slug, 1]) in page


def test_model_page_offers_downloads_and_the_api(owner_client, project, measured) -> None:  # type: ignore[no-untyped-def]
    page = owner_client.get(reverse("inference-model-detail", args=[project.slug, 1])).content.decode()
    for expected in ("GGUF file", "Ollama Modelfile", "Model card", "llama-cli -m support-handbook-v1-q4_1.gguf",
                     "support-handbook/v1", "chat/completions"):  # fmt: skip
        assert expected in page, expected


def test_gguf_download_is_the_model_file(owner_client, project, measured) -> None:  # type: ignore[no-untyped-def]
    response = owner_client.get(reverse("inference-download-gguf", args=[project.slug, 1]))
    assert response.status_code == 200
    assert 'filename="support-handbook-v1-q4_1.gguf"' in response["Content-Disposition"]
    head = next(iter(response.streaming_content))
    assert head[:4] == b"GGUF"
    response.close()


def test_modelfile_points_at_the_gguf_with_its_chat_template(owner_client, project, measured) -> None:  # type: ignore[no-untyped-def]
    text = owner_client.get(reverse("inference-download-modelfile", args=[project.slug, 1])).content.decode()
    assert "FROM ./support-handbook-v1-q4_1.gguf" in text
    assert "<|im_start|>" in text and 'PARAMETER stop "<|im_end|>"' in text  # SmolLM2's template is ChatML
    assert "SYSTEM" in text  # a RAG model says it expects passages


def test_model_card_reports_what_was_measured_and_nothing_invented(owner_client, project, measured) -> None:  # type: ignore[no-untyped-def]
    response = owner_client.get(reverse("inference-download-card", args=[project.slug, 1]))
    card = response.content.decode()
    assert response["Content-Type"].startswith("text/markdown")
    assert "| Perplexity | 14.250 |" in card and "| Answer F1 | 0.310 |" in card
    assert "| KL divergence | – |" in card  # not a quantized model: no parent, no number
    assert "134,515,008" in card  # parameters of the bundled base, from its GGUF
