"""What the machine this process runs on has: cores, memory, GPU, free disk. Django-free."""

from __future__ import annotations

import os
import shutil
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


def _gpu() -> tuple[str | None, int | None]:
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.name, int(props.total_memory)
    except Exception:  # a CPU-only torch, or none: no GPU either way
        pass
    return None, None


def machine(disk: Path | None = None) -> dict[str, Any]:
    """{"cores", "memory_bytes", "gpu", "gpu_memory_bytes", "disk_free_bytes"}."""
    gpu, gpu_memory = _gpu()
    free = None
    if disk is not None:
        try:
            free = shutil.disk_usage(disk).free
        except OSError:
            free = None
    return {
        "cores": _cores(),
        "memory_bytes": _memory_bytes(),
        "gpu": gpu,
        "gpu_memory_bytes": gpu_memory,
        "disk_free_bytes": free,
    }
