"""``radixpert-bench``: latency per stage, against PyTorch eager and against the memory-bandwidth bound."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from radixpert.errors import ModelError, UsageError, cli_errors

SCAN_SIZE = 2048  # default phantoms: the size of a typical digital chest radiograph


def _options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options every measuring subcommand shares."""
    options = [
        click.option("--scans", multiple=True, type=click.Path(exists=True, dir_okay=False),
                     help="DICOM/PNG scans to report on, cycled (repeat the option) [default: two 2048² phantom DICOMs, "
                          "made once under $RADIXPERT_CACHE/bench-scans]."),
        click.option("--rounds", type=click.IntRange(1, 100), default=2, show_default=True,
                     help="Fresh processes per engine, pooled (compare: runtime and eager alternate, ABBA). On a "
                          "shared machine one process's speed varies more than its reports do."),
        click.option("--warmup", type=click.IntRange(0, 1000), default=None, help="Untimed reports first in each process (its first "
                     "report is the cold start) [default: 1]."),
        click.option("--repeats", type=click.IntRange(1, 10000), default=None, help="Timed reports per process: medians and p95 over "
                     "all of them [default: 5; synthetic: 3]."),
        click.option("--tokens", type=click.IntRange(2, 4096), default=64, show_default=True,
                     help="New tokens per report, EOS ignored, so that every run decodes the same work."),
        click.option("--threads", type=click.IntRange(1, 256), default=None,
                     help="CPU threads for every engine [default: usable CPUs, at most 8]."),
        click.option("--providers", default=None, help="ONNX Runtime providers in order, e.g. cuda,cpu [default: tensorrt, "
                                                        "cuda, cpu, those available]."),
        click.option("--gpu-layers", type=int, default=None, help="LLM layers offloaded to the GPU [default: all if this "
                                                                  "llama.cpp build has GPU support, else 0]."),
        click.option("--frontend", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
                     help="Runtime frontend: fp32, or the INT8 one of a bundle exported with radixpert-export --int8."),
        click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
                     help="Folder for result.json, result.md and stages.png [default: bench-results/<command>-<name>]."),
        click.option("--bandwidth-mib", type=click.IntRange(16, 1 << 16), default=1024, show_default=True,
                     help="Buffer for the memory bandwidth test; keep it far larger than the CPU caches."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Latency of the exported runtime per stage, against PyTorch eager and against the memory-bandwidth bound.

    \b
      radixpert-bench run --bundle B          the runtime, stage by stage
      radixpert-bench compare --bundle B      runtime vs PyTorch eager, each in its own process
      radixpert-bench synthetic --llm medgemma-4b --quant q4_k_m
                                              the full-size model with random weights (no training needed)
      radixpert-bench contention --bundle B   idle vs beside a CPU-bound process, per thread-wait setting
      radixpert-bench diff A.json B.json      are two runs' medians within each other's spread?

    Every subcommand writes result.json, result.md and stages.png. Benchmarks report; they set no pass mark.
    Exit codes: 0 ok; 2 usage; 3 a scan refused; 4 bundle missing or invalid; 1 internal error.
    """


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False), help="Bundle from radixpert-export.")
@click.option("--quant", default=None, help="Which LLM file of the bundle [default: the bundle's default].")
@_options
@cli_errors()
def run(bundle_dir: str, quant: str | None, **common: Any) -> None:
    """Time every stage of the exported runtime (ONNX Runtime + llama.cpp) on this machine.

    Read, preprocess, frontend, prefix, visual prefill, first token, decode tokens/s and end to
    end: medians and p95 over --repeats reports after --warmup, in each of --rounds fresh
    torch-free processes.
    Also: cold start (process start to first token) and decode against the bandwidth bound.
    """
    _bench_runtime(bundle_dir, quant, "run", None, **common)


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False), help="Bundle from radixpert-export "
              "(with hf/ and frontend.safetensors for the eager side).")
@click.option("--quant", default=None, help="Which LLM file of the bundle the runtime uses [default: the bundle's default].")
@click.option("--device", default=None, help="Device of the eager side, cpu or cuda [default: cuda if torch sees one].")
@_options
@cli_errors()
def compare(bundle_dir: str, quant: str | None, device: str | None, **common: Any) -> None:
    """The runtime against the PyTorch eager reference: same weights, scans and token count.

    The eager side is the bundle's merged HF model in fp32 (HF generate with inputs_embeds) and its
    PyTorch frontend. Each engine runs in its own process (torch and ONNX Runtime thread pools fight
    in one), alternating within this invocation. Prints per-stage and end-to-end speed-ups and the
    cold start of each (process start to first token).
    """
    from radixpert.benchmarks.stages import combine, common_prefix
    from radixpert.bundle import load_bundle

    if load_bundle(bundle_dir).path_of("frontend-torch") is None:
        raise ModelError(f"{bundle_dir} has no frontend.safetensors (the PyTorch frontend weights); re-export it with this "
                         "radixpert version to compare against PyTorch")
    ctx = _prepare(bundle_dir, quant, "compare", None, common, default_repeats=5)
    rounds = common["rounds"]
    processes: dict[str, list[dict[str, Any]]] = {"runtime": [], "eager": []}
    with _progress() as progress:
        for r in range(rounds):
            for engine in (("runtime", "eager") if r % 2 == 0 else ("eager", "runtime")):  # ABBA: drift cancels
                spec = {**ctx["spec"], "engine": engine, "device": device}
                processes[engine].append(_spawn(progress, spec, f"{engine} (round {r + 1}/{rounds})"))
    result = _base_result(ctx, "compare")
    result.update(runtime=combine(processes["runtime"]), eager=combine(processes["eager"]), params=ctx["params"])
    rt, eg = result["runtime"]["summary"], result["eager"]["summary"]
    ratios = {k: eg[k]["median"] / rt[k]["median"] for k in ("read_ms", "preprocess_ms", "frontend_ms", "prefill_ms",
                                                               "ttft_ms", "decode_ms", "total_ms")}
    ratios["decode_tokens_per_s"] = rt["decode_tokens_per_s"]["median"] / eg["decode_tokens_per_s"]["median"]
    ratios["cold_start_ms"] = result["eager"]["cold"]["median"] / result["runtime"]["cold"]["median"]
    result["ratios"] = ratios
    a, b = result["runtime"]["tokens_first_scan"], result["eager"]["tokens_first_scan"]
    result["token_agreement"] = {"common_prefix": common_prefix(a, b), "tokens": max(len(a), len(b))}
    _finish(ctx, result, {"runtime": rt, "eager (PyTorch)": eg})


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False), help="Bundle from radixpert-export.")
@click.option("--quant", default=None, help="Which LLM file of the bundle [default: the bundle's default].")
@click.option("--settings", "setting_names", default="adaptive,spin,passive,spin-1-thread", show_default=True,
              help="Thread settings to compare, comma-separated (the first is the reference for idle speed).")
@_options
@cli_errors()
def contention(bundle_dir: str, quant: str | None, setting_names: str, **common: Any) -> None:
    """Report time idle vs beside one CPU-bound neighbour process, per thread-wait setting.

    adaptive: no --threads, the runtime picks its LLM threads from the idle CPUs before each report
    (the default); spin: --threads fixed, threads spin while they wait (the behaviour before);
    passive: --threads fixed, nothing spins; spin-1-thread: one thread. Each condition runs in fresh runtime processes,
    alternating idle and loaded within this invocation; the slow-down ratios are the result.
    """
    from radixpert.benchmarks.contention import SETTINGS, markdown, measure_contention
    from radixpert.benchmarks.report import write_json

    names = [n.strip() for n in setting_names.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        raise UsageError(f"--settings takes a comma list of {', '.join(SETTINGS)}")
    ctx = _prepare(bundle_dir, quant, "contention", None, common, default_repeats=4)
    with _progress() as progress:
        rows = measure_contention(ctx["spec"], names, common["rounds"],
                                  lambda spec, env, what: _spawn(progress, spec, what, env=env))
    result = _base_result(ctx, "contention")
    result.update(settings=names, rows=rows, params=ctx["params"])
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    text = markdown(result)
    write_json(result, ctx["out"] / "result.json")
    (ctx["out"] / "result.md").write_text(text, encoding="utf-8")
    click.echo(text)
    click.echo(f"wrote {ctx['out'] / 'result.json'} and {ctx['out'] / 'result.md'}", err=True)


@main.command()
@click.option("--llm", default="medgemma-4b", show_default=True, help="The shape to build: medgemma-4b (MedGemma-4b-it's "
              "text model, BioViL ResNet-50 + U-Net frontend).")
@click.option("--quant", default="q4_k_m", show_default=True, type=click.Choice(["q4_k_m", "q8_0", "f16"]),
              help="LLM quantization to build and time.")
@_options
@cli_errors()
def synthetic(llm: str, quant: str, **common: Any) -> None:
    """The full-size model with random weights, before anything is trained.

    Builds (once, cached under $RADIXPERT_CACHE) a random Gemma 3 of the preset's text shape with
    the real Gemma 3 tokenizer, converts and quantizes it with radixpert's export path, and a
    random BioViL-shaped frontend; then times it like `run`. Compute does not depend on weight
    values, so the latency is the real model's. Building needs radixpert-edge[export] and about
    16 GB of disk (q4_k_m quantization takes minutes); its reports are noise.
    """
    from radixpert.benchmarks.synthetic import synthetic_bundle

    with _progress() as progress:

        def step(what: str) -> Any:
            return _step(progress, what)

        bundle_dir = synthetic_bundle(llm, quant, common["tokens"], threads=common["threads"], step=step)
    _bench_runtime(str(bundle_dir), quant, "synthetic", f"synthetic {llm} {quant} (random weights)", default_repeats=3,
                   **common)


@main.command()
@click.argument("first", type=click.Path(exists=True, dir_okay=False))
@click.argument("second", type=click.Path(exists=True, dir_okay=False))
@cli_errors()
def diff(first: str, second: str) -> None:
    """Compare two result.json files of the same command: is each median inside the other's min–max spread?"""
    from rich.console import Console
    from rich.table import Table

    from radixpert.benchmarks.stages import within_spread

    a, b = (json.loads(Path(p).read_text(encoding="utf-8")) for p in (first, second))
    table = Table("engine", "stage", "median A", "median B", "Δ", "within spread")
    bad = 0
    for engine in ("runtime", "eager"):
        if engine not in a or engine not in b:
            continue
        sa, sb = a[engine]["summary"], b[engine]["summary"]
        for key in [k for k in sa if k in sb and k not in ("new_tokens", "prefix_cached")]:
            ok = within_spread(sa[key], sb[key])
            bad += not ok
            delta = (sb[key]["median"] - sa[key]["median"]) / sa[key]["median"] if sa[key]["median"] else 0.0
            table.add_row(engine, key, f"{sa[key]['median']:.1f}", f"{sb[key]['median']:.1f}", f"{100 * delta:+.1f}%",
                          "yes" if ok else "[red]no[/red]")
    Console().print(table)
    Console().print(f"{'all' if not bad else f'{bad} not'} within spread")


# --------------------------------------------------------------------------- shared steps


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=False)


