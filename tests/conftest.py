from __future__ import annotations

from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.test import Client

from projects.models import Membership, Project
from projects.services import membership_invite, project_create


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
