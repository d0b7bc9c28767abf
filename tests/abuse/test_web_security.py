"""The web security layer (issue 9): content security policy, log-in limits, production settings,
CSRF on every POST, downloads never shown inline, deleting a project, and who may open what."""

from __future__ import annotations

import inspect
import re
import secrets
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from axes.models import AccessAttempt
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone

from inference.models import ApiToken, Conversation, Message
from inference.services import api_token_create
from projects.models import Document, InstructionPair, Membership, Project
from projects.services import document_add, pair_create, project_delete
from tests.projects.test_access import _project_urls, everything  # noqa: F401  (a fixture)
from tests.projects.test_commands import run
from tests.services import check_deploy
from training.models import Build, BuildStep, GenerationRun, ModelVersion, SavedRecipe, Teacher, WizardState
from training.services import build_start
from training.steps import StepContext

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


def _policy(header: str) -> dict[str, str]:
    """A Content-Security-Policy header as {directive: sources}."""
    parts = (p.strip().split(None, 1) for p in header.split(";") if p.strip())
    return {p[0]: (p[1] if len(p) > 1 else "") for p in parts}


def _url(project: Project, name: str, args: list[str], ids: dict[str, int]) -> str:
    return reverse(name, args=[project.slug] + [ids.get(a, ids.get(name)) for a in args])


# --- 1. Content-Security-Policy ------------------------------------------------------------

STRICT = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' data:",
    "font-src": "'self'",
    "connect-src": "'self'",
    "object-src": "'none'",
    "base-uri": "'self'",
    "frame-ancestors": "'none'",
    "form-action": "'self'",
}


def test_every_project_page_sends_the_strict_policy(project, owner_client, everything):  # noqa: F811
    for name, args in _project_urls():
        response = owner_client.get(_url(project, name, args, everything))
        assert _policy(response["Content-Security-Policy"]) == STRICT, (name, response.status_code)


def test_pages_outside_projects_send_it_too(client, owner_client):
    for response in (
        client.get(reverse("login")),
        client.get(reverse("signup")),
        owner_client.get("/"),
        owner_client.get(reverse("inference-settings")),
        owner_client.get("/no/such/page/"),
        client.get("/v1/models"),
    ):
        assert _policy(response["Content-Security-Policy"]) == STRICT, response.status_code


def test_the_downloaded_report_has_its_own_policy_with_inline_styles_and_no_script(project, owner_client):
    url = reverse("inference-report", args=[project.slug])
    page = owner_client.get(url)
    assert _policy(page["Content-Security-Policy"]) == STRICT
    assert "<style" not in page.content.decode() and "data-print" in page.content.decode()

    download = owner_client.get(url + "?download=1")
    policy = _policy(download["Content-Security-Policy"])
    assert policy["default-src"] == "'none'" and policy["style-src"] == "'unsafe-inline'"
    assert "script-src" not in policy  # falls back to default-src 'none': no script at all
    assert policy["frame-ancestors"] == "'none'"
    body = download.content.decode()
    assert "<script" not in body and "<style>" in body and ".lineage-chain" in body  # report.css inlined
    # The file carries the policy itself, for when it is opened from disk.
    assert '<meta http-equiv="Content-Security-Policy" content="default-src &#x27;none&#x27;' in body


# Inline code the policy would block: handlers, inline <script>/<style>, style attributes,
# javascript: URLs, and htmx attributes that htmx evaluates (hx-on, js: values).
INLINE = re.compile(
    r"""\son[a-z]+\s*=|<script(?![^>]*\ssrc=)[^>]*>|<style|\sstyle\s*=|javascript:|hx-on|=\s*["']js:""",
    re.IGNORECASE,
)


