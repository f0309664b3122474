"""``radixpert-bench batch``: reports per hour of ``radixpert-batch`` with 1 actor and with N actors.

Each setting is a fresh ``radixpert-batch`` process with its own local Ray on loopback and a fresh
output folder, on the same inputs and the same CPUs: ``--cpus`` CPUs shared out between the actors
(1 actor of C CPUs, 2 of C/2, ...), each actor with as many threads as its CPUs. Per setting: the
wall time of the reporting phase (actor start and bundle load included) as ``radixpert-batch``
prints it, reports/hour, the ratio to 1 actor, the whole command's wall time (Ray start included),
and how many reports and token ids are identical to the 1-actor run's. With ``--address`` every
setting runs on that existing cluster instead; with ``--runtime`` every row is also compared with
the runtime's ``Reporter`` reporting the same file one scan at a time in this process: the
independent answer ``radixpert-run`` gives.

Benchmarks report; they set no pass mark.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from radixpert.errors import UsageError, cli_errors

# Per-scan stages from the rows' timings (ms): DICOM read and decode, frontend (its share of a batched call),
# the LLM's visual prefill and decode, and the whole scan inside the actor.
STAGES = ("read_ms", "preprocess_ms", "frontend_ms", "visual_prefill_ms", "decode_ms", "total_ms")
DONE = re.compile(r"done: (\d+) input\(s\) in ([0-9.]+) s: (\d+) reported, (\d+) withheld, (\d+) refused")


def inputs_of(data: str | None, count: int) -> list[str]:
    """The first ``count`` inputs of ``data`` (folder, glob or CSV manifest), or ``count`` phantoms of seed 7."""
    from radixpert.batch.inputs import collect_inputs

    if data is None:
        from radixpert.benchmarks.cli import throughput_scans

        return throughput_scans(count)
    manifests = (data,) if data.endswith(".csv") else ()
    paths, _ = collect_inputs(() if manifests else (data,), manifests)
    if not paths:
        raise UsageError(f"--data {data} holds no DICOM or PNG file")
    return sorted(str(Path(p).resolve()) for p in paths)[:count]


def run_setting(bundle: str, paths: list[str], actors: int, cpus: int, batch: int, quant: str | None,
                work: Path, address: str | None = None) -> dict[str, Any]:
    """One ``radixpert-batch`` run: its timings, counts and rows (report and token ids by input)."""
    from radixpert.batch.output import read_rows

    out = work / f"out-{actors}"
    per_actor = cpus / actors
    where = ["--address", address] if address else ["--local-cpus", str(cpus)]
    command = [sys.executable, "-m", "radixpert.batch.cli", "--out", str(out), "--bundle", bundle,
               *where, "--actors", str(actors), "--cpus-per-actor", f"{per_actor:g}",
               "--threads", str(max(1, int(per_actor))), "--batch", str(batch), "--rows-per-file", "4",
               "--no-progress", *(["--quant", quant] if quant else []), *paths]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=7200, env=env)
    wall = time.perf_counter() - started
    found = DONE.search(done.stderr)
    if done.returncode not in (0, 3, 6) or found is None:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise UsageError(f"radixpert-batch with {actors} actor(s) failed (exit {done.returncode}): {tail[0]}")
    n, seconds = int(found.group(1)), float(found.group(2))
    table = read_rows(out, ["input", "report", "tokens", "status", "timings"]).to_pylist()
    stages = [json.loads(r["timings"]) for r in table if r["timings"]]
    return {"actors": actors, "cpus_per_actor": per_actor, "threads_per_actor": max(1, int(per_actor)),
            "batch": batch, "inputs": n, "reported": int(found.group(3)), "withheld": int(found.group(4)),
            "refused": int(found.group(5)), "exit_code": done.returncode, "report_s": round(seconds, 2),
            "reports_per_hour": round(n / seconds * 3600, 1) if seconds else None, "wall_s": round(wall, 2),
            "load_average_after": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "rows": len(table), "median_ms": {k: round(statistics.median(t.get(k, 0.0) for t in stages), 1)
                                              for k in STAGES} if stages else {},
            "_rows": {r["input"]: (r["report"], r["tokens"]) for r in table}}


def runtime_rows(bundle: str, paths: list[str], quant: str | None, threads: int) -> dict[str, tuple[str, list[int]]]:
    """Report and token ids of every input from the runtime, one scan at a time (what radixpert-run writes)."""
    from radixpert.bundle import load_bundle
    from radixpert.runtime.pipeline import Reporter

    reporter = Reporter(load_bundle(bundle), quant=quant, threads=threads)
    try:
        found = {}
        for i, path in enumerate(paths, 1):
            result = reporter.report(path)
            found[path] = (result.report, list(result.tokens))
            if i % 10 == 0 or i == len(paths):
                click.echo(f"runtime, one scan at a time: {i}/{len(paths)}", err=True)
        return found
    finally:
        reporter.close()


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median reports/hour (the lower middle one for an even count), with every round's value."""
    ordered = sorted(runs, key=lambda r: r["reports_per_hour"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["rounds_reports_per_hour"] = [r["reports_per_hour"] for r in runs]
    chosen["rounds_load_average_after"] = [r["load_average_after"] for r in runs]
    return chosen


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# radixpert-bench batch: {result['title']}", "", f"`{result['command']}`", "",
             f"{result['inputs']} inputs; each setting a fresh radixpert-batch process " + (
                 f"on the existing cluster {result['address']}" if result.get("address") else "with its own local Ray")
             + f" ({result['cpus']} CPUs shared out between the actors), Ray {result['ray']}. Reporting time includes "
             "actor start and bundle load; wall time adds Ray's start. Ratios are to the first row of this invocation; "
             f"{result['rounds']} round(s), interleaved, the median shown.",
             "", f"| actors | CPUs / threads per actor | batch | reports/hour (median) | × {result['rows'][0]['actors']} actor(s) | each round | "
             f"reporting s | wall s | rows | identical to {result['rows'][0]['actors']} actor(s) | identical to the runtime |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        each = ", ".join(f"{v:.0f}" for v in row["rounds_reports_per_hour"])
        lines.append(f"| {row['actors']} | {row['cpus_per_actor']:g} / {row['threads_per_actor']} | {row['batch']} | "
                     f"{row['reports_per_hour']:.0f} | {row['ratio']:.2f}× | {each} | {row['report_s']:.1f} | "
                     f"{row['wall_s']:.1f} | {row['rows']} | {row['identical']}/{row['rows']} | "
                     + (f"{row['identical_runtime']}/{row['rows']} |" if "identical_runtime" in row else "– |"))
    lines += ["", "Median per scan inside the actors, ms (frontend: the whole batched call; the scans of a batch "
              "wait for one another, so total is more than the sum at batch > 1):", "",
              "| actors | " + " | ".join(s.removesuffix("_ms") for s in STAGES) + " |",
              "|---|" + "---|" * len(STAGES)]
    for row in result["rows"]:
        lines.append(f"| {row['actors']} | " + " | ".join(f"{row['median_ms'].get(s, 0):.0f}" for s in STAGES) + " |")
    lines += ["", "1-minute load average after each round: " + "; ".join(
        f"{row['actors']} actor(s): " + ", ".join(str(x[0]) if x else "?" for x in row["rounds_load_average_after"])
        for row in result["rows"]) + f" (on {result['cpus']} CPUs).", "", f"Machine: {result['machine']}", ""]
    return "\n".join(lines)


@click.command("batch")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False), help="Bundle from radixpert-export.")
@click.option("--data", default=None, help="Inputs: a folder, a quoted glob or a CSV manifest [default: phantom DICOMs "
                                           "of seed 7, made once under $RADIXPERT_CACHE].")
