"""Which queue a piece of work goes to, and which queues this process consumes.

Two queues: `cpu` (parsing, embedding, conversion, quantization, evaluation: work a GPU does not
speed up much) and `gpu` (training, distillation, pruning). A worker consumes what its `-Q` says
(both when it says nothing, as `make run`'s single worker does). Work for a queue no live worker
consumes goes to the other one instead, so an installation without GPU workers trains on its
CPU workers and nothing waits for a worker that does not exist.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_init

CPU, GPU = "cpu", "gpu"
QUEUES = (CPU, GPU)

# Set in a worker's main process before its pool forks (so pool processes inherit it); None
# outside a worker (web, management commands, eager tasks): such a process serves any queue.
_consumed: frozenset[str] | None = None
_node: str | None = None


@worker_init.connect
def _on_worker_init(sender: object, **kwargs: object) -> None:
    global _consumed, _node
    queues = sender.app.amqp.queues  # type: ignore[attr-defined]
    _consumed = frozenset(queues.consume_from or queues)
    _node = sender.hostname  # type: ignore[attr-defined]


def consumed_queues() -> frozenset[str] | None:
    return _consumed


def node_name() -> str | None:
    """This worker's Celery node name ("cpu@host"), None outside a worker."""
    return _node


def serves(queue: str) -> bool:
    """Whether this process may run work routed to `queue` (any, outside a worker)."""
    return _consumed is None or queue in _consumed


def served_queues() -> set[str]:
    """Queues a worker consumes, as the workers announced them: live ones, and those that stopped
    or went silent less than QUEUE_FALLBACK_SECONDS ago. A GPU worker restarting for a deploy
    keeps its queue, so training waits for it instead of moving to the CPU workers for good."""
    from datetime import timedelta

    from django.conf import settings
    from django.db.models import Q
    from django.utils import timezone

    from .models import Worker

    recently = timezone.now() - timedelta(seconds=settings.QUEUE_FALLBACK_SECONDS)
    served: set[str] = set()
    for queues in (
        Worker.objects.alive()
        | Worker.objects.filter(
            Q(stopped_at__gte=recently) | Q(stopped_at__isnull=True, last_seen__gte=recently)
        )
    ).values_list("queues", flat=True):
        served.update(queues)
    return served


def send(task: Any, *args: Any, preferred: str = CPU) -> None:
    """Send a task message (document parsing, pair generation) to the queue a live worker
    consumes: `cpu` work waits forever in the `cpu` queue of an installation whose only worker
    consumes `gpu`."""
    task.apply_async(args=args, queue=route(preferred))


def route(preferred: str, served: set[str] | None = None) -> str:
    """The queue for work that prefers `preferred`: it, unless no live worker consumes it while
    one consumes the other queue. With no worker known at all (before the first one starts),
    `cpu`: every installation has CPU workers, GPU ones only when someone adds them."""
    served = served_queues() if served is None else served
    if preferred in served:
        return preferred
    other = GPU if preferred == CPU else CPU
    return other if other in served else CPU
