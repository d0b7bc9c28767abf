"""Quantization of the bundled SmolLM2-135M-Instruct: size, perplexity and speed per GGUF type.

The bundled model is dequantized to safetensors, converted to F16 with our converter, and
quantized with llama.cpp to each type. Every file is then measured the same way, in one run:
perplexity (and KL divergence to F16) on the Debian FAQ text, and prompt / generation speed in a
fresh process, interleaved over --repeats rounds (medians). Ratios against F16 are the headline,
next to llama.cpp's published table for Llama-3-8B (anchors-techniques.md A3).

    .venv/bin/python bench/quantization.py [--tokens 16384] [--repeats 3] [--out bench/results]

Needs the Debian package debian-faq (HTML under /usr/share/doc/debian/FAQ).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAQ_DIR = Path("/usr/share/doc/debian/FAQ")
TYPES = ("q8_0", "q5_k_m", "q4_k_m", "q4_0")
# llama.cpp's own numbers (tools/quantize QUANT_OPTIONS, Llama-3-8B, WikiText-2, ctx 512): perplexity
# added over F16 (F16 6.2332) and bits per weight of Llama-3.1-8B; see anchors-techniques.md A3.
PUBLISHED = {
    "f16": {"bpw": 16.0, "dppl": 0.0},
    "q8_0": {"bpw": 8.50, "dppl": 0.0026},
    "q5_k_m": {"bpw": 5.70, "dppl": 0.0569},
    "q4_k_m": {"bpw": 4.89, "dppl": 0.1754},
    "q4_0": {"bpw": None, "dppl": 0.4685},
}
PUBLISHED_F16_PPL = 6.2332


def faq_text() -> str:
    from projects.parsing import parse_file

    pages = sorted(FAQ_DIR.glob("*.en.html"))
    if not pages:
        sys.exit("The Debian FAQ is missing: apt-get install debian-faq")
    return "\n\n".join(parse_file(page, page.name).text for page in pages)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384, help="tokens of FAQ text scored per model")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved speed rounds (median)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from training.ml import evaluate, gguf_convert, quantize
    from training.ml.base_models import dequantize_gguf_to_hf
    from training.ml.bundled import bundled_llm_gguf

    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    text = faq_text()
    bundled = bundled_llm_gguf().path
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        hf = dequantize_gguf_to_hf(bundled, work / "hf")
        dequant_s = time.perf_counter() - started
        files = {"f16": work / "model-f16.gguf"}
        started = time.perf_counter()
        gguf_convert.convert_hf_to_gguf(hf, files["f16"], out_type="f16")
        convert_s = time.perf_counter() - started
        quant_s = {}
        fallbacks = {}
        for qtype in TYPES:
            files[qtype] = work / f"model-{qtype}.gguf"
            result = quantize.quantize_gguf(files["f16"], files[qtype], qtype)
            quant_s[qtype], fallbacks[qtype] = result.seconds, result.fallback_tensors
        say(
            f"SmolLM2-135M-Instruct (bundled Q4_1 {bundled.stat().st_size / 1e6:.1f} MB) dequantized in "
            f"{dequant_s:.1f} s, converted to F16 in {convert_s:.1f} s; quantized: "
            + ", ".join(f"{t} {s:.1f} s" for t, s in quant_s.items())
        )
        say(
            "Note: the offline base is itself a Q4_1 file, so 'F16' holds Q4_1 values exactly; the types "
            "below re-quantize those values. Losses are measured against that F16."
        )

        scores = {}
        for name, path in files.items():
            reference = None if name == "f16" else files["f16"]
            scores[name] = evaluate.score_text(path, text, reference=reference, max_tokens=args.tokens)
            say(f"scored {name}: {scores[name].tokens} tokens in {scores[name].seconds:.1f} s")

        speeds: dict[str, list[evaluate.SpeedResult]] = {name: [] for name in files}
        for round_ in range(args.repeats):
            order = list(files) if round_ % 2 == 0 else list(reversed(files))
            for name in order:
                speeds[name].append(evaluate.measure_speed(files[name], prompt_tokens=128, gen_tokens=128))
            say(
                f"speed round {round_ + 1}/{args.repeats} ({' → '.join(order)}): load {os.getloadavg()[0]:.2f}"
            )

        rows = []
        f16 = scores["f16"]
        f16_size = files["f16"].stat().st_size
        f16_gen = statistics.median(s.tokens_per_second for s in speeds["f16"])
        f16_prompt = statistics.median(s.prompt_tokens_per_second for s in speeds["f16"])
        for name, path in files.items():
            bpw, types = quantize.gguf_bits_per_weight(path)
            gen = statistics.median(s.tokens_per_second for s in speeds[name])
            prompt = statistics.median(s.prompt_tokens_per_second for s in speeds[name])
            rows.append(
                {
                    "type": name,
                    "size_mb": round(path.stat().st_size / 1e6, 1),
                    "size_ratio": round(path.stat().st_size / f16_size, 3),
                    "bits_per_weight": round(bpw, 2),
                    "tensor_types": types,
                    "fallback_tensors": fallbacks.get(name, 0),
                    "perplexity": round(scores[name].perplexity, 4),
                    "ppl_delta_pct": round(100 * (scores[name].perplexity / f16.perplexity - 1), 3),
                    "kl_divergence": scores[name].kl_divergence,
                    "top1_agreement": scores[name].top1_agreement,
                    "gen_tps": round(gen, 1),
                    "gen_speedup": round(gen / f16_gen, 2),
                    "prompt_tps": round(prompt, 1),
                    "prompt_speedup": round(prompt / f16_prompt, 2),
                    "gen_tps_runs": [round(s.tokens_per_second, 1) for s in speeds[name]],
                    "peak_memory_mb": round(max(s.peak_memory_bytes for s in speeds[name]) / 1e6, 1),
                }
            )

    say()
    say(
        f"Debian FAQ text, {f16.tokens} tokens scored per model (ctx 512 windows), bits per byte F16 {f16.bits_per_byte:.4f}"
    )
    header = (
        f"{'type':<7} {'MB':>7} {'×F16':>6} {'bpw':>6} {'ppl':>9} {'Δppl %':>8} {'KL':>8} {'top1':>6} "
        f"{'gen t/s':>8} {'×F16':>6} {'prompt':>7} {'×F16':>6} {'mem MB':>7} | llama.cpp L3-8B: bpw, Δppl %"
    )
    say(header)
    say("-" * len(header))
    for r in rows:
        pub = PUBLISHED[r["type"]]
        pub_pct = 100 * pub["dppl"] / PUBLISHED_F16_PPL
        kl = "–" if r["kl_divergence"] is None else f"{r['kl_divergence']:.4f}"
        top1 = "–" if r["top1_agreement"] is None else f"{r['top1_agreement']:.3f}"
        say(
            f"{r['type']:<7} {r['size_mb']:>7.1f} {r['size_ratio']:>6.3f} {r['bits_per_weight']:>6.2f} "
            f"{r['perplexity']:>9.4f} {r['ppl_delta_pct']:>+8.3f} {kl:>8} {top1:>6} {r['gen_tps']:>8.1f} "
            f"{r['gen_speedup']:>6.2f} {r['prompt_tps']:>7.1f} {r['prompt_speedup']:>6.2f} {r['peak_memory_mb']:>7.1f}"
            f" | {pub['bpw'] if pub['bpw'] else '–'}, {pub_pct:+.2f}"
        )
    by = {r["type"]: r for r in rows}
    say()
    checks = [
        (
            "Q8_0 perplexity within 0.5% of F16",
            abs(by["q8_0"]["ppl_delta_pct"]) <= 0.5,
            f"{by['q8_0']['ppl_delta_pct']:+.3f}%",
        ),
        (
            "Q4_K_M perplexity within 5% of F16",
            abs(by["q4_k_m"]["ppl_delta_pct"]) <= 5,
            f"{by['q4_k_m']['ppl_delta_pct']:+.3f}%",
        ),
        (
            "Q4_K_M at most 40% of F16's size",
            by["q4_k_m"]["size_ratio"] <= 0.40,
            f"{by['q4_k_m']['size_ratio']:.3f}",
        ),
        (
            "Q4_K_M at least 1.5x F16's generation speed",
            by["q4_k_m"]["gen_speedup"] >= 1.5,
            f"{by['q4_k_m']['gen_speedup']:.2f}x",
        ),
    ]
    for label, ok, value in checks:
        say(f"{label}: {value} — {'MET' if ok else 'NOT MET'}")
    say(f"Q4_K_M tensor types: {by['q4_k_m']['tensor_types']} ({by['q4_k_m']['fallback_tensors']} fell back)")
    say(f"machine: {os.cpu_count()} cpus, load average {os.getloadavg()}")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantization.txt").write_text("\n".join(lines) + "\n")
    (args.out / "quantization.json").write_text(
        json.dumps(
            {"rows": rows, "tokens": f16.tokens, "checks": [(c[0], c[1], c[2]) for c in checks]}, indent=2
        )
        + "\n"
    )
    print(f"wrote {args.out / 'quantization.txt'} and .json")


if __name__ == "__main__":
    main()
