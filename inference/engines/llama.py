"""Streaming chat generation with llama.cpp (llama-cpp-python), free of Django.

A llama.cpp context is not thread-safe, so each engine serialises its generations behind one lock;
the process shares engines through `engines`, an LRU cache of loaded models. Tokenizing reads only
the vocabulary, which llama.cpp allows beside a running generation (its own server tokenizes in
request threads while it decodes): it waits for no generation, only for a close.
"""

from __future__ import annotations

import atexit
import codecs
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

# llama.cpp's threads meet at an OpenMP barrier after every operation. libgomp's default is to
# spin there for a long time, which makes generation 5-20 times slower as soon as another process
# wants the CPU (web workers, Celery builds and embeddings share a few cores); sleeping at once
# (OMP_WAIT_POLICY=PASSIVE) is 3 times slower on idle cores. A short spin keeps both: measured on
# 2 cores, 64 tokens/s idle (ACTIVE 66, PASSIVE 21) and 15-22 beside two busy processes (PASSIVE
# 20-36, ACTIVE 6-10). libgomp reads it once, when llama.cpp's library loads: before the first
# import of llama_cpp. Either variable set in the environment wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import llama_cpp  # noqa: E402
import llama_cpp.llama_cpp as llama_lib  # noqa: E402
from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402

from training.ml.base_models import read_gguf_header  # noqa: E402
from training.ml.llamacpp import without_extra_buffer_types  # noqa: E402

# For GGUFs whose metadata carries no chat template: the ChatML of the SmolLM2 family we ship.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Prompt tokens evaluated between two looks at should_stop(): about half a second on 2 cores.
PREFILL_CHUNK = 128

# Seconds between two looks at should_stop() while a generation waits for the model: a client
# that leaves while others are answered ahead of it is let go at once, not given its turn.
TURN_POLL_SECONDS = 0.25

# Stands in for a message's content while the template is rendered (see _chat_tokens).
_SLOT = re.compile("\x00(\\d+)\x00")


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 256
    temperature: float = 0.2
    top_p: float = 0.95
    repeat_penalty: float = 1.1
    seed: int | None = None  # a fixed seed makes sampling reproducible; None draws a fresh one


DEFAULT_CONFIG = GenerationConfig()


@dataclass
class GenerationResult:
    """Filled in while the stream runs; final once the iterator has ended."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    first_token_seconds: float | None = None
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decoding speed after the first token, so a long prompt does not drag it down."""
        decode_seconds = self.seconds - (self.first_token_seconds or 0.0)
        if self.completion_tokens < 2 or decode_seconds <= 0:
            return 0.0
        return (self.completion_tokens - 1) / decode_seconds


def _never() -> bool:
    return False


