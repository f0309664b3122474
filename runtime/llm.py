"""The LLM half of the runtime: a GGUF model in llama.cpp fed with raw visual embeddings.

Torch-free. Built on llama-cpp-python's low-level C API, because its high-level ``Llama``
class only accepts token ids. The sequence follows ``radixpert.prompt``:

* text (prefix, suffix, generated tokens) goes in as token ids, which llama.cpp scales by
  sqrt(n_embd) exactly as HF Gemma 3 does;
* the N_p visual tokens go in as raw float32 embeddings, unscaled;
* attention is causal throughout (llama.cpp's default), as in training.

One batch cannot mix tokens and embeddings, so chunks are decoded one after another with
continuing positions. The prefix is identical for every scan, so :meth:`LlamaRunner.generate`
keeps it in the KV cache and trims back to it (``llama_memory_seq_rm``) for the next scan.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radixpert.errors import ModelError

_LOG_CALLBACK = None  # kept alive for as long as llama.cpp may call it
DEFAULT_UBATCH = 256


def _import_llama_cpp():
    from radixpert.runtime.threads import configure_openmp

    configure_openmp()  # before llama.cpp's OpenMP runtime loads: it reads the wait policy once
    try:
        import llama_cpp
    except ImportError:
        raise ModelError("llama-cpp-python is not installed; install radixpert-edge (it is a base dependency)") from None
    return llama_cpp


def silence_llama_logs() -> None:
    """Route llama.cpp's C logging to nowhere (it is chatty on stderr)."""
    global _LOG_CALLBACK
    llama_cpp = _import_llama_cpp()
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())


def gpu_offload_supported() -> bool:
    return bool(_import_llama_cpp().llama_supports_gpu_offload())


# Weight types whose CPU matrix product is one dot product per output for any number of positions
# in a step (ggml's vec_dot), in a build without llamafile's sgemm. Others (Q4_0, Q4_K, IQ4_NL ...)
# are repacked on AVX2 and use one kernel for a single position and another for several.
_INVARIANT_FILE_TYPES = ("F32", "F16", "Q8_0")
# In a build with llamafile's sgemm (the default), only its Q8_0 kernel sums each output in the
# same order as ggml's dot product; its F16 and F32 kernels do not (radixpert-bench invariance on
# the demo: 0 for Q8_0, up to 0.11 logits for F16).
_SGEMM_INVARIANT_FILE_TYPES = ("Q8_0",)

# ggml's enum value for bfloat16 (ggml.h); llama-cpp-python 0.3.36 exports no constant for it.
GGML_TYPE_BF16 = 30

# How attention runs: llama.cpp's flash attention setting, and the K and V cache types.
# * "rows" (the CPU default): flash attention with an F16 K cache and a BF16 V cache. With K and V
#   of different types, llama.cpp's CPU flash attention takes neither its KV-split path (one query
#   over 512+ cells) nor its tiled path (64+ queries): every query row is computed alone, in one
#   order, whatever else shares its step. That makes a verify step give plain decoding's logits bit
#   for bit, so speculative decoding is exact. BF16 V is accumulated in F32 (an F16 V cache would be
#   accumulated in F16); the cache stays 2 bytes per value.
# * "matmul": no flash attention, F16 K and V (llama.cpp's default on CPU). A step of several
#   queries of one sequence takes llamafile's sgemm and rounds differently from one query.
# * "flash": flash attention with F16 K and V (llama.cpp's default on GPUs).
ATTENTION_MODES: dict[str, tuple[str, str, str]] = {
    "rows": ("ENABLED", "F16", "BF16"),
    "matmul": ("DISABLED", "F16", "F16"),
    "flash": ("AUTO", "F16", "F16"),
}


def build_features() -> str:
    """llama.cpp's own list of its build features ("CPU : ... AVX2 = 1 | LLAMAFILE = 1 ...")."""
    return _import_llama_cpp().llama_print_system_info().decode(errors="replace").strip(" |")


def _ggml_type(llama_cpp, name: str) -> int:
    """ggml's enum value for a cache type name ("F16", "BF16")."""
    return GGML_TYPE_BF16 if name == "BF16" else int(getattr(llama_cpp, f"GGML_TYPE_{name}"))


