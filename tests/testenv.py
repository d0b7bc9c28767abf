"""Loaded with `-p tests.testenv` before pytest-django imports the settings.

Tests never touch the developer's ./var: the whole run gets its own DATA_DIR, removed at exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

if "SLMSTUDIO_TEST_DATA_DIR" not in os.environ:
    _data_dir = tempfile.mkdtemp(prefix="slmstudio-test-")
    atexit.register(shutil.rmtree, _data_dir, ignore_errors=True)
    os.environ["SLMSTUDIO_TEST_DATA_DIR"] = _data_dir
os.environ["DATA_DIR"] = os.environ["SLMSTUDIO_TEST_DATA_DIR"]
# Tests run builds inside a rolled-back transaction; a heartbeat thread on its own connection
# would fight it for SQLite's lock. Worker round-trip tests run real workers with the thread on.
os.environ["BUILD_HEARTBEAT_THREAD"] = "0"
os.environ["CELERY_TASK_ALWAYS_EAGER"] = "1"
os.environ.pop("DATABASE_URL", None)
os.environ.pop("CELERY_BROKER_URL", None)
# Playwright's sync API runs an event loop in the test thread; Django's ORM refuses to run
# beside one unless told it is safe (it is: nothing else runs in that thread).
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
