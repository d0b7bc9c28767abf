"""The container files, checked without Docker: compose.yaml against the Compose Specification's
schema and against the project (Procfile, management commands, .env.example), the Dockerfiles
with hadolint and with checks of their own, the web container's health check script.

Each check also runs on a broken copy, so a check that could never fail would show.
"""

from __future__ import annotations

import http.server
import importlib.util
import re
import secrets
import shlex
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.conf import settings
from django.core.management import get_commands
from django.urls import Resolver404, resolve

from tests.deploy.checks import (
    REPO,
    REQUIRED_VARS,
    SERVICES,
    InterpolationError,
    compose_problems,
    dockerfile_problems,
    dockerignored,
    hadolint,
    interpolate,
    load_compose,
    parse_env_example,
    schema_errors,
    split_command,
    with_defaults,
)
from tests.services import check_deploy

ENV_EXAMPLE = (REPO / ".env.example").read_text()
PROCFILE = (REPO / "Procfile").read_text()
DOCKERIGNORE = (REPO / ".dockerignore").read_text()
# What .env looks like once an admin has filled in the required values.
FILLED_ENV = {
    **parse_env_example(ENV_EXAMPLE).values,
    "POSTGRES_PASSWORD": "0123456789abcdef",
    "SECRET_KEY": secrets.token_hex(32),
    "FIELD_ENCRYPTION_KEY": Fernet.generate_key().decode(),
    "ALLOWED_HOSTS": "slm.example.com",
    "CSRF_TRUSTED_ORIGINS": "https://slm.example.com",
}


def _local_apps() -> list[str]:
    """INSTALLED_APPS that live in this repository (slmstudio, projects, training, ...)."""
    return [app for app in settings.INSTALLED_APPS if "." not in app and (REPO / app / "apps.py").is_file()]


def _compose_problems(
    compose: dict[str, Any], env_example: str = ENV_EXAMPLE, procfile: str = PROCFILE
) -> list[str]:
    return compose_problems(compose, env_example, procfile, set(get_commands()))


def _dockerfile_problems(text: str, *, gpu: bool, dockerignore: str = DOCKERIGNORE) -> list[str]:
    service = load_compose()["services"]["worker-gpu" if gpu else "web"]
    expected = shlex.split(with_defaults(service["command"]))
    return dockerfile_problems(text, dockerignore, gpu=gpu, expected_cmd=expected, local_apps=_local_apps())


# --- compose.yaml --------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    compose = load_compose()
    assert set(compose["services"]) == SERVICES
    # Compose validates the file after interpolating the variables from .env.
    assert schema_errors(interpolate(compose, FILLED_ENV)) == []


def test_the_schema_check_catches_a_misspelt_key_and_a_wrong_type() -> None:
    compose = interpolate(load_compose(), FILLED_ENV)
    compose["services"]["worker-cpu"]["stop_grace"] = "5m"
    compose["services"]["redis"]["restart"] = 5
    errors = schema_errors(compose)
    assert any("'stop_grace' was unexpected" in e for e in errors), errors
    assert any(e.startswith("services/redis/restart") for e in errors), errors


def test_compose_refuses_to_start_until_each_secret_is_set() -> None:
    """Copied as it is, .env.example leaves the required values empty: compose stops on them."""
    for name in REQUIRED_VARS:
        env = {**FILLED_ENV, name: ""}
        with pytest.raises(InterpolationError, match=name):
            interpolate(load_compose(), env)
    interpolate(load_compose(), FILLED_ENV)


