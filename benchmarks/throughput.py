"""``radixpert-bench throughput``: reports per hour with several scans decoded together, with and
without speculative decoding, each setting in a fresh torch-free process of its own.

Every setting reports the same scans (EOS honoured, as radixpert-run does), so the reports per
hour are comparable, and its tokens are compared with the first setting's (batch 1, one token
per step: plain greedy decoding) scan by scan.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from radixpert.errors import ModelError


def settings(batches: Sequence[int], speculative: bool) -> list[dict[str, Any]]:
    """Plain batch 1 first (the reference), then each batch size plain and, if asked, speculative."""
    rows = [{"batch": 1, "speculative": False}]
    rows += [{"batch": b, "speculative": False} for b in batches if b != 1]
    if speculative:
        rows += [{"batch": b, "speculative": True} for b in batches]
    return rows


def measure_setting(spec: dict[str, Any]) -> dict[str, Any]:
    """One setting in this process: a warm-up report, then every scan through report_many."""
    from radixpert.bundle import load_bundle
    from radixpert.runtime.pipeline import Reporter, kv_bytes_per_token

    bundle = load_bundle(spec["bundle"])
    started = time.perf_counter()
    reporter = Reporter(bundle, threads=spec.get("threads"), quant=spec.get("quant"), batch=spec["batch"],
                        speculative=spec["speculative"], max_new_tokens=spec.get("max_new_tokens"))
    load_s = time.perf_counter() - started
    try:
        list(reporter.report_many(spec["scans"][:1]))  # warm-up: caches, first allocations
        started = time.perf_counter()
        results = list(reporter.report_many(spec["scans"]))
        wall_s = time.perf_counter() - started
    finally:
        reporter.close()
    refused = [str(r) for r in results if isinstance(r, Exception)]
    if refused:
        raise ModelError(f"{len(refused)} scan(s) refused in the throughput benchmark: {refused[0]}")
    streams = spec["batch"] + 1 if (spec["batch"] > 1 or spec["speculative"]) else 1
    return {
        **{k: spec[k] for k in ("batch", "speculative")},
        "wall_s": wall_s,
        "load_s": load_s,
        "reports": len(results),
        "tokens": [r.tokens for r in results],
        "latency_ms": [r.timings["total_ms"] for r in results],
        "decode_tokens_per_s": [r.timings["decode_tokens_per_s"] for r in results],
        "new_tokens": sum(len(r.tokens) for r in results),
        "drafted": sum(r.timings.get("drafted_tokens", 0) for r in results),
        "accepted": sum(r.timings.get("accepted_tokens", 0) for r in results),
        "rss_mib": _rss_mib(),
        "kv_mib": kv_bytes_per_token(bundle.config) * bundle.manifest["llm"]["n_ctx"] * streams / 2**20,
        "quant": reporter.quant,
    }


def _rss_mib() -> float | None:
    """Peak resident memory of this process (VmHWM), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_setting(spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """:func:`measure_setting` in a fresh process (torch-free, its own memory high-water mark)."""
    with tempfile.TemporaryDirectory(prefix="radixpert-throughput-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "radixpert.benchmarks.throughput", str(spec_path), str(out_path)],
                              capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
        if done.returncode != 0 or not out_path.is_file():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelError(f"throughput setting batch {spec['batch']} failed: {tail[:300]}")
        return json.loads(out_path.read_text(encoding="utf-8"))


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting: reports/hour, its ratio to plain batch 1, latency, tokens/s, identity with plain."""
    reference = rows[0]
    out = []
    for row in rows:
        per_hour = row["reports"] / row["wall_s"] * 3600
        same = sum(a == b for a, b in zip(row["tokens"], reference["tokens"]))
        out.append({
            "batch": row["batch"], "speculative": row["speculative"],
            "reports_per_hour": per_hour,
            "vs_plain_batch_1": per_hour / (reference["reports"] / reference["wall_s"] * 3600),
            "latency_p50_ms": percentile(row["latency_ms"], 0.5), "latency_p95_ms": percentile(row["latency_ms"], 0.95),
            "decode_tokens_per_s_per_sequence": percentile(row["decode_tokens_per_s"], 0.5),
            "aggregate_tokens_per_s": row["new_tokens"] / row["wall_s"],
            "acceptance": row["accepted"] / row["drafted"] if row["drafted"] else None,
            "identical_to_plain": same / len(reference["tokens"]),
            "identical_reports": f"{same}/{len(reference['tokens'])}",
            "rss_mib": row["rss_mib"], "kv_mib": row["kv_mib"], "wall_s": row["wall_s"],
        })
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# radixpert-bench throughput: {result['title']}", "", f"`{result['command']}`", "",
             f"{result['scans']} scans per setting, each setting in a fresh process after one warm-up report; EOS "
             "honoured. Ratios are to plain batch 1 of this same invocation.", "",
             "| batch | speculative | reports/hour | × plain batch 1 | latency p50 / p95 ms | decode tok/s per sequence | "
             "aggregate tok/s | draft acceptance | identical to plain | RSS MiB | KV MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        acceptance = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "–"
        lines.append(f"| {r['batch']} | {'yes' if r['speculative'] else 'no'} | {r['reports_per_hour']:.0f} | "
                     f"{r['vs_plain_batch_1']:.2f}× | {r['latency_p50_ms']:.0f} / {r['latency_p95_ms']:.0f} | "
                     f"{r['decode_tokens_per_s_per_sequence']:.1f} | {r['aggregate_tokens_per_s']:.1f} | {acceptance} | "
                     f"{r['identical_reports']} | {r['rss_mib']:.0f} | {r['kv_mib']:.1f} |")
    lines += ["", f"Machine: {result['machine']}", ""]
    return "\n".join(lines)


def measure_throughput(bundle: str, scans: Sequence[str], batches: Sequence[int], speculative: bool,
                       threads: int | None, quant: str | None, progress: Callable[[str], None] | None = None,
                       max_new_tokens: int | None = None) -> list[dict[str, Any]]:
    """Every setting, one after another, each in its own process; then their summary rows."""
    rows = []
    for setting in settings(batches, speculative):
        if progress is not None:
            progress(f"batch {setting['batch']}{' speculative' if setting['speculative'] else ''}")
        rows.append(run_setting({"bundle": bundle, "scans": list(scans), "threads": threads, "quant": quant,
                                 "max_new_tokens": max_new_tokens, **setting}))
    return summarize(rows)


def _main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    Path(sys.argv[2]).write_text(json.dumps(measure_setting(spec)), encoding="utf-8")


if __name__ == "__main__":
    _main()
