"""Per-stage timing of the exported runtime (ORT + llama.cpp), and the statistics every report uses.

Torch-free: this is what runs in the runtime's benchmark process. Each report decodes exactly
``tokens`` tokens (EOS ignored) so that runs, machines and engines compare.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from radixpert.bundle import Bundle, load_bundle
from radixpert.errors import UsageError

# Stages in pipeline order. "prefill" is everything from the frontend's output to the first
# token's logits (runtime: prefix + visual prefill + suffix; eager: one forward over the prompt).
RUNTIME_STAGES = ("read_ms", "preprocess_ms", "frontend_ms", "prefix_ms", "visual_prefill_ms", "first_token_ms",
                  "decode_ms")
CHART_STAGES = ("read_ms", "preprocess_ms", "frontend_ms", "prefill_ms", "decode_ms")


class Engine(Protocol):
    load_ms: float

    def report(self, path: str, tokens: int) -> tuple[dict[str, float], list[int]]: ...

    def describe(self) -> dict[str, Any]: ...


def prompt_length(bundle: Bundle) -> int:
    """Positions before the first generated token: prefix + visual tokens + suffix."""
    tokens = bundle.token_ids
    return len(tokens["prefix"]) + bundle.config.num_visual_tokens + len(tokens["suffix"])


def token_room(bundle: Bundle) -> int:
    """How many tokens the bundle's context leaves for the report."""
    return int(bundle.manifest["llm"]["n_ctx"]) - prompt_length(bundle)


def check_tokens(bundle: Bundle, tokens: int) -> None:
    room = token_room(bundle)
    if tokens > room:
        raise UsageError(f"--tokens {tokens} does not fit: the bundle's context ({bundle.manifest['llm']['n_ctx']}) leaves "
                         f"room for {room} tokens after the prompt; ask for at most {room}")


class RuntimeEngine:
    """The exported chain, exactly as radixpert-run drives it."""

    def __init__(self, bundle_dir: str | Path, threads: int | None = None, quant: str | None = None,
                 providers: list[str] | None = None, gpu_layers: int | None = None, frontend: str = "fp32",
                 speculative: bool = False):
        from radixpert.runtime.pipeline import Reporter

        started = time.perf_counter()
        self.bundle = load_bundle(bundle_dir)
        self.reporter = Reporter(self.bundle, providers=providers, threads=threads, quant=quant, gpu_layers=gpu_layers,
                                 frontend_variant=frontend, speculative=speculative)
        self.load_ms = (time.perf_counter() - started) * 1e3

    def report(self, path: str, tokens: int) -> tuple[dict[str, float], list[int]]:
        result = self.reporter.report(path, ignore_eos=True, max_new_tokens=tokens)
        timings = {k: float(v) for k, v in result.timings.items() if not isinstance(v, bool)}
        timings["prefix_cached"] = float(result.timings["prefix_cached"])
        timings["prefill_ms"] = timings["prefix_ms"] + timings["visual_prefill_ms"] + timings["first_token_ms"]
        timings["ttft_ms"] = timings["read_ms"] + timings["preprocess_ms"] + timings["frontend_ms"] + timings["prefill_ms"]
        return timings, list(result.tokens)

    def describe(self) -> dict[str, Any]:
        r = self.reporter
        return {**r.describe(), "engine": "runtime", "llm_file": r.bundle.llm_path(r.quant).name,
                "frontend": r.frontend.path.name, "prompt_tokens": prompt_length(r.bundle)}


def measure(engine: Engine, scans: Sequence[str], warmup: int, repeats: int, tokens: int, spawned_at: float,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """W warm-ups then R timed reports, cycling over the scans; the first report is the cold one.

    ``spawned_at`` (``time.time()``) is when the parent started this process: cold start is from
    there to the first token of the first report, imports and model loading included.
    """
    samples: list[dict[str, float]] = []
    cold: dict[str, float] = {}
    first_tokens: list[int] = []
    total = warmup + repeats
    for i in range(total):
        scan = scans[i % len(scans)]
        called = time.time()
        timings, ids = engine.report(scan, tokens)
        if i == 0:
            cold = {"cold_start_ms": (called - spawned_at) * 1e3 + timings["ttft_ms"], "first_report_ms": timings["total_ms"]}
        if i >= warmup:
            samples.append(timings)
        if i % len(scans) == 0:
            first_tokens = ids  # the first scan's tokens, from its latest report
        if progress is not None:
            progress(i + 1, total)
    return {"samples": samples, "summary": summarize(samples), "cold": cold, "load_ms": engine.load_ms,
            "tokens_first_scan": first_tokens, "engine": engine.describe()}


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def stats(values: Sequence[float]) -> dict[str, float]:
    """Median, p95 and the range (min..max: the spread two runs are checked against)."""
    return {"median": float(statistics.median(values)), "p95": percentile(values, 95), "min": float(min(values)),
            "max": float(max(values)), "n": len(values)}


def summarize(samples: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Statistics of every numeric timing present in all samples."""
    if not samples:
        return {}
    keys = [k for k in samples[0] if all(k in s for s in samples)]
    return {k: stats([s[k] for s in samples]) for k in keys}


def within_spread(a: dict[str, float], b: dict[str, float]) -> bool:
    """Each run's median lies inside the other's min..max range."""
    return a["min"] <= b["median"] <= a["max"] and b["min"] <= a["median"] <= b["max"]


def combine(processes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One engine's processes (rounds) pooled: every timed report, and cold start per process."""
    samples = [s for p in processes for s in p["samples"]]
    return {
        "samples": samples,
        "summary": summarize(samples),
        "cold": stats([p["cold"]["cold_start_ms"] for p in processes]),
        "load": stats([p["load_ms"] for p in processes]),
        "engine": processes[0]["engine"],
        "tokens_first_scan": processes[-1]["tokens_first_scan"],
        "processes": [{"pid": p["pid"], "torch_loaded": p["torch_loaded"], "onnxruntime_loaded": p["onnxruntime_loaded"],
                       "cold_start_ms": p["cold"]["cold_start_ms"], "load_ms": p["load_ms"]} for p in processes],
    }


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