def test_templates_and_scripts_hold_no_inline_code():
    found = []
    for path in sorted((ROOT / "templates").rglob("*.html")):
        text = path.read_text()
        if path.name == "report.html":
            # Only its downloaded copy inlines styles, under the policy tested above.
            text = re.sub(r"\{% if download %\}.*?\{% else %\}", "", text, flags=re.S)
        text = re.sub(r"\{#.*?#\}", "", text)  # template comments may name what they avoid
        found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in INLINE.finditer(text)]
    for path in sorted((ROOT / "static" / "js").rglob("*.js")):
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("//"))
        for banned in ("eval(", "new Function", 'setAttribute("style"', "style.cssText", "<script"):
            if banned in code:
                found.append(f"{path.relative_to(ROOT)}: {banned}")
    assert not found, found


def test_htmx_is_told_to_inject_no_style_and_evaluate_nothing(owner_client):
    page = owner_client.get("/").content.decode()
    meta = re.search(r"""<meta name="htmx-config" content='([^']*)'>""", page)
    assert meta is not None
    import json

    config = json.loads(meta.group(1))
    assert config["includeIndicatorStyles"] is False and config["allowEval"] is False
    assert config["allowScriptTags"] is False


# --- 2. Log-in limits ----------------------------------------------------------------------


def _log_in(username: str, password: str, address: str = "10.0.0.1"):  # type: ignore[no-untyped-def]
    client = Client(REMOTE_ADDR=address)
    return client, client.post(reverse("login"), {"username": username, "password": password})


def test_a_username_is_refused_after_ten_failures_and_others_still_log_in(owner, member):
    for _ in range(9):
        _, response = _log_in("bob", "wrong")
        assert response.status_code == 200 and "correct username and password" in response.content.decode()
    _, tenth = _log_in("bob", "wrong")
    assert tenth.status_code == 429
    # Locked: even the right password is refused, with a page that says what to do.
    _, right = _log_in("bob", "pw-bob-123")
    assert right.status_code == 429
    text = right.content.decode()
    assert "Too many failed log-ins: wait 15 minutes or ask your administrator" in text
    assert "_auth_user_id" not in _log_in("bob", "pw-bob-123")[0].session
    # Another account from the same address logs in: one person's typos lock no one else out.
    client, response = _log_in("alice", "pw-alice-123")
    assert response.status_code == 302 and client.session["_auth_user_id"] == str(owner.pk)
    # The admin's log-in form is behind the same limit.
    admin = Client(REMOTE_ADDR="10.0.0.9").post(
        "/admin/login/", {"username": "bob", "password": "pw-bob-123"}
    )
    assert admin.status_code == 429


def test_the_lock_lifts_after_fifteen_quiet_minutes(member):
    for _ in range(10):
        _log_in("bob", "wrong")
    assert _log_in("bob", "pw-bob-123")[1].status_code == 429
    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=14))
    assert _log_in("bob", "pw-bob-123")[1].status_code == 429
    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=16))
    assert _log_in("bob", "pw-bob-123")[1].status_code == 302


def test_an_address_trying_many_usernames_is_refused(owner):
    for i in range(50):
        _, response = _log_in(f"guess{i}", "wrong", address="10.6.6.6")
    assert response.status_code == 429
    # Every account, even with its right password, from that address only.
    assert _log_in("alice", "pw-alice-123", address="10.6.6.6")[1].status_code == 429
    assert _log_in("alice", "pw-alice-123", address="10.0.0.7")[1].status_code == 302


def test_api_tokens_and_the_cli_are_not_behind_the_log_in_limit(project, member):
    for _ in range(10):
        _log_in("bob", "wrong")
    assert _log_in("bob", "pw-bob-123")[1].status_code == 429
    _, raw = api_token_create(user=member, name="script")
    response = Client(REMOTE_ADDR="10.0.0.1").get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 200 and response.json()["object"] == "list"
    code, out = run("ensureadmin", "--username", "root")
    assert code == 0 and out["created"] is True
    _, admin_login = _log_in("root", out["password"])
    assert admin_login.status_code == 302


# --- 3. Production settings ----------------------------------------------------------------


