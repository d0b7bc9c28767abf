"""SLM Studio settings: one module, driven by the environment, with defaults that just work.

Everything a running installation writes lives under DATA_DIR (uploads, models, indexes, the SQLite
file and the embedded broker's queue), so two processes given the same DATA_DIR share one install.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from datetime import timedelta
from pathlib import Path

import dj_database_url
from csp.constants import NONE, SELF
from django.core.exceptions import ImproperlyConfigured
from kombu import Queue

from slmstudio import startup

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


PRODUCTION = env_bool("SLM_PRODUCTION", False)
DATA_DIR = Path(env_str("DATA_DIR", str(BASE_DIR / "var"))).resolve()


def ensure_dir(path: Path) -> None:
    # An unwritable DATA_DIR is reported by the start-up check below, with the other problems.
    with contextlib.suppress(OSError):
        path.mkdir(parents=True, exist_ok=True)


ensure_dir(DATA_DIR)


def _secret_key() -> str:
    """SECRET_KEY from the environment, else one generated once and kept in DATA_DIR.

    Keeping it in DATA_DIR means sessions survive restarts and every process sharing the
    installation (web, workers) agrees on it, without anyone having to configure a secret.
    """
    from_env = os.environ.get("SECRET_KEY")
    # Production without one, or an unwritable DATA_DIR: refused by the start-up check below.
    if from_env or PRODUCTION or not startup.writable(DATA_DIR):
        return from_env or ""
    key_file = DATA_DIR / "secret_key"
    if not key_file.exists():
        tmp = key_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(secrets.token_urlsafe(50))
        tmp.chmod(0o600)
        os.replace(tmp, key_file)
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()


def _field_key() -> str:
    """The Fernet key that encrypts stored secrets (teachers' API keys). Separate from SECRET_KEY,
    so rotating sessions' key does not make the stored secrets unreadable; kept like it."""
    from_env = os.environ.get("FIELD_ENCRYPTION_KEY")
    if from_env or PRODUCTION or not startup.writable(DATA_DIR):
        return from_env or ""
    key_file = DATA_DIR / "field_key"
    if not key_file.exists():
        from cryptography.fernet import Fernet

        tmp = key_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(Fernet.generate_key())
        tmp.chmod(0o600)
        os.replace(tmp, key_file)
    return key_file.read_text().strip()


FIELD_ENCRYPTION_KEY = _field_key()
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "template_partials",
    "csp",
    "axes",
    "slmstudio",
    "projects",
    "training",
    "inference",
    "ops",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # First after security: every log line of the request carries its id (LOG_FORMAT=json).
    "slmstudio.logs.RequestContextMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as django-axes asks: it turns a refused log-in into the "too many failures" page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "slmstudio.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "slmstudio.wsgi.application"

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'db.sqlite3'}"),
        conn_max_age=env_int("DB_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web threads and workers write concurrently. WAL lets readers and the writer overlap;
    # IMMEDIATE makes a write transaction wait for the lock (up to `timeout`) instead of failing
    # at once when a deferred read upgrades to a write.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=20000;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
    # A file, not Django's shared in-memory database: live-server tests then give each server
    # thread its own connection, as in production, instead of one connection shared by all.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test-db.sqlite3")}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# django-axes first: it refuses a locked-out username or address before any password is checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "projects-home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "static"
ensure_dir(STATIC_ROOT)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Served straight from the app folders by WhiteNoise, so `make run` needs no collectstatic.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# --- Uploads -------------------------------------------------------------------------------
# Per-file limit, enforced while the body streams in (slmstudio.http.MaxSizeUploadHandler),
# so an oversized file is refused before it is stored.
MAX_UPLOAD_BYTES = env_int("MAX_UPLOAD_MB", 50) * 1024 * 1024
DATA_UPLOAD_MAX_NUMBER_FILES = env_int("MAX_UPLOAD_FILES", 100)
FILE_UPLOAD_HANDLERS = [
    "slmstudio.http.MaxSizeUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]
FILE_UPLOAD_TEMP_DIR = str(DATA_DIR / "tmp")
ensure_dir(Path(FILE_UPLOAD_TEMP_DIR))
# Files up to this size are parsed in the upload request so the user sees the result at once;
# larger ones go to a worker.
PARSE_INLINE_MAX_BYTES = env_int("PARSE_INLINE_MAX_KB", 2048) * 1024

# --- Web server ----------------------------------------------------------------------------
# Threads per web process: gunicorn's --threads, which the Procfile reads from the same variable.
# A streamed answer holds a thread while it waits for the model (one generation at a time per
# process) and while it generates; a waiting thread costs almost nothing, so there are many.
WEB_THREADS = env_int("WEB_THREADS", 32)
# Streamed answers one web process serves at once (chat page and API). Past it a stream is
# refused with "busy, try again" rather than queued, so a quarter of the threads (8 of 32, at
# least 2) always serve pages.
STREAMS_PER_PROCESS = env_int("STREAMS_PER_PROCESS", max(1, WEB_THREADS - max(2, WEB_THREADS // 4)))
# Web processes (gunicorn's --workers; the Procfile reads the same variable). Each decodes one
# answer at a time with CHAT_THREADS threads, so together they fit the cores: half of them on
# the 2-core default (1 thread, measured best beside the web server's own work), and on a
# larger server the cores shared out between the processes (docs/capacity.md). Reading a prompt
# uses every core.
WEB_WORKERS = env_int("WEB_WORKERS", 2)
CHAT_THREADS = env_int("CHAT_THREADS", max(1, len(os.sched_getaffinity(0)) // max(2, WEB_WORKERS)))

# --- Celery --------------------------------------------------------------------------------
# Default: an on-disk broker under DATA_DIR, so no server is needed. Set CELERY_BROKER_URL
# (e.g. redis://localhost:6379/0) for the production stack.
# "localhost" only names the on-disk transport (kombu warns when a URL has no host).
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://localhost//")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _queue_dir = DATA_DIR / "broker" / "queue"
    _control_dir = DATA_DIR / "broker" / "control"
    for _d in (_queue_dir, _control_dir):
        ensure_dir(_d)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        "control_folder": str(_control_dir),
        "store_processed": False,
    }
# The job record lives in our database (training.Build); Celery keeps no results.
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = env_int("TASK_SOFT_TIME_LIMIT", 600)
CELERY_TASK_TIME_LIMIT = env_int("TASK_TIME_LIMIT", 660)
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Two queues (ops.queues): "cpu" for parsing, embedding, conversion, quantization and
# evaluation, "gpu" for training, distillation and pruning. A worker started without -Q consumes
# both; `celery worker -Q gpu` on a GPU machine takes the training. Work for a queue no live
# worker consumes goes to the other one.
CELERY_TASK_QUEUES = (Queue("cpu"), Queue("gpu"))
CELERY_TASK_DEFAULT_QUEUE = "cpu"
# With Redis, a message a worker took but never acknowledged (the worker died) comes back after
# this long; our own sweep re-queues such a build long before (BUILD_STALE_SECONDS), and a late
# copy finds the build no longer waits for it (its dispatch token changed), so it runs once.
if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("BROKER_VISIBILITY_TIMEOUT", 6 * 3600)}

# --- Builds --------------------------------------------------------------------------------
BUILD_HEARTBEAT_SECONDS = env_int("BUILD_HEARTBEAT_SECONDS", 5)
# A running build whose heartbeat is older than this is taken to have lost its worker.
BUILD_STALE_SECONDS = env_int("BUILD_STALE_SECONDS", 60)
# How many times a build is started (first run plus re-queues after a lost worker).
BUILD_MAX_ATTEMPTS = env_int("BUILD_MAX_ATTEMPTS", 3)
# Seconds one attempt of a build may run; past it the build stops at a safe point as "timed out"
# (checkpoints kept) and can be resumed.
BUILD_TIME_LIMIT = env_int("BUILD_TIME_LIMIT", 4 * 3600)
# Seconds after BUILD_TIME_LIMIT before Celery interrupts a step that has not stopped by itself
# (soft limit), and twice that before it kills the process (hard limit).
BUILD_STOP_GRACE = env_int("BUILD_STOP_GRACE", 300)
# Prepared base models (the bundled GGUF dequantized once, unchanged bases converted to F16),
# shared by every build. Tests point it at one folder for the whole run.
MODEL_CACHE_DIR = Path(env_str("MODEL_CACHE_DIR", str(DATA_DIR / "models"))).resolve()
# The evaluation every build ends with: how much held-out text and how many held-out pairs it
# reads. Fixed, so versions compare; larger is steadier and slower (about 300 tokens/s here).
EVAL_MAX_TOKENS = env_int("EVAL_MAX_TOKENS", 2048)
EVAL_MAX_PAIRS = env_int("EVAL_MAX_PAIRS", 8)
EVAL_ANSWER_TOKENS = env_int("EVAL_ANSWER_TOKENS", 96)
# Calibration tokens for an importance matrix (recipe item "imatrix"), from the training sections.
IMATRIX_MAX_TOKENS = env_int("IMATRIX_MAX_TOKENS", 4096)
# "auto" embeds in bfloat16 on CPUs that multiply it in hardware (2.5x faster, same vectors to
# a cosine distance of 3e-5) and in float32 elsewhere; "float32" or "bfloat16" force one.
EMBEDDING_PRECISION = env_str("EMBEDDING_PRECISION", "auto")

# LOG_FORMAT=json: one JSON object a line, with the build, document or request it concerns
# (slmstudio.logs), for a log collector; "plain" (default) for a terminal.
LOG_FORMAT = env_str("LOG_FORMAT", "plain")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "slmstudio.logs.ContextFilter"}},
    "formatters": {
        "plain": {"()": "slmstudio.logs.PlainFormatter"},
        "json": {"()": "slmstudio.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "plain",
            "filters": ["context"],
        }
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        # One INFO line per recognizer each time a process loads them.
        "presidio-analyzer": {"level": "WARNING"},
    },
}

# The spaCy pipeline person names are found with (a package name or a folder). Empty: an
# installed English pipeline if there is one, else names come only from each project's list.
PII_NER_MODEL = os.environ.get("PII_NER_MODEL", "")

# A worker that has not touched its row in the registry (ops.Worker) for this long is taken to be
# gone: its queues no longer count as served. Workers touch it every BUILD_STALE_SECONDS / 2.
WORKER_STALE_SECONDS = env_int("WORKER_STALE_SECONDS", 2 * BUILD_STALE_SECONDS)
# How long a queue counts as served after its last worker stopped or went silent: work for it
# waits that long (a GPU worker restarting for a deploy) before going to the other queue's
# workers (ops.queues).
QUEUE_FALLBACK_SECONDS = env_int("QUEUE_FALLBACK_SECONDS", 600)

# Tests that run builds inside a test transaction turn the heartbeat thread off.
BUILD_HEARTBEAT_THREAD = env_bool("BUILD_HEARTBEAT_THREAD", True)

# --- Web security (issue 9) ----------------------------------------------------------------
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # htmx reads the token from the page, not the cookie
CSRF_FAILURE_VIEW = "slmstudio.views.csrf_failure"
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

# Content-Security-Policy on every response (django-csp). Scripts and styles come only from our
# own static files: model output and document text end up in pages, and even if some markup slipped
# through sanitising it could neither run script nor load an image from elsewhere (a way to leak
# what the page shows). The downloadable report sets its own, stricter policy (inference.views).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "font-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "frame-ancestors": [NONE],
        "form-action": [SELF],
    },
}

