"""The start-up check: configurations that would run but are unsafe are refused, with a reason.

Pure functions over the settings' values (no Django), so settings.py can call them before
anything starts and the tests can go through every combination.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Config:
    production: bool
    debug: bool
    secret_key_from_env: bool
    field_key_from_env: bool
    allowed_hosts: list[str]
    allowed_hosts_from_env: bool
    database_engine: str  # Django's ENGINE
    broker_url: str
    data_dir: Path
    data_dir_from_env: bool
    login_limits: bool
    embedded_services_allowed: bool
    secret_key_length: int = 50
    field_key_valid: bool = True
    # DATA_DIR/field_key exists: an installation upgraded to production keeps its key from there
    field_key_file: bool = False


def problems(c: Config) -> list[str]:
    """Every reason not to start, as sentences an administrator can act on."""
    found: list[str] = []
    if not writable(c.data_dir):
        found.append(f"DATA_DIR {c.data_dir} is not a writable folder for this user.")
    if not c.production:
        return found
    if not c.secret_key_from_env:
        found.append("SLM_PRODUCTION=1 needs SECRET_KEY in the environment (50+ random characters).")
    elif c.secret_key_length < 50:
        found.append("SECRET_KEY is too short to be secret: use 50 or more random characters.")
    if not c.field_key_from_env and c.field_key_file:
        found.append(
            f"SLM_PRODUCTION=1 needs FIELD_ENCRYPTION_KEY in the environment: set it to the contents of "
            f"{c.data_dir / 'field_key'}, the key this installation's teachers' API keys are encrypted "
            "with (a new key could not read them)."
        )
    elif not c.field_key_from_env:
        found.append(
            "SLM_PRODUCTION=1 needs FIELD_ENCRYPTION_KEY in the environment (it encrypts teachers' API keys; "
            "generate one with: python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())')."
        )
    if c.field_key_from_env and not c.field_key_valid:
        found.append("FIELD_ENCRYPTION_KEY is not a Fernet key (32 url-safe base64-encoded bytes).")
    if c.debug:
        found.append("SLM_PRODUCTION=1 cannot run with DEBUG on (it shows settings and code to visitors).")
    if not c.allowed_hosts_from_env:
        found.append("SLM_PRODUCTION=1 needs ALLOWED_HOSTS: the host names users open the app at.")
    elif "*" in c.allowed_hosts:
        found.append(
            "ALLOWED_HOSTS=* accepts any Host header (password-reset links, cache poisoning); name the hosts."
        )
    if not c.login_limits:
        found.append(
            "SLM_PRODUCTION=1 cannot run with LOGIN_LIMITS off (passwords could be guessed without limit)."
        )
    if not c.data_dir_from_env:
        found.append(
            "SLM_PRODUCTION=1 needs DATA_DIR set: the folder (shared by the web server and every worker) "
            "that holds documents and models, not the default inside the code checkout."
        )
    embedded = []
    if c.database_engine.endswith("sqlite3"):
        embedded.append("the SQLite database (set DATABASE_URL=postgres://...)")
    if c.broker_url.startswith("filesystem://"):
        embedded.append("the on-disk queue (set CELERY_BROKER_URL=redis://...)")
    if embedded and not c.embedded_services_allowed:
        found.append(
            "SLM_PRODUCTION=1 would use "
            + " and ".join(embedded)
            + ": both work for one machine only and lose work when shared between machines. "
            "Set ALLOW_EMBEDDED_SERVICES=1 to run production on a single machine anyway."
        )
    return found


def writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def fernet_key_valid(key: str) -> bool:
    from cryptography.fernet import Fernet

    try:
        Fernet(key.encode())
    except (ValueError, TypeError):
        return False
    return True
