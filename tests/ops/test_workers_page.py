"""The Workers page: staff only; every registered worker with its queues and hardware, what each
runs now, queue lengths and waiting builds, recent failures; htmx polls its partial."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.utils import timezone

from ops.queues import CPU, GPU
from tests.conftest import client_for
from training.models import Build, BuildStep

from .helpers import add_worker

pytestmark = pytest.mark.django_db

URL = "/ops/workers/"


@pytest.fixture
def staff(db) -> User:  # type: ignore[no-untyped-def]
    return User.objects.create_user("erin", password="pw-erin-123", is_staff=True)


def test_only_staff_may_open_it(client, owner_client, staff):
    assert client.get(URL).status_code == 302  # to the log-in page
    assert owner_client.get(URL).status_code == 404
    assert client_for(staff).get(URL).status_code == 200


def test_the_navigation_links_it_for_staff_only(owner_client, staff):
    assert 'href="/ops/workers/"' not in owner_client.get("/").content.decode()
    assert 'href="/ops/workers/"' in client_for(staff).get("/").content.decode()


def test_it_lists_every_registered_worker_with_its_queues_and_state(staff):
    add_worker("cpu@web-1", [CPU], cores=16, concurrency=3)
    add_worker("gpu@gpu-box", [GPU], gpu="NVIDIA H200", gpu_memory_bytes=141 * 10**9)
    add_worker("old@web-2", [CPU], stopped=True)
    add_worker("lost@web-3", [CPU, GPU], seen_ago=3600)
    page = client_for(staff).get(URL).content.decode()
    for name in ("cpu@web-1", "gpu@gpu-box", "old@web-2", "lost@web-3"):
        assert name in page
    assert "NVIDIA H200 (141.00 GB)" in page and "16 cores" in page and "3 at a time" in page
    assert page.count('class="badge ok">Running<') == 2
    assert ">Stopped<" in page and ">Not responding<" in page
    assert '<span class="badge info">gpu</span>' in page
    # Alive first.
    assert page.index("cpu@web-1") < page.index("old@web-2") and page.index("gpu@gpu-box") < page.index(
        "lost@web-3"
    )


def test_it_shows_what_each_worker_runs_and_what_waits(project, staff, owner):
    add_worker("gpu@gpu-box", [GPU])
    running = Build.objects.create(
        project=project, recipe="lora", status=Build.Status.RUNNING, claimed_by="gpu-box:5151",
        started_at=timezone.now() - timedelta(minutes=3), heartbeat_at=timezone.now(),
    )  # fmt: skip
    BuildStep.objects.create(build=running, index=0, name="base", status="succeeded", worker="cpu@web-1")
    BuildStep.objects.create(
        build=running, index=1, name="lora", status="running", worker="gpu@gpu-box",
        progress_current=30, progress_total=120, message="Step 30 of 120, loss 1.84",
        started_at=timezone.now(),
    )  # fmt: skip
    for _ in range(2):
        Build.objects.create(
            project=project, status=Build.Status.QUEUED, queue=GPU, dispatched_at=timezone.now()
        )
    Build.objects.create(project=project, status=Build.Status.QUEUED, queue=CPU, dispatched_at=timezone.now())
    page = client_for(staff).get(URL).content.decode()
    worker_row = page[page.index("gpu@gpu-box") : page.index("</tr>", page.index("gpu@gpu-box"))]
    assert f"Build #{running.pk}" in worker_row and "lora" in worker_row
    running_table = page[page.index('id="running-title"') : page.index('id="failures-title"')]
    assert "gpu-box:5151" in running_table and "Step 30 of 120, loss 1.84" in running_table
    assert 'value="25"' in running_table  # 30 of 120
    # Staff who are not members of the project get no link to its (404) build page.
    assert f'href="{running.get_absolute_url()}"' not in page
    queues = page[page.index('id="queues-title"') : page.index('id="workers-title"')]
    rows = dict(re.findall(r'<tr><th scope="row" class="row-head">(\w+)</th>(.*?)</tr>', queues, re.S))
    cells = {q: re.findall(r'<td class="num">(\w+)</td>', row) for q, row in rows.items()}
    # Live workers and builds waiting (then the broker's messages, which these rows never sent).
    assert {q: c[:2] for q, c in cells.items()} == {"cpu": ["0", "1"], "gpu": ["1", "2"]}
    # A member of the project (here also staff) gets the link.
    owner.is_staff = True
    owner.save()
    assert f'href="{running.get_absolute_url()}"' in client_for(owner).get(URL).content.decode()


def test_it_lists_recent_failures_with_the_reason_and_the_worker(project, staff):
    failed = Build.objects.create(
        project=project, recipe="rag", status=Build.Status.FAILED, ended_at=timezone.now(),
        error="The embedding model ran out of memory; try fewer documents at once.",
    )  # fmt: skip
    BuildStep.objects.create(build=failed, index=0, name="rag", status="failed", worker="cpu@web-9")
    staff.user_permissions.add(Permission.objects.get(codename="view_build"))
    page = client_for(staff).get(URL).content.decode()
    failures = page[page.index('id="failures-title"') :]
    assert "ran out of memory" in failures and "cpu@web-9" in failures
    # Staff allowed to see builds in the admin are linked there.
    assert f'href="/admin/training/build/{failed.pk}/change/"' in failures


def test_an_empty_installation_says_what_to_do(staff):
    page = client_for(staff).get(URL).content.decode()
    assert "No worker has started yet" in page and "No worker is running" in page
    assert "No build is running." in page and "No build has failed." in page


def test_htmx_polls_the_partial_every_five_seconds(staff):
    add_worker("cpu@web-1", [CPU])
    client = client_for(staff)
    page = client.get(URL).content.decode()
    assert 'hx-get="/ops/workers/"' in page and 'hx-trigger="every 5s' in page and "data-poll-visible" in page
    partial = client.get(URL, HTTP_HX_REQUEST="true").content.decode()
    assert partial.lstrip().startswith('<div id="workers-status"') and "<html" not in partial
    assert "cpu@web-1" in partial
