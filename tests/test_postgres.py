"""DATABASE_URL switches the app to PostgreSQL: migrations and the data commands run on a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.projects import fixtures_docs as fx
from tests.services import postgres_server

pytestmark = pytest.mark.services
ROOT = Path(__file__).resolve().parent.parent


def test_the_app_runs_on_postgresql(tmp_path):
    with postgres_server() as url:
        env = {
            k: v for k, v in os.environ.items() if k not in ("SLMSTUDIO_TEST_DATA_DIR", "CELERY_BROKER_URL")
        } | {
            "DATABASE_URL": url,
            "DATA_DIR": str(tmp_path / "install"),
            # The build runs inside the command, so no worker is needed for this check.
            "CELERY_TASK_ALWAYS_EAGER": "1",
        }

        def manage(*args: str) -> dict:
            out = subprocess.run(
                [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True
            )
            assert out.returncode == 0, out.stdout + out.stderr
            return (
                json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip().startswith("{") else {}
            )

        manage("migrate", "--noinput", "-v0")
        assert manage("ensureadmin")["created"]
        slug = manage("createproject", "Pumps on Postgres", "--owner", "admin")["project"]
        docs = tmp_path / "docs"
        docs.mkdir()
        fx.make_pdf(docs)
        fx.make_markdown(docs)
        assert manage("ingest", slug, str(docs)) == {"added": 2, "duplicates": 0, "failed": []}
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text(
            "\n".join(json.dumps({"instruction": f"Q{i}?", "response": f"A{i}."}) for i in range(20))
        )
        report = manage("importpairs", slug, str(pairs))
        assert report["added"] == 20 and report["train"] + report["eval"] == 20
        build = manage("build", slug, "--recipe", "check", "--wait", "--timeout", "60")
        assert build["status"] == "succeeded", build
        assert build["metrics"]["parse"]["parsed"] == 2
        assert manage("makemigrations", "--check", "--dry-run") == {}
