from __future__ import annotations

import pytest

from inference.comparison import comparison_rows, size_quality_chart
from slmstudio.lib.charts import nice_ticks as _nice_ticks
from slmstudio.lib.charts import tick_label as _fmt
from training.models import ModelVersion

pytestmark = pytest.mark.django_db


def test_nice_ticks_cover_the_range_with_round_steps() -> None:
    assert _nice_ticks(0, 270) == [0, 100, 200, 300]
    ticks = _nice_ticks(11.3, 12.9)
    assert ticks[0] <= 11.3 and ticks[-1] >= 12.9
    steps = {round(b - a, 6) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert steps == {0.5}
    assert _nice_ticks(5, 5)  # a single value still gets an axis


def test_tick_labels_show_the_decimals_their_step_needs() -> None:
    ticks = _nice_ticks(16.2, 17.2)
    labels = [_fmt(t, ticks) for t in ticks]
    assert len(set(labels)) == len(labels) and labels[0] == "16.0"
    assert [_fmt(t, [0, 50, 100]) for t in (0, 50, 100)] == ["0", "50", "100"]


def _version(project, number: int, quant: str, size: int | None, ppl: float | None) -> ModelVersion:  # type: ignore[no-untyped-def]
    return ModelVersion.objects.create(
        project=project, number=number, recipe=f"quantize:{quant}", base_model="b", quant_type=quant,
        gguf_path="/nonexistent.gguf", metrics={"evaluate": {"size_bytes": size, "perplexity": ppl}},
    )  # fmt: skip


def test_rows_say_how_much_smaller_and_the_chart_places_points(project) -> None:  # type: ignore[no-untyped-def]
    big = _version(project, 1, "q8_0", 145_000_000, 12.0)
    small = _version(project, 2, "q4_0", 85_000_000, 13.0)
    unmeasured = _version(project, 3, "q4_1", None, None)
    rows = comparison_rows([big, small, unmeasured])
    assert [r.times_smaller for r in rows] == [None, 1.7, None]
    assert rows[0].kind.startswith("Q8_0")
    chart = size_quality_chart(rows)
    assert chart is not None and len(chart.points) == 2  # the unmeasured version has no point
    p_big, p_small = chart.points
    left, top, right, bottom = chart.plot
    assert p_small.x < p_big.x  # smaller file further left
    assert p_big.y > p_small.y  # lower perplexity (better) is drawn lower: larger SVG y
    assert all(left <= p.x <= right and top <= p.y <= bottom for p in chart.points)
    assert "/about/" in p_big.href


def test_no_chart_without_measurements(project) -> None:  # type: ignore[no-untyped-def]
    assert size_quality_chart(comparison_rows([_version(project, 1, "q8_0", None, None)])) is None


def test_versions_measured_on_other_text_are_flagged_and_left_off_the_chart(project) -> None:  # type: ignore[no-untyped-def]
    old = _version(project, 1, "q8_0", 145_000_000, 12.0)
    new = _version(project, 2, "q4_0", 85_000_000, 13.0)
    old.metrics["evaluate"]["eval_text_sha256"] = "aaaa"
    new.metrics["evaluate"]["eval_text_sha256"] = "bbbb"
    rows = comparison_rows([new, old])  # newest first, as the page lists them
    assert [r.other_text for r in rows] == [False, True]
    chart = size_quality_chart(rows)
    assert chart is not None and [p.label for p in chart.points] == ["v2 Q4_0"]


def test_the_report_shows_each_version_with_its_lineage_and_downloads_as_one_file(
    project, owner_client
) -> None:  # type: ignore[no-untyped-def]
    from django.urls import reverse

    version = _version(project, 1, "q4_k_m", 80_000_000, 12.5)
    version.metrics = version.metrics | {"lora": {"steps": 3}, "prune": {"method": "wanda", "sparsity": 0.5},
                                         "quantize": {"type": "q4_k_m"}}  # fmt: skip
    version.save()
    url = reverse("inference-report", args=[project.slug])
    page = owner_client.get(url).content.decode()
    assert version.name in page and "80.0 MB" in page and "12.50" in page
    for step in ("LoRA", "50% zeroed (wanda)", "quantized Q4_K_M"):
        assert f"<span>{step}</span>" in page
    download = owner_client.get(url + "?download=1")
    assert download["Content-Disposition"].startswith("attachment;")
    body = download.content.decode()
    assert "<style>" in body and 'rel="stylesheet"' not in body  # self-contained