def _check_deploy(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return check_deploy(tmp_path / "data", **env)


def test_production_mode_passes_the_deployment_checks(tmp_path):
    production = {
        "SLM_PRODUCTION": "1",
        "ALLOWED_HOSTS": "studio.example.com",
        "FIELD_ENCRYPTION_KEY": "7a9ZqkY2m3Sl0d5C6Yj1pQ8mXw4Rt7Uv9Hb2Nc5Ke0E=",
        # One machine on purpose: the embedded database and queue, acknowledged.
        "ALLOW_EMBEDDED_SERVICES": "1",
    }
    result = _check_deploy(tmp_path, SECRET_KEY=secrets.token_urlsafe(50), **production)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout

    refused = _check_deploy(tmp_path, **production)
    assert refused.returncode != 0 and "needs SECRET_KEY" in refused.stderr

    # Local mode (`make run`) is plain http on purpose, so the same checks flag it.
    local = _check_deploy(tmp_path)
    assert local.returncode != 0 and "security.W004" in local.stderr and "security.W012" in local.stderr


def test_local_mode_serves_plain_http(client):
    assert not django_settings.SESSION_COOKIE_SECURE and not django_settings.SECURE_SSL_REDIRECT
    response = client.get(reverse("login"))
    assert response.status_code == 200 and "Strict-Transport-Security" not in response
    assert response["X-Frame-Options"] == "DENY" and response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"


# --- 4. CSRF on every POST -----------------------------------------------------------------


def _routes(resolver: URLResolver | None = None, prefix: str = "") -> list[tuple[str, str]]:
    """Every (route, name) in the URL conf; regex routes (only the admin's) are left out."""
    found: list[tuple[str, str]] = []
    for entry in (resolver or get_resolver()).url_patterns:
        route = str(entry.pattern)
        if isinstance(entry, URLResolver):
            found += _routes(entry, prefix + route)
        elif isinstance(entry, URLPattern):
            if route.startswith("^") or route.endswith("$"):
                assert prefix.startswith("admin/"), f"a regex route outside the admin: {prefix}{route}"
                continue
            found.append((prefix + route, entry.name or ""))
    return found


def _fill(route: str, name: str, project: Project, ids: dict[str, object]) -> str:
    def value(match: re.Match[str]) -> str:
        converter, arg = match.groups()
        if arg == "slug":
            return project.slug
        return str(ids.get(arg, ids.get(name, ids.get(converter, 1))))

    url = "/" + re.sub(r"<(?:(\w+):)?(\w+)>", value, route)
    assert "<" not in url, url
    return url


# Every field name a form in the app reads, so that a POST which got through would change something.
ANY_FORM = {
    "name": "Changed", "description": "x", "username": "charlie", "role": "member", "instruction": "Q?",
    "response": "A.", "input": "", "decision": "accepted", "scope": "all-pending", "question": "Hi?",
    "recipe": "check", "kind": "endpoint", "base_url": "http://127.0.0.1:9/v1", "model_name": "m",
    "source": "/tmp", "answer": "rag", "password": "x", "password1": "a-Long-pass-2026",
    "password2": "a-Long-pass-2026", "new_password1": "a-Long-pass-2026", "new_password2": "a-Long-pass-2026",
}  # fmt: skip


def _snapshot(project: Project) -> dict[str, object]:
    models = (User, Project, Membership, Document, InstructionPair, Build, ModelVersion, Teacher,
              GenerationRun, SavedRecipe, Conversation, Message, ApiToken)  # fmt: skip
    return {m.__name__: m.objects.count() for m in models} | {
        "build": project.builds.get().status,
        "run": project.generation_runs.get().status,
        "wizard": list(WizardState.objects.values_list("answers", flat=True)),
        "project": Project.objects.values_list("name", "description").get(pk=project.pk),
        "pairs": list(InstructionPair.objects.values_list("review", "instruction")),
    }


def test_every_post_without_a_csrf_token_is_refused_and_changes_nothing(project, owner, everything):  # noqa: F811
    _, raw = api_token_create(user=owner, name="t")
    ids = everything | {"pk": ApiToken.objects.get().pk, "base": "bundled", "object_id": owner.pk}
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    before = _snapshot(project)
    posted = []
    for route, name in _routes():
        url = _fill(route, name, project, ids)
        if url.startswith("/v1/"):
            continue
        response = client.post(url, ANY_FORM)
        assert response.status_code == 403, (url, response.status_code)
        posted.append(url)
    assert len(posted) > 40 and f"/p/{project.slug}/delete/" in posted and "/logout/" in posted
    assert _snapshot(project) == before
    assert client.get("/").status_code == 200  # still logged in: the log-out POST was refused too

    # The same POST with the page's token goes through, so the 403s above were CSRF and nothing else.
    page = client.get(reverse("projects-pairs", args=[project.slug])).content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    client.post(reverse("projects-pairs", args=[project.slug]), ANY_FORM | {"csrfmiddlewaretoken": token})
    assert project.pairs.filter(instruction="Q?").exists()


def test_the_v1_api_skips_csrf_but_refuses_requests_without_a_valid_token(project, owner):
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)  # a browser session is no API credential
    for headers in ({}, {"HTTP_AUTHORIZATION": "Bearer slm_not-a-token"}, {"HTTP_AUTHORIZATION": "Basic x"}):
        listed = client.get("/v1/models", **headers)
        chat = client.post(
            "/v1/chat/completions",
            {"model": "x", "messages": [{"role": "user", "content": "hi"}]},
            content_type="application/json",
            **headers,
        )
        assert listed.status_code == 401 and chat.status_code == 401
        assert chat.json()["error"]["code"] == "invalid_api_key"
    assert not Conversation.objects.exists() and not Message.objects.exists()