# Log-in limits (django-axes; attempts are rows in our database, so every web process shares
# them). A username is refused after LOGIN_FAILURES_PER_USERNAME failures, an address after
# LOGIN_FAILURES_PER_ADDRESS, until LOGIN_LOCKOUT_MINUTES pass without a new failure. The address
# limit is higher because a whole office may share one address (slmstudio.auth explains).
# An administrator lifts a lock with `manage.py axes_reset_username NAME` (or `axes_reset`).
AXES_ENABLED = env_bool("LOGIN_LIMITS", True)
AXES_HANDLER = "slmstudio.auth.LoginLimitHandler"
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
LOGIN_FAILURES_PER_USERNAME = env_int("LOGIN_FAILURES_PER_USERNAME", 10)
LOGIN_FAILURES_PER_ADDRESS = env_int("LOGIN_FAILURES_PER_ADDRESS", 50)
LOGIN_LOCKOUT_MINUTES = env_int("LOGIN_LOCKOUT_MINUTES", 15)
AXES_FAILURE_LIMIT = LOGIN_FAILURES_PER_USERNAME
AXES_COOLOFF_TIME = timedelta(minutes=LOGIN_LOCKOUT_MINUTES)
# Tries made while locked out do not restart the wait, so "wait 15 minutes" stays true.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_HTTP_RESPONSE_CODE = 429
# Successful log-ins are not logged row by row (the table would only grow); failures are.
AXES_DISABLE_ACCESS_LOG = True
# No start-up banner on every management command (the CLI twins print JSON).
AXES_VERBOSE = False

