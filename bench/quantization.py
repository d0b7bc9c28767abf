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
IMATRIX_TYPES = ("q5_k_m", "q4_k_m", "q4_0")
# llama.cpp's own numbers (tools/quantize QUANT_OPTIONS, Llama-3-8B, WikiText-2, ctx 512): perplexity
# added over F16 (F16 6.2332) and bits per weight of Llama-3.1-8B; see anchors-techniques.md A3.
PUBLISHED = {
    "f16": {"bpw": 16.0, "dppl": 0.0},
    "q8_0": {"bpw": 8.50, "dppl": 0.0026},
    "q5_k_m": {"bpw": 5.70, "dppl": 0.0569},
    "q4_k_m": {"bpw": 4.89, "dppl": 0.1754},
    "q4_0": {"bpw": None, "dppl": 0.4685},
    "q4_k_m+imatrix": {"bpw": 4.89, "dppl": 0.1513},
}
PUBLISHED_F16_PPL = 6.2332


def faq_texts() -> tuple[str, list[str], list[str], list[str]]:
    """(evaluation text, its pages, calibration texts, their pages): alternate pages, so the
    importance matrix never sees the text the models are scored on."""
    from projects.parsing import parse_file

    pages = sorted(FAQ_DIR.glob("*.en.html"))
    if not pages:
        sys.exit("The Debian FAQ is missing: apt-get install debian-faq")
    texts = [parse_file(page, page.name).text for page in pages]
    evaluation, calibration = texts[1::2], texts[0::2]
    return "\n\n".join(evaluation), [p.name for p in pages[1::2]], calibration, [p.name for p in pages[0::2]]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384, help="tokens of FAQ text scored per model")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved speed rounds (median)")
    parser.add_argument(
        "--imatrix-tokens", type=int, default=4096, help="calibration tokens (the app's default)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from training.ml import evaluate, gguf_convert, quantize
    from training.ml.base_models import dequantize_gguf_to_hf, load_causal_lm
    from training.ml.bundled import bundled_llm_gguf

    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    text, eval_pages, calibration, calibration_pages = faq_texts()
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
        started = time.perf_counter()
        model, tokenizer = load_causal_lm(hf)
        imatrix = quantize.compute_imatrix(model, tokenizer, calibration, max_tokens=args.imatrix_tokens)
        del model
        imatrix_s = time.perf_counter() - started
        quant_s = {}
        fallbacks = {}
        for qtype in TYPES + tuple(f"{t}+imatrix" for t in IMATRIX_TYPES):
            files[qtype] = work / f"model-{qtype}.gguf"
            plain = qtype.removesuffix("+imatrix")
            result = quantize.quantize_gguf(
                files["f16"], files[qtype], plain, imatrix=imatrix if qtype != plain else None
            )
            quant_s[qtype], fallbacks[qtype] = result.seconds, result.fallback_tensors
        say(
            f"SmolLM2-135M-Instruct (bundled Q4_1 {bundled.stat().st_size / 1e6:.1f} MB) dequantized in "
            f"{dequant_s:.1f} s, converted to F16 in {convert_s:.1f} s; quantized: "
            + ", ".join(f"{t} {s:.1f} s" for t, s in quant_s.items())
        )
        say(
            f"importance matrix: {args.imatrix_tokens} tokens of the calibration pages ({', '.join(calibration_pages)}) "
            f"in {imatrix_s:.1f} s; models are scored on the other pages ({', '.join(eval_pages)})"
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

        # Speed depends on the type, not on the imatrix: only the plain files are timed. Two thread
        # settings: the chat engine's (half the cores decode, so the web server keeps one) and all
        # cores (llama-bench's default, how llama.cpp's own tables are made).
        cores = os.cpu_count() or 1
        timed = ["f16", *TYPES]
        speeds: dict[tuple[str, str], list[evaluate.SpeedResult]] = {}
        for round_ in range(args.repeats):
            order = timed if round_ % 2 == 0 else list(reversed(timed))
            for name in order:
                for setting, threads in (("engine", None), ("all", cores)):
                    speeds.setdefault((name, setting), []).append(
                        evaluate.measure_speed(
                            files[name], prompt_tokens=128, gen_tokens=128, threads=threads
                        )
                    )
            say(
                f"speed round {round_ + 1}/{args.repeats} ({' → '.join(order)}): load {os.getloadavg()[0]:.2f}"
            )

        def med(name: str, setting: str, field: str) -> float:
            return statistics.median(
                getattr(r, field) for r in speeds[(name.removesuffix("+imatrix"), setting)]
            )

        rows = []
        f16 = scores["f16"]
        f16_size = files["f16"].stat().st_size
        for name, path in files.items():
            bpw, types = quantize.gguf_bits_per_weight(path)
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
                    "gen_tps_engine": round(med(name, "engine", "tokens_per_second"), 1),
                    "gen_speedup_engine": round(
                        med(name, "engine", "tokens_per_second") / med("f16", "engine", "tokens_per_second"),
                        2,
                    ),
                    "gen_tps_all": round(med(name, "all", "tokens_per_second"), 1),
                    "gen_speedup_all": round(
                        med(name, "all", "tokens_per_second") / med("f16", "all", "tokens_per_second"), 2
                    ),
                    "prompt_tps_all": round(med(name, "all", "prompt_tokens_per_second"), 1),
                    "peak_memory_mb": round(
                        max(r.peak_memory_bytes for r in speeds[(name.removesuffix("+imatrix"), "engine")])
                        / 1e6,
                        1,
                    ),
                }
            )

    say()
    say(
        f"Debian FAQ text, {f16.tokens} tokens scored per model (ctx 512 windows), bits per byte F16 "
        f"{f16.bits_per_byte:.4f}. Generation: 128 tokens after a 128-token prompt, median of {args.repeats}; "
        f"'1 thr' = the chat engine's setting on this machine (half the cores), 'all' = {cores} threads."
    )
    header = (
        f"{'type':<15} {'MB':>6} {'×F16':>6} {'bpw':>5} {'ppl':>8} {'Δppl %':>7} {'KL':>7} {'top1':>5} "
        f"{'gen 1thr':>8} {'×F16':>5} {'gen all':>7} {'×F16':>5} {'mem MB':>6} | llama.cpp L3-8B Δppl %"
    )
    say(header)
    say("-" * len(header))
    for r in rows:
        pub = PUBLISHED.get(r["type"])
        pub_pct = "–" if pub is None else f"{100 * pub['dppl'] / PUBLISHED_F16_PPL:+.2f}"
        kl = "–" if r["kl_divergence"] is None else f"{r['kl_divergence']:.4f}"
        top1 = "–" if r["top1_agreement"] is None else f"{r['top1_agreement']:.3f}"
        say(
            f"{r['type']:<15} {r['size_mb']:>6.1f} {r['size_ratio']:>6.3f} {r['bits_per_weight']:>5.2f} "
            f"{r['perplexity']:>8.3f} {r['ppl_delta_pct']:>+7.2f} {kl:>7} {top1:>5} {r['gen_tps_engine']:>8.1f} "
            f"{r['gen_speedup_engine']:>5.2f} {r['gen_tps_all']:>7.1f} {r['gen_speedup_all']:>5.2f} "
            f"{r['peak_memory_mb']:>6.1f} | {pub_pct}"
        )
    by = {r["type"]: r for r in rows}
    q4 = by["q4_k_m"]
    q4i = by["q4_k_m+imatrix"]
    say()
    checks = [
        (
            "Q8_0 perplexity within 0.5% of F16",
            abs(by["q8_0"]["ppl_delta_pct"]) <= 0.5,
            f"{by['q8_0']['ppl_delta_pct']:+.3f}%",
        ),
        ("Q4_K_M perplexity within 5% of F16", abs(q4["ppl_delta_pct"]) <= 5, f"{q4['ppl_delta_pct']:+.3f}%"),
        (
            "Q4_K_M with importance matrix within 5%",
            abs(q4i["ppl_delta_pct"]) <= 5,
            f"{q4i['ppl_delta_pct']:+.3f}%",
        ),
        ("Q4_K_M at most 40% of F16's size", q4["size_ratio"] <= 0.40, f"{q4['size_ratio']:.3f}"),
        (
            "Q4_K_M at least 1.5x F16's generation speed, all cores",
            q4["gen_speedup_all"] >= 1.5,
            f"{q4['gen_speedup_all']:.2f}x",
        ),
        (
            "Q4_K_M at least 1.5x F16's generation speed, the engine's threads",
            q4["gen_speedup_engine"] >= 1.5,
            f"{q4['gen_speedup_engine']:.2f}x",
        ),
    ]
    for label, ok, value in checks:
        say(f"{label}: {value} — {'MET' if ok else 'NOT MET'}")
    say(f"Q4_K_M tensor types: {q4['tensor_types']} ({q4['fallback_tensors']} fell back)")
    say(f"Q5_K_M tensor types: {by['q5_k_m']['tensor_types']} ({by['q5_k_m']['fallback_tensors']} fell back)")
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