# --- 5. Downloads are attachments, never shown inline -------------------------------------


@pytest.fixture
def downloadable(project, owner):  # type: ignore[no-untyped-def]
    from training.ml.bundled import bundled_llm_gguf

    pair_create(project=project, instruction="Q", input="", response="A")
    version = ModelVersion.objects.create(
        project=project, number=1, recipe="quantize", base_model="x", quant_type="q4_1",
        gguf_path=str(bundled_llm_gguf().path),
    )  # fmt: skip
    recipe = SavedRecipe.objects.create(project=project, name="R", recipe="quantize:q8_0")
    s, n = project.slug, version.number
    return {
        "projects-pairs-export": reverse("projects-pairs-export", args=[s]),
        "training-recipe-export": reverse("training-recipe-export", args=[s, recipe.pk]),
        "inference-download-gguf": reverse("inference-download-gguf", args=[s, n]),
        "inference-download-modelfile": reverse("inference-download-modelfile", args=[s, n]),
        "inference-download-card": reverse("inference-download-card", args=[s, n]),
        "inference-report": reverse("inference-report", args=[s]) + "?download=1",
    }


def test_every_download_is_an_attachment_with_nosniff(owner_client, downloadable):
    for name, url in downloadable.items():
        response = owner_client.get(url)
        assert response.status_code == 200, name
        assert response["Content-Disposition"].startswith("attachment;"), name
        assert response["X-Content-Type-Options"] == "nosniff", name
        _close(response)


def _patterns(resolver: URLResolver | None = None) -> list[URLPattern]:
    found: list[URLPattern] = []
    for entry in (resolver or get_resolver()).url_patterns:
        found += _patterns(entry) if isinstance(entry, URLResolver) else [entry]
    return found


def test_the_list_of_downloads_is_complete(downloadable):
    """Any view that sends a file (FileResponse or a Content-Disposition) must be in the test above."""
    senders = set()
    for pattern in _patterns():
        source = inspect.getsource(pattern.callback)  # unwraps the decorators
        if "FileResponse" in source or "Content-Disposition" in source or "as_attachment" in source:
            senders.add(pattern.name)
    assert senders == set(downloadable)


