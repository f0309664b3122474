"""Benchmark output: JSON (everything), Markdown (the tables), PNG (stage breakdown), machine info."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from radixpert.benchmarks.bandwidth import gpu_name
from radixpert.benchmarks.stages import CHART_STAGES

LABELS = {
    "read_ms": "read", "preprocess_ms": "preprocess", "frontend_ms": "frontend", "prefix_ms": "prefix",
    "visual_prefill_ms": "visual prefill", "first_token_ms": "first token (suffix)", "prefill_ms": "prefill (to 1st logits)",
    "ttft_ms": "time to first token", "decode_ms": "decode", "total_ms": "end to end (per report)",
}
PACKAGES = ("radixpert-edge", "numpy", "onnxruntime", "onnxruntime-gpu", "llama_cpp_python", "torch", "transformers")


def command_line() -> str:
    """The command as typed, rebuilt from click's context (the options given on the command line)."""
    import click
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return " ".join([Path(sys.argv[0]).name] + [shlex.quote(a) for a in sys.argv[1:]])
    parts = ["radixpert-bench", ctx.info_name or ""]
    for param in ctx.command.params:
        if param.name is None or ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        values = list(value) if getattr(param, "multiple", False) else [value]
        if isinstance(param, click.Argument):
            parts += [shlex.quote(str(v)) for v in values]
            continue
        flag = max(param.opts, key=len)
        for v in values:
            parts += [flag] if getattr(param, "is_flag", False) else [flag, shlex.quote(str(v))]
    return " ".join(parts)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers were measured on; torch is never imported here."""
    versions = {}
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    llama_features = ""
    with contextlib.suppress(Exception):
        from radixpert.runtime.llm import build_features

        llama_features = build_features()
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "memory_gib": memory_gib(),
        "gpu": gpu_name(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "llama_cpp_features": llama_features,
    }


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- Markdown


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _cell(s: dict[str, float] | None) -> str:
    return f"{_ms(s['median'])} ({_ms(s['p95'])}; {_ms(s['min'])}–{_ms(s['max'])})" if s else "–"


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _bound_lines(bound: dict[str, Any] | None) -> list[str]:
    if not bound:
        return []
    b = bound["bytes_per_token"]
    lines = [
        "",
        f"**Decode vs the bandwidth bound** ({bound['where']}): {bound['achieved_tok_s']:.1f} tok/s achieved, "
        f"bound {bound['bound_tok_s']:.1f} tok/s = {bound['bandwidth_gb_s']:.1f} GB/s ÷ {b['total'] / 1e6:,.1f} MB/token "
        f"(weights {b['weights'] / 1e6:,.1f} MB incl. output head {b['output_head'] / 1e6:,.1f} MB, "
        f"KV {b['kv'] / 1e6:,.1f} MB at {b['positions']:.0f} positions): **{100 * bound['share']:.0f}%** of the bound.",
    ]
    if bound.get("cpu_bandwidth"):
        cells = ", ".join(f"{r['threads']}: {r['median_gb_s']:.1f} ({r['best_gb_s']:.1f})" for r in bound["cpu_bandwidth"])
        lines.append(f"CPU read bandwidth by threads, GB/s, median (best) of 10 passes over "
                     f"{bound['cpu_bandwidth'][0]['bytes'] / 2**30:.2g} GiB: {cells}.")
    gpu = bound.get("gpu_bandwidth") or {}
    lines.append(f"GPU read bandwidth: {gpu['median_gb_s']:.0f} GB/s median ({gpu['best_gb_s']:.0f} best; {gpu['name']})."
                 if "median_gb_s" in gpu
                 else f"GPU: {gpu.get('skipped', 'not measured')}.")
    return lines


def _machine_lines(info: dict[str, Any], engines: list[dict[str, Any]]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    lines = [
        "",
        f"**Machine:** {info['cpu']}, {info['usable_cpus']} usable of {info['logical_cpus']} logical CPUs, "
        f"{info['threads']} threads, {info['memory_gib']} GiB; GPU: {info['gpu'] or 'none'}; "
        f"load average at start {info['load_average']}, at the end {info.get('load_average_end')}.",
        f"**Versions:** {versions}. llama.cpp: {info['llama_cpp_features']}.",
    ]
    for e in engines:
        if e.get("engine") == "runtime":
            lines.append(f"**Runtime:** ONNX Runtime providers {e.get('providers')}, llama.cpp {e.get('llm_file')} with "
                         f"{e.get('threads')} threads and {e.get('llm_gpu_layers')} GPU layers.")
        elif e.get("engine") == "eager":
            lines.append(f"**Eager:** torch {e.get('torch')} on {e.get('device')} ({e.get('gpu') or 'CPU'}), "
                         f"{e.get('threads')} threads, {e.get('dtype')}, attention {e.get('attn_implementation')}.")
    return lines


def markdown_run(result: dict[str, Any]) -> str:
    s = result["runtime"]["summary"]
    rows = [[LABELS[k], _cell(s.get(k))] for k in ("read_ms", "preprocess_ms", "frontend_ms", "prefix_ms",
                                                  "visual_prefill_ms", "first_token_ms", "ttft_ms", "decode_ms", "total_ms")]
    rows.append(["decode tokens/s", _cell(s.get("decode_tokens_per_s"))])
    rows.append(["cold start: process start → first token", _cell(result["runtime"]["cold"])])
    rows.append(["model load (in that process)", _cell(result["runtime"]["load"])])
    p = result["params"]
    lines = [
        f"# radixpert-bench {result['command_name']}: {result['title']}",
        "",
        f"`{result['command']}`",
        "",
        f"{p['tokens']} new tokens per report (EOS ignored); {p['rounds']} fresh process(es), each {p['warmup']} warm-up + "
        f"{p['repeats']} timed reports over {len(p['scans'])} scan(s); prefix cached after a process's first report.",
        "",
        *_table(rows, ["stage", "ms: median (p95; min–max)"]),
        *_bound_lines(result.get("bound")),
        *_machine_lines(result["machine"], [result["runtime"]["engine"]]),
    ]
    return "\n".join(lines) + "\n"


def markdown_compare(result: dict[str, Any]) -> str:
    rt, eg = result["runtime"]["summary"], result["eager"]["summary"]
    ratios = result["ratios"]
    rows = []
    for key in ("read_ms", "preprocess_ms", "frontend_ms", "prefill_ms", "ttft_ms", "decode_ms", "total_ms"):
        rows.append([LABELS[key], _cell(rt.get(key)), _cell(eg.get(key)), f"{ratios[key]:.2f}×"])
    rows.append(["decode tokens/s", _cell(rt.get("decode_tokens_per_s")), _cell(eg.get("decode_tokens_per_s")),
                 f"{ratios['decode_tokens_per_s']:.2f}×"])
    rc, ec = result["runtime"]["cold"], result["eager"]["cold"]
    rows.append(["cold start: process start → first token", _cell(rc), _cell(ec), f"{ratios['cold_start_ms']:.2f}×"])
    p = result["params"]
    agree = result["token_agreement"]
    lines = [
        f"# radixpert-bench compare: {result['title']}",
        "",
        f"`{result['command']}`",
        "",
        f"Runtime (ONNX Runtime + llama.cpp {result['runtime']['engine'].get('llm_file')}) vs PyTorch eager (fp32, HF "
        f"`generate` with `inputs_embeds`), same bundle weights, {p['tokens']} new tokens per report (EOS ignored). "
        f"{p['rounds']} rounds, each engine in its own process, alternating; per process {p['warmup']} warm-up + "
        f"{p['repeats']} timed reports over {len(p['scans'])} scan(s).",
        "",
        *_table(rows, ["stage", "runtime ms: median (p95; min–max)", "eager ms: median (p95; min–max)", "speed-up"]),
        "",
        f"**End to end: {ratios['total_ms']:.2f}× faster** than PyTorch eager (median per report). Speed-up = eager ÷ "
        "runtime time (for tokens/s: runtime ÷ eager). Greedy tokens of the first scan agree for the first "
        f"{agree['common_prefix']} of {agree['tokens']} (a quantized LLM drifts from fp32 after a while).",
        *_speculative_lines(result),
        *_bound_lines(result.get("bound")),
        *_machine_lines(result["machine"], [result["runtime"]["engine"], result["eager"]["engine"]]),
    ]
    return "\n".join(lines) + "\n"


def _speculative_lines(result: dict[str, Any]) -> list[str]:
    """The speculative-decoding row of compare: the same runtime, drafts verified from the n-gram index."""
    if "ratios_speculative" not in result:
        return []
    sp, ratios = result["runtime_speculative"]["summary"], result["ratios_speculative"]
    drafted = sp.get("drafted_tokens", {}).get("median", 0.0)
    accepted = sp.get("accepted_tokens", {}).get("median", 0.0)
    rows = [[LABELS[k], _cell(sp.get(k)), f"{ratios[k]:.2f}×"] for k in ("prefill_ms", "decode_ms", "total_ms")]
    rows.append(["decode tokens/s", _cell(sp.get("decode_tokens_per_s")), f"{ratios['decode_tokens_per_s']:.2f}×"])
    return [
        "",
        "## With speculative decoding",
        "",
        *_table(rows, ["stage", "runtime speculative ms: median (p95; min–max)", "speed-up vs eager"]),
        "",
        f"**End to end with speculative decoding: {ratios['total_ms']:.2f}× faster** than PyTorch eager. Median "
        f"drafts per report {drafted:.0f}, accepted {accepted:.0f}"
        + (f" ({accepted / drafted:.0%})." if drafted else "."),
    ]


# --------------------------------------------------------------------------- chart


def write_chart(bars: dict[str, dict[str, dict[str, float]]], title: str, path: Path) -> Path | None:
    """Stacked horizontal bars of median stage times, one bar per engine; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colours = ["#56B4E9", "#009E73", "#E69F00", "#CC79A7", "#0072B2"]
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.7 * len(bars)))
    names = list(bars)
    for row, name in enumerate(names):
        left = 0.0
        for stage, colour in zip(CHART_STAGES, colours):
            width = bars[name].get(stage, {}).get("median", 0.0)
            ax.barh(row, width, left=left, color=colour, label=LABELS[stage] if row == 0 else None)
            left += width
        total = bars[name].get("total_ms", {}).get("median", left)
        ax.text(left, row, f"  {total / 1e3:.2f} s", va="center")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("median ms per report")
    ax.set_title(title, fontsize=10, pad=24)
    ax.margins(x=0.15)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(CHART_STAGES), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