def llamafile_sgemm_built() -> bool:
    """Whether this llama.cpp multiplies steps of 2+ positions with llamafile's sgemm (the default
    build). Its F16 and F32 kernels sum in another order than ggml's dot product for a single
    position, so with such weights a verify step is not bit-exact (docs/throughput.md)."""
    return "LLAMAFILE = 1" in build_features()


def default_gpu_layers() -> int:
    """Layers offloaded when none are asked for: all of them where llama.cpp was built for a GPU."""
    return 999 if _import_llama_cpp().llama_supports_gpu_offload() else 0


def batch_invariant(file_type: str, gpu_layers: int, attention: str | None = None) -> bool:
    """Whether a position's logits are bit for bit the same decoded alone in a step or beside others,
    which makes speculative decoding give exactly plain greedy decoding's tokens. ``file_type`` is
    llama.cpp's ("Q8_0", "F16", "all F32") or a bundle's quantization name ("q8_0"); ``attention``
    None is the runtime's default for the device.

    True on CPU with Q8_0 weights and the "rows" attention; in a llama.cpp built with
    -DGGML_LLAMAFILE=OFF, also with F32/F16 weights and with the "matmul" attention
    (docs/throughput.md). Flash attention with one cache type splits a single query's cells across
    threads, and GPU kernels differ between one and several positions: neither counts as invariant."""
    attention = attention or ("flash" if gpu_layers > 0 else "rows")
    if gpu_layers > 0 or attention == "flash":
        return False
    sgemm = llamafile_sgemm_built()
    if attention == "matmul" and sgemm:  # sgemm's kernel for several queries of one sequence
        return False
    weights = _SGEMM_INVARIANT_FILE_TYPES if sgemm else _INVARIANT_FILE_TYPES
    return file_type.removeprefix("all ").strip().upper() in weights


@dataclass
class GenerationResult:
    """Greedy output of one scan, with the timings the runtime reports."""

    tokens: list[int]
    stopped: str  # "eog", "max_tokens"
    prefix_cached: bool
    prefix_s: float
    visual_prefill_s: float
    first_token_s: float
    decode_s: float
    decode_steps: int  # single-token evaluations after the first token (verify steps when batched)
    drafted: int = 0  # speculative decoding: draft tokens proposed
    accepted: int = 0  # and kept (each one a decode step saved)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first one, per second of decoding."""
        decoded = self.decode_steps + self.accepted
        return decoded / self.decode_s if self.decode_s > 0 and decoded else 0.0


