"""Teachers and what they do for a project, against a real local OpenAI-compatible server
(tests/teacherserver.py): registering (the key encrypted), testing the connection, writing
question/answer pairs from documents (review, resume without duplicates, cancel), and the
distill step in both modes on tiny models."""

from __future__ import annotations

import contextlib
import json
from io import StringIO

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.urls import reverse

from projects.models import InstructionPair
from projects.services import document_add, pair_create
from tests.teacherserver import teacher_server
from tests.tinymodels import make_tiny_llama
from training.models import Build, GenerationRun, Teacher
from training.registry import base_model_register
from training.services import build_start
from training.teachers import generation_cancel, generation_passages, generation_start, teacher_add

MANUAL = "\n\n".join(
    f"## Pump P-{i}00\n\nTo reset the P-{i}00 pump, hold the red RESET button for {i + 2} seconds until the "
    f"light blinks green. Error E-40{i}1 on the P-{i}00 means the inlet pressure is too low, so open the "
    "inlet valve fully and wait a minute before you start it again."
    for i in range(1, 7)
)


@pytest.fixture
def documents(project):  # type: ignore[no-untyped-def]
    document_add(
        project=project, stream=SimpleUploadedFile("pumps.md", MANUAL.encode()), name="pumps.md", size=None
    )
    return project


def _cli(*args: str) -> dict:
    out = StringIO()
    with contextlib.suppress(SystemExit):
        call_command(*args, stdout=out)
    return json.loads(out.getvalue())


