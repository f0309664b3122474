"""One scan through the exported chain: read -> preprocess -> frontend (ORT) -> LLM (llama.cpp).

Torch-free. :class:`Reporter` loads a bundle once and serves every scan of a process; the
fixed prompt prefix stays in llama.cpp's KV cache between scans.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radixpert.bundle import Bundle
from radixpert.checks.checker import Checked, Checker
from radixpert.errors import InputError, UsageError
from radixpert.imageio import letterbox_resize, normalize_imagenet, read_display
from radixpert.runtime.frontend import OnnxFrontend, frontend_path
from radixpert.runtime.batched import BatchDecoder
from radixpert.runtime.llm import GenerationResult, LlamaRunner, batch_invariant, default_gpu_layers
from radixpert.runtime.ngram import DRAFT_LENGTHS, NgramDrafter
from radixpert.runtime.threads import thread_policy, threads_for_load

# Smaller images are thumbnails or icons, not radiographs worth a draft report.
MIN_SIDE = 64
# The most draft tokens verified in one step of speculative decoding (radixpert.runtime.ngram says
# why 3, 5 or 7).
DRAFT_TOKENS = max(DRAFT_LENGTHS)
# The default limit on the KV cache of --batch (MiB); --kv-memory changes it.
KV_MEMORY_MIB = 4096
# Printed once by radixpert-run and radixpert-eval when Reporter.speculative_exact is false.
SPECULATIVE_NOT_EXACT = ("warning: speculative decoding is not exact with this llama.cpp build, LLM file or device: "
                         "some reports may differ from plain decoding (exact: CPU with q8_0, or f32/f16 with llama.cpp "
                         "built with -DGGML_LLAMAFILE=OFF; docs/throughput.md)")


@dataclass
class ScanReport:
    """The result for one scan: text, provenance and timings (milliseconds)."""

    path: str
    sop_instance_uid: str | None
    source: str
    report: str
    tokens: list[int]
    stopped: str
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    display: np.ndarray | None = None  # kept for --overlay
    masks: np.ndarray | None = None
    checked: Checked | None = None  # findings, guard checks, anatomy gate


class Reporter:
    """A loaded bundle: the ORT frontend session and the llama.cpp model, ready for scans.

    ``batch`` scans are decoded together (``radixpert.runtime.batched``): the same tokens as one at
    a time. ``speculative`` decoding verifies drafts from the bundle's n-gram index: the same tokens
    where llama.cpp computes a position alike alone or beside others (``speculative_exact``, see
    ``radixpert.runtime.llm.batch_invariant``: CPU with Q8_0 weights, for one); elsewhere some
    reports differ. ``speculative=None`` turns it on exactly where it is exact and the bundle has an
    n-gram index (docs/throughput.md). ``batch=1, speculative=False`` is the one-scan-at-a-time
    path, the only one that streams.
    """

    def __init__(
        self,
        bundle: Bundle,
        providers: list[str] | None = None,
        threads: int | None = None,
        quant: str | None = None,
        gpu_layers: int | None = None,
        max_new_tokens: int | None = None,
        frontend_variant: str = "fp32",
        batch: int = 1,
        speculative: bool | None = False,
        draft_tokens: int = DRAFT_TOKENS,
        kv_memory_mib: float | None = None,
    ):
        self.bundle = bundle
        self.frontend_variant = frontend_variant
        started = time.perf_counter()
        # FP16 in TensorRT only where the bundle allows it (radixpert-export --tensorrt).
        fp16 = bool(bundle.manifest.get("parity", {}).get("tensorrt", {}).get("fp16"))
        self.frontend = OnnxFrontend(frontend_path(bundle, frontend_variant), providers=providers, threads=threads,
                                     tensorrt_fp16=fp16)
        self.quant = quant or bundle.manifest["llm"]["default_quant"]
        n_ctx = bundle.manifest["llm"]["n_ctx"]
        ngram = bundle.path_of("ngram")
        if speculative and ngram is None:
            raise UsageError("this bundle has no n-gram index for speculative decoding; re-export it with "
                             "radixpert-export, or run without --speculative")
        if speculative is None:  # on where it gives plain decoding's reports
            speculative = ngram is not None and batch_invariant(
                self.quant, gpu_layers if gpu_layers is not None else default_gpu_layers())
        self.drafter = NgramDrafter.load(ngram) if speculative else None
        self.batch = int(batch)
        if self.batch < 1:
            raise UsageError(f"--batch must be at least 1, got {batch}")
        batched = self.batch > 1 or self.drafter is not None
        if batched:
            check_kv_fits(bundle, self.batch, kv_memory_mib)
        self.llm = LlamaRunner(bundle.llm_path(self.quant), n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers,
                               n_seq=self.batch if batched else None,
                               n_batch=max(512, self.batch * (draft_tokens + 1)) if batched else 512)
        # Verified drafts give plain decoding's tokens only where the kernels are batch-invariant.
        self.speculative_exact = self.drafter is None or self.llm.batch_invariant()
        # With no --threads, a CPU LLM takes as many threads as there are idle CPUs, per report.
        self.adaptive_threads = threads is None and thread_policy() == "adaptive" and self.llm.gpu_layers == 0
        self.checker = Checker(bundle.manifest, bundle.config.mask_names)
        tokens = bundle.token_ids
        self.prefix_ids: list[int] = tokens["prefix"]
        self.suffix_ids: list[int] = tokens["suffix"]
        self.stop_ids: list[int] = tokens["stop"]
        self.image_size = bundle.config.image_size
        limit = max_new_tokens or bundle.config.max_new_tokens
        # The context was sized at export for the configured report length.
        room = n_ctx - len(self.prefix_ids) - bundle.config.num_visual_tokens - len(self.suffix_ids)
        self.max_new_tokens = max(1, min(limit, room))
        self.batched = batched
        self.draft_tokens = draft_tokens
        self._decoders: dict[tuple[int, bool], BatchDecoder] = {}
        self.load_s = time.perf_counter() - started

    @property
    def speculative(self) -> bool:
        """Whether drafts are verified (speculative decoding is on)."""
        return self.drafter is not None

    @property
    def providers_used(self) -> list[str]:
        return self.frontend.providers_used

    def describe(self) -> dict[str, Any]:
        """What ran, for logs and JSON output (no patient data)."""
        return {"bundle_id": self.bundle.bundle_id, "frontend": self.frontend_variant, "quant": self.quant,
                "providers": self.providers_used, "llm_gpu_layers": self.llm.gpu_layers, "threads": self.llm.threads,
                "batch": self.batch, "speculative": self.speculative,
                "speculative_exact": self.speculative_exact}

    # --- stages shared by both paths -------------------------------------------------------
    def _read(self, path: str | Path) -> tuple[np.ndarray, dict[str, Any], np.ndarray, dict[str, float]]:
        """(display, reader metadata, model input (3, S, S), read and preprocess times); InputError when refused."""
        t0 = time.perf_counter()
        display, meta = read_display(path)
        if min(display.shape) < MIN_SIDE:
            raise InputError(f"{Path(path).name}: image is {display.shape[1]}x{display.shape[0]} pixels, too small for a "
                             f"radiograph (minimum {MIN_SIDE} a side); give the full-resolution image")
        t1 = time.perf_counter()
        image = normalize_imagenet(letterbox_resize(display, self.image_size))
        t2 = time.perf_counter()
        return display, meta, image, {"read_ms": (t1 - t0) * 1e3, "preprocess_ms": (t2 - t1) * 1e3, "_t0": t0}

    def _finish(self, path: str | Path, display: np.ndarray, meta: dict[str, Any], outputs: dict[str, np.ndarray],
                result: GenerationResult, timings: dict[str, float]) -> ScanReport:
        """Detokenize, check the report against the image, and assemble the result."""
        text = self.llm.detokenize(result.tokens).strip()
        started = time.perf_counter()
        evidence = outputs.get("evidence")
        checked = self.checker.check(text, outputs["masks"], evidence, display.shape)
        ended = time.perf_counter()
        t0 = timings.pop("_t0")
        timings.update({
            "prefix_ms": result.prefix_s * 1e3,
            "prefix_cached": result.prefix_cached,
            "visual_prefill_ms": result.visual_prefill_s * 1e3,
            "first_token_ms": result.first_token_s * 1e3,
            "decode_ms": result.decode_s * 1e3,
            "decode_tokens_per_s": result.decode_tokens_per_s,
            "new_tokens": len(result.tokens),
            "drafted_tokens": result.drafted,
            "accepted_tokens": result.accepted,
            "checks_ms": (ended - started) * 1e3,
            "total_ms": (ended - t0) * 1e3,
            "llm_threads": self.llm.threads_now,
        })
        return ScanReport(str(path), meta.get("sop_instance_uid"), meta["source"], text, result.tokens, result.stopped,
                          timings, list(meta["warnings"]), display, outputs["masks"], checked)

    # --- one scan ---------------------------------------------------------------------------
    def report(self, path: str | Path, on_token: Callable[[str], None] | None = None, ignore_eos: bool = False,
               max_new_tokens: int | None = None) -> ScanReport:
        """Write the draft report for one scan; InputError for a refused file."""
        if self.batched:
            if on_token is not None:
                raise UsageError("streaming needs batch 1 without speculative decoding (--no-speculative)")
            (result,) = self.report_many([path], max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
            if isinstance(result, Exception):
                raise result
            return result
        display, meta, image, timings = self._read(path)
        t2 = time.perf_counter()
        outputs = {k: v[0] for k, v in self.frontend.run_outputs(image[None]).items()}
        timings["frontend_ms"] = (time.perf_counter() - t2) * 1e3
        if self.adaptive_threads:
            # Sampled after the frontend, whose threads are asleep by now (runtime/threads.py).
            self.llm.set_threads(threads_for_load(self.llm.threads))
        if on_token is not None and self.checker.gate(outputs["masks"], display.shape)["verdict"] == "implausible":
            on_token = None  # no text is streamed for an image that is no plausible chest (it may be withheld)
        stream = _Utf8Stream(self.llm, on_token) if on_token is not None else None
        result = self.llm.generate(self.prefix_ids, outputs["visual_tokens"], self.suffix_ids,
                                   max_new_tokens or self.max_new_tokens, self.stop_ids, ignore_eos=ignore_eos,
                                   on_token=stream)
        if stream is not None:
            stream.flush()
        return self._finish(path, display, meta, outputs, result, timings)

    # --- many scans -------------------------------------------------------------------------
    def decoder(self, max_new_tokens: int | None = None, ignore_eos: bool = False) -> BatchDecoder:
        """The batch decoder for a report length (one per length, sharing the context; they run one after another)."""
        key = (max_new_tokens or self.max_new_tokens, ignore_eos)
        if key not in self._decoders:
            self._decoders[key] = BatchDecoder(self.llm, self.prefix_ids, self.suffix_ids, key[0], self.stop_ids,
                                               self.drafter, self.draft_tokens, ignore_eos=ignore_eos)
        return self._decoders[key]

    def report_many(self, paths: Sequence[str | Path], max_new_tokens: int | None = None,
                    ignore_eos: bool = False) -> Iterator[ScanReport | InputError]:
        """Reports for ``paths`` in input order: a ScanReport, or the InputError of a refused scan.

        Scans are read and run through the frontend as decoding slots free up, several at once
        (the ONNX graph takes a dynamic batch), and decoded together (``batch``).
        """
        if not self.batched:
            for path in paths:
                try:
                    yield self.report(path, ignore_eos=ignore_eos, max_new_tokens=max_new_tokens)
                except InputError as exc:
                    yield exc
            return
        waiting = iter(enumerate(paths))
        done: dict[int, ScanReport | InputError] = {}
        state: dict[int, tuple[Any, ...]] = {}

        def fill(free: int) -> list[tuple[int, np.ndarray]]:
            ready: list[tuple[int, np.ndarray, dict[str, Any], np.ndarray, dict[str, float]]] = []
            while len(ready) < free:
                item = next(waiting, None)
                if item is None:
                    break
                index, path = item
                try:
                    ready.append((index, *self._read(path)))
                except InputError as exc:
                    done[index] = exc
            if not ready:
                return []
            started = time.perf_counter()
            outputs = self.frontend.run_outputs(np.stack([image for _, _, _, image, _ in ready]))
            frontend_ms = (time.perf_counter() - started) * 1e3
            if self.adaptive_threads:
                self.llm.set_threads(threads_for_load(self.llm.threads))
            items = []
            for row, (index, display, meta, _, timings) in enumerate(ready):
                timings.update({"frontend_ms": frontend_ms, "frontend_batch": len(ready)})
                state[index] = (display, meta, {k: v[row] for k, v in outputs.items()}, timings)
                items.append((index, outputs["visual_tokens"][row]))
            return items

        emitted = 0
        for index, result in self.decoder(max_new_tokens, ignore_eos).run(fill):
            display, meta, outputs, timings = state.pop(index)
            done[index] = self._finish(paths[index], display, meta, outputs, result, timings)
            while emitted in done:
                yield done.pop(emitted)
                emitted += 1
        while emitted < len(paths):  # refused scans after the last report
            yield done.pop(emitted)
            emitted += 1

    def close(self) -> None:
        self.llm.close()


def kv_bytes_per_token(config: Any) -> int:
    """K and V of every layer for one token, in f16 (llama.cpp's default cache type)."""
    return 2 * config.llm_layers * config.llm_kv_heads * config.llm_head_dim * 2


def check_kv_fits(bundle: Bundle, batch: int, kv_memory_mib: float | None) -> None:
    """UsageError, in one line, when ``batch`` sequences' KV cache would not fit ``kv_memory_mib``."""
    streams = batch + 1  # one more for the shared prefix
    need = kv_bytes_per_token(bundle.config) * bundle.manifest["llm"]["n_ctx"] * streams / 2**20
    limit = kv_memory_mib if kv_memory_mib is not None else KV_MEMORY_MIB
    if need > limit:
        raise UsageError(f"--batch {batch} needs {need:.0f} MiB of KV cache ({streams} streams of "
                         f"{bundle.manifest['llm']['n_ctx']} tokens) but the limit is {limit:.0f} MiB; "
                         "use a smaller --batch or raise --kv-memory")


class _Utf8Stream:
    """Token ids -> text pieces, never splitting a multi-byte UTF-8 character, and holding back
    leading and trailing whitespace so that the streamed text equals the final (stripped) report."""

    def __init__(self, llm: LlamaRunner, sink: Callable[[str], None]):
        self.llm, self.sink = llm, sink
        self.pending = b""
        self.held = ""
        self.started = False

    def __call__(self, token: int) -> None:
        self.pending += self.llm.token_bytes(token)
        try:
            text = self.pending.decode("utf-8")
        except UnicodeDecodeError:
            return  # wait for the rest of the character
        self.pending = b""
        self._emit(text)

    def _emit(self, text: str) -> None:
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        if not self.started:
            body = body.lstrip()
            self.started = bool(body)
        if body:
            self.sink(body)

    def flush(self) -> None:
        if self.pending:
            self._emit(self.pending.decode("utf-8", errors="replace"))
            self.pending = b""