class LlamaRunner:
    """One GGUF model and one context; sequence 0 only.

    Use it as a context manager or call :meth:`close`: after that every method raises
    ModelError instead of touching freed llama.cpp memory; closing twice is harmless. Not
    thread-safe: one thread at a time may use (and close) a runner.
    """

    _closed = False  # class default, so a runner whose __init__ failed closes cleanly too

    def __init__(
        self,
        gguf_path: str | Path,
        n_ctx: int = 1024,
        threads: int | None = None,
        gpu_layers: int | None = None,
        n_batch: int = 512,
        attention: str | None = None,
        verbose: bool = False,
        n_seq: int | None = None,
        n_ubatch: int | None = None,
        threads_batch: int | None = None,
    ):
        if attention is not None and attention not in ATTENTION_MODES:
            raise ModelError(f"unknown attention mode {attention!r}; use one of {', '.join(ATTENTION_MODES)}")
        llama_cpp = _import_llama_cpp()
        self._c = llama_cpp
        self._model = self._ctx = None
        path = Path(gguf_path)
        if not path.is_file():
            raise ModelError(f"GGUF file {path} not found; rebuild the bundle with radixpert-export")
        if not verbose:
            silence_llama_logs()
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        if gpu_layers is None:
            gpu_layers = default_gpu_layers()
        model_params.n_gpu_layers = gpu_layers
        self.gpu_layers = gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            self._model = None
            raise ModelError(f"llama.cpp could not load {path.name}; the file is corrupt or not a Gemma 3 GGUF")
        self.threads = threads or max(1, min(os.cpu_count() or 1, 8))
        ctx_params = llama_cpp.llama_context_default_params()
        # Several sequences (batched decoding) get one KV stream each, n_ctx cells apiece, plus
        # one more stream that holds the shared prompt prefix to copy from (radixpert.runtime.batched).
        # Separate streams, not one unified buffer: the sequences share only a short prefix, and
        # in a unified buffer every sequence's attention would scan every other's cells.
        self.n_seq = int(n_seq or 1)
        streams = 1 if n_seq is None else self.n_seq + 1
        ctx_params.n_ctx = n_ctx * streams
        ctx_params.n_seq_max = streams
        ctx_params.kv_unified = False
        ctx_params.n_batch = n_batch
        # Physical batch 256: the fastest prefill of the demo's 202-position prompt on our CPU, 7 % faster
        # than 512 at q8_0 and the same tokens (the prompt fits in one either way); see docs/throughput.md.
        ctx_params.n_ubatch = min(n_ubatch or DEFAULT_UBATCH, n_batch)
        self.threads_now = self.threads
        ctx_params.n_threads = self.threads
        ctx_params.n_threads_batch = threads_batch or self.threads  # prompt prefill (compute-bound)
        # Keep every sliding-window layer's cache whole, so trimming back to the cached
        # prefix is always possible (pruned SWA entries could not be restored).
        ctx_params.swa_full = True
        # ATTENTION_MODES says why "rows" on CPU. GPUs keep llama.cpp's own flash attention.
        self.attention = attention or ("flash" if gpu_layers > 0 else "rows")
        flash, type_k, type_v = ATTENTION_MODES[self.attention]
        ctx_params.flash_attn_type = getattr(llama_cpp, f"LLAMA_FLASH_ATTN_TYPE_{flash}")
        ctx_params.type_k, ctx_params.type_v = _ggml_type(llama_cpp, type_k), _ggml_type(llama_cpp, type_v)
        ctx_params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            self._ctx = None
            model, self._model = self._model, None
            llama_cpp.llama_model_free(model)
            raise ModelError(f"llama.cpp could not create a context of {n_ctx} tokens for {path.name}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_embd = int(llama_cpp.llama_model_n_embd(self._model))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_ubatch = int(ctx_params.n_ubatch)
        self.template_seq = self.n_seq if n_seq is not None else None  # the prefix stream in batched mode
        self._token_batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._embd_batch = llama_cpp.llama_batch_init(n_batch, self.n_embd, 1)
        self.n_past = 0
        self._cached_prefix: tuple[int, ...] = ()

    # --- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Free the context, batches and model; later calls to any method raise ModelError."""
        if self._closed:
            return
        self._closed = True
        c = getattr(self, "_c", None)
        ctx, model = getattr(self, "_ctx", None), getattr(self, "_model", None)
        # Drop every handle into llama.cpp memory before freeing it, so nothing can reach it later.
        self._ctx = self._model = self._vocab = self._memory = None
        token_batch, embd_batch = getattr(self, "_token_batch", None), getattr(self, "_embd_batch", None)
        self._token_batch = self._embd_batch = None
        if c is None:
            return
        if ctx:
            c.llama_batch_free(token_batch)
            c.llama_batch_free(embd_batch)
            c.llama_free(ctx)
        if model:
            c.llama_model_free(model)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ModelError("the LLM runner is closed; create a new LlamaRunner to use the model again")

    def __enter__(self) -> "LlamaRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def set_threads(self, threads: int) -> None:
        """Use ``threads`` CPU threads from the next decode on (between 1 and the thread count it was built with)."""
        self._check_open()
        self.threads_now = max(1, min(int(threads), self.threads))
        self._c.llama_set_n_threads(self._ctx, self.threads_now, self.threads_now)

    def file_type(self) -> str:
        """llama.cpp's name for the weights' type: "all F32", "F16", "Q8_0", "Q4_K - Medium" ..."""
        self._check_open()
        buf = ctypes.create_string_buffer(256)
        self._c.llama_model_desc(self._model, buf, len(buf))
        # "<arch> <size> <file type>"; the file type may contain spaces
        return buf.value.decode(errors="replace").split(" ", 2)[-1]

    def batch_invariant(self) -> bool:
        """Whether a position's logits are bit for bit the same alone in a step or beside others
        (:func:`batch_invariant`), for this runner's device, attention and weights."""
        return batch_invariant(self.file_type(), self.gpu_layers, self.attention)

    # --- vocabulary ----------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Ids for text that may contain special-token strings; adds no BOS of its own."""
        self._check_open()
        data = text.encode("utf-8")
        capacity = len(data) + 8
        out = (self._c.llama_token * capacity)()
        n = self._c.llama_tokenize(self._vocab, data, len(data), out, capacity, False, True)
        if n < 0:
            raise ModelError("llama.cpp tokenization overflowed; the GGUF vocabulary is unusual")
        return list(out[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        self._check_open()
        buf = ctypes.create_string_buffer(64)
        n = self._c.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._c.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        self._check_open()
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        self._check_open()
        return bool(self._c.llama_vocab_is_eog(self._vocab, token))

    # --- evaluation ----------------------------------------------------------------------
    def reset(self) -> None:
        self._check_open()
        self._c.llama_memory_clear(self._memory, True)
        self.n_past = 0
        self._cached_prefix = ()

    def trim(self, n_keep: int) -> None:
        """Drop every cached position >= n_keep."""
        self._check_open()
        if not self._c.llama_memory_seq_rm(self._memory, 0, n_keep, -1):
            raise ModelError("llama.cpp refused to trim its KV cache; this model's cache cannot keep a prefix")
        self.n_past = n_keep

    def _logits_row(self, index: int) -> np.ndarray:
        self._check_open()
        pointer = self._c.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

    def _decode(self, batch, n: int, all_logits: bool) -> list[np.ndarray]:
        self._check_open()
        for i in range(n):
            batch.pos[i] = self.n_past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if (all_logits or i == n - 1) else 0
        batch.n_tokens = n
        if self.n_past + n > self.n_ctx:
            raise ModelError(f"the prompt needs {self.n_past + n} positions but the context holds {self.n_ctx}")
        status = self._c.llama_decode(self._ctx, batch)
        if status != 0:
            raise ModelError(f"llama_decode failed with status {status}")
        self.n_past += n
        return [self._logits_row(i) for i in range(n)] if all_logits else [self._logits_row(n - 1)]

    def eval_tokens(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append token ids; logits of the last position (1-D) or of every position (2-D)."""
        self._check_open()
        rows: list[np.ndarray] = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            for i, token in enumerate(chunk):
                self._token_batch.token[i] = int(token)
            rows += self._decode(self._token_batch, len(chunk), all_logits)
        return np.stack(rows) if all_logits else rows[-1]

    def eval_embeddings(self, embeddings: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append raw (n, n_embd) embeddings; logits as in :meth:`eval_tokens`."""
        self._check_open()
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.n_embd:
            raise ModelError(f"visual tokens have shape {embeddings.shape}, the LLM expects (n, {self.n_embd})")
        rows: list[np.ndarray] = []
        row_bytes = self.n_embd * 4
        for start in range(0, embeddings.shape[0], self.n_batch):
            chunk = embeddings[start : start + self.n_batch]
            ctypes.memmove(self._embd_batch.embd, chunk.ctypes.data, chunk.shape[0] * row_bytes)
            rows += self._decode(self._embd_batch, chunk.shape[0], all_logits)
        return np.stack(rows) if all_logits else rows[-1]

    # --- several sequences (batched decoding) ---------------------------------------------
    def seq_rm(self, seq: int, start: int, end: int = -1) -> None:
        """Drop positions [start, end) of sequence ``seq`` (end -1: to its end)."""
        self._check_open()
        if not self._c.llama_memory_seq_rm(self._memory, seq, start, end):
            raise ModelError("llama.cpp refused to trim a sequence of its KV cache")

    def seq_cp(self, source: int, target: int, start: int = 0, end: int = -1) -> None:
        """Copy positions [start, end) of sequence ``source`` into sequence ``target``."""
        self._check_open()
        self._c.llama_memory_seq_cp(self._memory, source, target, start, end)

    def decode_tokens(self, rows: Sequence[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """One llama_decode of (sequence, position, token, want logits) rows, any sequences mixed;
        the logits of the rows that want them, in row order."""
        self._check_open()
        if len(rows) > self.n_batch:
            raise ModelError(f"{len(rows)} tokens in one step exceed the batch of {self.n_batch}")
        batch = self._token_batch
        for i, (seq, pos, token, logits) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(token), int(pos), 1
            batch.seq_id[i][0], batch.logits[i] = int(seq), 1 if logits else 0
        batch.n_tokens = len(rows)
        self._decode_checked(batch)
        return [self._logits_row(i) for i, row in enumerate(rows) if row[3]]

    def decode_embeddings(self, parts: Sequence[tuple[int, int, np.ndarray]]) -> None:
        """Raw (n, n_embd) embeddings of several sequences, each from its start position, in as
        few llama_decode calls as the batch allows; no logits (a suffix always follows)."""
        self._check_open()
        rows = [(seq, start + i, emb) for seq, start, embeddings in parts
                for i, emb in enumerate(np.ascontiguousarray(embeddings, dtype=np.float32))]
        row_bytes = self.n_embd * 4
        batch = self._embd_batch
        for first in range(0, len(rows), self.n_batch):
            chunk = rows[first : first + self.n_batch]
            data = np.ascontiguousarray(np.stack([emb for _, _, emb in chunk]), dtype=np.float32)
            if data.shape[1] != self.n_embd:
                raise ModelError(f"visual tokens have width {data.shape[1]}, the LLM expects {self.n_embd}")
            ctypes.memmove(batch.embd, data.ctypes.data, data.shape[0] * row_bytes)
            for i, (seq, pos, _) in enumerate(chunk):
                batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = pos, 1, seq, 0
            batch.n_tokens = len(chunk)
            self._decode_checked(batch)

    def _decode_checked(self, batch) -> None:
        status = self._c.llama_decode(self._ctx, batch)
        if status != 0:
            raise ModelError(f"llama_decode failed with status {status} (a full KV cache is status 1)")

    # --- generation ----------------------------------------------------------------------
    def start(self, prefix_ids: Sequence[int]) -> tuple[bool, float]:
        """Make the KV cache hold exactly ``prefix_ids``; (was it cached?, seconds spent)."""
        self._check_open()
        started = time.perf_counter()
        prefix = tuple(prefix_ids)
        if prefix and self._cached_prefix == prefix and self.n_past >= len(prefix):
            self.trim(len(prefix))
            return True, time.perf_counter() - started
        self.reset()
        self.eval_tokens(prefix)
        self._cached_prefix = prefix
        return False, time.perf_counter() - started

    def generate(
        self,
        prefix_ids: Sequence[int],
        visual_tokens: np.ndarray,
        suffix_ids: Sequence[int],
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Greedy report tokens for one scan (stop tokens are not included)."""
        self._check_open()
        prefix_cached, prefix_s = self.start(prefix_ids)
        started = time.perf_counter()
        self.eval_embeddings(visual_tokens)
        visual_s = time.perf_counter() - started
        started = time.perf_counter()
        logits = self.eval_tokens(suffix_ids)
        first_s = time.perf_counter() - started
        stops = set(stop_ids)
        tokens: list[int] = []
        stopped = "max_tokens"
        steps = 0
        decode_started = time.perf_counter()
        while len(tokens) < max_new_tokens:
            token = int(np.argmax(logits))
            if not ignore_eos and (token in stops or self.is_end_of_generation(token)):
                stopped = "eog"
                break
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if len(tokens) == max_new_tokens:
                break
            logits = self.eval_tokens([token])
            steps += 1
        decode_s = time.perf_counter() - decode_started
        return GenerationResult(tokens, stopped, prefix_cached, prefix_s, visual_s, first_s, decode_s, steps)
