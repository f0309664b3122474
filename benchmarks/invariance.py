"""``radixpert-bench invariance``: does a position get the same logits alone in a decode step as
beside others? Speculative decoding verifies k drafts in one step and is exact only if so.

For each attention setting (without flash attention, the runtime's CPU default; with it), after a real scan's
prompt and the first tokens of its greedy report, the logits of k consecutive report positions
decoded one per step are compared with the same k positions decoded in one step (what a verify
step does), and with one position decoded beside k - 1 copies of it in other sequences (what
batched decoding does). Whether the first is 0 depends on the llama.cpp build: its default
(llamafile's sgemm) multiplies several queries of one sequence with another f16 kernel than one
query; a build with -DGGML_LLAMAFILE=OFF uses one kernel for both. It also decodes each of the k
positions in its own step beside a throwaway next position (then dropped from the cache): that
takes the several-query kernel, so it matches the k-position step in either build, and the
bench reports what the padding costs a step. Torch-free.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

# Flash attention off (the runtime's CPU default), then on. On CPU, flash attention decodes a single
# query with KV split across threads once the cache view reaches 512 cells, another summation order.
SETTINGS: tuple[bool, ...] = (False, True)


def measure_invariance(bundle: Any, visual: np.ndarray, quant: str | None, threads: int, k: int = 5,
                       report_tokens: int = 24) -> list[dict[str, Any]]:
    """One row per attention setting: the largest logit difference of each way of sharing a step."""
    from radixpert.runtime.llm import LlamaRunner

    tokens = bundle.token_ids
    rows = []
    for flash in SETTINGS:
        with LlamaRunner(bundle.llm_path(quant), n_ctx=bundle.manifest["llm"]["n_ctx"], threads=threads, gpu_layers=0,
                         n_seq=k, n_batch=512, flash_attention=flash) as runner:
            runner.decode_tokens([(0, i, t, False) for i, t in enumerate(tokens["prefix"])])
            runner.decode_embeddings([(0, len(tokens["prefix"]), visual)])
            start = len(tokens["prefix"]) + len(visual)
            logits = runner.decode_tokens([(0, start + i, t, i == len(tokens["suffix"]) - 1)
                                           for i, t in enumerate(tokens["suffix"])])[0]
            prompt = start + len(tokens["suffix"])
            report, alone = [], []  # greedy report tokens and each one's logits, one position per step
            for i in range(report_tokens):
                report.append(int(np.argmax(logits)))
                logits = runner.decode_tokens([(0, prompt + i, report[-1], True)])[0]
                alone.append(logits)
            worst_sequence = worst_sequences = worst_padded = 0.0
            argmax_changes = 0
            for cut in range(0, report_tokens - k, k):
                runner.seq_rm(0, prompt + cut)
                together = runner.decode_tokens([(0, prompt + cut + j, report[cut + j], True) for j in range(k)])
                for j, row in enumerate(together):
                    worst_sequence = max(worst_sequence, float(np.abs(row - alone[cut + j]).max()))
                    argmax_changes += int(np.argmax(row) != np.argmax(alone[cut + j]))
                runner.seq_rm(0, prompt + cut)
                for j in range(k):  # one position per step again, each beside a throwaway next position
                    padded = runner.decode_tokens([(0, prompt + cut + j, report[cut + j], True),
                                                   (0, prompt + cut + j + 1, report[cut + j], False)])[0]
                    runner.seq_rm(0, prompt + cut + j + 1)
                    worst_padded = max(worst_padded, float(np.abs(padded - together[j]).max()))
                runner.seq_rm(0, prompt + cut)
                for seq in range(1, k):  # k - 1 copies of the same context in other sequences
                    runner.seq_rm(seq, 0)
                    runner.seq_cp(0, seq)
                beside = runner.decode_tokens([(seq, prompt + cut, report[cut], True) for seq in range(k)])
                worst_sequences = max(worst_sequences, *(float(np.abs(row - alone[cut]).max()) for row in beside))
                for seq in range(k):
                    runner.seq_rm(seq, prompt + cut if seq == 0 else 0)
                for j in range(k):  # back to the one-per-step cache the reference positions saw
                    runner.decode_tokens([(0, prompt + cut + j, report[cut + j], False)])
            rows.append({"flash_attention": flash, "k": k,
                         "positions_compared": (report_tokens - 1) // k * k,
                         "max_diff_k_positions_one_sequence": worst_sequence,
                         "argmax_changes_k_positions_one_sequence": argmax_changes,
                         "max_diff_one_position_k_sequences": worst_sequences,
                         "max_diff_padded_steps_vs_k_positions": worst_padded,
                         "padded_step_time_ratio": _padded_step_time_ratio(runner, prompt, report[0]),
                         "runtime_default_on_cpu": not flash})
    return rows


def _padded_step_time_ratio(runner: Any, position: int, token: int, steps: int = 30) -> float:
    """Time of a decode step padded with a throwaway position over an unpadded one, interleaved
    in this run (the ratio, not the durations, is what compares on a shared machine)."""
    times = {False: [], True: []}
    for _ in range(3):
        for padded in (False, True):
            runner.seq_rm(0, position)
            started = time.perf_counter()
            for i in range(steps):
                rows = [(0, position + i, token, True)] + ([(0, position + i + 1, token, False)] if padded else [])
                runner.decode_tokens(rows)
                if padded:
                    runner.seq_rm(0, position + i + 1)
            times[padded].append(time.perf_counter() - started)
    runner.seq_rm(0, position)
    return float(np.median(times[True]) / np.median(times[False]))


def markdown(result: dict[str, Any]) -> str:
    rows: Sequence[dict[str, Any]] = result["rows"]
    k = rows[0]["k"]
    lines = [f"# radixpert-bench invariance: {result['title']}", "", f"`{result['command']}`", "",
             f"Largest |logit difference| over the vocabulary against the same position decoded alone, after a real "
             f"scan's prompt, over {rows[0]['positions_compared']} greedy report positions. Exact speculative decoding "
             f"needs 0 in the first column (a verify step decodes {k} positions of one sequence); batched decoding "
             f"needs 0 in the third. The fourth column compares the {k}-position step with the same positions each "
             f"decoded in its own step beside a throwaway next position (what plain decoding would have to do to match "
             f"a verify step); the fifth is what that padding costs a decode step, measured in this run.", "",
             f"| flash attention | {k} positions of one sequence in one step | argmax changed | "
             f"1 position beside {k - 1} other sequences | padded single steps vs the {k}-position step | "
             f"padded step time / plain step | runtime default on CPU |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'on' if r['flash_attention'] else 'off'} | "
                     f"{r['max_diff_k_positions_one_sequence']:.4g} | {r['argmax_changes_k_positions_one_sequence']} | "
                     f"{r['max_diff_one_position_k_sequences']:.4g} | {r['max_diff_padded_steps_vs_k_positions']:.4g} | "
                     f"{r['padded_step_time_ratio']:.2f} | {'yes' if r['runtime_default_on_cpu'] else ''} |")
    lines += ["", f"llama.cpp: {result['llama_cpp_features']}"]
    return "\n".join(lines) + "\n"
