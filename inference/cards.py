"""What goes with a downloaded model: its file name, an Ollama Modelfile, llama.cpp command lines
and a Markdown model card with the measured numbers."""

from __future__ import annotations

from django.utils import timezone

from training.ml.prompt import SYSTEM_PROMPT
from training.models import ModelVersion
from training.recipes import QUANTIZE_TYPES, recipe_label

from .services import N_CTX, ChatSettings


def gguf_filename(version: ModelVersion) -> str:
    suffix = f"-{version.quant_type}" if version.quant_type else ""
    return f"{version.project.slug}-v{version.number}{suffix}.gguf"


def _is_chatml(version: ModelVersion) -> bool:
    """Whether the GGUF's own chat template is ChatML (SmolLM2's), read from its metadata."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(version.gguf_file)).fields.get("tokenizer.chat_template")
    except (OSError, ValueError):  # the file is gone or unreadable: say nothing about its template
        return False
    if field is None:
        return False
    return "<|im_start|>" in bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def ollama_modelfile(version: ModelVersion) -> str:
    """A Modelfile next to the downloaded GGUF: `ollama create NAME -f Modelfile`."""
    lines = [
        f"# {version.name} — built with SLM Studio ({recipe_label(version.recipe)})",
        f"# Put this file next to {gguf_filename(version)}, then: ollama create {version.project.slug}-v{version.number} -f Modelfile",
        f"FROM ./{gguf_filename(version)}",
    ]
    if _is_chatml(version):
        # Spelled out rather than left to Ollama's guess from the GGUF metadata.
        lines += [
            'TEMPLATE """{{- if .System }}<|im_start|>system',
            "{{ .System }}<|im_end|>",
            "{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}",
            "{{ .Content }}<|im_end|>",
            "{{ end }}<|im_start|>assistant",
            '"""',
            'PARAMETER stop "<|im_end|>"',
        ]
    lines += [
        f"PARAMETER temperature {ChatSettings.temperature}",
        f"PARAMETER num_ctx {N_CTX}",
    ]
    if version.index_dir:
        lines += [
            "# This model was built to answer from retrieved passages. Ollama does no retrieval:",
            "# put passages in the message yourself, or use SLM Studio's API, which retrieves for you.",
            f'SYSTEM """{SYSTEM_PROMPT}"""',
        ]
    return "\n".join(lines) + "\n"


def llama_cpp_commands(version: ModelVersion) -> dict[str, str]:
    name = gguf_filename(version)
    return {
        "chat": f"llama-cli -m {name} -cnv -c {N_CTX} --temp {ChatSettings.temperature}",
        "server": f"llama-server -m {name} -c {N_CTX} --port 8080",
    }


def _number(value: object, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def model_card(version: ModelVersion) -> str:
    """The version's model card in Markdown: what it is, how it was made, what was measured."""
    m = version.evaluation
    base = version.base
    info = base.info if base else {}
    quant = version.metrics.get("quantize", {})
    rag = version.metrics.get("rag", {})
    lines = [
        f"# {version.name}",
        "",
        f"Built with SLM Studio on {timezone.localtime(version.created_at):%Y-%m-%d %H:%M} "
        f"from **{base.name if base else version.base_model}**: {recipe_label(version.recipe).lower()}.",
        "",
        "## Model",
        "",
        "| | |",
        "| --- | --- |",
        f"| Base model | {base.name if base else version.base_model} |",
        f"| Architecture | {info.get('architecture', '–')} |",
        f"| Parameters | {_number(info.get('parameters'), ',')} |",
        f"| Context length | {_number(info.get('context_length'), ',')} (served with {N_CTX}) |",
        f"| Format | GGUF {QUANTIZE_TYPES.get(version.quant_type, version.quant_type.upper())} |",
        f"| File | `{gguf_filename(version)}`, {_number(m.get('size_bytes'), ',')} bytes |",
        f"| Bits per weight (measured) | {_number(m.get('bits_per_weight'), '.2f')} |",
    ]
    if quant.get("fallback_tensors"):
        lines.append(
            f"| Note | {quant['fallback_tensors']} tensors could not use the requested type "
            "(their rows are not a multiple of 256) and fell back to another |"
        )
    if rag:
        lines.append(
            f"| Retrieval | {rag.get('chunks', '–')} passages from {rag.get('documents', '–')} documents, "
            f"{rag.get('embedding_model', '')} embeddings + BM25, hybrid fusion |"
        )
    lines += [
        "",
        "## Evaluation",
        "",
        "Measured by SLM Studio on this project's held-out data; every version is measured the same way.",
        "",
        "| Metric | Value | Meaning |",
        "| --- | --- | --- |",
        f"| Perplexity | {_number(m.get('perplexity'), '.3f')} | on {_number(m.get('eval_tokens'), ',')} tokens of "
        f"{'held-out' if m.get('held_out') else 'project'} document text; lower is better |",
        f"| Bits per byte | {_number(m.get('bits_per_byte'), '.4f')} | the same, independent of the tokenizer |",
        f"| KL divergence | {_number(m.get('kl_divergence'), '.5f')} | how far its next-token distribution is "
        "from the unquantized parent's; 0 = identical |",
        f"| Answer F1 | {_number(m.get('answer_f1'), '.3f')} | word overlap with the reference answers of "
        f"{_number(m.get('eval_pairs'), 'd')} held-out instruction pairs |",
        f"| ROUGE-L | {_number(m.get('rouge_l'), '.3f')} | longest common word sequence with the references |",
        f"| Meaning similarity | {_number(m.get('embedding_similarity'), '.3f')} | cosine similarity of answer "
        "and reference embeddings (all-MiniLM-L6-v2) |",
        f"| Generation speed | {_number(m.get('tokens_per_second'), '.1f')} tokens/s | on the server that built it |",
        f"| Prompt reading | {_number(m.get('prompt_tokens_per_second'), '.1f')} tokens/s | |",
        f"| Peak memory | {_number(m.get('peak_memory_bytes'), ',')} bytes | loading and running the model alone |",
        "",
        "## Use it",
        "",
        f"* llama.cpp: `{llama_cpp_commands(version)['chat']}`",
        f"* Ollama: put the Modelfile next to the GGUF and run `ollama create {version.project.slug}-v{version.number} -f Modelfile`",
        f"* SLM Studio API (OpenAI-compatible): model id `{version.api_id}`",
        "",
    ]
    licence = info.get("licence")
    if licence:
        lines += ["## Licence of the base model", "", licence.strip(), ""]
    return "\n".join(lines)
