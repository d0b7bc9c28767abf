from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from inference.models import Conversation, Message
from projects.models import Membership, PiiFinding
from projects.services import document_add, membership_invite, pair_create, project_create
from tests.conftest import client_for
from training.models import GenerationRun, ModelVersion, SavedRecipe, Teacher, WizardState
from training.services import build_start

pytestmark = [pytest.mark.django_db, pytest.mark.abuse]  # part of the fault and abuse suite (issue 9)


def _project_urls(resolver: URLResolver | None = None, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Every named URL that takes a project slug, with the names of its other arguments."""
    found = []
    for entry in (resolver or get_resolver()).url_patterns:
        if isinstance(entry, URLResolver):
            found += _project_urls(entry, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern) and entry.name:
            route = prefix + str(entry.pattern)
            if "<slug:slug>" in route:
                found.append((entry.name, re.findall(r"<int:(\w+)>", route)))
    return found


@pytest.fixture
def everything(project, owner, tmp_path):  # type: ignore[no-untyped-def]
    doc = document_add(
        project=project, stream=SimpleUploadedFile("a.md", b"# A\n\ntext"), name="a.md", size=None
    ).document
    pair = pair_create(project=project, instruction="Q", input="", response="A")
    build = build_start(project=project, user=owner, recipe="check")
    membership = project.memberships.get(role=Membership.Role.MEMBER)
    version = ModelVersion.objects.create(
        project=project, build=build, number=1, recipe="rag", base_model="x", gguf_path="/nonexistent.gguf"
    )
    conversation = Conversation.objects.create(version=version, user=owner, title="Q")
    question = Message.objects.create(conversation=conversation, role="user", content="Q?")
    teacher = Teacher.objects.create(
        project=project,
        name="T",
        kind=Teacher.Kind.ENDPOINT,
        base_url="http://127.0.0.1:9/v1",
        model_name="m",
    )
    run = GenerationRun.objects.create(project=project, teacher=teacher)
    recipe = SavedRecipe.objects.create(project=project, name="R", recipe="quantize:q8_0")
    finding = PiiFinding.objects.create(
        project=project, pair=pair, field="response", start=0, end=1, type="PERSON", detector="t", digest="d"
    )
    ids = {
        "projects-document": doc.pk, "projects-document-row": doc.pk, "projects-document-delete": doc.pk,
        "projects-pair-edit": pair.pk, "projects-pair-delete": pair.pk,
        "projects-member-remove": membership.pk,
        "training-build-detail": build.pk, "training-build-cancel": build.pk, "training-build-resume": build.pk,
        "number": version.number, "conversation": conversation.pk, "message": question.pk,
        "training-teacher-check": teacher.pk, "training-teacher-remove": teacher.pk,
        "training-generation-status": run.pk, "training-generation-cancel": run.pk,
        "projects-finding-ignore": finding.pk,
        "training-recipe-export": recipe.pk, "training-recipe-build": recipe.pk, "training-recipe-delete": recipe.pk,
    }  # fmt: skip
    return ids


def test_the_url_list_covers_every_project_page():
    names = {name for name, _ in _project_urls()}
    assert {"projects-detail", "projects-documents", "projects-pairs", "training-build-detail"} <= names
    assert len(names) >= 15


def test_an_outsider_gets_404_on_every_project_url(project, outsider_client, everything):
    for name, args in _project_urls():
        url = reverse(name, args=[project.slug] + [everything.get(a, everything.get(name)) for a in args])
        for method in ("get", "post"):
            response = getattr(outsider_client, method)(url)
            # 405 answers a wrong method before any lookup; the right method must give 404.
            assert response.status_code in (404, 405), (method, url, response.status_code)
    # Nothing the outsider touched changed.
    assert project.documents.count() == 1 and project.pairs.count() == 1
    assert project.builds.get().status == "queued"
    assert project.teachers.count() == 1 and project.generation_runs.get().status == "queued"
    assert project.recipes.count() == 1
    assert not project.pii_findings.filter(ignored=True).exists()
    assert not WizardState.objects.filter(project=project).exclude(answers={}).exists()


def test_an_outsider_does_not_see_the_project_on_home(project, outsider_client):
    assert project.name not in outsider_client.get("/").content.decode()


def test_ids_from_another_project_give_404(project, owner, everything):
    other_owner = User.objects.create_user("dora", password="x")
    other = project_create(name="Other team", owner=other_owner)
    client = client_for(other_owner)
    for name, args in _project_urls():
        if not args:
            continue
        url = reverse(name, args=[other.slug] + [everything.get(a, everything.get(name)) for a in args])
        response = (
            client.get(url)
            if "delete" not in name and "cancel" not in name and "remove" not in name
            else client.post(url)
        )
        assert response.status_code in (404, 405), (url, response.status_code)
    assert project.documents.count() == 1 and project.pairs.count() == 1


def test_anonymous_users_are_sent_to_log_in(project, client):
    response = client.get(reverse("projects-detail", args=[project.slug]))
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_a_member_can_use_the_project(project, member_client):
    for name in (
        "projects-detail",
        "projects-documents",
        "projects-pairs",
        "training-builds",
        "projects-members",
    ):
        assert member_client.get(reverse(name, args=[project.slug])).status_code == 200


def test_only_owners_manage_members(project, member, member_client, owner_client, outsider):
    url = reverse("projects-members", args=[project.slug])
    member_client.post(url, {"username": outsider.username, "role": "member"})
    assert not project.memberships.filter(user=outsider).exists()
    owner_client.post(url, {"username": outsider.username, "role": "member"})
    assert project.memberships.filter(user=outsider).exists()
    assert client_for(outsider).get(reverse("projects-detail", args=[project.slug])).status_code == 200


def test_inviting_an_unknown_user_says_so(project, owner_client):
    response = owner_client.post(
        reverse("projects-members", args=[project.slug]), {"username": "nobody", "role": "member"}
    )
    assert "need to sign up first" in response.content.decode()


def test_the_last_owner_cannot_be_removed(project, owner, owner_client):
    own = project.memberships.get(user=owner)
    owner_client.post(reverse("projects-member-remove", args=[project.slug, own.pk]))
    assert project.memberships.filter(user=owner, role="owner").exists()


def test_inviting_twice_is_refused(project, owner, member):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError):
        membership_invite(project=project, actor=owner, username=member.username)


def test_signup_creates_an_account_and_logs_in(client, db):
    response = client.post(
        reverse("signup"),
        {"username": "erin", "password1": "a-Long-pass-2026", "password2": "a-Long-pass-2026"},
    )
    assert response.status_code == 302
    assert client.get("/").status_code == 200
    assert User.objects.filter(username="erin").exists()


def test_creating_a_project_makes_the_creator_its_owner(owner_client, owner):
    response = owner_client.post(reverse("projects-new"), {"name": "Field ops", "description": ""})
    assert response.status_code == 302
    assert owner.memberships.get(project__slug="field-ops").role == "owner"


def test_a_post_without_a_csrf_token_is_refused_with_advice(project, owner):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    response = client.post(
        reverse("projects-pairs", args=[project.slug]), {"instruction": "Q", "response": "A"}
    )
    assert response.status_code == 403 and "Reload the page" in response.content.decode()
    htmx = client.post(reverse("projects-pairs", args=[project.slug]), HTTP_HX_REQUEST="true")
    assert htmx.status_code == 403 and "<html" not in htmx.content.decode()
    assert not project.pairs.exists()


def test_too_many_files_in_one_upload_is_refused_and_nothing_is_stored(project, owner_client, settings):
    settings.DATA_UPLOAD_MAX_NUMBER_FILES = 2
    files = [SimpleUploadedFile(f"n{i}.md", f"# N{i}\n\ntext {i}".encode()) for i in range(3)]
    response = owner_client.post(reverse("projects-documents-upload", args=[project.slug]), {"files": files})
    assert response.status_code == 400
    assert "too many files" in response.content.decode()
    assert not project.documents.exists()
