from __future__ import annotations

import os

# libgomp reads its spin policy once, when the first library that uses it loads. In the web and
# worker processes that is torch's copy (transformers is imported while the apps load), and
# llama.cpp then shares it: set the short spin here, before anything else is imported, or
# training/ml's own setting comes too late. With the default long spin, prompts were read 5-10
# times slower in a web process while other processes used the cores (100 tokens: 10 s, not 1 s).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# Load the Celery app with Django so `shared_task` binds to it and `delay_on_commit` works.
from .celery import app as celery_app  # noqa: E402

__all__ = ["celery_app"]