@pytest.mark.django_db
def test_addteacher_keeps_the_key_encrypted_and_never_shows_it(project, owner_client, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TEACHER_KEY", "sk-very-secret-42")
    printed = _cli("addteacher", project.slug, "Big model", "--endpoint", "http://127.0.0.1:9/v1",
                   "--model", "llama", "--api-key-env", "TEACHER_KEY")  # fmt: skip
    teacher = Teacher.objects.get(pk=printed["teacher"])
    assert teacher.kind == Teacher.Kind.ENDPOINT and teacher.has_api_key
    assert "sk-very-secret-42" not in teacher.api_key_encrypted
    from slmstudio.lib import crypto

    assert crypto.decrypt(teacher.api_key_encrypted) == "sk-very-secret-42"
    page = owner_client.get(reverse("training-teachers", args=[project.slug])).content.decode()
    assert "Big model" in page and "sk-very-secret-42" not in page and "encrypted, not shown" in page
    assert _cli("addteacher", project.slug, "Big model", "--path", "/nowhere")["error"]
    assert "not set" in _cli("addteacher", project.slug, "Other", "--endpoint", "http://x/v1", "--model", "m",
                             "--api-key-env", "NO_SUCH_VAR_SET")["error"]  # fmt: skip


@pytest.mark.django_db
def test_local_teachers_need_a_model_folder_or_gguf(project, tmp_path):  # type: ignore[no-untyped-def]
    from django.core.exceptions import ValidationError

    model_dir = make_tiny_llama(tmp_path / "tiny")
    assert teacher_add(project=project, name="Tiny", user=None, path=str(model_dir)).kind == Teacher.Kind.HF
    with pytest.raises(ValidationError, match="neither a folder"):
        teacher_add(project=project, name="Nothing", user=None, path=str(tmp_path))


@pytest.mark.django_db
def test_test_connection_reports_success_and_a_wrong_key(project, owner_client):  # type: ignore[no-untyped-def]
    with teacher_server(api_key="right") as server:
        good = teacher_add(
            project=project, name="Good", user=None, endpoint=server.url, model="m", api_key="right"
        )
        bad = teacher_add(
            project=project, name="Bad", user=None, endpoint=server.url, model="m", api_key="wrong"
        )
        for teacher in (good, bad):
            owner_client.post(
                reverse("training-teacher-check", args=[project.slug, teacher.pk]), HTTP_HX_REQUEST="true"
            )
    good.refresh_from_db()
    bad.refresh_from_db()
    assert good.check_ok is True
    assert bad.check_ok is False and "API key" in bad.check_message
    page = owner_client.get(reverse("training-teachers", args=[project.slug])).content.decode()
    assert "Works" in page and "check its API key" in page


@pytest.mark.django_db
def test_passages_are_spread_over_each_document(documents):  # type: ignore[no-untyped-def]
    from projects.services import document_parse

    document_parse(document_id=documents.documents.get().pk)
    passages = generation_passages(project=documents, per_document=3)
    assert 1 <= len(passages) <= 3 and len({p.id for p in passages}) == len(passages)
    assert passages == generation_passages(project=documents, per_document=3)


@pytest.mark.django_db(transaction=True)
def test_generated_pairs_wait_for_review_and_a_rerun_adds_no_duplicates(documents, owner_client):  # type: ignore[no-untyped-def]
    from projects.services import document_parse

    document_parse(document_id=documents.documents.get().pk)
    total = len(generation_passages(project=documents, per_document=20))
    assert total >= 2
    with teacher_server(fail_words={"P-200"}) as server:
        teacher = teacher_add(project=documents, name="T", user=None, endpoint=server.url, model="m")
        Teacher.objects.filter(pk=teacher.pk).update(timeout_seconds=5)
        # The P-200 passage fails (500 after retries); the others land.
        first = _cli(
            "generatepairs", documents.slug, "--teacher", str(teacher.pk), "--per-document", "20", "--wait"
        )
        assert first["status"] == "succeeded" and first["failed"] >= 1 and first["added"] >= 1
        assert "500" in first["last_error"] or "overloaded" in first["last_error"]
        generated = documents.pairs.filter(source=InstructionPair.Source.GENERATED)
        assert generated.count() == first["added"]
        pair = generated.first()
        assert pair.review == InstructionPair.Review.PENDING and pair.passage_id and pair.document is not None
        assert not documents.pairs.usable().filter(source=InstructionPair.Source.GENERATED).exists()
        # Fixed teacher, new run: only what the first run did not get.
        server.fail_words.clear()
        asked_before = len(server.requests)
        second = _cli(
            "generatepairs", documents.slug, "--teacher", str(teacher.pk), "--per-document", "20", "--wait"
        )
        assert second["added"] == first["failed"] and second["duplicates"] == 0
        assert len(server.requests) - asked_before == first["failed"]  # answered passages not asked again
    assert generated.count() == total
    assert generated.values("key").distinct().count() == total
    # Bulk review on the pairs page.
    page = owner_client.get(
        reverse("projects-pairs", args=[documents.slug]) + "?review=pending"
    ).content.decode()
    assert "Waiting for review" in page and "Accept ticked" in page
    ids = list(generated.values_list("pk", flat=True))
    owner_client.post(
        reverse("projects-pairs-review", args=[documents.slug]), {"decision": "rejected", "pair": ids[:1]}
    )
    owner_client.post(
        reverse("projects-pairs-review", args=[documents.slug]),
        {"decision": "accepted", "scope": "all-pending"},
    )
    assert documents.pairs.usable().filter(source=InstructionPair.Source.GENERATED).count() == total - 1
    assert documents.pairs.get(pk=ids[0]).review == InstructionPair.Review.REJECTED


@pytest.mark.django_db
def test_a_queued_run_can_be_cancelled_and_a_wrong_key_fails_the_run(documents, owner):  # type: ignore[no-untyped-def]
    from projects.services import document_parse
    from training.teachers import generation_run

    document_parse(document_id=documents.documents.get().pk)
    with teacher_server(api_key="right") as server:
        teacher = teacher_add(
            project=documents, name="T", user=None, endpoint=server.url, model="m", api_key="wrong"
        )
        run = generation_start(project=documents, teacher=teacher, per_document=2, user=owner)
        assert generation_cancel(run=run).status == GenerationRun.Status.CANCELLED
        run = generation_start(project=documents, teacher=teacher, per_document=6, user=owner)
        generation_run(run_id=run.pk)
        # A refused key is not retried, and the run stops instead of asking about every passage
        # (at most the requests already in flight when the first refusal came back).
        assert len(server.requests) <= teacher.max_concurrency
    run.refresh_from_db()
    assert run.status == GenerationRun.Status.FAILED and "API key" in run.error


# --- The distill step -------------------------------------------------------------------------

PAIRS = [
    ("How do I reset the P-100 pump?", "Hold RESET for 3 seconds."),
    ("What does E-4011 mean?", "Low inlet pressure."),
    ("How do I reset the P-200 pump?", "Hold RESET for 4 seconds."),
    ("What does E-4021 mean?", "Low inlet pressure."),
    ("How do I reset the P-300 pump?", "Hold RESET for 5 seconds."),
]


@pytest.fixture
def pairs(documents, settings):  # type: ignore[no-untyped-def]
    settings.EVAL_MAX_TOKENS = 128
    settings.EVAL_MAX_PAIRS = 2
    settings.EVAL_ANSWER_TOKENS = 8
    for i, (q, a) in enumerate(PAIRS):
        pair = pair_create(project=documents, instruction=q, input="", response=a)
        pair.split = InstructionPair.Split.EVAL if i >= 3 else InstructionPair.Split.TRAIN
        pair.save()
    return documents


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):  # type: ignore[no-untyped-def]
    return make_tiny_llama(tmp_path_factory.mktemp("student") / "student")


def _distill(project, owner, base, params, capture):  # type: ignore[no-untyped-def]
    quick = {"overrides": {"max_steps": "3", "checkpoint_every": "1", "batch_tokens": "256"}}
    with capture(execute=True):
        build = build_start(
            project=project, user=owner, recipe="distill", base=base, params={"distill": quick | params}
        )
    build.refresh_from_db()
    return build


