"""Tiny random Llama models for unit tests: seconds to build, no download, no bundled file.

The tokenizer is a byte-level BPE (the GPT-2 family SmolLM2 belongs to) trained here on a few
sentences, with ChatML special tokens and SmolLM2's chat template, so converters and chat code
see the same kinds of files a real model folder holds.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = [
    "To reset the P-200 pump, hold the red RESET button for five seconds.",
    "Error E-4021 means the inlet pressure is too low: open the inlet valve fully.",
    "Employees get 25 days of paid vacation per year; requests go to your manager.",
    "Backups are kept for thirty days. Administrators reset forgotten passwords.",
    "Grüße aus Köln — naïve café, 東京, emoji 🙂, tabs\tand\nnewlines.",
    "def main():\n    return 42  # code has indentation and symbols {}[]()<>",
]


def make_tokenizer(out_dir: Path, *, vocab_size: int = 400):
    """Train and save a byte-level BPE tokenizer; returns the PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def make_tiny_llama(
    out_dir: Path,
    *,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> Path:
    """A random LlamaForCausalLM (fp32 safetensors) with the tiny tokenizer, saved to out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    # Random init is near-uniform; larger weights give peaked, distinguishable distributions.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