# --- Production (SLM_PRODUCTION=1) ---------------------------------------------------------
# The default is a local install opened over plain http (`make run`), so HTTPS-only settings are
# switched on only here. `manage.py check --deploy --fail-level WARNING` passes with these.
# (Database, broker and storage for production are configured above through their URLs.)
# The start-up check (slmstudio.startup): an unsafe combination stops every process (web,
# worker, manage.py) at once with the reasons, instead of running half-safe.
_problems = startup.problems(
    startup.Config(
        production=PRODUCTION,
        debug=DEBUG,
        secret_key_from_env=bool(os.environ.get("SECRET_KEY")),
        field_key_from_env=bool(os.environ.get("FIELD_ENCRYPTION_KEY")),
        allowed_hosts=ALLOWED_HOSTS,
        allowed_hosts_from_env=bool(os.environ.get("ALLOWED_HOSTS")),
        database_engine=DATABASES["default"]["ENGINE"],
        broker_url=CELERY_BROKER_URL,
        data_dir=DATA_DIR,
        data_dir_from_env=bool(os.environ.get("DATA_DIR")),
        login_limits=AXES_ENABLED,
        embedded_services_allowed=env_bool("ALLOW_EMBEDDED_SERVICES", False),
        secret_key_length=len(SECRET_KEY),
        field_key_valid=startup.fernet_key_valid(FIELD_ENCRYPTION_KEY),
        field_key_file=(DATA_DIR / "field_key").is_file(),
    )
)
if _problems:
    raise ImproperlyConfigured("SLM Studio will not start:\n- " + "\n- ".join(_problems))