@pytest.mark.django_db
def test_sequence_distillation_trains_on_the_teachers_answers(
    pairs, owner, student_dir, django_capture_on_commit_callbacks
):  # type: ignore[no-untyped-def]
    base = base_model_register(source=str(student_dir), name="Student")
    with teacher_server() as server:
        teacher = teacher_add(
            project=pairs, name="Endpoint teacher", user=None, endpoint=server.url, model="m"
        )
        build = _distill(
            pairs,
            owner,
            base,
            {"teacher": str(teacher.pk), "mode": "sequence"},
            django_capture_on_commit_callbacks,
        )
        asked = len(server.requests)
    assert build.status == Build.Status.SUCCEEDED, build.error
    step = build.steps.get(name="distill")
    assert step.metrics["mode"] == "sequence" and step.metrics["teacher_answers"] == 3 and asked == 3
    answers = json.loads(next(iter(build_dir(build).rglob("teacher-answers.json"))).read_text())
    assert answers["How do I reset the P-100 pump?"].startswith("Teacher says:")


def build_dir(build):  # type: ignore[no-untyped-def]
    from django.conf import settings

    return settings.DATA_DIR / "builds" / str(build.pk)


@pytest.mark.django_db
def test_logit_distillation_needs_a_local_same_tokenizer_teacher(
    pairs, owner, student_dir, tmp_path, django_capture_on_commit_callbacks
):  # type: ignore[no-untyped-def]
    base = base_model_register(source=str(student_dir), name="Student")
    teacher_dir = make_tiny_llama(tmp_path / "teacher", hidden=96, heads=6, kv_heads=2, layers=3, seed=1)
    teacher = teacher_add(project=pairs, name="Bigger", user=None, path=str(teacher_dir))
    build = _distill(
        pairs,
        owner,
        base,
        {"teacher": str(teacher.pk), "mode": "logits", "temperature": "2"},
        django_capture_on_commit_callbacks,
    )
    assert build.status == Build.Status.SUCCEEDED, build.error
    m = build.steps.get(name="distill").metrics
    assert m["mode"] == "logits" and m["temperature"] == 2.0 and m["steps"] == 3
    with teacher_server() as server:
        remote = teacher_add(project=pairs, name="Remote", user=None, endpoint=server.url, model="m")
        failed = _distill(
            pairs,
            owner,
            base,
            {"teacher": str(remote.pk), "mode": "logits"},
            django_capture_on_commit_callbacks,
        )
    assert failed.status == Build.Status.FAILED and "distill.mode=sequence" in failed.error
    missing = _distill(pairs, owner, base, {}, django_capture_on_commit_callbacks)
    assert missing.status == Build.Status.FAILED and "distill.teacher=ID" in missing.error


@pytest.mark.django_db
def test_runs_a_lost_worker_left_are_recovered(documents, owner):  # type: ignore[no-untyped-def]
    import socket
    from datetime import timedelta

    from django.utils import timezone

    from projects.services import document_parse
    from training.teachers import generation_runs_recover_stale

    document_parse(document_id=documents.documents.get().pk)
    with teacher_server() as server:
        teacher = teacher_add(project=documents, name="T", user=None, endpoint=server.url, model="m")
        lost_message = generation_start(project=documents, teacher=teacher, per_document=2, user=owner)
        GenerationRun.objects.filter(pk=lost_message.pk).update(
            created_at=timezone.now() - timedelta(hours=1)
        )
        lost_worker = GenerationRun.objects.create(
            project=documents, teacher=teacher, status=GenerationRun.Status.RUNNING,
            claimed_by=f"{socket.gethostname()}:999999999", heartbeat_at=timezone.now(),
        )  # fmt: skip
        recovered = generation_runs_recover_stale()
    assert set(recovered) == {lost_message.pk, lost_worker.pk}
    lost_message.refresh_from_db()
    lost_worker.refresh_from_db()
    assert lost_message.status == GenerationRun.Status.SUCCEEDED and lost_message.added >= 1  # sent again
    assert lost_worker.status == GenerationRun.Status.FAILED and "Run again" in lost_worker.error


@pytest.mark.django_db
def test_the_build_form_offers_distillation_once_there_is_a_teacher(project, owner_client, tmp_path):  # type: ignore[no-untyped-def]
    url = reverse("training-builds", args=[project.slug])
    assert "add a teacher" in owner_client.get(url).content.decode()
    teacher = teacher_add(
        project=project, name="Bigger", user=None, endpoint="http://127.0.0.1:9/v1", model="m"
    )
    assert "Learn from a larger teacher model" in owner_client.get(url).content.decode()
    owner_client.post(
        reverse("training-build-new", args=[project.slug]),
        {
            "tune": "distill",
            "distill.teacher": str(teacher.pk),
            "distill.mode": "sequence",
            "prune.target": "0.5",
        },
    )
    build = project.builds.get()
    assert build.recipe == "distill"
    assert build.steps.get(name="distill").params == {"teacher": str(teacher.pk), "mode": "sequence"}
