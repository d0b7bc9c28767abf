"""What the machine this process runs on has: cores, memory, GPU, free disk. Django-free."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cores() -> int:
    # The cores this process may use (a container's or taskset's limit), not the host's.
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@functools.cache
def _gpu() -> tuple[str | None, int | None]:
    """The first GPU's name and memory, without initialising CUDA in this process: a worker's
    main process reads its hardware, and a pool process it forks after CUDA was initialised
    could not use CUDA any more. nvidia-smi where the driver ships it, else a child process."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout  # fmt: skip
            name, _, mib = out.splitlines()[0].rpartition(",")
            return name.strip(), int(float(mib)) * 2**20
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    try:
        import torch

        if not torch.backends.cuda.is_built():  # the CPU build: no GPU whatever the machine has
            return None, None
    except Exception:
        return None, None
    probe = (
        "import torch\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0); print(p.total_memory, p.name)\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
        ).stdout
        memory, _, name = out.strip().partition(" ")
        return (name, int(memory)) if name else (None, None)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None, None


def disk_free(path: Path) -> int | None:
    """Free bytes on the disk holding `path`; None when it cannot be read."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def machine(disk: Path | None = None) -> dict[str, Any]:
    """{"cores", "memory_bytes", "gpu", "gpu_memory_bytes", "disk_free_bytes"}."""
    gpu, gpu_memory = _gpu()
    return {
        "cores": _cores(),
        "memory_bytes": _memory_bytes(),
        "gpu": gpu,
        "gpu_memory_bytes": gpu_memory,
        "disk_free_bytes": disk_free(disk) if disk is not None else None,
    }