def test_compose_file_agrees_with_the_project() -> None:
    assert _compose_problems(load_compose()) == []


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(compose: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = compose
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[int(last) if isinstance(node, list) else last]
        else:
            node[int(last) if isinstance(node, list) else last] = value

    return change


_DELETE = object()


def _replace_in_command(service: str, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def change(compose: dict[str, Any]) -> None:
        command = compose["services"][service]["command"]
        if isinstance(command, list):
            compose["services"][service]["command"] = [c.replace(old, new) for c in command]
        else:
            assert old in command
            compose["services"][service]["command"] = command.replace(old, new)

    return change


BROKEN_COMPOSE = {
    "no DATA_DIR": (_set("services/worker-cpu/environment/DATA_DIR", _DELETE), "worker-cpu: DATA_DIR"),
    "no data volume": (_set("services/web/volumes", []), "web: the data volume is not mounted"),
    "unknown dependency": (
        _set("services/web/depends_on/cache", {"condition": "service_started"}),
        "web depends on cache, which is no service",
    ),
    "not after migrate": (
        _set("services/worker-cpu/depends_on/migrate/condition", "service_started"),
        "worker-cpu: does not wait for migrate",
    ),
    "queue mismatch": (
        _set("services/worker-gpu/environment/WORKER_QUEUES", "cpu"),
        "worker-gpu: WORKER_QUEUES 'cpu' differs",
    ),
    "wrong queue": (_replace_in_command("worker-cpu", "-Q cpu", "-Q gpu"), "worker-cpu: consumes 'gpu'"),
    "node name": (_replace_in_command("worker-cpu", "cpu@%h", "worker@%h"), "worker-cpu: node name"),
    "health path": (
        _set("services/web/healthcheck/test/3", "http://127.0.0.1:8000/health"),
        "healthcheck does not ask",
    ),
    "no such manage.py command": (
        _replace_in_command("migrate", "preparemodels", "preparemodel"),
        "no command 'preparemodel'",
    ),
    "no such WSGI module": (
        _replace_in_command("web", "slmstudio.wsgi", "slmstudio.wsgix"),
        "slmstudio.wsgix is no WSGI module",
    ),
    "gunicorn drifts from the Procfile": (
        _replace_in_command("web", "--timeout 120", "--timeout 30"),
        "web: --timeout is '30'",
    ),
    "celery drifts from the Procfile": (
        _replace_in_command("worker-gpu", " --without-gossip", ""),
        "worker-gpu: --without-gossip is '<absent>'",
    ),
    "undocumented variable": (
        _replace_in_command("web", "--timeout 120", "--timeout ${WEB_TIMEOUT:-120}"),
        "${WEB_TIMEOUT} is not documented",
    ),
    "a beat": (_set("services/beat", {"image": "x"}), "a beat service"),
    "gpu worker always on": (
        _set("services/worker-gpu/profiles", _DELETE),
        "worker-gpu: not in the profile 'gpu'",
    ),
    "no GPU": (_set("services/worker-gpu/deploy", _DELETE), "no NVIDIA GPU reserved"),
    "cpu worker in a profile": (_set("services/worker-cpu/profiles", ["cpu"]), "worker-cpu: in a profile"),
    "short stop grace": (
        _set("services/worker-cpu/stop_grace_period", "10s"),
        "stop_grace_period 10s is too short",
    ),
    "worker ping": (
        _set("services/worker-cpu/healthcheck/test/1", "celery -A slmstudio inspect ping"),
        "does not ping its own node",
    ),
    "secret with a default": (
        _set("services/web/environment/SECRET_KEY", "${SECRET_KEY:-dev}"),
        "web: SECRET_KEY is not taken from .env",
    ),
    "not production": (_set("services/web/environment/SLM_PRODUCTION", "0"), "web: SLM_PRODUCTION is not 1"),
    "database elsewhere": (
        _set(
            "services/web/environment/DATABASE_URL",
            "postgres://slmstudio:${POSTGRES_PASSWORD:?x}@db:5432/slmstudio",
        ),
        "web: DATABASE_URL does not point at the postgres service",
    ),
    "environments drift": (
        _set("services/worker-cpu/environment/LOG_LEVEL", "DEBUG"),
        "worker-cpu: environment differs from web's in ['LOG_LEVEL']",
    ),
    "no pg_isready": (_set("services/postgres/healthcheck", _DELETE), "postgres: no pg_isready"),
    "redis without AOF": (_set("services/redis/command", ["redis-server"]), "redis: append-only file off"),
}


@pytest.mark.parametrize("case", BROKEN_COMPOSE, ids=list(BROKEN_COMPOSE))
def test_compose_checks_catch(case: str) -> None:
    change, expected = BROKEN_COMPOSE[case]
    compose = load_compose()
    change(compose)
    problems = _compose_problems(compose)
    assert any(expected in p for p in problems), problems


def test_the_containers_environment_passes_djangos_deployment_check(tmp_path: Path) -> None:
    """The app containers' environment, as compose fills it from .env, is a production
    configuration the app starts with (its start-up check and `check --deploy`); /data is a
    temporary folder here."""
    web_env = interpolate(load_compose(), FILLED_ENV)["services"]["web"]["environment"]
    result = check_deploy(tmp_path, **web_env)
    assert result.returncode == 0, result.stdout + result.stderr
    # The same check refuses a configuration that is not safe.
    result = check_deploy(tmp_path, **{**web_env, "ALLOWED_HOSTS": "*"})
    assert result.returncode != 0 and "ALLOWED_HOSTS" in result.stderr


def test_env_example_checks_catch_drift() -> None:
    compose = load_compose()
    stale = ENV_EXAMPLE + "\n# No longer used.\n# OLD_SETTING=1\n"
    assert ".env.example documents OLD_SETTING, which compose.yaml does not use" in _compose_problems(
        compose, stale
    )
    unexplained = ENV_EXAMPLE.replace("# Largest upload, per file, in megabytes.\n", "")
    assert ".env.example has no explanation above MAX_UPLOAD_MB" in _compose_problems(compose, unexplained)
    other_default = ENV_EXAMPLE.replace("# WEB_THREADS=32", "# WEB_THREADS=8")
    assert any("default of WEB_THREADS" in p for p in _compose_problems(compose, other_default))
    with_secret = ENV_EXAMPLE.replace("\nSECRET_KEY=\n", "\nSECRET_KEY=change-me\n")
    assert any("gives required SECRET_KEY a value" in p for p in _compose_problems(compose, with_secret))


def test_compose_follows_the_procfile_when_it_changes() -> None:
    procfile = PROCFILE.replace("--timeout 120", "--timeout 300")
    assert "web: --timeout is '120', the Procfile's '300'" in _compose_problems(
        load_compose(), procfile=procfile
    )


# --- Dockerfiles ---------------------------------------------------------------------------

DOCKERFILE = (REPO / "docker/Dockerfile").read_text()
DOCKERFILE_GPU = (REPO / "docker/Dockerfile.gpu").read_text()


def test_dockerfiles_pass_hadolint() -> None:
    assert hadolint([REPO / "docker/Dockerfile", REPO / "docker/Dockerfile.gpu"]) == []


def test_hadolint_catches_the_common_mistakes(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text(
        "FROM python:latest\n"
        "RUN apt-get update && apt-get install -y gcc\n"
        "ADD . /app\n"
        "RUN pip install -r requirements.txt\n"
        "RUN sudo chown -R 1000 /app\n"
        "USER root\n"
        "CMD gunicorn slmstudio.wsgi\n"
    )
    codes = {finding["code"] for finding in hadolint([broken])}
    # latest tag, recommends, apt lists kept, ADD, pip cache, sudo, root user, shell-form CMD
    assert {"DL3007", "DL3015", "DL3009", "DL3020", "DL3042", "DL3004", "DL3002", "DL3025"} <= codes, codes


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_dockerfiles_agree_with_the_project(gpu: bool) -> None:
    assert _dockerfile_problems(DOCKERFILE_GPU if gpu else DOCKERFILE, gpu=gpu) == []


BROKEN_DOCKERFILE = {
    "no user": (lambda t: t.replace("USER 1000:1000\n", ""), "no USER in the runtime stage"),
    "root user": (lambda t: t.replace("USER 1000:1000", "USER root"), "last USER is root"),
    "no healthcheck": (lambda t: t.replace("HEALTHCHECK", "# HEALTHCHECK"), "no HEALTHCHECK"),
    "unbuffered": (lambda t: t.replace("    PYTHONUNBUFFERED=1 \\\n", ""), "does not set PYTHONUNBUFFERED=1"),
    "compiler at runtime": (
        lambda t: t.replace(
            "install -y --no-install-recommends libgomp1", "install -y --no-install-recommends libgomp1 gcc"
        ),
        "the runtime stage installs a compiler",
    ),
    "one stage": (lambda t: t.replace("FROM python:3.11-slim-bookworm\n", ""), "a single stage"),
    "missing source": (
        lambda t: t.replace("requirements/ml.txt requirements/", "requirements/gpu.txt requirements/"),
        "no such file",
    ),
    "ignored source": (
        lambda t: t.replace("COPY . /app", "COPY tests /app/tests"),
        "COPY tests: excluded by .dockerignore",
    ),
    "cmd drifts": (
        lambda t: t.replace('"--timeout", "120"', '"--timeout", "30"'),
        "differs from compose.yaml's default command",
    ),
    "cuda torch": (lambda t: t.replace("whl/cpu", "whl/cu126"), "not installed from PyTorch's CPU index"),
}


@pytest.mark.parametrize("case", BROKEN_DOCKERFILE, ids=list(BROKEN_DOCKERFILE))
def test_dockerfile_checks_catch(case: str) -> None:
    change, expected = BROKEN_DOCKERFILE[case]
    broken = change(DOCKERFILE)
    assert broken != DOCKERFILE
    problems = _dockerfile_problems(broken, gpu=False)
    assert any(expected in p for p in problems), problems


def test_gpu_dockerfile_checks_catch() -> None:
    assert "llama-cpp-python is not built with CUDA (-DGGML_CUDA=on)" in _dockerfile_problems(
        DOCKERFILE_GPU.replace("-DGGML_CUDA=on ", ""), gpu=True
    )
    assert any("not on nvidia/cuda" in p for p in _dockerfile_problems(DOCKERFILE, gpu=True))


def test_dockerignore_keeps_the_app_and_drops_the_rest() -> None:
    for app in _local_apps():
        assert not dockerignored(f"{app}/apps.py", DOCKERIGNORE)
    assert dockerignored("training/__pycache__/models.cpython-311.pyc", DOCKERIGNORE)
    assert dockerignored(".env", DOCKERIGNORE)
    assert dockerignored("tests/deploy/checks.py", DOCKERIGNORE)
    # Every local Django app must reach the image; one left out is caught.
    app = _local_apps()[-1]
    problems = _dockerfile_problems(DOCKERFILE, gpu=False, dockerignore=DOCKERIGNORE + f"\n{app}\n")
    assert f".dockerignore excludes {app}, which the image needs" in problems
    problems = _dockerfile_problems(
        DOCKERFILE, gpu=False, dockerignore=DOCKERIGNORE.replace("\n.env\n", "\n")
    )
    assert ".dockerignore lets .env into the image" in problems


def test_dockerignore_patterns() -> None:
    text = "**/__pycache__\n*.log\ndocs\n!docs/keep.md\n"
    assert dockerignored("a/b/__pycache__/c.pyc", text)
    assert dockerignored("__pycache__", text)
    assert dockerignored("x.log", text) and not dockerignored("sub/x.log", text)
    assert dockerignored("docs/other.md", text) and not dockerignored("docs/keep.md", text)


# --- The web container's health check -------------------------------------------------------


def _load_healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("healthcheck", REPO / "docker/healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            seen.append(dict(self.headers))
            status = {"/healthz": 200, "/down": 503, "/moved": 301}.get(self.path, 404)
            self.send_response(status)
            if status == 301:
                self.send_header("Location", "/healthz")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_healthcheck_script_passes_only_on_200(http_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    base, seen = http_server
    check = _load_healthcheck().check
    monkeypatch.setenv("ALLOWED_HOSTS", ".example.com,slm.example.com")
    assert check(f"{base}/healthz") == 0
    # Asked as the TLS proxy would ask, for a host the app serves.
    assert seen[-1]["Host"] == "example.com"
    assert seen[-1]["X-Forwarded-Proto"] == "https"
    assert check(f"{base}/down") == 1
    assert check(f"{base}/moved") == 1  # a redirect (e.g. to https) is not healthy
    assert check(f"{base}/missing") == 1
    assert check("http://127.0.0.1:9/healthz", timeout=2) == 1  # nothing listening


def test_the_apps_healthz_answers_the_container_check_in_production_mode(
    client, settings, monkeypatch, db
) -> None:  # type: ignore[no-untyped-def]
    """The container check's request, as Django sees it with production's https redirect and
    host check on."""
    try:
        resolve("/healthz")
    except Resolver404:
        pytest.skip("/healthz is not in this checkout yet")
    settings.ALLOWED_HOSTS = ["slm.example.com"]
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    host = _load_healthcheck().host_header(",".join(settings.ALLOWED_HOSTS))
    response = client.get("/healthz", headers={"host": host, "x-forwarded-proto": "https"})
    # Whether the installation is healthy is the view's business (200 or 503); the check's
    # request itself must reach the view: not refused for its host (400), not sent to https (301).
    assert response.status_code in (200, 503), response


# --- The guide -----------------------------------------------------------------------------


def test_deploy_guide_names_every_service_and_setting() -> None:
    guide = (REPO / "docs/deploy.md").read_text()
    missing = [s for s in SERVICES if f"`{s}`" not in guide]
    missing += [v for v in parse_env_example(ENV_EXAMPLE).documented if v not in guide]
    assert missing == []
    for command in (
        "docker compose up -d",
        "--profile gpu",
        "docker compose run --rm migrate",
        "--scale worker-cpu=",
    ):
        assert command in guide


def test_the_guides_secret_commands_make_a_working_env_file(tmp_path: Path) -> None:
    """Step 2 of docs/deploy.md, run as written on a copy of .env.example."""
    guide = (REPO / "docs/deploy.md").read_text()
    commands = [
        line for line in guide.splitlines() if line.startswith(("cp .env.example", "chmod 600", "sed -i"))
    ]
    assert len(commands) == 7, commands
    (tmp_path / ".env.example").write_text(ENV_EXAMPLE)
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "\n".join(commands)], cwd=tmp_path, check=True, timeout=30
    )
    env = parse_env_example((tmp_path / ".env").read_text()).values
    interpolate(load_compose(), env)  # compose starts: every required value is set
    assert re.fullmatch(r"[0-9a-f]{48}", env["POSTGRES_PASSWORD"])  # safe inside DATABASE_URL
    assert len(env["SECRET_KEY"]) >= 50 and len(set(env["SECRET_KEY"])) >= 5  # Django's check
    Fernet(env["FIELD_ENCRYPTION_KEY"].encode())
    assert oct((tmp_path / ".env").stat().st_mode)[-3:] == "600"


def test_compose_commands_split_like_a_shell() -> None:
    assert split_command(["sh", "-c", "a b && c; d"]) == [["a", "b"], ["c"], ["d"]]
    assert split_command("celery -A x worker") == [["celery", "-A", "x", "worker"]]