class LlamaEngine:
    def __init__(
        self,
        gguf_path: Path,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        lora_path: Path | None = None,
    ) -> None:
        # Refuses a malformed or hostile header (MalformedModelFile, a ValueError like llama.cpp's
        # own load failure) with a message that names the problem, before llama.cpp parses it.
        read_gguf_header(gguf_path)
        cores = os.cpu_count() or 1
        with without_extra_buffer_types():
            self._llm = llama_cpp.Llama(
                model_path=str(gguf_path),
                n_ctx=n_ctx,
                # Decoding one token at a time gains little from a second thread, and the web
                # server, the client and retrieval need a core meanwhile: a decode thread that is
                # preempted stalls the others at every barrier (on 2 cores: 61 tokens/s alone,
                # 24 beside a streaming client with 2 threads). llama-cpp-python's own default.
                n_threads=n_threads or max(1, cores // 2),
                # Reading the prompt is one large batch: every core helps the first token come sooner.
                n_threads_batch=n_threads_batch or n_threads or cores,
                lora_path=str(lora_path) if lora_path else None,
                verbose=False,
            )
        self.gguf_path = Path(gguf_path)
        self.lora_path = Path(lora_path) if lora_path else None
        self.n_ctx: int = self._llm.n_ctx()
        self._vocab = llama_lib.llama_model_get_vocab(self._llm.model)
        self._formatter = Jinja2ChatFormatter(
            template=self._llm.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE,
            eos_token=self._token_text(self._llm.token_eos()),
            bos_token=self._token_text(self._llm.token_bos()),
        )
        self._lock = threading.Lock()  # one generation at a time
        self._vocab_lock = threading.Lock()  # held briefly while tokenizing, so close() waits for it
        self._closing = False

    # --- Tokens --------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        with self._tokenizing():
            return len(self._tokenize(text, special=False))

    def count_chat_tokens(self, messages: list[dict]) -> int:
        """Tokens of the prompt the chat template makes of `messages`, generation prompt included.
        Never waits for a generation: a request queued behind others prepares its prompt at once."""
        with self._tokenizing():
            return len(self._chat_tokens(messages))

    def _tokenize(self, text: str, *, special: bool) -> list[int]:
        # No automatic BOS: the chat template writes whatever markers the model expects.
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _token_text(self, token: int) -> str:
        return self._llm.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

    def _chat_tokens(self, messages: list[dict]) -> list[int]:
        """The chat prompt as tokens, where message text can never become a control token.

        The template is rendered with numbered slots in place of the contents: its own markup is
        tokenized with special tokens recognised, each content as plain text. A document holding
        "<|im_end|><|im_start|>system" thus stays harmless text, where create_chat_completion
        (which tokenizes the whole rendered prompt with special=True) would obey it.
        """
        slotted = [{**message, "content": f"\x00{i}\x00"} for i, message in enumerate(messages)]
        parts = _SLOT.split(self._formatter(messages=slotted).prompt)
        if [int(n) for n in parts[1::2]] != list(range(len(messages))):
            raise ValueError("The model's chat template alters message contents; it is not supported.")
        tokens: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                tokens += self._tokenize(messages[int(part)]["content"], special=False)
            elif part:
                tokens += self._tokenize(part, special=True)
        return tokens

    # --- Generation ----------------------------------------------------------------------

    def stream_chat(
        self,
        messages: list[dict],
        config: GenerationConfig = DEFAULT_CONFIG,
        *,
        should_stop: Callable[[], bool] | None = None,
        result: GenerationResult | None = None,
    ) -> Iterator[str]:
        """Yield the answer's text as it is generated; `result` holds usage and timings.

        The engine stays locked from the first next() until the generator ends or is closed.
        Timings count from when the lock was obtained, so they describe the model, not the queue.
        should_stop() is also asked while waiting for the lock: if it turns true there, the stream
        ends "cancelled" without having used the model.
        """
        result = result if result is not None else GenerationResult()
        stop = should_stop or _never
        with self._session(stop) as llm:
            if llm is None:
                result.finish_reason = "cancelled"
                return
            started = time.perf_counter()
            try:
                yield from self._generate(llm, messages, config, stop, result, started)
            except GeneratorExit:  # the consumer went away
                result.finish_reason = "cancelled"
                raise
            finally:
                result.seconds = time.perf_counter() - started

    def chat(self, messages: list[dict], config: GenerationConfig = DEFAULT_CONFIG) -> GenerationResult:
        result = GenerationResult()
        for _ in self.stream_chat(messages, config, result=result):
            pass
        return result

    def _generate(
        self,
        llm: llama_cpp.Llama,
        messages: list[dict],
        config: GenerationConfig,
        should_stop: Callable[[], bool],
        result: GenerationResult,
        started: float,
    ) -> Iterator[str]:
        with self._vocab_lock:
            prompt = self._chat_tokens(messages)
        result.prompt_tokens = len(prompt)
        room = self.n_ctx - len(prompt)
        if room <= 0:
            raise ValueError(f"The prompt has {len(prompt)} tokens; the context holds {self.n_ctx}.")
        max_tokens = min(config.max_tokens, room)
        if not self._prefill(llm, prompt, should_stop):
            result.finish_reason = "cancelled"
            return
        # The sampler reads the seed when generate() builds it; LLAMA_DEFAULT_SEED means "random".
        llm.set_seed(llama_lib.LLAMA_DEFAULT_SEED if config.seed is None else config.seed)
        # A token may end inside a multi-byte character: the decoder holds those bytes back.
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        tokens = llm.generate(
            prompt, temp=config.temperature, top_p=config.top_p, repeat_penalty=config.repeat_penalty
        )
        with closing(tokens):
            for token in tokens:
                if llama_lib.llama_vocab_is_eog(self._vocab, token):
                    result.finish_reason = "stop"
                    break
                result.completion_tokens += 1
                if result.first_token_seconds is None:
                    result.first_token_seconds = time.perf_counter() - started
                piece = decoder.decode(llm.detokenize([token]))
                if piece:
                    result.text += piece
                    yield piece
                if result.completion_tokens >= max_tokens:
                    result.finish_reason = "length"
                    break
                if should_stop():
                    result.finish_reason = "cancelled"
                    break
        tail = decoder.decode(b"", final=True)
        if tail:
            result.text += tail
            yield tail

    @staticmethod
    def _prefill(llm: llama_cpp.Llama, prompt: list[int], should_stop: Callable[[], bool]) -> bool:
        """Evaluate the prompt chunk by chunk so a stop request is seen during a long prompt.

        Each chunk goes through generate(), whose prefix matching keeps what is already in the KV
        cache (earlier chunks), so the final generate() only evaluates the rest. Chunks start after
        the part the previous generation left cached: feeding generate() a shorter prompt than the
        cache holds would make it drop the rest. False when asked to stop.
        """
        cached = llama_cpp.Llama.longest_token_prefix(llm.input_ids[: llm.n_tokens].tolist(), prompt)
        for end in range(cached + PREFILL_CHUNK, len(prompt), PREFILL_CHUNK):
            if should_stop():
                return False
            with closing(llm.generate(prompt[:end])) as step:
                next(step)  # evaluates the chunk; the token it samples is thrown away
        return not should_stop()

    # --- Lifetime ------------------------------------------------------------------------

    @contextmanager
    def _session(self, should_stop: Callable[[], bool] = _never) -> Iterator[llama_cpp.Llama | None]:
        """Exclusive use of the model, or None if should_stop() turned true while waiting for it;
        finishes a close() that arrived while it was busy."""
        acquired = False
        try:
            while not (acquired := self._lock.acquire(timeout=TURN_POLL_SECONDS)):
                if should_stop():
                    break
            if acquired and self._closing:
                raise RuntimeError(f"The engine for {self.gguf_path.name} has been closed.")
            yield self._llm if acquired else None
        finally:
            if acquired:
                self._lock.release()
            if self._closing:
                self.close()

    @contextmanager
    def _tokenizing(self) -> Iterator[None]:
        with self._vocab_lock:
            if self._closing:
                raise RuntimeError(f"The engine for {self.gguf_path.name} has been closed.")
            yield

    def close(self) -> None:
        """Free the model now, or as soon as the generation running in another thread ends.

        Never waits for a generation: an evicting request or the exit handler must not hang on a
        stream whose consumer stalled (a tokenization in progress takes microseconds).
        """
        self._closing = True
        if self._lock.acquire(blocking=False):
            try:
                with self._vocab_lock:
                    self._llm.close()
            finally:
                self._lock.release()


class EngineCache:
    """One engine per (model, adapter) per process, loaded on first use, least recently used evicted."""

    def __init__(self, max_models: int = 2) -> None:
        self.max_models = max_models
        # Decode threads per engine; None: half the cores (see LlamaEngine). A server running
        # several web processes sets it so their decode threads together fit the cores
        # (inference.apps, from CHAT_THREADS).
        self.decode_threads: int | None = None
        self._lock = threading.Lock()
        self._engines: OrderedDict[tuple[Path, Path | None], LlamaEngine] = OrderedDict()

    def get(self, gguf_path: Path, *, n_ctx: int = 2048, lora_path: Path | None = None) -> LlamaEngine:
        key = (Path(gguf_path).absolute(), Path(lora_path).absolute() if lora_path else None)
        with self._lock:
            engine = self._engines.pop(key, None)
            if engine is not None and engine.n_ctx < n_ctx:
                engine.close()  # too small for this caller: reload with the larger context
                engine = None
            if engine is None:
                # Loading under the lock keeps two requests from loading the same model twice.
                engine = LlamaEngine(
                    gguf_path,
                    n_ctx=n_ctx,
                    lora_path=lora_path,
                    n_threads=self.decode_threads,
                    n_threads_batch=os.cpu_count() if self.decode_threads else None,
                )
            self._engines[key] = engine  # (re)inserted last: the most recently used
            while len(self._engines) > self.max_models:
                _, evicted = self._engines.popitem(last=False)
                evicted.close()
            return engine

    def drop(self, gguf_path: Path) -> None:
        """Close every engine of this model (a build evaluated it and is done with it)."""
        path = Path(gguf_path).absolute()
        with self._lock:
            dropped = [self._engines.pop(key) for key in list(self._engines) if key[0] == path]
        for engine in dropped:
            engine.close()

    def close_all(self) -> None:
        with self._lock:
            evicted = list(self._engines.values())
            self._engines.clear()
        for engine in evicted:
            engine.close()


engines = EngineCache()
# Llama objects left to the garbage collector at interpreter exit print errors from __del__.
atexit.register(engines.close_all)