def test_no_page_serves_an_uploaded_original(project, owner_client, everything):  # noqa: F811
    """The stored original never comes back: pages show the parsed text, and no view opens the file."""
    marker = "original-bytes-7f3a"
    upload = f"<html><head><script id='{marker}'>alert(1)</script></head><body><h1>Hi</h1><p>Text.</p></body></html>"
    doc = document_add(
        project=project, stream=SimpleUploadedFile("page.html", upload.encode()), name="page.html", size=None
    ).document
    ids = everything | {"projects-document": doc.pk, "projects-document-row": doc.pk}
    for name, args in _project_urls():
        response = owner_client.get(_url(project, name, args, ids))
        body = b"".join(response) if response.streaming else response.content
        assert marker.encode() not in body, name
        assert not response.get("Content-Disposition", "").startswith("inline"), name
    for path in [*ROOT.glob("*/views.py"), *ROOT.glob("*/*_views.py"), *ROOT.glob("*/api.py")]:
        assert ".file_path" not in path.read_text(), path


# --- 6. Deleting a project -----------------------------------------------------------------


@pytest.fixture
def filled(project, owner):  # type: ignore[no-untyped-def]
    """A project with a document on disk and a finished build with a folder of its own."""
    document_add(project=project, stream=SimpleUploadedFile("a.md", b"# A\n\ntext"), name="a.md", size=None)
    pair_create(project=project, instruction="Q", input="", response="A")
    build = build_start(project=project, user=owner, recipe="check")
    Build.objects.filter(pk=build.pk).update(status=Build.Status.SUCCEEDED)
    step = BuildStep.objects.filter(build=build).first() or BuildStep.objects.create(
        build=build, index=0, name="check"
    )
    workdir = StepContext(build=build, step=step).workdir
    workdir.mkdir(parents=True)
    (workdir / "model.gguf").write_bytes(b"GGUF")
    return {"build": build, "folders": [project.data_dir, workdir.parent]}


def _close(response) -> None:  # type: ignore[no-untyped-def]
    # The file a FileResponse streams; response.close() would also end the test's DB connection.
    if getattr(response, "file_to_stream", None):
        response.file_to_stream.close()


def _delete_url(project: Project) -> str:
    return reverse("projects-delete", args=[project.slug])


def test_the_owner_deletes_a_project_with_its_files(
    project, owner_client, filled, django_capture_on_commit_callbacks
):
    assert all(folder.is_dir() for folder in filled["folders"])
    page = owner_client.get(reverse("projects-members", args=[project.slug])).content.decode()
    assert "Delete this project" in page and f"Type “{project.name}” to confirm." in page
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post(_delete_url(project), {"name": project.name})
    assert response.status_code == 302 and response["Location"] == reverse("projects-home")
    assert not Project.objects.exists() and not Document.objects.exists() and not Build.objects.exists()
    assert not any(folder.exists() for folder in filled["folders"])
    assert "was deleted" in owner_client.get("/").content.decode()


def test_a_wrong_name_deletes_nothing(project, owner_client, filled):
    response = owner_client.post(_delete_url(project), {"name": "support handbook"})
    assert response.status_code == 400 and "not the project&#x27;s name" in response.content.decode()
    assert Project.objects.filter(pk=project.pk).exists() and project.documents.count() == 1


def test_a_member_gets_403_an_outsider_404_and_nothing_is_deleted(
    project, member_client, outsider_client, filled, django_capture_on_commit_callbacks
):
    page = member_client.get(reverse("projects-members", args=[project.slug])).content.decode()
    assert "Delete this project" not in page
    with django_capture_on_commit_callbacks(execute=True):
        assert member_client.post(_delete_url(project), {"name": project.name}).status_code == 403
        assert outsider_client.post(_delete_url(project), {"name": project.name}).status_code == 404
    assert Project.objects.filter(pk=project.pk).exists() and project.builds.count() == 1
    assert all(folder.is_dir() for folder in filled["folders"])


def test_the_service_refuses_non_owners(project, member, outsider):
    for user in (member, outsider):
        with pytest.raises(PermissionDenied):
            project_delete(project=project, actor=user)
    assert Project.objects.filter(pk=project.pk).exists()


