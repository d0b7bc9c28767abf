"""Keeping a version current: what changed since it was built, and a refresh that embeds only
the changed passages (cache hits) and carries over the numbers whose inputs did not change."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.urls import reverse

from projects.services import document_add, document_delete, document_parse, pair_create
from training.models import Build, ModelVersion
from training.services import build_run, build_start, version_changes

pytestmark = pytest.mark.django_db

TEXTS = {
    "pump.md": "# Pump manual\n\n"
    + "Hold the red RESET button for five seconds to reset the P-200 pump. " * 30,
    "vacation.md": "# Vacation policy\n\n" + "Employees get 25 days of paid vacation per year. " * 30,
    "kitchen.md": "# Office kitchen\n\n" + "The coffee machine is descaled every Friday morning. " * 30,
}
CHANGED_PUMP = "# Pump manual\n\n" + "Since 2026 the P-300 pump resets from its touch screen menu. " * 30


def _add(project, name: str, text: str):  # type: ignore[no-untyped-def]
    return document_add(
        project=project, stream=SimpleUploadedFile(name, text.encode()), name=name, size=None
    ).document


def _rag_version(project, owner) -> ModelVersion:  # type: ignore[no-untyped-def]
    # Parse and index only: the evaluate step is covered by the refresh test below.
    build = build_start(project=project, user=owner, recipe="rag", steps=[{"name": "parse"}, {"name": "rag"}])
    build_run(build_id=build.pk)
    build.refresh_from_db()
    assert build.status == Build.Status.SUCCEEDED, build.error
    return ModelVersion.objects.get(build=build)


def _chunks(version: ModelVersion) -> list[dict]:
    return [json.loads(line) for line in (version.index_path / "chunks.jsonl").read_text().splitlines()]


@pytest.fixture
def documents(project):  # type: ignore[no-untyped-def]
    return {name: _add(project, name, text) for name, text in TEXTS.items()}


def _replace_pump(project, documents):  # type: ignore[no-untyped-def]
    document_delete(document=documents["pump.md"])
    return _add(project, "pump.md", CHANGED_PUMP)


def test_a_version_records_its_sources_and_reports_what_changed_since(project, owner, documents):
    version = _rag_version(project, owner)
    sources = json.loads((version.index_path / "sources.json").read_text())
    assert {d["name"] for d in sources["documents"]} == set(TEXTS)
    assert {d["sha256"] for d in sources["documents"]} == {d.sha256 for d in documents.values()}
    assert version.metrics["rag"]["embedded"] == version.metrics["rag"]["chunks"]
    assert version.metrics["rag"]["reused"] == 0
    assert not version_changes(version=version).any

    _replace_pump(project, documents)
    _add(project, "new.md", "# New\n\nA new note about the parking garage.")
    document_delete(document=documents["kitchen.md"])
    # Uploads count before they are read (the refresh reads them); one that failed does not.
    _add(project, "broken.pdf", "not a pdf")
    assert project.documents.get(original_name="broken.pdf").status in ("pending", "failed")
    document_parse(document_id=project.documents.get(original_name="broken.pdf").pk)
    changes = version_changes(version=version)
    assert (changes.changed, changes.added, changes.removed) == (["pump.md"], ["new.md"], ["kitchen.md"])
    assert changes.documents == 3 and not changes.policy_changed

    project.known_names = "Alice Example"
    project.save(update_fields=["known_names"])
    assert version_changes(version=ModelVersion.objects.get(pk=version.pk)).policy_changed


def test_a_second_rag_build_embeds_only_the_changed_documents_passages(project, owner, documents):
    first = _rag_version(project, owner)
    old_pump_id = documents["pump.md"].pk
    new_pump = _replace_pump(project, documents)
    second = _rag_version(project, owner)
    rag = second.metrics["rag"]
    chunks = _chunks(second)
    pump_chunks = [c for c in chunks if c["document_id"] == new_pump.pk]
    assert pump_chunks and rag["chunks"] == len(chunks)
    assert rag["embedded"] == len(pump_chunks)  # only the changed document's passages
    assert rag["reused"] == len(chunks) - len(pump_chunks) > 0  # every other passage: a cache hit
    old_pump = [c for c in _chunks(first) if c["document_id"] == old_pump_id]
    assert rag["reused"] == first.metrics["rag"]["chunks"] - len(old_pump)
    assert (project.data_dir / "embeddings").is_dir()


def test_the_version_page_shows_the_changes_and_refresh_starts_the_same_recipe(
    project, owner, owner_client, outsider_client, documents
):
    version = _rag_version(project, owner)
    page = owner_client.get(reverse("inference-model-detail", args=[project.slug, version.number]))
    assert "changed since this version was built" not in page.content.decode()

    _replace_pump(project, documents)
    page = owner_client.get(
        reverse("inference-model-detail", args=[project.slug, version.number])
    ).content.decode()
    assert "1 document changed since this version was built" in page
    assert "Changed: pump.md." in page
    refresh_url = reverse("inference-refresh", args=[project.slug, version.number])
    assert f'action="{refresh_url}"' in page

    assert owner_client.get(refresh_url).status_code == 405
    assert outsider_client.post(refresh_url).status_code == 404
    assert Build.objects.count() == 1
    response = owner_client.post(refresh_url)
    build = Build.objects.order_by("-pk").first()
    assert build.pk != version.build.pk
    assert response.status_code == 302 and response["Location"] == build.get_absolute_url()
    assert build.recipe == version.build.recipe and build.base == version.build.base
    steps = {s.name: s.params for s in build.steps.all()}
    assert steps["evaluate"]["refresh_of"] == version.pk


def test_refresh_cli_reuses_cached_passages_and_carries_over_unchanged_numbers(
    project, owner, documents, django_capture_on_commit_callbacks
):
    pair_create(project=project, instruction="How do I reset the pump?", input="", response="Hold RESET.")
    project.pairs.update(split="eval")  # held out, so answers are measured
    with django_capture_on_commit_callbacks(execute=True):
        build = build_start(project=project, user=owner, recipe="rag")
    build.refresh_from_db()
    assert build.status == Build.Status.SUCCEEDED, build.error
    version = ModelVersion.objects.get(build=build)
    first_eval = version.evaluation
    assert first_eval["tokens_per_second"] and first_eval["gguf_identity"] and not first_eval["carried_over"]

    out = StringIO()
    call_command("refresh", str(version.pk), "--check", stdout=out)
    assert json.loads(out.getvalue())["changes"]["documents_changed"] == 0

    _replace_pump(project, documents)
    out = StringIO()
    with django_capture_on_commit_callbacks(execute=True):  # the build runs when the command commits
        call_command("refresh", str(version.pk), stdout=out)
    printed = json.loads(out.getvalue())
    assert printed["refreshed"] == version.pk and printed["status"] == "queued", printed
    assert printed["changes"]["changed"] == ["pump.md"] and printed["changes"]["documents_changed"] == 1
    refreshed = Build.objects.get(pk=printed["build"])
    assert refreshed.status == Build.Status.SUCCEEDED, refreshed.error
    rag = refreshed.steps.get(name="rag").metrics
    assert 0 < rag["embedded"] < rag["chunks"] and rag["reused"] == rag["chunks"] - rag["embedded"]
    new = ModelVersion.objects.get(build=refreshed)
    assert new.number == version.number + 1 and new.recipe == version.recipe
    evaluated = new.evaluation
    # The same bundled GGUF: speed and size are carried over, and say so.
    assert evaluated["carried_over"]["from_version"] == version.number
    assert "tokens_per_second" in evaluated["carried_over"]["keys"]
    assert evaluated["tokens_per_second"] == first_eval["tokens_per_second"]
    # The held-out text changed with the document, so perplexity was measured again;
    # answers depend on the index and are always measured again.
    assert evaluated["eval_text_sha256"] != first_eval["eval_text_sha256"]
    assert "perplexity" not in evaluated["carried_over"]["keys"]
    assert evaluated["answer_f1"] is not None and evaluated["eval_pairs"] == 1
    assert not version_changes(version=new).any
