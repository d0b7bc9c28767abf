from __future__ import annotations

import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from django.utils import timezone

from projects.models import Document
from projects.services import document_add, pair_create
from training import steps as steps_module
from training.models import Build, BuildStep
from training.services import build_cancel, build_claim, build_run, build_start, builds_recover_stale
from training.tasks import _run_build_failure

pytestmark = pytest.mark.django_db


@pytest.fixture
def project_with_data(project):  # type: ignore[no-untyped-def]
    for i in range(3):
        document_add(
            project=project, stream=SimpleUploadedFile(f"n{i}.md", f"# Note {i}\n\nBody {i}.".encode()),
            name=f"n{i}.md", size=None,
        )  # fmt: skip
    pair_create(project=project, instruction="Q", input="", response="A")
    return project


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_build_runs_its_steps_and_succeeds(project_with_data, owner, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        build = build_start(project=project_with_data, user=owner, recipe="check")
    build.refresh_from_db()
    assert build.status == Build.Status.SUCCEEDED, build.error
    assert build.attempts == 1 and build.started_at and build.ended_at and not build.error
    parse, validate = build.steps.all()
    assert (parse.name, parse.status, parse.percent) == ("parse", "succeeded", 100)
    assert parse.metrics["parsed"] == 3 and parse.metrics["newly_read"] == 3
    assert (
        validate.metrics == {"documents": 3, "train_pairs": 1, "eval_pairs": 0}
        or validate.metrics["documents"] == 3
    )
    assert project_with_data.documents.filter(status=Document.Status.PARSED).count() == 3
    messages = list(build.logs.values_list("message", flat=True))
    assert messages[0] == "Build queued." and messages[-1] == "Build finished."


def test_a_build_is_claimed_once(project_with_data, owner):
    build = build_start(project=project_with_data, user=owner, recipe="check")
    assert build_claim(build_id=build.pk, worker="a:1")
    assert not build_claim(build_id=build.pk, worker="b:2")
    build.refresh_from_db()
    assert (build.status, build.claimed_by, build.attempts) == ("running", "a:1", 1)


def test_a_second_delivery_of_the_same_message_does_nothing(project_with_data, owner):
    build = build_start(project=project_with_data, user=owner, recipe="check")
    build_run(build_id=build.pk)
    build.refresh_from_db()
    finished = (build.status, build.ended_at, build.logs.count())
    build_run(build_id=build.pk)
    build.refresh_from_db()
    assert (build.status, build.ended_at, build.logs.count()) == finished


def test_a_build_without_data_fails_with_a_readable_reason(project, owner):
    build = build_start(project=project, user=owner, recipe="check")
    build_run(build_id=build.pk)
    build.refresh_from_db()
    assert build.status == Build.Status.FAILED
    assert "no usable data" in build.error
    assert build.steps.get(name="validate").status == BuildStep.Status.FAILED


def test_cancelling_a_queued_build_stops_it_before_it_starts(project_with_data, owner):
    build = build_start(project=project_with_data, user=owner, recipe="check")
    build_cancel(build=build)
    build_run(build_id=build.pk)
    build.refresh_from_db()
    assert build.status == Build.Status.CANCELLED and build.started_at is None
    assert project_with_data.documents.filter(status=Document.Status.PENDING).count() == 3


def test_cancelling_a_running_build_stops_it_within_a_second(project_with_data, owner, monkeypatch):
    iterations = []

    def slow_step(ctx):  # type: ignore[no-untyped-def]
        for i in range(1000):
            iterations.append(i)
            if i == 3:  # the user presses Cancel while the step is working
                build_cancel(build=ctx.build)
            ctx.check_cancel()
            time.sleep(0.01)
        return {}

    monkeypatch.setitem(steps_module.STEP_RUNNERS, "slow", slow_step)
    build = build_start(project=project_with_data, user=owner, steps=[{"name": "parse"}, {"name": "slow"}])
    build_run(build_id=build.pk)
    build.refresh_from_db()
    assert build.status == Build.Status.CANCELLED
    assert build.steps.get(name="parse").status == "succeeded"
    assert build.steps.get(name="slow").status == "cancelled"
    # check_cancel reads the flag at most once a second: 10 ms a loop means < ~150 iterations.
    assert len(iterations) < 150


def test_an_unexpected_error_fails_the_build_and_names_the_step(project_with_data, owner, monkeypatch):
    def broken(ctx):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    monkeypatch.setitem(steps_module.STEP_RUNNERS, "broken", broken)
    build = build_start(project=project_with_data, user=owner, steps=[{"name": "broken"}])
    build_run(build_id=build.pk)
    build.refresh_from_db()
    assert build.status == "failed" and "broken" in build.error and "boom" in build.error


def test_a_stale_build_is_requeued_and_resumes_after_its_last_finished_step(
    project_with_data, owner, django_capture_on_commit_callbacks
):
    build = build_start(project=project_with_data, user=owner, recipe="check")
    assert build_claim(build_id=build.pk, worker="elsewhere:123")
    parse = build.steps.get(name="parse")
    parse.status, parse.metrics = BuildStep.Status.SUCCEEDED, {"marker": "kept"}
    parse.save()
    build.steps.filter(name="validate").update(status=BuildStep.Status.RUNNING)
    Build.objects.filter(pk=build.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    with django_capture_on_commit_callbacks(execute=True):
        assert builds_recover_stale() == [build.pk]
    build.refresh_from_db()
    assert build.status == Build.Status.SUCCEEDED and build.attempts == 2
    assert build.steps.get(name="parse").metrics == {"marker": "kept"}  # not run again
    assert build.logs.filter(message__contains="re-queued").exists()
    assert build.logs.filter(message__contains="Resuming (attempt 2)").exists()


def test_a_build_whose_local_worker_died_is_requeued_without_waiting(project_with_data, owner):
    build = build_start(project=project_with_data, user=owner, recipe="check")
    assert build_claim(build_id=build.pk, worker=f"{socket.gethostname()}:{_dead_pid()}")
    assert builds_recover_stale() == [build.pk]
    build.refresh_from_db()
    assert build.status == Build.Status.QUEUED and build.claimed_by == ""


def test_a_build_with_a_live_worker_is_left_alone(project_with_data, owner):
    import os

    build = build_start(project=project_with_data, user=owner, recipe="check")
    assert build_claim(build_id=build.pk, worker=f"{socket.gethostname()}:{os.getpid()}")
    assert builds_recover_stale() == []
    build.refresh_from_db()
    assert build.status == Build.Status.RUNNING


def test_a_build_that_keeps_losing_its_worker_fails_after_the_last_attempt(
    project_with_data, owner, settings
):
    settings.BUILD_MAX_ATTEMPTS = 2
    build = build_start(project=project_with_data, user=owner, recipe="check")
    for _attempt in (1, 2):
        assert build_claim(build_id=build.pk, worker="gone:1")
        Build.objects.filter(pk=build.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
        builds_recover_stale()
    build.refresh_from_db()
    assert build.status == Build.Status.FAILED and build.attempts == 2
    assert "stopped 2 times" in build.error


def test_a_cancelling_build_whose_worker_died_ends_cancelled(project_with_data, owner):
    build = build_start(project=project_with_data, user=owner, recipe="check")
    build_claim(build_id=build.pk, worker="gone:1")
    build_cancel(build=build)
    Build.objects.filter(pk=build.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    builds_recover_stale()
    build.refresh_from_db()
    assert build.status == Build.Status.CANCELLED


def test_a_crashed_task_marks_the_build_failed(project_with_data, owner):
    build = build_start(project=project_with_data, user=owner, recipe="check")
    _run_build_failure(None, MemoryError("out of memory"), "task-id", (build.pk,), {}, None)
    build.refresh_from_db()
    assert build.status == "failed" and "MemoryError" in build.error


def test_the_build_page_polls_until_the_build_ends(project_with_data, owner, owner_client):
    build = build_start(project=project_with_data, user=owner, recipe="check")
    url = reverse("training-build-detail", args=[project_with_data.slug, build.pk])
    page = owner_client.get(url).content.decode()
    assert 'hx-trigger="every 2s"' in page and "Cancel build" in page
    running = owner_client.get(url, HTTP_HX_REQUEST="true")
    assert running.status_code == 200 and "<html" not in running.content.decode()
    build_run(build_id=build.pk)
    done = owner_client.get(url, HTTP_HX_REQUEST="true")
    assert done.status_code == 286
    body = done.content.decode()
    assert "hx-trigger" not in body and "Succeeded" in body and "Cancel build" not in body


def test_the_cancel_button_cancels(project_with_data, owner, owner_client):
    build = build_start(project=project_with_data, user=owner, recipe="check")
    owner_client.post(reverse("training-build-cancel", args=[project_with_data.slug, build.pk]))
    build.refresh_from_db()
    assert build.status == "cancelled"


def test_start_a_build_from_the_project_page(
    project_with_data, owner_client, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post(reverse("training-build-new", args=[project_with_data.slug]))
    build = project_with_data.builds.get()
    assert response["Location"] == build.get_absolute_url()
    build.refresh_from_db()
    assert build.status == "succeeded"


def test_a_killed_but_unreaped_worker_counts_as_dead():
    import signal

    from slmstudio.lib.workers import worker_is_dead

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not worker_is_dead(f"{socket.gethostname()}:{proc.pid}")
        proc.send_signal(signal.SIGKILL)
        time.sleep(0.3)  # dead, but not waited for: a zombie that kill(pid, 0) still finds
        assert worker_is_dead(f"{socket.gethostname()}:{proc.pid}")
    finally:
        proc.wait()
    assert not worker_is_dead(f"another-host:{proc.pid}")


def test_the_parse_step_takes_over_a_parse_whose_process_died(project_with_data, owner):
    doc = project_with_data.documents.first()
    Document.objects.filter(pk=doc.pk).update(
        status=Document.Status.PARSING,
        parse_started_at=timezone.now(),
        parsing_by=f"{socket.gethostname()}:{_dead_pid()}",
    )
    build = build_start(project=project_with_data, user=owner, recipe="check")
    build_run(build_id=build.pk)
    build.refresh_from_db()
    assert build.status == "succeeded", build.error
    assert project_with_data.documents.filter(status=Document.Status.PARSED).count() == 3
    assert build.steps.get(name="parse").metrics["newly_read"] == 3


def test_a_build_past_its_time_limit_times_out_and_resumes_from_the_page(
    project_with_data, owner, owner_client, settings, django_capture_on_commit_callbacks
):
    settings.BUILD_TIME_LIMIT = 0  # the deadline has passed before the first step
    build = build_start(project=project_with_data, user=owner, recipe="check")
    build_run(build_id=build.pk)
    build.refresh_from_db()
    assert build.status == Build.Status.TIMED_OUT and build.is_terminal and build.can_resume
    assert "time limit of 0 seconds" in build.error and "Resume it" in build.error
    assert set(build.steps.values_list("status", flat=True)) == {"pending"}
    page = owner_client.get(build.get_absolute_url()).content.decode()
    assert "Timed out" in page and "Resume build" in page and build.error in page

    settings.BUILD_TIME_LIMIT = 3600
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post(
            reverse("training-build-resume", args=[project_with_data.slug, build.pk])
        )
    assert response.status_code == 302
    build.refresh_from_db()
    assert build.status == Build.Status.SUCCEEDED and not build.error
    assert "Resumed: queued to continue where it stopped." in build.logs.values_list("message", flat=True)
    # Only a timed-out build resumes: a second request changes nothing.
    owner_client.post(reverse("training-build-resume", args=[project_with_data.slug, build.pk]))
    build.refresh_from_db()
    assert build.status == Build.Status.SUCCEEDED


def test_disk_full_and_out_of_memory_errors_say_what_to_do() -> None:
    import errno

    from training.services import _unexpected_error

    step = BuildStep(name="lora")
    full = _unexpected_error(OSError(errno.ENOSPC, "No space left on device"), step)
    assert full.startswith("The disk is full") and "Free some space" in full
    # Wrapped by a library that keeps only the text (safetensors).
    wrapped = _unexpected_error(RuntimeError("IoError: No space left on device (os error 28)"), step)
    assert wrapped.startswith("The disk is full")
    memory = _unexpected_error(
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 1 GB"), step
    )
    assert "ran out of memory" in memory and "smaller base model" in memory
    assert "ran out of memory" in _unexpected_error(MemoryError(), step)
    other = _unexpected_error(KeyError("x"), step)
    assert "unexpected error: KeyError" in other