if PRODUCTION:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 365 * 24 * 3600)
    # Off unless asked: HSTS on every subdomain (or the browsers' preload list) binds services
    # this installation does not own, so it is the domain owner's decision.
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
    # Behind a proxy that terminates TLS, it tells us the original scheme in X-Forwarded-Proto;
    # only set this when that proxy always overwrites the header (a client could send it too).
    if env_bool("BEHIND_TLS_PROXY", False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    # A proxy that already redirects http to https may turn ours off (SECURE_SSL_REDIRECT=0).
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    # Decided above, not forgotten: silence only the checks for choices made on purpose.
    SILENCED_SYSTEM_CHECKS = [
        *([] if SECURE_HSTS_INCLUDE_SUBDOMAINS else ["security.W005"]),
        *([] if SECURE_HSTS_PRELOAD else ["security.W021"]),
        *([] if SECURE_SSL_REDIRECT else ["security.W008"]),
    ]

# --- Observability (issue 10) --------------------------------------------------------------
# GET /healthz (ops.health): for load balancers and monitors, no log-in. DATA_DIR's disk with
# less free space than this is "failing": uploads, builds and SQLite would soon fail to write.
HEALTH_MIN_FREE_MB = env_int("HEALTH_MIN_FREE_MB", 1024)
# Seconds a broker or disk probe may take (health and metrics) before it counts as failing, so a
# monitor gets its answer quickly even when the broker hangs.
HEALTH_TIMEOUT_SECONDS = env_int("HEALTH_TIMEOUT_SECONDS", 3)
# Anonymous /healthz callers (load balancers) share one report per web process for this long.
HEALTH_CACHE_SECONDS = env_int("HEALTH_CACHE_SECONDS", 5)
# GET /metrics (ops.metrics, Prometheus): open to callers on this machine (loopback, not through
# a proxy); anyone else must send "Authorization: Bearer <METRICS_TOKEN>", and with no token set
# nobody else gets in. Gunicorn's processes share their numbers through PROMETHEUS_MULTIPROC_DIR,
# which slmstudio/gunicorn.conf.py sets up (a fresh folder per server).
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
# Probes inside the private network (a load balancer, Prometheus) speak plain http: with
# SECURE_SSL_REDIRECT on, they would get a redirect instead of an answer.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^metrics$"]

# --- Teacher endpoints (issue 10) ----------------------------------------------------------
# Where a teacher's base URL may point (training.ml.netpolicy), checked when a teacher is added
# and again on every request. "any": anywhere but link-local / cloud metadata addresses (a local
# install talks to teachers on this machine or the LAN). "public": only addresses on the public
# internet, so users cannot make the server call its database, Redis, admin ports or the metadata
# service. TEACHER_ALLOWED_HOSTS: host names and CIDR ranges always allowed (an internal GPU box:
# "gpu-box.internal,10.0.3.7,10.8.0.0/16").
TEACHER_ENDPOINTS = env_str("TEACHER_ENDPOINTS", "public" if PRODUCTION else "any").strip().lower()
TEACHER_ALLOWED_HOSTS = env_list("TEACHER_ALLOWED_HOSTS", [])


def _teacher_endpoint_problems() -> list[str]:
    import ipaddress

    found = [] if TEACHER_ENDPOINTS in ("any", "public") else [f"TEACHER_ENDPOINTS is {TEACHER_ENDPOINTS!r}"]
    for entry in TEACHER_ALLOWED_HOSTS:
        if "/" in entry:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                found.append(f"{entry!r} in TEACHER_ALLOWED_HOSTS is not a CIDR range")
    return found


_teacher_problems = _teacher_endpoint_problems()
if _teacher_problems:
    raise ImproperlyConfigured(
        "SLM Studio will not start: "
        + "; ".join(_teacher_problems)
        + ' (TEACHER_ENDPOINTS is "any" or "public"; TEACHER_ALLOWED_HOSTS is a comma list of host '
        "names and CIDR ranges)."
    )
