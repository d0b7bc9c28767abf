"""Backup and restore of a whole installation (docs/backups.md).

An archive is one gzip'd tar:

- `db.json`: every row, as Django's portable JSON (`dumpdata`, foreign keys to content types and
  permissions by natural key), so it loads into SQLite or PostgreSQL alike;
- `data/...`: the files under DATA_DIR the rows point at (documents, build folders, referenced
  model files) and the two keys (`secret_key`, `field_key`);
- `files.sha256`: `sha256sum -c` input for a restore drill by hand;
- `manifest.json` (last, since it lists every file's checksum): format, source, counts,
  migrations, the folders it restores.

The archive holds the key that decrypts teachers' API keys, so it is as secret as the keys.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import posixpath
import shutil
import sqlite3
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.core.serializers.base import DeserializationError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.recorder import MigrationRecorder
from django.utils import timezone

FORMAT = "slmstudio-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATABASE = "db.json"
CHECKSUMS = "files.sha256"
DATA = "data"

# Rows left out of the dump. Content types and permissions are recreated by `migrate` (with other
# ids: the dump names them by natural key instead); sessions and log-in failures (axes) are
# transient and sessions are signed with SECRET_KEY anyway; ops.Worker is the registry of the
# workers that were running, which announce themselves again on the new machine.
EXCLUDED = ("contenttypes", "auth.permission", "sessions", "axes", "ops.worker")

# Columns holding file paths as training.models.stored_path writes them: relative to DATA_DIR
# when inside it, else absolute. BuildStep.outputs holds a dict of such paths too.
PATH_COLUMNS: dict[str, tuple[str, ...]] = {
    "training.basemodel": ("hf_dir", "gguf_path"),
    "training.modelversion": ("gguf_path", "parent_gguf_path", "hf_dir", "index_dir"),
    "training.teacher": ("path",),
}
OUTPUT_COLUMNS = {"training.buildstep": "outputs"}

# Model files barely compress at any level (quantized weights are dense), and they are most of
# the bytes: the fastest level keeps a large backup quick while the JSON still shrinks well.
GZIP_LEVEL = 1
CHUNK = 1024 * 1024


class BackupError(Exception):
    """A backup or restore that cannot go on, with a message for the operator."""


@dataclass
class Counts:
    projects: int = 0
    documents: int = 0
    pairs: int = 0
    builds: int = 0
    model_versions: int = 0

    @classmethod
    def now(cls) -> Counts:
        def count(label: str) -> int:
            return apps.get_model(label)._base_manager.count()

        return cls(
            projects=count("projects.Project"),
            documents=count("projects.Document"),
            pairs=count("projects.InstructionPair"),
            builds=count("training.Build"),
            model_versions=count("training.ModelVersion"),
        )

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class BackupResult:
    path: Path
    bytes: int
    counts: Counts
    files: int
    warnings: list[str] = field(default_factory=list)


@dataclass
class RestoreResult:
    path: Path
    counts: Counts
    files: int
    warnings: list[str] = field(default_factory=list)


# --- Backup ----------------------------------------------------------------------------------


def backup_create(*, out: Path | str) -> BackupResult:
    """Write an archive of this installation to `out` (a file, or a folder to name one in).

    The database is dumped first, in one read transaction; the files are copied after. That is a
    consistent snapshot because every file is written (atomically) before the row that points at
    it, and what a finished build made never changes: a row in the dump always finds its file.
    What is written after the dump (a build still running) may come along or not; a restored
    installation re-runs such builds from their last finished step.
    """
    data_dir = Path(settings.DATA_DIR).resolve()
    out = _archive_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A dot-name in the same folder, renamed into place at the end: a reader (or a cron job's
    # rotation) never sees half an archive. mkstemp's 0600 suits a file holding the keys.
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    warnings: list[str] = []
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp") as work:
            dump = Path(work) / DATABASE
            with _read_snapshot():
                call_command(
                    "dumpdata",
                    exclude=[label for label in EXCLUDED if _is_label(label)],
                    use_natural_foreign_keys=True,
                    # Every row, also of a model whose default manager hides some.
                    use_base_manager=True,
                    output=str(dump),
                    verbosity=0,
                )
                counts = Counts.now()
                roots, external = _referenced_roots(data_dir)
                migrations = _applied_migrations()
            warnings += [
                f"Not in the archive (outside DATA_DIR): {path} ({owner})" for path, owner in external
            ]
            with tarfile.open(tmp, "w:gz", compresslevel=GZIP_LEVEL, format=tarfile.PAX_FORMAT) as tar:
                # Password hashes and encrypted API keys: readable by the archive's owner only.
                info = tar.gettarinfo(str(dump), arcname=DATABASE)
                _anonymous(info)
                info.mode = 0o600
                with dump.open("rb") as fh:
                    tar.addfile(info, fh)
                files = _add_files(tar, data_dir, roots, work=Path(work), skip={out, tmp}, warnings=warnings)
                files.update(_add_field_key(tar))
                _add_bytes(
                    tar,
                    CHECKSUMS,
                    "".join(f"{f['sha256']}  {DATA}/{rel}\n" for rel, f in sorted(files.items())).encode(),
                )
                manifest = {
                    "format": FORMAT,
                    "version": FORMAT_VERSION,
                    "created_at": timezone.now().isoformat(),
                    "database": connection.vendor,
                    "data_dir": str(data_dir),
                    "bundled_gguf": _bundled_gguf(),
                    "migrations": migrations,
                    "counts": counts.as_dict(),
                    "roots": sorted(roots | ({"field_key"} if "field_key" in files else set())),
                    "files": files,
                    "warnings": warnings,
                }
                _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False).encode())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return BackupResult(
        path=out, bytes=out.stat().st_size, counts=counts, files=len(files), warnings=warnings
    )


def _archive_path(out: Path | str) -> Path:
    """`out` itself, or a dated name inside it when it names a folder (handy from cron)."""
    path = Path(out).expanduser()
    # Path() drops a trailing slash, which says "a folder" even before the folder exists.
    if path.is_dir() or str(out).endswith(os.sep):
        path = path / f"slmstudio-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.tar.gz"
    return path.resolve()


@contextlib.contextmanager
def _read_snapshot() -> Iterator[None]:
    """One consistent view of the whole database for the dump, without holding up writers."""
    if connection.in_atomic_block:  # called inside a transaction (tests): it is the snapshot
        yield
        return
    connection.ensure_connection()
    if connection.vendor == "sqlite":
        # The settings make every transaction BEGIN IMMEDIATE, which takes SQLite's write lock:
        # every worker's write would wait for the whole dump (and fail past busy_timeout). A
        # DEFERRED transaction only reads, and under WAL it sees one snapshot, from its first read
        # to its end, while writers carry on.
        saved = connection.transaction_mode
        connection.transaction_mode = "DEFERRED"
        try:
            with transaction.atomic():
                yield
        finally:
            connection.transaction_mode = saved
    elif connection.vendor == "postgresql":
        with transaction.atomic():
            with connection.cursor() as cursor:
                # READ COMMITTED would give each table's SELECT its own snapshot.
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield
    else:
        with transaction.atomic():
            yield


def _is_label(label: str) -> bool:
    """Whether `label` (app or app.model) exists here: dumpdata refuses unknown ones."""
    app_label, _, model = label.partition(".")
    try:
        config = apps.get_app_config(app_label)
        if model:
            config.get_model(model)
    except LookupError:
        return False
    return True


def _applied_migrations() -> dict[str, list[str]]:
    applied: dict[str, list[str]] = {}
    for app_label, name in MigrationRecorder(connection).applied_migrations():
        applied.setdefault(app_label, []).append(name)
    return {app_label: sorted(names) for app_label, names in sorted(applied.items())}


def _stored_paths() -> Iterator[tuple[str, str]]:
    """(stored path, which row holds it) for every file path the database records."""
    for label, columns in PATH_COLUMNS.items():
        model = apps.get_model(label)
        for pk, *values in model._base_manager.values_list("pk", *columns):
            for column, value in zip(columns, values, strict=True):
                if value:
                    yield value, f"{label} {pk} {column}"
    for label, column in OUTPUT_COLUMNS.items():
        model = apps.get_model(label)
        for pk, outputs in model._base_manager.values_list("pk", column):
            for name, value in (outputs or {}).items():
                if isinstance(value, str) and value:
                    yield value, f"{label} {pk} {column}[{name}]"


def _referenced_roots(data_dir: Path) -> tuple[set[str], list[tuple[str, str]]]:
    """The files and folders under DATA_DIR to archive (relative paths), and the referenced
    paths outside it (not archived: the bundled GGUF ships with the installation; a folder an
    administrator registered is theirs to keep)."""
    project_ids = apps.get_model("projects.Project")._base_manager.values_list("pk", flat=True)
    build_ids = apps.get_model("training.Build")._base_manager.values_list("pk", flat=True)
    # A project's documents live in its folder and a build's outputs (GGUFs, weights, indexes,
    # teacher caches, checkpoints) in its own, both named by id (Project.data_dir, StepContext).
    roots = {f"projects/{pk}" for pk in project_ids} | {f"builds/{pk}" for pk in build_ids}
    # SECRET_KEY's file when it has one (the field key is added from settings, see _add_field_key).
    if (data_dir / "secret_key").is_file():
        roots.add("secret_key")
    bundled = (_bundled_gguf() or {}).get("path")
    external: list[tuple[str, str]] = []
    for stored, owner in _stored_paths():
        rel = _relative_to(stored, data_dir)
        if rel is None:
            if stored != bundled:
                external.append((stored, owner))
        elif _reserved(rel, data_dir):
            external.append((stored, owner + ", in a folder backups leave out"))
        else:
            # E.g. a hub download or a cached F16 in MODEL_CACHE_DIR: not re-creatable offline,
            # or not at the same path (cache entries are named after file times).
            roots.add(rel)
    return _outermost(roots), external


def _relative_to(stored: str, data_dir: Path) -> str | None:
    path = Path(stored)
    if not path.is_absolute():
        path = data_dir / path
    try:
        rel = path.resolve().relative_to(data_dir)
    except ValueError:
        return None
    return rel.as_posix() if rel.parts else None


def _reserved(rel: str, data_dir: Path) -> bool:
    """Derived or transient things under DATA_DIR, never archived nor written by a restore: the
    database file (it travels as JSON), the embedded broker's queue (a restore re-sends what was
    queued), upload temp files, collected static files, and unfinished restores."""
    first = PurePosixPath(rel).parts[0]
    reserved = {"broker", "tmp", "static"}
    name = str(settings.DATABASES[DEFAULT_DB_ALIAS].get("NAME", ""))
    if connection.vendor == "sqlite" and name:
        db_rel = _relative_to(name, data_dir)
        if db_rel:
            reserved |= {db_rel, f"{db_rel}-wal", f"{db_rel}-shm", f"{db_rel}-journal"}
    return first in reserved or rel in reserved or first.startswith("test-db.") or _half_written(first)


def _half_written(name: str, *, in_step: bool = False) -> bool:
    """Names the app writes under before renaming into place (slmstudio.lib.files), and this
    module's own temp folders: a file that is not finished yet. In a build step's folder every
    dot-name is one (`.index.<hex>.building`, ...): the next attempt of the step deletes them
    (training.services._remove_half_written)."""
    return name.startswith(".") and (in_step or name.endswith(".tmp"))


def _step_folder(rel: Path) -> bool:
    """builds/<id>/<index>-<step>, a StepContext.workdir."""
    return len(rel.parts) == 3 and rel.parts[0] == "builds"


def _outermost(roots: set[str]) -> set[str]:
    kept: set[str] = set()
    for rel in sorted(roots, key=lambda r: len(PurePosixPath(r).parts)):
        if not any(rel == k or rel.startswith(k + "/") for k in kept):
            kept.add(rel)
    return kept


class _Hashing:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(size)
        self.digest.update(chunk)
        return chunk


def _add_files(
    tar: tarfile.TarFile,
    data_dir: Path,
    roots: set[str],
    *,
    work: Path,
    skip: set[Path],
    warnings: list[str],
) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}

    def add(path: Path) -> None:
        rel = path.relative_to(data_dir).as_posix()
        if path.is_symlink():
            # The app writes none; one is someone's own doing and might point anywhere.
            warnings.append(f"Left out a symbolic link: {rel}")
            return
        if path in skip:
            return
        try:
            if path.is_dir():
                info = tar.gettarinfo(str(path), arcname=f"{DATA}/{rel}")
                _anonymous(info)
                tar.addfile(info)
                return
            source = _sqlite_copy(path, work) if _is_sqlite(path) else path
            with source.open("rb") as fh:
                # From the open file: a file replaced meanwhile (renamed over) is read whole.
                info = tar.gettarinfo(arcname=f"{DATA}/{rel}", fileobj=fh)
                if source != path:
                    info.mtime, info.mode = int(path.stat().st_mtime), path.stat().st_mode & 0o7777
                _anonymous(info)
                hashing = _Hashing(fh)
                tar.addfile(info, hashing)
            if source != path:
                source.unlink()
        except FileNotFoundError:
            # Deleted since the dump (a project deleted meanwhile): its rows are in the dump.
            warnings.append(f"Gone while backing up: {rel}")
            return
        files[rel] = {"sha256": hashing.digest.hexdigest(), "size": info.size}

    for root in sorted(roots):
        top = data_dir / root
        if not top.exists() and not top.is_symlink():
            continue  # a project without documents has no folder
        add(top)
        if not top.is_dir() or top.is_symlink():
            continue
        for folder, dirnames, filenames in os.walk(top):
            in_step = _step_folder(Path(folder).relative_to(data_dir))
            dirnames[:] = sorted(d for d in dirnames if not _half_written(d, in_step=in_step))
            for name in dirnames:
                add(Path(folder) / name)
            for name in sorted(filenames):
                if not _half_written(name, in_step=in_step) and not _sqlite_sidecar(Path(folder) / name):
                    add(Path(folder) / name)
    return files


SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_SIDECARS = ("-journal", "-wal", "-shm")


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(len(SQLITE_HEADER)) == SQLITE_HEADER


def _sqlite_sidecar(path: Path) -> bool:
    """A journal or WAL file next to an SQLite database: what it holds goes into the copy of the
    database itself (_sqlite_copy), and a stale one restored beside it would corrupt it."""
    return any(
        path.name.endswith(suffix) and path.with_name(path.name[: -len(suffix)]).is_file()
        for suffix in SQLITE_SIDECARS
    )


def _sqlite_copy(path: Path, work: Path, *, tries: int = 5) -> Path:
    """A consistent copy of an SQLite file another process may be writing to. Not only our own
    database: Chroma records every process that opens an index in the index's chroma.sqlite3,
    so a finished version's index changes whenever a web process or worker first reads it.

    The bytes as they are, when no write overlapped the copy (the file unchanged from before to
    after, with no journal or WAL beside it); else SQLite's online backup, which is consistent
    but rewrites a few header bytes."""
    copy = work / f"sqlite-{os.getpid()}-{path.stat().st_ino}"

    def state() -> tuple[int, int, int, bool]:
        stat = path.stat()
        busy = any(Path(f"{path}{suffix}").exists() for suffix in ("-journal", "-wal"))
        return stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, busy

    for attempt in range(tries):
        before = state()
        if not before[3]:
            shutil.copyfile(path, copy)
            if state() == before:
                return copy
        time.sleep(0.1 * (attempt + 1))
    copy.unlink(missing_ok=True)  # a torn byte copy, which SQLite must not open as a database
    source, target = sqlite3.connect(path), sqlite3.connect(copy)
    try:
        with target:
            source.backup(target)
    finally:
        source.close()
        target.close()
    return copy


def _add_field_key(tar: tarfile.TarFile) -> dict[str, dict[str, Any]]:
    """The key the teachers' API keys were encrypted with, as the `field_key` file: the one in
    use, which may come from the environment (production) rather than from DATA_DIR."""
    key = (settings.FIELD_ENCRYPTION_KEY or "").encode()
    if not key:
        return {}
    _add_bytes(tar, f"{DATA}/field_key", key, mode=0o600)
    return {"field_key": {"sha256": hashlib.sha256(key).hexdigest(), "size": len(key)}}


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, *, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(timezone.now().timestamp())
    tar.addfile(info, BytesIO(data))


def _anonymous(info: tarfile.TarInfo) -> None:
    # Owners mean nothing on another machine; a restore writes files as its own user.
    info.uid = info.gid = 0
    info.uname = info.gname = ""


def _bundled_gguf() -> dict[str, str] | None:
    from training.ml.bundled import BundledModelMissing, bundled_llm_gguf

    try:
        gguf = bundled_llm_gguf()
    except BundledModelMissing:
        return None
    return {"path": str(gguf.path), "distribution": gguf.distribution, "version": gguf.version}


# --- Restore ---------------------------------------------------------------------------------


def backup_restore(*, archive: Path, replace: bool = False) -> RestoreResult:
    """Load an archive into this installation: its rows into the database, its files into
    DATA_DIR.

    The installation must be migrated, and empty unless `replace` (then its rows and its projects'
    and builds' files are replaced). The archive is an input file: every member is checked before
    anything is written (no links, no absolute paths or `..`, only the folders the manifest names),
    files are unpacked into a temporary folder inside DATA_DIR and checked against their sha256,
    and the database is loaded in one transaction before they are moved into place.
    """
    data_dir = Path(settings.DATA_DIR).resolve()
    archive = Path(archive).expanduser().resolve()
    _check_target(replace=replace)
    if not archive.is_file():
        raise BackupError(f"There is no file {archive}.")
    warnings: list[str] = []
    staging = Path(tempfile.mkdtemp(dir=data_dir, prefix=".restore.", suffix=".tmp"))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                manifest = _unpack(tar, staging, data_dir)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise BackupError(f"{archive} is not a backup archive, or it is damaged ({exc}).") from None
        _check_migrations(manifest)
        dump = _rewrite_paths(staging / DATABASE, manifest, data_dir, warnings)
        try:
            with transaction.atomic():
                # Empties every table (also the rows an empty installation already has, such as
                # the bundled base model's), then `migrate`'s own rows come back: content types
                # and permissions, which the dump names by natural key.
                call_command("flush", interactive=False, verbosity=0)
                ContentType.objects.clear_cache()
                call_command("loaddata", str(dump), verbosity=0)
                _resend_queued_builds()
        except (DeserializationError, DatabaseError) as exc:
            # Rolled back with the flush (PostgreSQL checks foreign keys at the commit): the
            # installation is as it was.
            ContentType.objects.clear_cache()
            raise BackupError(
                f"The archive's rows do not fit this installation's database ({exc}). Restore it "
                "with the SLM Studio version that made it, then upgrade."
            ) from None
        counts = Counts.now()
        _move_into_place(staging / DATA, data_dir, manifest["roots"], replace=replace)
        warnings += _key_warnings(data_dir)
        warnings += _missing_files(data_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RestoreResult(path=archive, counts=counts, files=len(manifest["files"]), warnings=warnings)


def _check_target(*, replace: bool) -> None:
    executor = MigrationExecutor(connection)
    if executor.migration_plan(executor.loader.graph.leaf_nodes()):
        raise BackupError("This installation's database is not migrated: run `manage.py migrate` first.")
    if replace:
        return
    from projects.models import Project

    if Project._base_manager.exists() or get_user_model()._base_manager.exists():
        raise BackupError(
            "This installation already has users or projects; a restore goes into an empty one. "
            "To replace everything in it with the archive, run again with --replace --yes."
        )


def _unpack(tar: tarfile.TarFile, staging: Path, data_dir: Path) -> dict[str, Any]:
    """Check every member, then write the database dump and the data files into `staging`.
    Returns the manifest."""
    members = tar.getmembers()
    by_name: dict[str, tarfile.TarInfo] = {}
    for member in members:
        if member.name in by_name:
            raise BackupError(f"The archive holds {member.name!r} twice.")
        by_name[member.name] = member
    for name in (MANIFEST, DATABASE):
        if name not in by_name or not by_name[name].isfile():
            raise BackupError(f"This is not an SLM Studio backup: it has no {name}.")
    manifest = _read_manifest(tar, by_name[MANIFEST])
    roots = manifest["roots"]
    expected: dict[str, dict[str, Any]] = manifest["files"]
    for member in members:
        _check_member(member, roots, expected)
    present = {m.name[len(DATA) + 1 :] for m in members if m.isfile() and m.name.startswith(f"{DATA}/")}
    missing = sorted(set(expected) - present)
    if missing:
        raise BackupError(f"The archive is incomplete: {len(missing)} files are missing, e.g. {missing[0]}.")
    needed = sum(m.size for m in members) + (64 << 20)
    free = shutil.disk_usage(data_dir).free
    if needed > free:
        raise BackupError(
            f"Not enough free space under {data_dir}: the archive unpacks to {needed >> 20} MB, "
            f"{free >> 20} MB are free."
        )
    root = (staging / DATA).resolve()
    for member in members:
        if member.name in (MANIFEST, CHECKSUMS):
            continue
        if member.name == DATABASE:
            target = staging / DATABASE
        else:
            target = staging / member.name
            # Belt and braces after _check_member: the resolved path stays inside the staging
            # folder whatever the name (a folder of that name cannot be a link: links are refused).
            if not target.resolve().is_relative_to(root):
                raise BackupError(f"The archive member {member.name!r} points outside DATA_DIR.")
        digest = hashlib.sha256()
        try:
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            source = tar.extractfile(member)
            assert source is not None  # a regular file (checked)
            target.parent.mkdir(parents=True, exist_ok=True)
            with source, open(target, "xb") as out:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            target.chmod(member.mode & 0o777)
            os.utime(target, (member.mtime, member.mtime))  # cache entries are named after file times
        except OSError as exc:
            raise BackupError(f"Cannot unpack {member.name!r}: {exc}") from None
        if member.name != DATABASE:
            rel = member.name[len(DATA) + 1 :]
            if digest.hexdigest() != expected[rel]["sha256"]:
                raise BackupError(f"The archive is damaged: {rel} does not match its checksum.")
    for member in members:  # folders' times last: writing their files changed them
        if member.isdir() and member.name.startswith(f"{DATA}/"):
            os.utime(staging / member.name, (member.mtime, member.mtime))
    return manifest


def _read_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo) -> dict[str, Any]:
    stream = tar.extractfile(member)
    try:
        manifest = json.loads(stream.read() if stream else b"")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BackupError("The archive's manifest.json is not valid JSON.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError("This is not an SLM Studio backup (its manifest names another format).")
    if manifest.get("version") != FORMAT_VERSION:
        raise BackupError(
            f"This archive is in backup format {manifest.get('version')}; this SLM Studio reads "
            f"format {FORMAT_VERSION}."
        )
    roots, files = manifest.get("roots"), manifest.get("files")
    if not isinstance(roots, list) or not isinstance(files, dict):
        raise BackupError("The archive's manifest lists no folders or files.")
    for rel in roots:
        if not isinstance(rel, str) or not _clean_relative(rel) or _reserved(rel, Path(settings.DATA_DIR)):
            raise BackupError(f"The archive would write {rel!r}, which a restore never writes.")
    return manifest


def _clean_relative(name: str) -> bool:
    """A plain relative path: no absolute path, no `..` or `.`, no empty part, no backslash."""
    return (
        bool(name)
        and not name.startswith("/")
        and "\\" not in name
        and "\0" not in name
        and posixpath.normpath(name) == name
        and all(part not in ("", ".", "..") for part in name.split("/"))
    )


def _check_member(member: tarfile.TarInfo, roots: list[str], expected: dict[str, dict[str, Any]]) -> None:
    name = member.name
    if not _clean_relative(name):
        raise BackupError(f"Refused: the archive member {name!r} is an absolute path or climbs out (..).")
    if not (member.isfile() or member.isdir()):
        kind = "a link" if member.issym() or member.islnk() else "not a file or folder"
        raise BackupError(f"Refused: the archive member {name!r} is {kind}.")
    if name in (MANIFEST, DATABASE, CHECKSUMS):
        if not member.isfile():
            raise BackupError(f"Refused: the archive member {name!r} is not a file.")
        return
    rel = name[len(DATA) + 1 :] if name.startswith(f"{DATA}/") else None
    if rel is None or not any(rel == r or rel.startswith(r + "/") for r in roots):
        raise BackupError(f"Refused: the archive member {name!r} is outside the folders a backup restores.")
    if member.isfile() and (rel not in expected or expected[rel].get("size") != member.size):
        raise BackupError(f"Refused: the archive member {name!r} is not the file its manifest lists.")


def _check_migrations(manifest: dict[str, Any]) -> None:
    """Rows load into the schema they were dumped from or a newer one (new columns have
    defaults), not into an older one."""
    here = {(app_label, name) for app_label, names in _applied_migrations().items() for name in names}
    unknown = sorted(
        f"{app_label}.{name}"
        for app_label, names in (manifest.get("migrations") or {}).items()
        for name in names
        if (app_label, name) not in here
    )
    if unknown:
        raise BackupError(
            "The archive comes from a newer SLM Studio (migrations not applied here: "
            f"{', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}). Restore it with that version."
        )


def _rewrite_paths(dump: Path, manifest: dict[str, Any], data_dir: Path, warnings: list[str]) -> Path:
    """Point paths recorded as absolute at this machine: the bundled GGUF lives wherever this
    installation's site-packages are, and a path that was inside the old DATA_DIR moves with it.
    Relative paths (everything the app writes under DATA_DIR) need nothing."""
    remap = _path_map(manifest, data_dir, warnings)
    if remap is None:
        return dump
    rows = json.loads(dump.read_text(encoding="utf-8"))
    changed = False
    for row in rows:
        fields = row.get("fields", {})
        for column in PATH_COLUMNS.get(row.get("model", ""), ()):
            if isinstance(fields.get(column), str) and (new := remap(fields[column])) != fields[column]:
                fields[column], changed = new, True
        column = OUTPUT_COLUMNS.get(row.get("model", ""))
        if column and isinstance(fields.get(column), dict):
            for name, value in fields[column].items():
                if isinstance(value, str) and (new := remap(value)) != value:
                    fields[column][name], changed = new, True
    if not changed:
        return dump
    rewritten = dump.with_name("db-rewritten.json")
    rewritten.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return rewritten


def _path_map(manifest: dict[str, Any], data_dir: Path, warnings: list[str]) -> Callable[[str], str] | None:
    old_bundled = manifest.get("bundled_gguf") or {}
    new_bundled = _bundled_gguf() or {}
    bundled_moved = bool(
        old_bundled.get("path") and new_bundled and old_bundled["path"] != new_bundled["path"]
    )
    if bundled_moved and old_bundled.get("version") != new_bundled.get("version"):
        warnings.append(
            f"The archive was made with {old_bundled.get('distribution')} {old_bundled.get('version')}, "
            f"this installation has {new_bundled['version']}: versions built on the bundled model now "
            "use the installed file."
        )
    old_dir = PurePosixPath(manifest.get("data_dir") or str(data_dir))
    if not bundled_moved and old_dir == PurePosixPath(data_dir):
        return None

    def remap(stored: str) -> str:
        if bundled_moved and stored == old_bundled["path"]:
            return new_bundled["path"]
        path = PurePosixPath(stored)
        if path.is_absolute() and path.is_relative_to(old_dir):
            return str(data_dir / path.relative_to(old_dir))
        return stored

    return remap


def _resend_queued_builds() -> None:
    """A build queued at backup time had its task message in the old broker, which is not part
    of a backup. The flag a stopping worker sets makes the next sweep of a running worker send
    the message again (training.services.builds_dispatch_requeued). Running builds need nothing:
    their heartbeat is old, so the same sweep re-queues them to resume from their last finished
    step (builds_recover_stale); pending documents and queued generation runs are re-sent by it
    too."""
    from training.models import Build

    Build._base_manager.filter(status=Build.Status.QUEUED, requeue_requested_at__isnull=True).update(
        requeue_requested_at=timezone.now()
    )


def _move_into_place(staged: Path, data_dir: Path, roots: list[str], *, replace: bool) -> None:
    if replace:
        # The replaced installation's documents and builds belong to rows that are gone now.
        for top in ("projects", "builds"):
            shutil.rmtree(data_dir / top, ignore_errors=True)
    for rel in roots:
        source = staged / rel
        if not source.exists():
            continue
        target = data_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(source, target)


def _key_warnings(data_dir: Path) -> list[str]:
    from_env = os.environ.get("FIELD_ENCRYPTION_KEY")
    key_file = data_dir / "field_key"
    if not from_env or not key_file.is_file() or key_file.read_text().strip() == from_env:
        return []
    return [
        "FIELD_ENCRYPTION_KEY in the environment is not the key in the archive: teachers' API keys "
        f"cannot be read until it is set to the contents of {key_file}."
    ]


def _missing_files(data_dir: Path) -> list[str]:
    """Referenced files this machine lacks: ones the archive could not hold (outside DATA_DIR)."""
    missing = []
    for stored, owner in _stored_paths():
        path = Path(stored) if Path(stored).is_absolute() else data_dir / stored
        if not path.exists():
            missing.append(f"Missing on this machine: {stored} ({owner})")
    return missing
