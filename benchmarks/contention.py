"""How the runtime shares the CPU: report time idle vs beside one CPU-bound neighbour process.

llama.cpp's and ONNX Runtime's worker threads can spin while they wait for each other. On an
idle machine that saves a few microseconds per step; beside another busy process, a spinning
thread burns the core that the thread it waits for needs, and every step waits for the slowest
thread. runtime/threads.py explains the default this chose. Each setting runs in fresh runtime processes (``benchmarks.worker``), idle and
with a ``while True: pass`` neighbour, alternating within one invocation so that machine drift
cancels; what matters is the ratio loaded / idle of each setting, measured in the same run.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from radixpert.runtime.threads import THREAD_POLICY_ENV

# name -> (environment, threads: a number, or None for the runtime's own choice)
SETTINGS: dict[str, tuple[dict[str, str], int | None]] = {
    "adaptive": ({THREAD_POLICY_ENV: "adaptive"}, None),
    "spin": ({THREAD_POLICY_ENV: "spin"}, 0),
    "passive": ({THREAD_POLICY_ENV: "passive"}, 0),
    "spin-1-thread": ({THREAD_POLICY_ENV: "spin"}, 1),
}
NEIGHBOUR = [sys.executable, "-c", "while True: pass"]


def start_neighbour() -> subprocess.Popen:
    """One CPU-bound process beside the runtime (the caller stops it)."""
    return subprocess.Popen(NEIGHBOUR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure_contention(spec: dict[str, Any], settings: list[str], rounds: int,
                       spawn: Callable[[dict[str, Any], dict[str, str], str], dict[str, Any]]) -> dict[str, Any]:
    """Per setting: per-report totals idle and with a neighbour, pooled over ``rounds`` processes each.

    ``spawn(spec, env, label)`` runs one isolated runtime process and returns its measurement.
    The order alternates per round (idle first, then loaded first) so that drift cancels.
    """
    totals: dict[str, dict[str, list[float]]] = {name: {"idle": [], "neighbour": []} for name in settings}
    for r in range(rounds):
        for name in settings:
            env, threads = SETTINGS[name]
            # 0: the benchmark's --threads, fixed; None: no --threads, the runtime chooses.
            run_spec = {**spec, "engine": "runtime", "threads": spec["threads"] if threads == 0 else threads}
            for load in (("idle", "neighbour") if r % 2 == 0 else ("neighbour", "idle")):
                neighbour = start_neighbour() if load == "neighbour" else None
                try:
                    result = spawn(run_spec, env, f"{name} {load} (round {r + 1}/{rounds})")
                finally:
                    if neighbour is not None:
                        neighbour.kill()
                        neighbour.wait(timeout=10)
                totals[name][load] += [s["total_ms"] for s in result["samples"]]
    return summarize(totals, settings)


def summarize(totals: dict[str, dict[str, list[float]]], settings: list[str]) -> dict[str, Any]:
    """Medians, the slow-down with a neighbour per setting, and each setting's idle speed vs the first."""
    rows = {}
    for name in settings:
        idle = statistics.median(totals[name]["idle"])
        loaded = statistics.median(totals[name]["neighbour"])
        rows[name] = {"idle_ms": idle, "neighbour_ms": loaded, "slowdown": loaded / idle,
                      "idle_samples": totals[name]["idle"], "neighbour_samples": totals[name]["neighbour"]}
    reference = rows[settings[0]]["idle_ms"]
    for name in settings:
        rows[name]["idle_vs_" + settings[0]] = rows[name]["idle_ms"] / reference
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The table of result.md."""
    settings = result["settings"]
    first = settings[0]
    lines = [f"# {result['title']}", "", f"`{result['command']}`", "",
             f"Per-report time (median ms, {result['params']['tokens']} tokens), idle and beside one CPU-bound "
             f"process, {result['params']['rounds']} round(s) of {result['params']['repeats']} reports per condition; "
             f"{result['machine'].get('usable_cpus', '?')} usable CPUs.", "",
             f"| setting | threads | idle | with neighbour | slow-down | idle vs {first} |", "|---|---|---|---|---|---|"]
    for name in settings:
        row = result["rows"][name]
        chosen = SETTINGS[name][1]
        threads = {0: result["params"]["threads"], None: "from load"}.get(chosen, chosen)
        lines.append(f"| {name} | {threads} | {row['idle_ms']:.0f} | {row['neighbour_ms']:.0f} | "
                     f"{row['slowdown']:.2f}x | {row['idle_vs_' + first]:.2f}x |")
    return "\n".join(lines) + "\n"
