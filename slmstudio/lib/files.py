"""Framework-free file helpers: atomic writes, hashing, safe display names."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A reader (or a process killed mid-write) sees either the old file or the new one, never half.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_copy_stream(src: BinaryIO, path: Path) -> tuple[str, int]:
    """Copy a stream to `path` atomically; return (sha256 hex, size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temp folder next to `final`; on success rename it to `final` (replacing it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_stream(src: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := src.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


# Bidirectional overrides and isolates can make "exe.pdf" display as "fdp.exe"; zero-width
# characters hide text. They carry no meaning in a file name, so they are dropped.
_INVISIBLE = {
    "\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d",
    "\u202e", "\u2066", "\u2067", "\u2068", "\u2069", "\ufeff",
}  # fmt: skip


def display_name(raw: str, *, max_length: int = 200) -> str:
    """A user's file name made safe to show and log: no folders, control or invisible characters.

    The result is only ever displayed; files are stored under generated names.
    """
    name = unicodedata.normalize("NFC", raw or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch not in _INVISIBLE and unicodedata.category(ch)[0] != "C").strip(
        " ."
    )
    if len(name) > max_length:
        stem, dot, ext = name.rpartition(".")
        if dot and len(ext) <= 10:
            name = stem[: max_length - len(ext) - 2] + "…." + ext
        else:
            name = name[: max_length - 1] + "…"
    return name or "unnamed"


def extension(name: str) -> str:
    """Lower-case extension with the dot ('.pdf'), or '' — taken from a display_name()."""
    _, dot, ext = name.rpartition(".")
    return f".{ext.lower()}" if dot and ext and len(ext) <= 10 else ""
