from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command

from projects.models import Document, Project
from tests.projects import fixtures_docs as fx

pytestmark = pytest.mark.django_db


def run(*args: str) -> tuple[int, dict]:
    out = StringIO()
    try:
        call_command(*args, stdout=out)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, json.loads(out.getvalue())


def test_createproject_prints_the_slug(owner):
    code, out = run("createproject", "Pump manuals", "--owner", owner.username)
    assert (code, out) == (0, {"project": "pump-manuals"})
    assert Project.objects.get(slug="pump-manuals").memberships.get().user == owner
    code, out = run("createproject", "Pump manuals", "--owner", owner.username)
    assert out == {"project": "pump-manuals-2"}


def test_createproject_fails_for_an_unknown_owner(db):
    code, out = run("createproject", "X", "--owner", "ghost")
    assert code == 1 and "ghost" in out["error"]


def test_ingest_adds_files_and_folders_recursively(project, tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    fx.make_pdf(folder)
    fx.make_markdown(folder / "sub")
    (folder / ".hidden.txt").write_text("skip me")
    single = fx.make_html(tmp_path)
    code, out = run("ingest", project.slug, str(folder), str(single))
    assert (code, out) == (0, {"added": 3, "duplicates": 0, "failed": []})
    assert project.documents.filter(status=Document.Status.PARSED).count() == 3


def test_ingest_counts_duplicates_and_reports_failures(project, tmp_path):
    pdf = fx.make_pdf(tmp_path)
    run("ingest", project.slug, str(pdf))
    bad = fx.make_exe_renamed_pdf(tmp_path)
    missing = tmp_path / "nope.md"
    code, out = run("ingest", project.slug, str(pdf), str(bad), str(missing))
    assert code == 1
    assert out["added"] == 0 and out["duplicates"] == 1
    assert [f["path"] for f in out["failed"]] == [str(bad), str(missing)]
    assert "Windows program" in out["failed"][0]["error"]
    assert out["failed"][1]["error"] == "No such file."


def test_ingest_refuses_files_over_the_limit_before_storing(project, tmp_path, settings):
    settings.MAX_UPLOAD_BYTES = 100
    big = tmp_path / "big.txt"
    big.write_text("x " * 500)
    code, out = run("ingest", project.slug, str(big))
    assert code == 1 and "larger than" in out["failed"][0]["error"]
    assert not project.documents.exists()


def test_importpairs_prints_the_report(project, tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('instruction,input,response\nHow?,,"Like this"\nWhy?,ctx,\n"Multi\nline",,Yes\n')
    code, out = run("importpairs", project.slug, str(path))
    assert code == 0
    assert out["added"] == 2
    assert out["rejected"] == [{"line": 3, "error": "empty response"}]
    assert out["train"] + out["eval"] == 2
    assert set(out) == {"added", "rejected", "train", "eval"}


def test_importpairs_fails_for_an_unreadable_file(project, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\x00\x01\x02binary")
    code, out = run("importpairs", project.slug, str(path))
    assert code == 1 and out["added"] == 0 and out["error"]
    assert not project.pairs.exists()


def test_ensureadmin_creates_one_admin_once(db):
    code, first = run("ensureadmin")
    assert first["created"] and first["username"] == "admin" and len(first["password"]) >= 12
    code, second = run("ensureadmin")
    assert second == {"created": False}
