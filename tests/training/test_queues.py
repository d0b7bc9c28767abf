"""Queue routing: steps prefer the cpu or gpu queue, a build moves between them, work for a queue
no live worker consumes falls back to the other, and only the newest dispatch claims a build."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from ops import queues
from ops.models import Worker
from projects.services import document_add, pair_create
from training import steps as steps_module
from training.models import Build
from training.services import build_run, build_start, builds_reroute_stranded
from training.wizard import estimate, machine

pytestmark = pytest.mark.django_db


@pytest.fixture
def project_with_data(project):  # type: ignore[no-untyped-def]
    document_add(
        project=project, stream=SimpleUploadedFile("n.md", b"# Note\n\nBody."), name="n.md", size=None
    )
    pair_create(project=project, instruction="Q", input="", response="A")
    return project


def _worker(
    name: str, queue_names: list[str], *, gpu: str | None = None, cores: int = 2, seen_ago: float = 0
):
    now = timezone.now()
    return Worker.objects.create(
        name=name, host=name.partition("@")[2] or "h", pid=1, queues=queue_names,
        hardware={"cores": cores, "memory_bytes": 8 << 30, "gpu": gpu, "gpu_memory_bytes": None},
        started_at=now, last_seen=now - timedelta(seconds=seen_ago),
    )  # fmt: skip


@pytest.fixture
def as_worker(monkeypatch):  # type: ignore[no-untyped-def]
    """Run build_run as a worker consuming the given queues (what `celery -Q` sets at start)."""

    def consume(*names: str) -> None:
        monkeypatch.setattr(queues, "_consumed", frozenset(names))
        monkeypatch.setattr(queues, "_node", f"{names[0]}@test")

    return consume


@pytest.fixture
def gpu_step(monkeypatch):  # type: ignore[no-untyped-def]
    ran: list[str | None] = []

    def train(ctx):  # type: ignore[no-untyped-def]
        ran.append(queues.node_name())
        return {"trained": True}

    monkeypatch.setitem(steps_module.STEP_RUNNERS, "train_x", train)
    monkeypatch.setitem(steps_module.STEP_QUEUES, "train_x", queues.GPU)
    return ran


def test_route_prefers_the_queue_and_falls_back_to_one_someone_consumes():
    assert queues.route("gpu", {"cpu", "gpu"}) == "gpu"
    assert queues.route("gpu", {"cpu"}) == "cpu"  # no GPU worker: train on the CPU workers
    assert queues.route("cpu", {"gpu"}) == "gpu"  # only a GPU worker: it does everything
    assert queues.route("cpu", {"cpu", "gpu"}) == "cpu"
    assert queues.route("gpu", set()) == "cpu"  # nobody yet: the queue every installation has


def test_a_queue_counts_while_its_worker_is_alive_or_only_briefly_gone(settings):
    settings.QUEUE_FALLBACK_SECONDS = 600
    _worker("cpu@a", ["cpu"])
    _worker("gpu@b", ["gpu"], gpu="H200", seen_ago=10_000)  # stopped answering long ago
    assert queues.served_queues() == {"cpu"}
    Worker.objects.filter(name="gpu@b").update(last_seen=timezone.now())
    assert queues.served_queues() == {"cpu", "gpu"}
    # Signed off a minute ago (a restart): still counted, so training waits for it ...
    Worker.objects.filter(name="gpu@b").update(stopped_at=timezone.now() - timedelta(minutes=1))
    assert queues.served_queues() == {"cpu", "gpu"} and queues.route("gpu") == "gpu"
    # ... but not once it has been gone longer than QUEUE_FALLBACK_SECONDS.
    Worker.objects.filter(name="gpu@b").update(stopped_at=timezone.now() - timedelta(minutes=11))
    assert queues.served_queues() == {"cpu"} and queues.route("gpu") == "cpu"
    # Silent (killed on another host) for a minute: counted; long ago: not.
    Worker.objects.filter(name="gpu@b").update(
        stopped_at=None, last_seen=timezone.now() - timedelta(minutes=3)
    )
    assert "gpu" in queues.served_queues()
    settings.QUEUE_FALLBACK_SECONDS = 0
    assert queues.served_queues() == {"cpu"}


def test_a_build_moves_to_the_gpu_queue_for_training_and_back(
    project_with_data, owner, as_worker, gpu_step, client
):
    _worker("cpu@a", ["cpu"])
    _worker("gpu@b", ["gpu"], gpu="H200")
    build = build_start(
        project=project_with_data,
        user=owner,
        steps=[{"name": "parse"}, {"name": "train_x"}, {"name": "validate"}],
    )
    assert (build.queue, len(build.dispatch_token)) == ("cpu", 32)

    as_worker("cpu")
    build_run(build_id=build.pk, token=build.dispatch_token)
    build.refresh_from_db()
    assert (build.status, build.queue, build.attempts, build.claimed_by) == ("queued", "gpu", 0, "")
    assert [s.status for s in build.steps.order_by("index")] == ["succeeded", "pending", "pending"]
    assert build.steps.get(name="parse").worker == "cpu@test"
    gpu_token = build.dispatch_token
    client.force_login(owner)
    page = client.get(build.get_absolute_url()).content.decode()
    assert "Waiting for a GPU worker to pick it up." in page and "· cpu@test" in page

    as_worker("gpu")
    build_run(build_id=build.pk, token=gpu_token)
    build.refresh_from_db()
    assert (build.status, build.queue) == ("queued", "cpu")
    assert gpu_step == ["gpu@test"]
    assert build.steps.get(name="train_x").hardware == {"cores": machine_cores(), "gpu": None}

    as_worker("cpu")
    build_run(build_id=build.pk, token=build.dispatch_token)
    build.refresh_from_db()
    assert build.status == "succeeded" and build.attempts == 1, build.error
    assert gpu_step == ["gpu@test"]  # the training ran once
    logs = list(build.logs.values_list("message", flat=True))
    assert any("handed over to the gpu queue" in m for m in logs)
    assert any("handed over to the cpu queue" in m for m in logs)
    assert logs.count("Build started.") == 1
    page = client.get(build.get_absolute_url()).content.decode()
    assert page.count("· cpu@test") == 2 and page.count("· gpu@test") == 1


def machine_cores() -> int:
    from ops.hardware import machine as here

    return here()["cores"]


def test_without_gpu_workers_training_stays_on_the_cpu_workers(project_with_data, owner, as_worker, gpu_step):
    _worker("cpu@a", ["cpu"])
    build = build_start(project=project_with_data, user=owner, steps=[{"name": "parse"}, {"name": "train_x"}])
    as_worker("cpu")
    build_run(build_id=build.pk, token=build.dispatch_token)
    build.refresh_from_db()
    assert build.status == "succeeded" and gpu_step == ["cpu@test"]
    assert not build.logs.filter(message__contains="handed over").exists()


def test_an_old_message_cannot_claim_a_build_sent_again(project_with_data, owner, as_worker, gpu_step):
    _worker("cpu@a", ["cpu"])
    build = build_start(project=project_with_data, user=owner, steps=[{"name": "parse"}])
    stale = build.dispatch_token
    Build.objects.filter(pk=build.pk).update(dispatch_token="f" * 32)  # sent again since
    as_worker("cpu")
    build_run(build_id=build.pk, token=stale)
    build.refresh_from_db()
    assert (build.status, build.attempts) == ("queued", 0)
    build_run(build_id=build.pk, token="f" * 32)
    build.refresh_from_db()
    assert build.status == "succeeded"


def test_a_build_stranded_on_a_queue_nobody_consumes_is_sent_to_one(
    project_with_data, owner, django_capture_on_commit_callbacks, monkeypatch, gpu_step
):
    sent = []
    monkeypatch.setattr(
        "training.tasks.run_build_task.apply_async",
        lambda args, kwargs, queue: sent.append((args[0], kwargs["token"], queue)),
    )
    gpu = _worker("gpu@b", ["gpu"], gpu="H200")
    _worker("cpu@a", ["cpu"])
    with django_capture_on_commit_callbacks(execute=True):
        build = build_start(project=project_with_data, user=owner, steps=[{"name": "train_x"}])
    build.refresh_from_db()
    assert sent[-1] == (build.pk, build.dispatch_token, "gpu") and build.queue == "gpu"
    with django_capture_on_commit_callbacks(execute=True):
        assert builds_reroute_stranded() == []  # its worker is alive
    # The only GPU worker stops (a deploy): within QUEUE_FALLBACK_SECONDS it may come back, and
    # the build waits for it.
    Worker.objects.filter(pk=gpu.pk).update(stopped_at=timezone.now())
    Build.objects.filter(pk=build.pk).update(dispatched_at=timezone.now() - timedelta(hours=1))
    with django_capture_on_commit_callbacks(execute=True):
        assert builds_reroute_stranded() == []
    # It does not come back.
    Worker.objects.filter(pk=gpu.pk).update(stopped_at=timezone.now() - timedelta(minutes=11))
    with django_capture_on_commit_callbacks(execute=True):
        assert builds_reroute_stranded() == [build.pk]
    build.refresh_from_db()
    assert build.queue == "cpu" and sent[-1] == (build.pk, build.dispatch_token, "cpu")
    with django_capture_on_commit_callbacks(execute=True):
        assert builds_reroute_stranded() == []  # once


def test_the_wizard_estimates_on_the_worker_that_will_train(project_with_data):
    for i in range(40):
        pair_create(
            project=project_with_data,
            instruction=f"Question {i} " * 20,
            input="",
            response="An answer. " * 30,
        )
    assert machine()["source"] == "this machine"
    _worker("cpu@small", ["cpu"], cores=2)
    _worker("cpu@big", ["cpu"], cores=16)
    assert (machine()["cores"], machine()["source"]) == (16, "worker cpu@big")
    cpu16 = next(s for s in estimate(project_with_data, "lora")["steps"] if s["step"] == "lora")
    _worker("gpu@b", ["gpu"], gpu="NVIDIA H200", cores=8)
    assert (machine()["gpu"], machine()["source"]) == ("NVIDIA H200", "worker gpu@b")
    on_gpu = estimate(project_with_data, "lora")
    assert on_gpu["hardware"]["gpu"] == "NVIDIA H200"
    # 16 cores train 8x the 2-core reference; the GPU worker, with nothing measured on a GPU yet,
    # gets the unscaled reference (an overestimate, never a made-up speed-up).
    gpu_lora = next(s for s in on_gpu["steps"] if s["step"] == "lora")
    assert gpu_lora["seconds"] == pytest.approx(cpu16["seconds"] * 8, rel=0.01)


def test_other_background_work_goes_where_a_worker_consumes_it(project, owner, monkeypatch):
    """Document parsing prefers `cpu`; with only a GPU worker running it goes to `gpu` rather than
    wait in a queue nobody reads."""
    from projects.tasks import parse_document_task

    sent = []
    monkeypatch.setattr(parse_document_task, "apply_async", lambda args, queue: sent.append((args, queue)))
    queues.send(parse_document_task, 7)
    _worker("gpu@b", ["gpu"], gpu="H200")
    queues.send(parse_document_task, 8)
    _worker("cpu@a", ["cpu"])
    queues.send(parse_document_task, 9)
    assert sent == [((7,), "cpu"), ((8,), "gpu"), ((9,), "cpu")]


def test_a_message_the_broker_did_not_take_is_sent_again(
    project_with_data, owner, django_capture_on_commit_callbacks, monkeypatch, gpu_step
):
    from training.services import builds_resend_unsent

    sent, broker_up = [], [False]

    def publish(args, kwargs, queue):  # type: ignore[no-untyped-def]
        if not broker_up[0]:
            raise ConnectionError("Redis is restarting")
        sent.append((args[0], kwargs["token"], queue))

    monkeypatch.setattr("training.tasks.run_build_task.apply_async", publish)
    with django_capture_on_commit_callbacks(execute=True):
        build = build_start(project=project_with_data, user=owner, steps=[{"name": "train_x"}])  # no 500
    build.refresh_from_db()
    assert build.status == "queued" and build.sent_at is None and sent == []
    assert builds_resend_unsent() == []  # not before RESEND_AFTER
    Build.objects.filter(pk=build.pk).update(dispatched_at=timezone.now() - timedelta(minutes=2))
    broker_up[0] = True
    with django_capture_on_commit_callbacks(execute=True):
        assert builds_resend_unsent() == [build.pk]
    build.refresh_from_db()
    assert sent == [(build.pk, build.dispatch_token, "cpu")] and build.sent_at is not None
    with django_capture_on_commit_callbacks(execute=True):
        assert builds_resend_unsent() == []  # taken: not again


def test_builds_queued_before_tokens_existed_are_sent(
    project_with_data, owner, django_capture_on_commit_callbacks, monkeypatch, gpu_step
):
    from training.services import builds_resend_unsent

    sent = []
    monkeypatch.setattr(
        "training.tasks.run_build_task.apply_async", lambda args, kwargs, queue: sent.append(queue)
    )
    build = build_start(project=project_with_data, user=owner, steps=[{"name": "train_x"}])
    # As migration 0008 left a build queued by the previous version (its message in a queue no
    # worker reads any more).
    Build.objects.filter(pk=build.pk).update(
        queue="",
        dispatch_token="",
        dispatched_at=None,
        sent_at=None,
        created_at=timezone.now() - timedelta(hours=1),
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert builds_resend_unsent() == [build.pk]
    assert sent == ["cpu"]


def test_a_build_cancelled_before_its_hand_over_ends_cancelled(project_with_data, owner, as_worker, gpu_step):
    from training.services import build_cancel

    _worker("cpu@a", ["cpu"])
    _worker("gpu@b", ["gpu"], gpu="H200")
    build = build_start(project=project_with_data, user=owner, steps=[{"name": "parse"}, {"name": "train_x"}])
    as_worker("cpu")
    original = steps_module.STEP_RUNNERS["parse"]

    def parse_then_cancel(ctx):  # type: ignore[no-untyped-def]
        metrics = original(ctx)
        build_cancel(build=ctx.build)  # the user presses Cancel as reading ends
        return metrics

    steps_module.STEP_RUNNERS["parse"] = parse_then_cancel
    try:
        build_run(build_id=build.pk, token=build.dispatch_token)
    finally:
        steps_module.STEP_RUNNERS["parse"] = original
    build.refresh_from_db()
    assert (build.status, build.queue) == ("cancelled", "cpu") and gpu_step == []


def test_workers_gone_for_a_week_are_forgotten():
    from ops.services import workers_forget_old

    _worker("cpu@old", ["cpu"], seen_ago=8 * 86400)
    _worker("cpu@new", ["cpu"])
    assert workers_forget_old() == 1
    assert list(Worker.objects.values_list("name", flat=True)) == ["cpu@new"]


def test_a_message_the_broker_lost_after_taking_it_is_sent_again(
    project_with_data, owner, django_capture_on_commit_callbacks, monkeypatch, gpu_step
):
    from ops import broker
    from training.services import builds_resend_unsent

    sent, depth = [], {"cpu": 1, "gpu": 0}
    monkeypatch.setattr(
        "training.tasks.run_build_task.apply_async", lambda args, kwargs, queue: sent.append(queue)
    )
    monkeypatch.setattr(broker, "broker_probe", lambda: broker.BrokerState(True, 0.01, dict(depth)))
    _worker("cpu@a", ["cpu"])
    with django_capture_on_commit_callbacks(execute=True):
        build = build_start(project=project_with_data, user=owner, steps=[{"name": "train_x"}])
    assert sent == ["cpu"]
    Build.objects.filter(pk=build.pk).update(sent_at=timezone.now() - timedelta(minutes=10))
    # Its queue still holds a message (behind a long build): waiting, not lost.
    with django_capture_on_commit_callbacks(execute=True):
        assert builds_resend_unsent() == []
    # The broker came back empty (restarted without its data).
    depth["cpu"] = 0
    with django_capture_on_commit_callbacks(execute=True):
        assert builds_resend_unsent() == [build.pk]
    assert sent == ["cpu", "cpu"]
