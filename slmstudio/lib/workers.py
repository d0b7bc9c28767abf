"""Which process holds a job: "host:pid" ids, and whether such a process is gone."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_is_dead(claimed_by: str) -> bool:
    """True when `claimed_by` names a process on this host that no longer runs.

    Another host's process cannot be checked from here: False, and its heartbeat decides.
    """
    host, _, pid = claimed_by.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # A killed process its parent has not reaped yet is a zombie, and kill(pid, 0) still succeeds.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True  # reaped between the two checks
    except OSError:
        return False  # no /proc: keep the answer kill() gave
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")