def _step(progress: Any, what: str) -> Any:
    import contextlib

    @contextlib.contextmanager
    def context():
        task = progress.add_task(what, total=1)
        yield
        progress.update(task, completed=1)

    return context()


def _spawn(progress: Any, spec: dict[str, Any], what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    from radixpert.benchmarks.worker import run_isolated

    task = progress.add_task(what, total=spec["warmup"] + spec["repeats"])
    result = run_isolated(spec, progress=lambda done, total: progress.update(task, completed=done, total=total), env=env)
    progress.update(task, completed=spec["warmup"] + spec["repeats"])
    return result


def default_scans() -> list[str]:
    """Two phantom DICOMs at a radiograph's size (one uncompressed, one compressed), made once."""
    from radixpert.paths import cache_dir

    folder = cache_dir() / "bench-scans"
    found = sorted(str(p) for p in (folder / "dicom").glob("*.dcm")) if folder.is_dir() else []
    if len(found) >= 2:
        return found
    from radixpert.atomic import build_once
    from radixpert.phantom import write_dataset

    build_once(folder, lambda partial: write_dataset(partial, n=2, seed=7, size=SCAN_SIZE, workers=1, progress=False),
               done=lambda path: len(list((path / "dicom").glob("*.dcm"))) >= 2, what="the benchmark scans")
    return sorted(str(p) for p in (folder / "dicom").glob("*.dcm"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def _default_name(command: str, bundle_name: str, quant: str) -> str:
    """e.g. run-demo-q4_k_m, synthetic-medgemma-4b-q8_0."""
    parts = [command] if not bundle_name.startswith(command) else []
    parts.append(bundle_name)
    if not bundle_name.endswith(quant):
        parts.append(quant)
    return _slug("-".join(parts))


def _prepare(bundle_dir: str, quant: str | None, command: str, title: str | None, common: dict[str, Any],
             default_repeats: int) -> dict[str, Any]:
    """Check the bundle and options, pick scans and threads, measure bandwidth (before any child runs)."""
    from radixpert.benchmarks.bandwidth import cpu_read_bandwidth, gpu_read_bandwidth_isolated
    from radixpert.benchmarks.stages import check_tokens
    from radixpert.bundle import load_bundle
    from radixpert.runtime.frontend import frontend_path, parse_providers

    bundle = load_bundle(bundle_dir)
    quant = quant or bundle.manifest["llm"]["default_quant"]
    bundle.llm_path(quant)  # a one-line ModelError for a quant the bundle lacks
    check_tokens(bundle, common["tokens"])
    threads = common["threads"] or max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                              else os.cpu_count() or 1, 8))
    scans = [str(Path(s).resolve()) for s in common["scans"]] or default_scans()
    warmup = 1 if common["warmup"] is None else common["warmup"]
    repeats = common["repeats"] or default_repeats
    name = title or f"{bundle.config.name} {quant} ({Path(bundle_dir).name})"
    out = Path(common["out_dir"] or Path("bench-results") / _default_name(command, Path(bundle_dir).name, quant))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out folder {out}: {exc.strerror or exc}") from None
    from radixpert.benchmarks.report import machine_info

    machine = machine_info(threads)  # load average before we add our own
    cpu_bw = cpu_read_bandwidth(threads, nbytes=common["bandwidth_mib"] << 20)
    gpu_bw = gpu_read_bandwidth_isolated()
    providers = parse_providers(common["providers"]) if common["providers"] else None
    frontend_path(bundle, common["frontend"])  # a one-line UsageError for int8 on a bundle without it
    spec = {"bundle": str(Path(bundle_dir).resolve()), "scans": scans, "warmup": warmup, "repeats": repeats,
            "tokens": common["tokens"], "threads": threads, "quant": quant, "providers": providers,
            "gpu_layers": common["gpu_layers"], "frontend": common["frontend"]}
    params = {**{k: spec[k] for k in ("scans", "warmup", "repeats", "tokens", "threads", "quant", "frontend")},
              "rounds": common["rounds"]}
    return {"bundle": bundle, "quant": quant, "spec": spec, "params": params, "title": name, "out": out,
            "machine": machine, "cpu_bandwidth": cpu_bw, "gpu_bandwidth": gpu_bw}


def _base_result(ctx: dict[str, Any], command: str) -> dict[str, Any]:
    from radixpert.benchmarks.report import command_line

    bundle = ctx["bundle"]
    return {"command_name": command, "command": command_line(), "title": ctx["title"], "bundle": str(bundle.root),
            "bundle_id": bundle.bundle_id, "synthetic": bool(bundle.manifest.get("synthetic")), "machine": ctx["machine"]}


def _bench_runtime(bundle_dir: str, quant: str | None, command: str, title: str | None, default_repeats: int = 5,
                   **common: Any) -> None:
    from radixpert.benchmarks.stages import combine

    ctx = _prepare(bundle_dir, quant, command, title, common, default_repeats=default_repeats)
    rounds = common["rounds"]
    with _progress() as progress:
        processes = [_spawn(progress, {**ctx["spec"], "engine": "runtime"}, f"runtime (process {r + 1}/{rounds})")
                     for r in range(rounds)]
    result = _base_result(ctx, command)
    result.update(runtime=combine(processes), params=ctx["params"])
    _finish(ctx, result, {"runtime": result["runtime"]["summary"]})


def _finish(ctx: dict[str, Any], result: dict[str, Any], bars: dict[str, Any]) -> None:
    """Bandwidth bound, then result.json, result.md and stages.png; the Markdown also goes to stdout."""
    from rich.console import Console
    from rich.markdown import Markdown

    from radixpert.benchmarks.bound import bound_report
    from radixpert.benchmarks.report import markdown_compare, markdown_run, write_chart, write_json
    from radixpert.benchmarks.stages import prompt_length

    runtime = result["runtime"]
    bundle = ctx["bundle"]
    result["bound"] = bound_report(bundle.llm_path(ctx["quant"]), prompt_length(bundle), ctx["params"]["tokens"],
                                   runtime["summary"]["decode_tokens_per_s"]["median"], ctx["cpu_bandwidth"],
                                   ctx["params"]["threads"], ctx["gpu_bandwidth"], int(runtime["engine"].get("llm_gpu_layers") or 0))
    out: Path = ctx["out"]
    # Other work on the machine shows here: compare with the load average at the start.
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    markdown = markdown_compare(result) if "eager" in result else markdown_run(result)
    chart = write_chart(bars, result["title"], out / "stages.png")
    result["files"] = {"json": "result.json", "markdown": "result.md", "chart": chart.name if chart else None}
    write_json(result, out / "result.json")
    (out / "result.md").write_text(markdown, encoding="utf-8")
    console = Console()
    console.print(Markdown(markdown))
    console.print(f"wrote {out / 'result.json'}, {out / 'result.md'}" + (f", {chart}" if chart else " (no matplotlib: no chart)"))


if __name__ == "__main__":
    main()
