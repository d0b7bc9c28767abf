"""Loading GGUFs with llama-cpp-python on these machines: shared by the chat engine (inference)
and by evaluation (training), so both load a model the same, working way."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

# The package's __init__ has set libgomp's spin policy before anything here imports llama_cpp.
import llama_cpp.llama_cpp as llama_lib

_load_lock = threading.Lock()


@contextmanager
def without_extra_buffer_types() -> Iterator[None]:
    """Make Llama() load weights into plain CPU buffers instead of the AMX/repacked ones.

    On AMX CPUs (Sapphire Rapids and later) llama.cpp repacks Q4_0/Q4_1 weights for AMX, and that
    path segfaults in the first batched decode here (llama.cpp issues #20824, #16315: crashes and
    wrong results). Llama() takes no argument for `use_extra_bufts`, so the default model params
    are swapped for the duration of the load; the lock keeps concurrent loads from interleaving.
    """
    original = llama_lib.llama_model_default_params

    def params() -> llama_lib.llama_model_params:
        chosen = original()
        chosen.use_extra_bufts = False
        return chosen

    with _load_lock:
        llama_lib.llama_model_default_params = params
        try:
            yield
        finally:
            llama_lib.llama_model_default_params = original
