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
      radixpert-bench throughput --bundle B   reports/hour at --batch 1,2,4,8, with and without speculative decoding
      radixpert-bench prefill --bundle B      prompt prefill across n_ubatch, prefill threads and LLM file type
      radixpert-bench verify --bundle B       the cost of verifying k draft tokens in one step vs decoding 1
      radixpert-bench invariance --bundle B   same logits alone in a step or beside others? (per attention setting)
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
    # The runtime one token per step, the runtime with speculative decoding (the same tokens), and eager.
    variants = {"runtime": {"engine": "runtime"}, "runtime_speculative": {"engine": "runtime", "speculative": True},
                "eager": {"engine": "eager", "device": device}}
    if load_bundle(bundle_dir).path_of("ngram") is None:
        del variants["runtime_speculative"]  # a bundle exported before the n-gram index
    processes: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    with _progress() as progress:
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))  # ABBA: drift cancels
            for name in order:
                spec = {**ctx["spec"], **variants[name]}
                processes[name].append(_spawn(progress, spec, f"{name.replace('_', ' ')} (round {r + 1}/{rounds})"))
    result = _base_result(ctx, "compare")
    result.update({name: combine(runs) for name, runs in processes.items()}, params=ctx["params"])
    eg = result["eager"]["summary"]
    result["ratios"] = speedups(result["runtime"], result["eager"])
    tables = {"runtime": result["runtime"]["summary"]}
    if "runtime_speculative" in result:
        result["ratios_speculative"] = speedups(result["runtime_speculative"], result["eager"])
        tables["runtime, speculative"] = result["runtime_speculative"]["summary"]
    a, b = result["runtime"]["tokens_first_scan"], result["eager"]["tokens_first_scan"]
    result["token_agreement"] = {"common_prefix": common_prefix(a, b), "tokens": max(len(a), len(b))}
    _finish(ctx, result, {**tables, "eager (PyTorch)": eg})


def speedups(runtime: dict[str, Any], eager: dict[str, Any]) -> dict[str, float]:
    """Eager time ÷ runtime time per stage (tokens/s: runtime ÷ eager), from one invocation's medians."""
    rt, eg = runtime["summary"], eager["summary"]
    ratios = {k: eg[k]["median"] / rt[k]["median"] for k in ("read_ms", "preprocess_ms", "frontend_ms", "prefill_ms",
                                                               "ttft_ms", "decode_ms", "total_ms")}
    ratios["decode_tokens_per_s"] = rt["decode_tokens_per_s"]["median"] / eg["decode_tokens_per_s"]["median"]
    ratios["cold_start_ms"] = eager["cold"]["median"] / runtime["cold"]["median"]
    return ratios


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
    save_result(ctx["out"], result, markdown(result))


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
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False), help="Bundle from radixpert-export.")
@click.option("--batch", "batches", default="1,2,4,8", show_default=True, help="Batch sizes to measure, comma-separated.")
@click.option("--scans", "count", type=click.IntRange(1, 10000), default=16, show_default=True,
              help="How many scans each setting reports: phantom DICOMs of seed 7 (made once under $RADIXPERT_CACHE).")