@click.option("--scans", "count", type=click.IntRange(1, 100000), default=24, show_default=True,
              help="How many inputs (the first ones of --data, sorted).")
@click.option("--actors", "actor_counts", default="1,2", show_default=True, help="Actor counts to compare, comma-separated.")
@click.option("--cpus", type=click.IntRange(1, 4096), default=None,
              help="CPUs of the local Ray, shared out between the actors [default: usable CPUs].")
@click.option("--batch", type=click.IntRange(1, 64), default=4, show_default=True, help="radixpert-batch --batch.")
@click.option("--rounds", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Rounds of every setting, interleaved (1, 2, 1, 2 ...); the table shows each setting's median.")
@click.option("--quant", default=None, help="Which LLM file of the bundle [default: the bundle's default].")
@click.option("--address", default=None, help="Run every setting on this existing Ray cluster (host:port, auto) "
                                              "instead of a fresh local Ray; --cpus is then the cluster's CPUs to use.")
@click.option("--runtime/--no-runtime", "against_runtime", default=False, show_default=True,
              help="Also report every input with the runtime one scan at a time, and count identical rows.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for result.json and result.md [default: bench-results/batch-<bundle name>].")
@cli_errors()
def batch(bundle_dir: str, data: str | None, count: int, actor_counts: str, cpus: int | None, batch: int,
          rounds: int, quant: str | None, address: str | None, against_runtime: bool, out_dir: str | None) -> None:
    """Reports per hour of radixpert-batch with 1 actor and with more, on the same inputs and CPUs.

    Each setting runs in a fresh process with a fresh local Ray. Per setting: reports/hour and the
    ratio to 1 actor, the reporting and wall times, and how many reports (text and token ids)
    are identical to the 1-actor run's.
    """
    import ray

    from radixpert.benchmarks.cli import save_result
    from radixpert.benchmarks.report import command_line, machine_info
    from radixpert.bundle import load_bundle

    counts = sorted({int(a) for a in actor_counts.split(",") if a.strip()})
    if not counts or counts[0] < 1:
        raise UsageError(f"--actors takes a comma list of positive counts, got {actor_counts!r}")
    if counts[0] != 1 and not address:
        counts.insert(0, 1)  # the baseline; on an existing cluster the first count given is, as its nodes may be small
    cpus = cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if cpus < counts[-1]:
        raise UsageError(f"{counts[-1]} actors need at least {counts[-1]} CPUs; --cpus is {cpus}")
    bundle = load_bundle(bundle_dir)
    root = str(Path(bundle_dir).resolve())
    paths = inputs_of(data, count)
    runs: dict[int, list[dict[str, Any]]] = {a: [] for a in counts}
    for round_ in range(rounds):
        for actors in counts:
            click.echo(f"round {round_ + 1}/{rounds}: {actors} actor(s) on {len(paths)} input(s)...", err=True)
            with tempfile.TemporaryDirectory(prefix="bench-batch-") as work:
                runs[actors].append(run_setting(root, paths, actors, cpus, batch, quant, Path(work), address))
    rows = [median_run(runs[a]) for a in counts]
    base = rows[0]
    for row in rows:
        row["ratio"] = round(row["reports_per_hour"] / base["reports_per_hour"], 3)
        row["identical"] = sum(1 for k, v in row["_rows"].items() if base["_rows"].get(k) == v)
    if against_runtime:
        expected = runtime_rows(root, paths, quant, cpus)
        for row in rows:
            row["identical_runtime"] = sum(1 for k, v in row["_rows"].items() if expected.get(k) == v)
    for row in rows:
        del row["_rows"]
    name = f"batch-{Path(bundle_dir).name}"
    out = Path(out_dir) if out_dir else Path("bench-results") / name
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": command_line(), "title": f"{Path(bundle_dir).name} "
                                                  f"({quant or bundle.manifest['llm']['default_quant']})",
              "inputs": len(paths), "data": data, "cpus": cpus, "rounds": rounds, "address": address, "ray": ray.__version__, "rows": rows,
              "machine": machine_info(cpus)}
    save_result(out, result, markdown(result))