def test_a_queued_or_running_build_must_be_cancelled_first(project, owner, owner_client, filled):
    build_start(project=project, user=owner, recipe="check")  # queued
    response = owner_client.post(_delete_url(project), {"name": project.name})
    assert response.status_code == 400
    assert (
        "still has 1 build queued or running. Cancel it on the Builds page first" in response.content.decode()
    )
    Build.objects.filter(status=Build.Status.QUEUED).update(status=Build.Status.CANCELLING)
    with pytest.raises(ValidationError, match="1 build queued or running"):
        project_delete(project=project, actor=owner)
    teacher = Teacher.objects.create(project=project, name="T", kind=Teacher.Kind.ENDPOINT, model_name="m",
                                     base_url="http://127.0.0.1:9/v1")  # fmt: skip
    GenerationRun.objects.create(project=project, teacher=teacher)  # queued
    with pytest.raises(ValidationError, match="1 build and 1 pair generation queued or running. Cancel them on "
                       "the Builds and Teachers pages first"):  # fmt: skip
        project_delete(project=project, actor=owner)
    assert Project.objects.filter(pk=project.pk).exists()


def test_the_cli_twin_deletes_with_yes_only(project, filled, django_capture_on_commit_callbacks):
    code, out = run("deleteproject", project.slug)
    assert code == 1 and "--yes" in out["error"] and Project.objects.exists()
    code, out = run("deleteproject", "no-such-project", "--yes")
    assert code == 1 and "no-such-project" in out["error"]
    with django_capture_on_commit_callbacks(execute=True):
        code, out = run("deleteproject", project.slug, "--yes")
    assert (code, out) == (0, {"deleted": "support-handbook"})
    assert not Project.objects.exists() and not any(folder.exists() for folder in filled["folders"])


def test_the_cli_twin_refuses_while_a_build_runs(project, owner):
    build_start(project=project, user=owner, recipe="check")
    code, out = run("deleteproject", project.slug, "--yes")
    assert code == 1 and "Cancel it on the Builds page first" in out["error"] and Project.objects.exists()


# --- 7. Owner, member, outsider on every project page --------------------------------------

# Pages (or actions) only an owner may use; everything else a member uses like the owner.
OWNER_ONLY_POSTS = {"projects-delete", "projects-members"}
# A conversation is private to the one who had it, even inside a shared project (the owner's here).
AUTHOR_ONLY = {"inference-conversation", "inference-stream"}


def _status(client: Client, url: str) -> int:
    response = client.get(url)
    _close(response)
    return response.status_code


def test_three_personas_on_every_project_url(
    project,
    owner_client,
    member_client,
    outsider_client,
    everything,  # noqa: F811
):
    from training.ml.bundled import bundled_llm_gguf

    project.model_versions.update(gguf_path=str(bundled_llm_gguf().path))  # a real file to download
    for name, args in _project_urls():
        url = _url(project, name, args, everything)
        owner_status = _status(owner_client, url)
        member_status = _status(member_client, url)
        assert owner_status in (200, 405), (name, owner_status)  # 405: a POST-only action
        if name in AUTHOR_ONLY:
            assert member_status == 404, (name, member_status)
        else:
            assert member_status == owner_status, (name, member_status)
        assert outsider_client.get(url).status_code in (404, 405), name
    for name in OWNER_ONLY_POSTS:
        url = reverse(name, args=[project.slug])
        data = {"name": project.name, "username": "charlie", "role": "owner"}
        assert member_client.post(url, data).status_code == 403, name
        assert outsider_client.post(url, data).status_code == 404, name
    # Removing a member is refused too (with a message on the members page).
    own = project.memberships.get(role=Membership.Role.OWNER)
    member_client.post(reverse("projects-member-remove", args=[project.slug, own.pk]))
    assert Project.objects.filter(pk=project.pk).exists() and project.memberships.count() == 2