@click.option("--scan", "given", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Report these scans instead (repeatable).")
@click.option("--no-speculative", is_flag=True, help="Measure plain decoding only (no speculative rows).")
@click.option("--quant", default=None, help="Which LLM file of the bundle [default: the bundle's default].")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads [default: usable CPUs, at most 8].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for result.json and result.md [default: bench-results/throughput-<bundle name>].")
@cli_errors()
def throughput(bundle_dir: str, batches: str, count: int, given: tuple[str, ...], no_speculative: bool, quant: str | None,
               threads: int | None, out_dir: str | None) -> None:
    """Reports per hour at each batch size, with and without speculative decoding.

    Each setting runs in a fresh process and reports the same scans (EOS honoured). Per setting:
    reports/hour and its ratio to plain batch 1, p50/p95 latency per report, decode tokens/s per
    sequence and aggregate, draft acceptance, how many reports are identical to plain decoding's,
    peak RSS and the KV cache size.
    """
    from radixpert.benchmarks.report import command_line, machine_info
    from radixpert.benchmarks.throughput import markdown, measure_throughput
    from radixpert.bundle import load_bundle

    sizes = sorted({int(b) for b in batches.split(",") if b.strip()})
    if not sizes or sizes[0] < 1:
        raise UsageError(f"--batch takes a comma list of positive sizes, got {batches!r}")
    bundle = load_bundle(bundle_dir)
    scans = [str(Path(s).resolve()) for s in given] or throughput_scans(count)
    with _progress() as progress:
        rows = measure_throughput(str(Path(bundle_dir).resolve()), scans, sizes, not no_speculative, threads, quant,
                                  progress=lambda what: progress.add_task(what, total=None))
    name = _slug(f"throughput-{Path(bundle_dir).name}")
    out = Path(out_dir) if out_dir else Path("bench-results") / name
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": command_line(), "title": f"{Path(bundle_dir).name} ({quant or bundle.manifest['llm']['default_quant']})",
              "scans": len(scans), "rows": rows, "machine": machine_info(threads or min(os.cpu_count() or 1, 8))}
    save_result(out, result, markdown(result))


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False), help="Bundle from radixpert-export.")
@click.option("--quants", default=None, help="LLM files to compare, comma-separated [default: every one in the bundle].")
@click.option("--ubatch", "ubatches", default="64,128,256,512", show_default=True, help="llama.cpp n_ubatch values.")
@click.option("--threads-batch", "batch_threads", default=None, help="Prefill thread counts [default: 1 up to --threads].")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Decode threads [default: usable CPUs, at most 8].")
@click.option("--rounds", type=click.IntRange(1, 100), default=5, show_default=True, help="Timed rounds (interleaved).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for result.json and result.md [default: bench-results/prefill-<bundle name>].")
@cli_errors()
def prefill(bundle_dir: str, quants: str | None, ubatches: str, batch_threads: str | None, threads: int | None,
            rounds: int, out_dir: str | None) -> None:
    """The prompt prefill across n_ubatch, prefill threads and LLM file type (a real scan's visual tokens)."""
    from radixpert.benchmarks.prefill import markdown, measure_prefill
    from radixpert.benchmarks.report import command_line
    from radixpert.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    files = [q.strip() for q in quants.split(",")] if quants else bundle.quants
    missing = [q for q in files if q not in bundle.quants]
    if missing:
        raise UsageError(f"the bundle has no {', '.join(missing)} LLM file; it has {', '.join(bundle.quants)}")
    threads = threads or min(len(os.sched_getaffinity(0)), 8)
    counts = [int(t) for t in batch_threads.split(",")] if batch_threads else list(range(1, threads + 1))
    visual = _visual_tokens(bundle, threads)
    with _progress() as progress:
        rows = measure_prefill(bundle, visual, files, [int(u) for u in ubatches.split(",")], counts, threads, rounds,
                               progress=lambda what: progress.add_task(what, total=None))
    out = Path(out_dir) if out_dir else Path("bench-results") / _slug(f"prefill-{Path(bundle_dir).name}")
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": command_line(), "title": Path(bundle_dir).name, "rounds": rounds, "threads": threads, "rows": rows}
    save_result(out, result, markdown(result))


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False), help="Bundle from radixpert-export.")
@click.option("--k", "counts", default="1,2,3,5,9", show_default=True,
              help="Tokens per verify step (1 = plain decoding; k drafts are verified in a step of k + 1).")
@click.option("--acceptance", type=click.FloatRange(0, 1), default=None,
              help="A draft acceptance rate measured elsewhere (e.g. the demo's, from throughput), to project the gain.")
