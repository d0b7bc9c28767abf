"""The Models tab in real Chromium: versions compared in a table and a chart, a point leads to the
version's page, and its downloads arrive."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import expect

from training.ml.bundled import bundled_llm_gguf
from training.models import ModelVersion
from training.registry import base_model_default

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SCREENSHOTS = os.environ.get("SCREENSHOT_DIR")


def _versions(project) -> list[ModelVersion]:  # type: ignore[no-untyped-def]
    base = base_model_default()
    made = []
    for number, (qtype, size, ppl, kl, f1, tps) in enumerate(
        [("q8_0", 144_800_000, 16.08, 0.0038, 0.34, 44.7), ("q4_k_m", 105_500_000, 16.61, 0.0525, 0.31, 46.1),
         ("q4_0", 91_700_000, 18.27, 0.2633, 0.22, 54.6)],
        start=1,
    ):  # fmt: skip
        made.append(
            ModelVersion.objects.create(
                project=project,
                number=number,
                recipe=f"rag,quantize:{qtype}",
                base=base,
                base_model=f"{base.name}, {qtype.upper()}",
                quant_type=qtype,
                gguf_path=str(bundled_llm_gguf().path),
                metrics={
                    "quantize": {"type": qtype, "bits_per_weight": 8.5, "fallback_tensors": 0},
                    "evaluate": {
                        "size_bytes": size,
                        "perplexity": ppl,
                        "kl_divergence": kl,
                        "answer_f1": f1,
                        "tokens_per_second": tps,
                        "peak_memory_bytes": size + 80_000_000,
                        "bits_per_weight": 8.5,
                        "eval_tokens": 2048,
                        "held_out": True,
                    },
                },
            )  # fmt: skip
        )
    return made


def test_compare_versions_then_open_one_and_download_its_files(live_server, page, owner, project):  # type: ignore[no-untyped-def]
    _versions(project)
    page.goto(f"{live_server.url}/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("pw-alice-123")
    page.get_by_role("button", name="Log in").click()
    page.goto(f"{live_server.url}/p/{project.slug}/")
    page.get_by_role("navigation", name="Project sections").get_by_role("link", name="Models").click()

    table = page.locator("table#compare")
    expect(table.locator("tbody tr")).to_have_count(3)
    expect(table).to_contain_text("Q4_K_M")
    expect(table).to_contain_text("1.6× smaller")  # 144.8 MB against 91.7 MB
    expect(table).to_contain_text("91.7 MB")
    points = page.locator("svg.chart-svg circle.point")
    expect(points).to_have_count(3)
    if SCREENSHOTS:
        page.screenshot(path=os.path.join(SCREENSHOTS, "models.png"), full_page=True)

    # The smallest file is drawn furthest left; following it opens that version's page.
    xs = [float(points.nth(i).get_attribute("cx")) for i in range(3)]
    leftmost = xs.index(min(xs))
    expect(page.locator("svg.chart-svg .point-label").nth(leftmost)).to_have_text("v3 Q4_0")
    points.nth(leftmost).click()
    expect(page.get_by_role("heading", level=2)).to_contain_text("v3")
    expect(page.locator("pre.code").first).to_contain_text(f"llama-cli -m {project.slug}-v3-q4_0.gguf")
    if SCREENSHOTS:
        page.screenshot(path=os.path.join(SCREENSHOTS, "model_detail.png"), full_page=True)

    with page.expect_download() as download:
        page.get_by_role("link", name="Ollama Modelfile").click()
    assert download.value.suggested_filename == "Modelfile"
    assert f"FROM ./{project.slug}-v3-q4_0.gguf" in Path(download.value.path()).read_text()
    with page.expect_download() as download:
        page.get_by_role("link", name="Model card").click()
    card = Path(download.value.path()).read_text()
    assert card.startswith(f"# {project.name} v3") and "| Perplexity | 18.270 |" in card
