"""The start-up check refuses unsafe configurations, in every process, with reasons to act on."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from slmstudio.startup import Config, problems
from tests.services import bare_env

ROOT = Path(__file__).resolve().parent.parent


def _safe(tmp_path: Path) -> Config:
    return Config(
        production=True, debug=False, secret_key_from_env=True, field_key_from_env=True,
        allowed_hosts=["studio.example.com"], allowed_hosts_from_env=True,
        database_engine="django.db.backends.postgresql", broker_url="redis://redis:6379/0",
        data_dir=tmp_path, data_dir_from_env=True, login_limits=True, embedded_services_allowed=False,
    )  # fmt: skip


def test_a_complete_production_configuration_starts(tmp_path):
    assert problems(_safe(tmp_path)) == []


def test_each_unsafe_production_setting_is_named(tmp_path):
    safe = _safe(tmp_path)
    cases = {
        "needs SECRET_KEY": replace(safe, secret_key_from_env=False),
        "needs FIELD_ENCRYPTION_KEY": replace(safe, field_key_from_env=False),
        "set it to the contents of": replace(safe, field_key_from_env=False, field_key_file=True),
        "not a Fernet key": replace(safe, field_key_valid=False),
        "too short": replace(safe, secret_key_length=12),
        "DEBUG on": replace(safe, debug=True),
        "needs ALLOWED_HOSTS": replace(safe, allowed_hosts_from_env=False),
        "ALLOWED_HOSTS=*": replace(safe, allowed_hosts=["*"]),
        "LOGIN_LIMITS off": replace(safe, login_limits=False),
        "needs DATA_DIR set": replace(safe, data_dir_from_env=False),
        "the SQLite database": replace(safe, database_engine="django.db.backends.sqlite3"),
        "the on-disk queue": replace(safe, broker_url="filesystem://localhost//"),
    }
    for expected, config in cases.items():
        found = problems(config)
        assert len(found) == 1 and expected in found[0], (expected, found)
    # A single machine may run production on the embedded services when it says so.
    single = replace(
        safe, database_engine="django.db.backends.sqlite3", broker_url="filesystem://x//",
        embedded_services_allowed=True,
    )  # fmt: skip
    assert problems(single) == []


def test_local_mode_needs_only_a_writable_data_dir(tmp_path):
    local = replace(
        _safe(tmp_path), production=False, secret_key_from_env=False, field_key_from_env=False,
        allowed_hosts_from_env=False, data_dir_from_env=False, database_engine="django.db.backends.sqlite3",
        broker_url="filesystem://localhost//", debug=True,
    )  # fmt: skip
    assert problems(local) == []
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root may write anywhere
        assert "not a writable folder" in problems(replace(local, data_dir=locked))[0]
    assert "not a writable folder" in problems(replace(local, data_dir=tmp_path / "missing" / "x.txt"))[0]


def test_fernet_keys_are_checked():
    from slmstudio.startup import fernet_key_valid

    assert fernet_key_valid("7a9ZqkY2m3Sl0d5C6Yj1pQ8mXw4Rt7Uv9Hb2Nc5Ke0E=")
    assert not fernet_key_valid("changeme") and not fernet_key_valid("")


def test_every_process_refuses_to_start_and_says_why(tmp_path):
    env = bare_env(
        DATA_DIR=str(tmp_path / "data"), SLM_PRODUCTION="1", ALLOWED_HOSTS="*", SECRET_KEY="x" * 60
    )
    for command in (
        [sys.executable, "manage.py", "check"],
        [sys.executable, "-m", "celery", "-A", "slmstudio", "inspect", "ping"],
    ):
        out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0
        for reason in (
            "needs FIELD_ENCRYPTION_KEY",
            "ALLOWED_HOSTS=*",
            "the SQLite database",
            "the on-disk queue",
        ):
            assert reason in out.stderr, (command, out.stderr[-2000:])
    # Nothing was generated into the data folder for the refused production start.
    assert not (tmp_path / "data" / "secret_key").exists() and not (tmp_path / "data" / "field_key").exists()
