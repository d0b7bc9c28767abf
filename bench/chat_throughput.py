"""Chat speed through the whole web stack against llama-cpp-python called directly.

Same GGUF, same prompt (the retrieved passages and the question, assembled by our prompt code),
same sampling, measured side by side in one run with the order alternated, because these
machines are noisy. The web side is gunicorn (the Procfile's gthread workers) serving
/v1/chat/completions as a stream, read with the official `openai` client; the direct side is
`llama_cpp.Llama.create_chat_completion(stream=True)` in this process.

    .venv/bin/python bench/chat_throughput.py [--rounds 8] [--max-tokens 128]

Prints a table and writes bench/results/chat_throughput.{json,txt}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DOCS = {
    "pump.md": "# P-200 pump manual\n\n## Resetting the pump\n\nTo reset the P-200 pump, hold the red RESET "
    "button for five seconds until the status LED blinks green. Then release it and wait ten seconds.\n\n"
    "## Error codes\n\nError E-4021 means the inlet pressure is too low: open the inlet valve fully.\n",
    "vacation.md": "# Vacation policy\n\nEmployees get 25 days of paid vacation per year. Requests go to "
    "your manager at least two weeks ahead. Unused days expire at the end of March.\n",
    "kitchen.md": "# Office kitchen\n\nThe coffee machine is descaled every Friday. Label food in the "
    "fridge with your name; the fridge is emptied on Thursdays.\n",
}
SETUP = """
import json
from django.contrib.auth.models import User
from projects.services import project_create, documents_ingest_paths
from training.services import build_start
from training.models import ModelVersion
from inference.services import api_token_create
from pathlib import Path
user = User.objects.create_user("bench", password="bench-pw-123")
project = project_create(name="Bench", owner=user)
documents_ingest_paths(project=project, paths=[Path({docs!r})])
build = build_start(project=project, user=user, recipe="rag")
build.refresh_from_db()
assert build.status == "succeeded", build.error
version = ModelVersion.objects.get(build=build)
_, token = api_token_create(user=user, name="bench")
print(json.dumps({{"version": version.pk, "api_id": version.api_id, "token": token}}))
"""
# Short questions, a different one each round so no run reuses the previous prompt's cache.
QUESTIONS = [
    "How do I reset the pump?",
    "What does error E-4021 mean?",
    "How many vacation days do I get?",
    "When is the fridge emptied?",
    "When is the coffee machine descaled?",
    "Who approves vacation requests?",
    "What should I do about low inlet pressure?",
    "Do unused vacation days expire?",
]
CASES = {"short question, 4 passages": 4, "short question, no passages": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(data_dir: Path) -> tuple[dict, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env |= {"DATA_DIR": str(data_dir), "CELERY_TASK_ALWAYS_EAGER": "1", "BUILD_HEARTBEAT_THREAD": "0"}
    docs = data_dir.parent / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    subprocess.run([PY, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    out = subprocess.run(
        [PY, "manage.py", "shell", "-c", SETUP.format(docs=str(docs))],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1]), env


def start_web(env: dict[str, str], port: int) -> subprocess.Popen:
    procfile = (ROOT / "Procfile").read_text().splitlines()
    command = next(line.split(":", 1)[1] for line in procfile if line.startswith("web:"))
    web = subprocess.Popen(
        ["bash", "-c", command], cwd=ROOT, env=env | {"WEB_PORT": str(port)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return web
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("gunicorn did not start")


def timed_stream(chunks) -> dict:  # type: ignore[no-untyped-def]
    """First-token time and decode speed from a stream of text pieces."""
    start = time.perf_counter()
    first = last = None
    pieces = 0
    for text in chunks:
        if not text:
            continue
        now = time.perf_counter()
        first = first or now
        last = now
        pieces += 1
    assert first is not None and last is not None, "no tokens came back"
    decode = last - first
    return {
        "ttft_s": first - start,
        "pieces": pieces,
        "tokens_per_s": (pieces - 1) / decode if decode > 0 and pieces > 1 else 0.0,
    }


def web_run(client, api_id: str, question: str, top_k: int, max_tokens: int) -> dict:  # type: ignore[no-untyped-def]
    stream = client.chat.completions.create(
        model=api_id, messages=[{"role": "user", "content": question}], temperature=0,
        max_tokens=max_tokens, stream=True, extra_body={"top_k": top_k},
    )  # fmt: skip
    return timed_stream(c.choices[0].delta.content for c in stream if c.choices)


def direct_run(llm, messages: list[dict], max_tokens: int) -> dict:  # type: ignore[no-untyped-def]
    stream = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=max_tokens, stream=True)
    return timed_stream(c["choices"][0]["delta"].get("content") for c in stream)


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="slm-chat-bench-"))
    data_dir = tmp / "data"
    load_start = os.getloadavg()
    info, env = prepare(data_dir)

    # The same prompt our stack builds, for the direct side.
    os.environ.update(DATA_DIR=str(data_dir), DJANGO_SETTINGS_MODULE="slmstudio.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    # Our engine module first: it sets the OpenMP wait policy before llama.cpp's library loads,
    # so the direct side runs with the same threading as the web side.
    import llama_cpp
    from openai import OpenAI

    from inference import services
    from inference.engines.llama import _without_extra_buffer_types
    from training.ml.prompt import Passage, build_messages
    from training.models import ModelVersion

    version = ModelVersion.objects.get(pk=info["version"])
    with _without_extra_buffer_types():  # the AMX repack crashes here; see inference/engines/llama.py
        # llama-cpp-python's own thread defaults (half the cores to decode, all to read the
        # prompt), which our engine uses too.
        llm = llama_cpp.Llama(str(version.gguf_file), n_ctx=services.N_CTX, verbose=False)

    def count(messages: list[dict]) -> int:
        return len(llm.tokenize(json.dumps(messages).encode()))  # only to keep within n_ctx

    port = free_port()
    web = start_web(env, port)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=info["token"], max_retries=0, timeout=120)
    results = {}
    try:
        for label, top_k in CASES.items():
            prompts = []
            for question in QUESTIONS:
                hits = services.retrieve(version=version, query=question, k=top_k)
                sources = services.sources_from_hits(hits)
                passages = [Passage(x["n"], x["title"], x["location"], x["text"]) for x in sources]
                messages = build_messages(
                    question, passages, [], count_tokens=count, n_ctx=services.N_CTX,
                    max_new_tokens=args.max_tokens,
                )  # fmt: skip
                prompts.append((question, messages))
            for _ in range(2 * int(env.get("WEB_WORKERS", "2"))):  # load every web worker's model
                web_run(client, info["api_id"], "Hello?", top_k, 4)
            direct_run(llm, [{"role": "user", "content": "Hello?"}], 4)
            web_runs: list[dict] = []
            direct_runs: list[dict] = []
            for r in range(args.rounds):
                question, messages = prompts[r % len(prompts)]
                # Alternate which side goes first, so drift in machine load hits both alike.
                for side in ("web", "direct") if r % 2 == 0 else ("direct", "web"):
                    if side == "web":
                        web_runs.append(web_run(client, info["api_id"], question, top_k, args.max_tokens))
                    else:
                        direct_runs.append(direct_run(llm, messages, args.max_tokens))
            web_tps, direct_tps = median_of(web_runs, "tokens_per_s"), median_of(direct_runs, "tokens_per_s")
            results[label] = {
                "prompt_tokens_median": statistics.median(
                    sum(len(llm.tokenize(m["content"].encode())) for m in messages) for _, messages in prompts
                ),
                "web": {"ttft_s": median_of(web_runs, "ttft_s"), "tokens_per_s": web_tps, "runs": web_runs},
                "direct": {
                    "ttft_s": median_of(direct_runs, "ttft_s"),
                    "tokens_per_s": direct_tps,
                    "runs": direct_runs,
                },
                "throughput_ratio_web_over_direct": web_tps / direct_tps if direct_tps else None,
            }
    finally:
        os.killpg(web.pid, 15)
        web.wait(timeout=20)
        llm.close()
        shutil.rmtree(tmp, ignore_errors=True)

    report = {
        "machine": {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "results": results,
    }
    lines = [
        f"Chat speed, web stack (gunicorn gthread, /v1 stream) vs llama-cpp-python direct; "
        f"median of {args.rounds} alternated rounds, {args.max_tokens} new tokens, "
        f"load {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
        f"{'case':32} {'web TTFT':>9} {'direct TTFT':>12} {'web tok/s':>10} {'direct tok/s':>13} {'web/direct':>11}",
    ]
    for label, r in results.items():
        lines.append(
            f"{label:32} {r['web']['ttft_s']:>8.2f}s {r['direct']['ttft_s']:>11.2f}s "
            f"{r['web']['tokens_per_s']:>10.1f} {r['direct']['tokens_per_s']:>13.1f} "
            f"{r['throughput_ratio_web_over_direct']:>11.2f}"
        )
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "chat_throughput.json").write_text(json.dumps(report, indent=2))
    (out / "chat_throughput.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
