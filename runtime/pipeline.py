"""One scan through the exported chain: read -> preprocess -> frontend (ORT) -> LLM (llama.cpp).

Torch-free. :class:`Reporter` loads a bundle once and serves every scan of a process; the
fixed prompt prefix stays in llama.cpp's KV cache between scans.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radixpert.bundle import Bundle
from radixpert.checks.checker import Checked, Checker
from radixpert.errors import InputError
from radixpert.imageio import letterbox_resize, normalize_imagenet, read_display
from radixpert.runtime.frontend import OnnxFrontend, frontend_path
from radixpert.runtime.llm import LlamaRunner
from radixpert.runtime.threads import thread_policy, threads_for_load

# Smaller images are thumbnails or icons, not radiographs worth a draft report.
MIN_SIDE = 64


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
    """A loaded bundle: the ORT frontend session and the llama.cpp model, ready for scans."""

    def __init__(
        self,
        bundle: Bundle,
        providers: list[str] | None = None,
        threads: int | None = None,
        quant: str | None = None,
        gpu_layers: int | None = None,
        max_new_tokens: int | None = None,
        frontend_variant: str = "fp32",
    ):
        self.bundle = bundle
        self.frontend_variant = frontend_variant
        started = time.perf_counter()
        # FP16 in TensorRT only where the bundle allows it (radixpert-export --tensorrt).
        fp16 = bool(bundle.manifest.get("parity", {}).get("tensorrt", {}).get("fp16"))
        self.frontend = OnnxFrontend(frontend_path(bundle, frontend_variant), providers=providers, threads=threads,
                                     tensorrt_fp16=fp16)
        self.quant = quant or bundle.manifest["llm"]["default_quant"]
        self.llm = LlamaRunner(bundle.llm_path(self.quant), n_ctx=bundle.manifest["llm"]["n_ctx"], threads=threads,
                               gpu_layers=gpu_layers)
        # With no --threads, a CPU LLM takes as many threads as there are idle CPUs, per report.
        self.adaptive_threads = threads is None and thread_policy() == "adaptive" and self.llm.gpu_layers == 0
        self.checker = Checker(bundle.manifest, bundle.config.mask_names)
        self.load_s = time.perf_counter() - started
        tokens = bundle.token_ids
        self.prefix_ids: list[int] = tokens["prefix"]
        self.suffix_ids: list[int] = tokens["suffix"]
        self.stop_ids: list[int] = tokens["stop"]
        self.image_size = bundle.config.image_size
        limit = max_new_tokens or bundle.config.max_new_tokens
        # The context was sized at export for the configured report length.
        room = bundle.manifest["llm"]["n_ctx"] - len(self.prefix_ids) - bundle.config.num_visual_tokens - len(self.suffix_ids)
        self.max_new_tokens = max(1, min(limit, room))

    @property
    def providers_used(self) -> list[str]:
        return self.frontend.providers_used

    def describe(self) -> dict[str, Any]:
        """What ran, for logs and JSON output (no patient data)."""
        return {"bundle_id": self.bundle.bundle_id, "frontend": self.frontend_variant, "quant": self.quant,
                "providers": self.providers_used,
                "llm_gpu_layers": self.llm.gpu_layers, "threads": self.llm.threads}

    def report(self, path: str | Path, on_token: Callable[[str], None] | None = None, ignore_eos: bool = False,
               max_new_tokens: int | None = None) -> ScanReport:
        """Write the draft report for one scan; InputError for a refused file."""
        t0 = time.perf_counter()
        display, meta = read_display(path)
        if min(display.shape) < MIN_SIDE:
            raise InputError(f"{Path(path).name}: image is {display.shape[1]}x{display.shape[0]} pixels, too small for a "
                             f"radiograph (minimum {MIN_SIDE} a side); give the full-resolution image")
        t1 = time.perf_counter()
        image = normalize_imagenet(letterbox_resize(display, self.image_size))[None]
        t2 = time.perf_counter()
        outputs = self.frontend.run_outputs(image)
        visual, masks = outputs["visual_tokens"], outputs["masks"]
        t3 = time.perf_counter()
        if self.adaptive_threads:
            # Sampled after the frontend, whose threads are asleep by now (runtime/threads.py).
            self.llm.set_threads(threads_for_load(self.llm.threads))
        stream = _Utf8Stream(self.llm, on_token) if on_token is not None else None
        result = self.llm.generate(self.prefix_ids, visual[0], self.suffix_ids, max_new_tokens or self.max_new_tokens,
                                   self.stop_ids, ignore_eos=ignore_eos, on_token=stream)
        t4 = time.perf_counter()
        if stream is not None:
            stream.flush()
        text = self.llm.detokenize(result.tokens).strip()
        t5 = time.perf_counter()
        evidence = outputs.get("evidence")
        checked = self.checker.check(text, masks[0], evidence[0] if evidence is not None else None, display.shape)
        t6 = time.perf_counter()
        timings = {
            "read_ms": (t1 - t0) * 1e3,
            "preprocess_ms": (t2 - t1) * 1e3,
            "frontend_ms": (t3 - t2) * 1e3,
            "prefix_ms": result.prefix_s * 1e3,
            "prefix_cached": result.prefix_cached,
            "visual_prefill_ms": result.visual_prefill_s * 1e3,
            "first_token_ms": result.first_token_s * 1e3,
            "decode_ms": result.decode_s * 1e3,
            "decode_tokens_per_s": result.decode_tokens_per_s,
            "new_tokens": len(result.tokens),
            "checks_ms": (t6 - t5) * 1e3,
            "total_ms": (t6 - t0) * 1e3,
            "llm_threads": self.llm.threads_now,
        }
        return ScanReport(str(path), meta.get("sop_instance_uid"), meta["source"], text, result.tokens, result.stopped,
                          timings, list(meta["warnings"]), display, masks[0], checked)

    def close(self) -> None:
        self.llm.close()


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
