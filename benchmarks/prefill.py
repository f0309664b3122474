"""``radixpert-bench prefill``: the prompt prefill (prefix, 196 visual embeddings, suffix) across
llama.cpp's physical batch (``n_ubatch``), its prefill thread count and the LLM file type.

Prefill is compute-bound where decode is memory-bound, so the file that decodes fastest need not
prefill fastest. Torch-free, in this process; one file's settings are timed in rounds that
interleave them, so a shared machine's noise lands on all of them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def measure_prefill(bundle: Any, visual: np.ndarray, quants: Sequence[str], ubatches: Sequence[int],
                    batch_threads: Sequence[int], threads: int, rounds: int = 5,
                    progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Median prefill ms (visual embeddings + suffix, prefix cached) of each (quant, n_ubatch, threads) setting."""
    from radixpert.runtime.llm import LlamaRunner

    tokens = bundle.token_ids
    n_ctx = bundle.manifest["llm"]["n_ctx"]
    times: dict[tuple[str, int, int], list[float]] = {}
    for quant in quants:  # one file's settings loaded at a time, interleaved among themselves
        runners = {(quant, ubatch, tb): LlamaRunner(bundle.llm_path(quant), n_ctx=n_ctx, threads=threads, gpu_layers=0,
                                                    n_batch=512, n_ubatch=ubatch, threads_batch=tb)
                   for ubatch in ubatches for tb in batch_threads}
        times.update({key: [] for key in runners})
        try:
            for round_index in range(rounds + 1):  # round 0 warms every runner up and is not counted
                if progress is not None:
                    progress(f"{quant} round {round_index}/{rounds}")
                for key, runner in runners.items():
                    runner.start(tokens["prefix"])
                    started = time.perf_counter()
                    runner.eval_embeddings(visual)
                    runner.eval_tokens(tokens["suffix"])
                    if round_index:
                        times[key].append((time.perf_counter() - started) * 1e3)
        finally:
            for runner in runners.values():
                runner.close()
    prompt = visual.shape[0] + len(tokens["suffix"])
    rows = []
    for (quant, ubatch, tb), values in times.items():
        median = statistics.median(values)
        rows.append({"quant": quant, "n_ubatch": ubatch, "threads_batch": tb, "median_ms": median,
                     "min_ms": min(values), "max_ms": max(values), "tokens_per_s": prompt / median * 1e3,
                     "prompt_tokens": prompt})
    fastest = min(r["median_ms"] for r in rows)
    for row in rows:
        row["vs_fastest"] = row["median_ms"] / fastest
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# radixpert-bench prefill: {result['title']}", "", f"`{result['command']}`", "",
             f"Prefill of {result['rows'][0]['prompt_tokens']} positions (the visual embeddings and the suffix; the "
             f"prefix is cached), {result['rounds']} interleaved rounds after a warm-up, decode threads "
             f"{result['threads']}.", "",
             "| LLM file | n_ubatch | prefill threads | median ms | min–max ms | positions/s | × fastest |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: r["median_ms"]):
        lines.append(f"| {r['quant']} | {r['n_ubatch']} | {r['threads_batch']} | {r['median_ms']:.0f} | "
                     f"{r['min_ms']:.0f}–{r['max_ms']:.0f} | {r['tokens_per_s']:.0f} | {r['vs_fastest']:.2f}× |")
    return "\n".join(lines) + "\n"


def measure_verify_cost(bundle: Any, visual: np.ndarray, counts: Sequence[int], threads: int, quant: str | None = None,
                        rounds: int = 5) -> list[dict[str, Any]]:
    """Median time of one decode step that verifies k tokens (k = 1: plain decoding), after a real prompt.

    The cost ratio k-vs-1 with a measured acceptance projects speculative decoding's gain on a model
    whose own acceptance cannot be measured (random weights): tokens per step ÷ cost per step.
    """
    from radixpert.runtime.llm import LlamaRunner

    tokens = bundle.token_ids
    with LlamaRunner(bundle.llm_path(quant), n_ctx=bundle.manifest["llm"]["n_ctx"], threads=threads, gpu_layers=0) as runner:
        runner.start(tokens["prefix"])
        runner.eval_embeddings(visual)
        runner.eval_tokens(tokens["suffix"])
        position = runner.n_past
        draft = [int(t) for t in np.random.default_rng(0).integers(1000, 2000, max(counts))]
        times: dict[int, list[float]] = {k: [] for k in counts}
        for round_index in range(rounds + 1):  # round 0 warms up
            for k in counts:
                started = time.perf_counter()
                runner.decode_tokens([(0, position + i, draft[i], True) for i in range(k)])
                elapsed = (time.perf_counter() - started) * 1e3
                runner.seq_rm(0, position, -1)
                if round_index:
                    times[k].append(elapsed)
    one = statistics.median(times[counts[0]])
    return [{"k": k, "median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
             "vs_first": statistics.median(v) / one} for k, v in times.items()]