@click.option("--quant", default=None, help="Which LLM file of the bundle [default: the bundle's default].")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads [default: usable CPUs, at most 8].")
@click.option("--rounds", type=click.IntRange(1, 100), default=5, show_default=True, help="Timed rounds.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for result.json and result.md [default: bench-results/verify-<bundle name>].")
@cli_errors()
def verify(bundle_dir: str, counts: str, acceptance: float | None, quant: str | None, threads: int | None, rounds: int,
           out_dir: str | None) -> None:
    """The cost of one decode step that verifies k tokens against one that decodes 1, after a real prompt.

    With --acceptance a (from a model whose drafts can be judged), a step of k drafts yields on
    average 1 + a + a^2 + ... + a^k tokens (drafts accepted in order, then the model's own token);
    the projected decode speed-up is that over the step's cost ratio, and is labelled a projection.
    """
    from radixpert.benchmarks.prefill import measure_verify_cost
    from radixpert.benchmarks.report import command_line
    from radixpert.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    ks = sorted({int(k) for k in counts.split(",") if k.strip()})
    if not ks or ks[0] != 1:
        raise UsageError("--k must include 1 (plain decoding, the reference)")
    threads = threads or min(len(os.sched_getaffinity(0)), 8)
    visual = _visual_tokens(bundle, threads)
    with _progress() as progress:
        progress.add_task("verify steps", total=None)
        rows = measure_verify_cost(bundle, visual, ks, threads, quant, rounds)
    for row in rows:
        if acceptance is not None:
            drafts = row["k"] - 1
            expected = sum(acceptance ** i for i in range(drafts + 1))  # tokens per step
            row["projected_tokens_per_step"] = expected
            row["projected_speedup"] = expected / row["vs_first"]
    out = Path(out_dir) if out_dir else Path("bench-results") / _slug(f"verify-{Path(bundle_dir).name}")
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": command_line(), "title": Path(bundle_dir).name, "threads": threads, "rounds": rounds,
              "acceptance": acceptance, "rows": rows}
    lines = [f"# radixpert-bench verify: {result['title']}", "", f"`{result['command']}`", "",
             "| tokens verified in one step | median ms | min–max ms | × one token |"
             + (" projected tokens/step | projected decode speed-up (a projection) |" if acceptance is not None else ""),
             "|---|---|---|---|" + ("---|---|" if acceptance is not None else "")]
    for r in rows:
        line = f"| {r['k']} | {r['median_ms']:.0f} | {r['min_ms']:.0f}–{r['max_ms']:.0f} | {r['vs_first']:.2f}× |"
        if acceptance is not None:
            line += f" {r['projected_tokens_per_step']:.2f} | {r['projected_speedup']:.2f}× |"
        lines.append(line)
    save_result(out, result, "\n".join(lines) + "\n")


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False), help="Bundle from radixpert-export.")
@click.option("--quant", default=None, help="Which LLM file of the bundle [default: the bundle's default].")
@click.option("--k", type=click.IntRange(2, 16), default=5, show_default=True, help="Positions sharing one step.")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads [default: usable CPUs, at most 8].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for result.json and result.md [default: bench-results/invariance-<bundle name>].")
@cli_errors()
def invariance(bundle_dir: str, quant: str | None, k: int, threads: int | None, out_dir: str | None) -> None:
    """Does a position get the same logits alone in a step as beside others, per attention setting?

    Speculative decoding (k positions of one sequence per verify step) is exact only where the first
    column is 0; batched decoding (one position in each of k sequences) only where the third is.
    """
    from radixpert.benchmarks.invariance import markdown, measure_invariance
    from radixpert.benchmarks.report import command_line, machine_info
    from radixpert.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    threads = threads or min(len(os.sched_getaffinity(0)), 8)
    visual = _visual_tokens(bundle, threads)
    with _progress() as progress:
        progress.add_task("attention settings", total=None)
        rows = measure_invariance(bundle, visual, quant, threads, k)
    info = machine_info(threads)
    result = {"command": command_line(), "title": f"{Path(bundle_dir).name} ({quant or bundle.manifest['llm']['default_quant']})",
              "threads": threads, "rows": rows, "llama_cpp_features": info["llama_cpp_features"], "machine": info}
    out = Path(out_dir) if out_dir else Path("bench-results") / _slug(f"invariance-{Path(bundle_dir).name}")
    out.mkdir(parents=True, exist_ok=True)
    save_result(out, result, markdown(result))


def _visual_tokens(bundle: Any, threads: int) -> Any:
    """The frontend's visual tokens (N_p, D) for the first default bench scan."""
    from radixpert.imageio import read_image
    from radixpert.runtime.frontend import OnnxFrontend

    scan = read_image(default_scans()[0], bundle.config.image_size).model_input[None]
    return OnnxFrontend(bundle.path_of("frontend"), threads=threads).run(scan)[0][0]


def save_result(out: Path, result: dict[str, Any], text: str) -> None:
    """result.json and result.md in ``out``; the Markdown also goes to stdout."""
    from radixpert.benchmarks.report import write_json

    write_json(result, out / "result.json")
    (out / "result.md").write_text(text, encoding="utf-8")
    click.echo(text)
    click.echo(f"wrote {out / 'result.json'} and {out / 'result.md'}", err=True)


def throughput_scans(count: int) -> list[str]:
    """``count`` 1024² phantom DICOMs of seed 7 (the evaluation seed, never trained on), made once."""
    from radixpert.atomic import build_once
    from radixpert.paths import cache_dir
    from radixpert.phantom import write_dataset

    folder = cache_dir() / f"throughput-scans-{count}"
    build_once(folder, lambda partial: write_dataset(partial, n=count, seed=7, size=1024, workers=1, progress=False),
               done=lambda path: len(list((path / "dicom").glob("*.dcm"))) >= count, what="the throughput scans")
    return sorted(str(p) for p in (folder / "dicom").glob("*.dcm"))[:count]


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


from radixpert.benchmarks.serve import serve as _serve  # noqa: E402  (the DICOM node; benchmarks/serve.py)

main.add_command(_serve)

from radixpert.benchmarks.batch import batch as _batch  # noqa: E402  (radixpert-batch, 1 vs N actors; benchmarks/batch.py)

main.add_command(_batch)


if __name__ == "__main__":
    main()
