"""Training checkpoints under faults: a kill while a checkpoint is being written, and a checkpoint
that went bad afterwards, both end in the same adapter as a run that was never interrupted.

The training runs in real processes (killed with SIGKILL at moments chosen from the steps they
print), on a tiny random Llama, with a checkpoint after every step so that kills land in the
middle of writes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tinymodels import make_tiny_llama
from training.ml.lora import Example, LoraSettings, TrainPoint, train_lora

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]

ROOT = Path(__file__).resolve().parents[2]

PAIRS = [
    ("How do I reset the P-200 pump?", "Hold the red RESET button for five seconds."),
    ("What does error E-4021 mean?", "The inlet pressure is too low: open the inlet valve."),
    ("How many vacation days do employees get?", "25 days of paid vacation per year."),
    ("How long are backups kept?", "Backups are kept for thirty days."),
]
EXAMPLES = [Example([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in PAIRS]
# A checkpoint after every step: most of a step's time is spent writing one.
SETTINGS = LoraSettings(
    rank=4, alpha=8, learning_rate=1e-2, epochs=100, max_steps=40, batch_tokens=128, checkpoint_every=1,
    precision="float32",
)  # fmt: skip

# Run as `python -c` in a fresh process: train (resuming from whatever the folder holds) and
# print each finished step, so the test can pick its moment to kill.
_TRAIN = """
import sys
from pathlib import Path
from tests.abuse.test_checkpoints import EXAMPLES, SETTINGS
from training.ml.lora import train_lora
result = train_lora(
    Path(sys.argv[1]), EXAMPLES, [], Path(sys.argv[2]), SETTINGS,
    on_point=lambda point: print(f"step {point.step}", flush=True),
)
print(f"done resumed_from={result.resumed_from}", flush=True)
"""


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("checkpoints") / "base")


def _train_process(base_dir: Path, work: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", _TRAIN, str(base_dir), str(work)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _train_to_the_end(base_dir: Path, work: Path) -> str:
    proc = _train_process(base_dir, work)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def _adapter(work: Path) -> dict[str, torch.Tensor]:
    return load_file(str(work / "adapter" / "adapter_model.safetensors"))


def _same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> bool:
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_kills_during_checkpoint_writes_leave_a_loadable_checkpoint(base_dir: Path, tmp_path: Path) -> None:
    unbroken = tmp_path / "unbroken"
    _train_to_the_end(base_dir, unbroken)

    work = tmp_path / "killed"
    rng = random.Random(7)
    kills = []
    for target in (4, 11, 18, 25, 32):
        proc = _train_process(base_dir, work)
        assert proc.stdout is not None
        seen = None
        for line in proc.stdout:
            if line.startswith("step ") and int(line.split()[1]) >= target:
                seen = int(line.split()[1])
                break
        assert seen is not None, "the training process ended before the kill"
        # A step writes its checkpoint right after it prints; a few milliseconds later the write
        # is usually under way.
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        kills.append(seen)
        complete = sorted((work / "checkpoints").glob("step-*"))
        assert complete, "no checkpoint survived the kill"
        for folder in complete:
            assert {p.name for p in folder.iterdir()} == {
                "trainable.safetensors",
                "optimizer.pt",
                "state.json",
            }

    out = _train_to_the_end(base_dir, work)
    resumed_from = int(out.rsplit("resumed_from=", 1)[1].split()[0])
    assert kills[-1] - 2 <= resumed_from <= kills[-1] + 1, (kills, resumed_from)
    # Nothing half-written was ever resumed from: the result is the uninterrupted run's, bit for bit.
    assert _same(_adapter(work), _adapter(unbroken))


def _crash_at(step: int):  # noqa: ANN202
    def crash(point: TrainPoint) -> None:
        if point.step == step:
            raise RuntimeError("worker lost")

    return crash


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(base_dir: Path, tmp_path: Path) -> None:
    unbroken = train_lora(base_dir, EXAMPLES, [], tmp_path / "unbroken", SETTINGS)

    work = tmp_path / "broken"

    with pytest.raises(RuntimeError, match="worker lost"):
        train_lora(base_dir, EXAMPLES, [], work, SETTINGS, on_point=_crash_at(25))
    kept = sorted((work / "checkpoints").glob("step-*"))
    assert len(kept) == 2, kept
    older, newest = kept
    # The newest checkpoint goes bad after it was written (a disk that filled up, a bad sector).
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])

    resumed = train_lora(base_dir, EXAMPLES, [], work, SETTINGS)
    assert resumed.resumed_from == int(older.name.split("-")[1])
    # The bad one is kept aside for inspection, never read again.
    assert [p.name.startswith(f".unreadable-{newest.name}") for p in (work / "checkpoints").iterdir()].count(
        True
    ) == 1
    assert [p.step for p in resumed.history] == list(range(1, SETTINGS.max_steps + 1))
    assert _same(_adapter(work), load_file(str(unbroken.adapter_dir / "adapter_model.safetensors")))


def test_a_checkpoint_of_another_run_is_still_refused(base_dir: Path, tmp_path: Path) -> None:
    """Falling back covers unreadable checkpoints only: one written for other data or settings
    means the folder is being reused by mistake, and resuming from an older one would hide it."""
    with pytest.raises(RuntimeError, match="lost"):
        train_lora(base_dir, EXAMPLES, [], tmp_path, SETTINGS, on_point=_crash_at(3))
    with pytest.raises(ValueError, match="belongs to a run with other data"):
        train_lora(base_dir, EXAMPLES[:2], [], tmp_path, SETTINGS)
