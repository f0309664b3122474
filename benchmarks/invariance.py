"""``radixpert-bench invariance``: does a position get the same logits alone in a decode step as
beside others? Speculative decoding verifies k drafts in one step and is exact only if so.

For each of the runtime's attention modes (radixpert.runtime.llm.ATTENTION_MODES), after a real
scan's prompt and the first tokens of its greedy report, the logits of k consecutive report
positions decoded one per step are compared with the same k positions decoded in one step (what a
verify step does), and with one position decoded beside k - 1 copies of it in other sequences (what
batched decoding does). Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np



def measure_invariance(bundle: Any, visual: np.ndarray, quant: str | None, threads: int, k: int = 5,
                       report_tokens: int = 24) -> list[dict[str, Any]]:
    """One row per attention mode: the largest logit difference of each way of sharing a step."""
    from radixpert.runtime.llm import ATTENTION_MODES, LlamaRunner

    tokens = bundle.token_ids
    rows = []
    for attention, (flash, type_k, type_v) in ATTENTION_MODES.items():
        with LlamaRunner(bundle.llm_path(quant), n_ctx=bundle.manifest["llm"]["n_ctx"], threads=threads, gpu_layers=0,
                         n_seq=k, n_batch=512, attention=attention) as runner:
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
            worst_sequence = worst_sequences = 0.0
            argmax_changes = 0
            for cut in range(0, report_tokens - k, k):
                runner.seq_rm(0, prompt + cut)
                together = runner.decode_tokens([(0, prompt + cut + j, report[cut + j], True) for j in range(k)])
                for j, row in enumerate(together):
                    worst_sequence = max(worst_sequence, float(np.abs(row - alone[cut + j]).max()))
                    argmax_changes += int(np.argmax(row) != np.argmax(alone[cut + j]))
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
            rows.append({"attention": attention, "flash_attention": flash.lower(), "k_cache": type_k, "v_cache": type_v,
                         "k": k,
                         "positions_compared": (report_tokens - 1) // k * k,
                         "max_diff_k_positions_one_sequence": worst_sequence,
                         "argmax_changes_k_positions_one_sequence": argmax_changes,
                         "max_diff_one_position_k_sequences": worst_sequences,
                         "runtime_default_on_cpu": attention == "rows"})
    return rows


def markdown(result: dict[str, Any]) -> str:
    rows: Sequence[dict[str, Any]] = result["rows"]
    k = rows[0]["k"]
    lines = [f"# radixpert-bench invariance: {result['title']}", "", f"`{result['command']}`", "",
             f"Largest |logit difference| over the vocabulary against the same position decoded alone, after a real "
             f"scan's prompt, over {rows[0]['positions_compared']} greedy report positions. Exact speculative decoding "
             f"needs 0 in the first column (a verify step decodes {k} positions of one sequence); batched decoding "
             f"needs 0 in the third.", "",
             f"| attention | llama.cpp flash attention | K / V cache | {k} positions of one sequence in one step | "
             f"argmax changed | 1 position beside {k - 1} other sequences | runtime default on CPU |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['attention']} | {r['flash_attention']} | {r['k_cache']} / {r['v_cache']} | "
                     f"{r['max_diff_k_positions_one_sequence']:.4g} | {r['argmax_changes_k_positions_one_sequence']} | "
                     f"{r['max_diff_one_position_k_sequences']:.4g} | {'yes' if r['runtime_default_on_cpu'] else ''} |")
    lines += ["", f"llama.cpp: {result['llama_cpp_features']}"]
    return "\n".join(lines) + "\n"
