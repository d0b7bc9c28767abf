"""With the real bundled models: ingest three documents, build the RAG recipe, ask, check the citation."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command

from inference import services as inference
from projects.services import documents_ingest_paths
from tests.projects import fixtures_docs as fx
from training.models import Build, ModelVersion
from training.services import build_run, build_start

pytestmark = pytest.mark.django_db

BACKUP_GUIDE = """# Nightly backup guide

## Restoring a file

To restore a single file from last night's backup, run `bkp restore --date yesterday PATH`.
The restored copy appears next to the original with the suffix .restored.

## Retention

Backups are kept for 35 days. Monthly snapshots are kept for one year.
"""


def _command(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_ingest_build_ask_and_the_right_document_is_cited(project, owner, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    fx.make_pdf(docs)  # the pump field guide (installation, maintenance)
    fx.make_docx(docs)
    (docs / "backup.md").write_text(BACKUP_GUIDE)
    result = documents_ingest_paths(project=project, paths=[docs], user=owner)
    assert (result.added, result.failed) == (3, [])

    build = build_start(project=project, user=owner, recipe="rag")
    build_run(build_id=build.pk)
    build.refresh_from_db()
    assert build.status == Build.Status.SUCCEEDED, build.error
    version = ModelVersion.objects.get(build=build)
    assert version.metrics["rag"]["documents"] == 3 and version.metrics["rag"]["chunks"] >= 3
    assert version.index_path and (version.index_path / "manifest.json").exists()

    backup = project.documents.get(original_name="backup.md")
    chat = inference.ChatSettings(top_k=3, temperature=0.0, max_tokens=64)
    answer = inference.answer_start(
        version=version, question="How long are backups kept?", history=[], chat=chat
    )
    text = "".join(answer.pieces)
    assert text.strip() and text == answer.result.text
    assert answer.sources[0]["document_id"] == backup.pk
    assert answer.result.completion_tokens > 0

    # The CLI twins see the same model.
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        json.dumps({"query": "bkp restore command"}) + "\n" + json.dumps({"query": "clean the filter"}) + "\n"
    )
    lines = [
        json.loads(line)
        for line in _command("retrieve", str(version.pk), "--queries", str(queries), "--k", "2").splitlines()
    ]
    assert [line["query"] for line in lines] == ["bkp restore command", "clean the filter"]
    assert lines[0]["results"][0]["document"] == backup.title
    assert len(lines[1]["results"]) == 2 and all(
        {"document", "text", "score"} <= set(r) for r in lines[1]["results"]
    )

    asked = json.loads(
        _command("ask", str(version.pk), "How do I restore a file from backup?", "--max-tokens", "48")
    )
    assert asked["answer"].strip() and asked["tokens_per_second"] > 0
    assert asked["sources"][0]["document_id"] == backup.pk


# Without a wrapping test transaction, the build's task (eager in tests) runs as the build
# row commits, so `--wait` finds it finished.
@pytest.mark.django_db(transaction=True)
def test_the_build_command_prints_the_model_version(project, tmp_path):
    (tmp_path / "backup.md").write_text(BACKUP_GUIDE)
    documents_ingest_paths(project=project, paths=[tmp_path / "backup.md"])
    out = StringIO()
    call_command(
        "build", project.slug, "--recipe", "rag", "--chunk-chars", "150", "--overlap-chars", "30",
        "--wait", "--timeout", "120", stdout=out,
    )  # fmt: skip
    printed = json.loads(out.getvalue())
    assert {"build", "status", "model_version", "metrics", "model_versions"} == set(printed)
    assert printed["status"] == "succeeded"
    version = ModelVersion.objects.get(pk=printed["model_version"])
    assert version.build_id == printed["build"] and version.number == 1
    assert printed["metrics"]["rag"]["chunks"] >= 2 and printed["metrics"]["parse"]["parsed"] == 1
    assert (printed["metrics"]["rag"]["chunk_chars"], printed["metrics"]["rag"]["overlap_chars"]) == (150, 30)
