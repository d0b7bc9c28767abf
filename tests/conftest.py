from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.test import Client

from projects.models import Membership, Project
from projects.parsing import parse_file
from projects.services import membership_invite, project_create
from tests.installation import Install
from training.models import ModelVersion


@pytest.fixture(autouse=True)
def _isolated_data_dir(settings, tmp_path: Path) -> Path:
    """Each test writes its files into its own DATA_DIR."""
    settings.DATA_DIR = tmp_path / "data"
    settings.DATA_DIR.mkdir()
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return settings.DATA_DIR


@pytest.fixture
def owner(db) -> User:  # type: ignore[no-untyped-def]
    return User.objects.create_user("alice", password="pw-alice-123")


@pytest.fixture
def member(db) -> User:  # type: ignore[no-untyped-def]
    return User.objects.create_user("bob", password="pw-bob-123")


@pytest.fixture
def outsider(db) -> User:  # type: ignore[no-untyped-def]
    return User.objects.create_user("charlie", password="pw-charlie-123")


@pytest.fixture
def project(owner: User, member: User) -> Project:
    project = project_create(name="Support handbook", owner=owner)
    membership_invite(project=project, actor=owner, username=member.username, role=Membership.Role.MEMBER)
    return project


def client_for(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def owner_client(owner: User) -> Client:
    return client_for(owner)


@pytest.fixture
def member_client(member: User) -> Client:
    return client_for(member)


@pytest.fixture
def outsider_client(outsider: User) -> Client:
    return client_for(outsider)


# --- A real model version: the bundled GGUF and a hybrid index of three small documents ---

# Three small documents a question can be matched against; ids are what the index records.
DOCS = {
    1001: (
        "pump.md",
        "# P-200 pump manual\n\n## Resetting the pump\n\nTo reset the P-200 pump, hold the red RESET button "
        "for five seconds until the status LED blinks green. Then release it and wait ten seconds.\n\n"
        "## Error codes\n\nError E-4021 means the inlet pressure is too low: open the inlet valve fully.\n",
    ),
    1002: (
        "vacation.md",
        "# Vacation policy\n\nEmployees get 25 days of paid vacation per year. Requests go to your manager "
        "at least two weeks ahead. Unused days expire at the end of March.\n",
    ),
    1003: (
        "kitchen.md",
        "# Office kitchen\n\nThe coffee machine is descaled every Friday. Please label food in the fridge "
        "with your name; the fridge is emptied on Thursdays.\n",
    ),
}


@pytest.fixture(scope="session")
def rag_index(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A real hybrid index of DOCS, built once per run with the bundled MiniLM."""
    from training.embedding import shared_embedder
    from training.ml import rag

    src = tmp_path_factory.mktemp("docs")
    chunks = []
    for doc_id, (name, text) in DOCS.items():
        path = src / name
        path.write_text(text)
        parsed = parse_file(path, name)
        chunks += rag.chunk_document(doc_id, parsed.title, parsed.sections)
    out = tmp_path_factory.mktemp("index") / "index"
    rag.build_index(chunks, out, shared_embedder())
    return out


@pytest.fixture
def version(project, rag_index) -> ModelVersion:  # type: ignore[no-untyped-def]
    from training.ml.bundled import bundled_llm_gguf

    return ModelVersion.objects.create(
        project=project,
        number=1,
        recipe="rag",
        base_model="SmolLM2-135M-Instruct (bundled, Q4_1)",
        quant_type="q4_1",
        gguf_path=str(bundled_llm_gguf().path),
        index_dir=str(rag_index),
        metrics={"rag": {"documents": 3, "chunks": 5}},
    )


@pytest.fixture
def install(tmp_path: Path) -> Iterator[Install]:
    """An installation of the app run by real processes (tests/installation.py); its workers are
    stopped when the test ends."""
    installation = Install(tmp_path)
    try:
        yield installation
    finally:
        installation.stop_all()
