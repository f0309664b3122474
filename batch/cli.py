"""``radixpert-batch``: draft reports for a whole archive on Ray Data, into a resumable Parquet dataset."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from radixpert.errors import (EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_WITHHELD, ModelError, UsageError,
                              cli_errors)

EXIT_INTERRUPTED = 130


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder of the Parquet dataset (created; a rerun resumes it).")
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False), default=None,
              help="Bundle folder from radixpert-export, at the same path on every node [default: $RADIXPERT_BUNDLE, "
                   "else the demo bundle].")
@click.option("--manifest", "manifests", multiple=True, type=click.Path(dir_okay=False),
              help="CSV of inputs: PadChest format, or a path/DicomPath column relative to the CSV. Repeatable.")
@click.option("--address", default=None,
              help="Ray cluster to run on: auto (the cluster this machine belongs to), ray://host:10001 (Ray Client) "
                   "or host:6379 [default: start a local Ray for this run].")
@click.option("--actors", type=click.IntRange(1, 4096), default=None,
              help="Report actors, each with one loaded bundle [default: one per GPU, else one per --cpus-per-actor "
                   "CPUs of the cluster].")
@click.option("--cpus-per-actor", type=click.FloatRange(0.1, 256), default=None,
              help="CPUs each actor reserves [default: 1 with GPUs, else 2].")
@click.option("--gpus-per-actor", type=click.FloatRange(0, 8), default=None,
              help="GPUs each actor reserves; 0.5 puts two actors on a GPU so that one decodes DICOM while the other "
                   "runs the model [default: 1 where the cluster has GPUs, else 0].")
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="CPU threads per actor for ONNX Runtime and llama.cpp [default: --cpus-per-actor, rounded up].")
@click.option("--rows-per-file", type=click.IntRange(1, 100000), default=16, show_default=True,
              help="Inputs per actor call and per Parquet part file; an interrupted run loses at most the calls in flight.")
@click.option("--batch", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Scans each actor decodes together (continuous batching): the same reports as one at a time, "
                   "more per hour where decoding is memory-bound (a GPU).")
@click.option("--local-cpus", type=click.IntRange(1, 4096), default=None,
              help="CPUs of the local Ray when no --address is given [default: all].")
@click.option("--quant", default=None, help="Which LLM file of the bundle to use [default: the bundle's default].")
@click.option("--frontend", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="Frontend model: fp32, or the INT8 one of a bundle exported with --int8.")
@click.option("--providers", default=None, help="ONNX Runtime providers in order, e.g. cuda,cpu [default: those available].")
@click.option("--gpu-layers", type=int, default=None, help="LLM layers to offload to the GPU [default: all if "
                                                           "llama.cpp has GPU support, else 0].")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=None, help="Report length limit [default: the bundle's].")
@click.option("--on-conflict", type=click.Choice(["warn", "withhold"]), default="warn", show_default=True,
              help="A finding on the side opposite to the image evidence: keep the report, flagged, or withhold it.")
@click.option("--on-implausible", type=click.Choice(["warn", "withhold"]), default="withhold", show_default=True,
              help="No plausible chest anatomy (rotated, inverted, cropped, non-chest): withhold the report, or keep it flagged.")
@click.option("--redact", is_flag=True, help="Write a hash of each file (sha256: and 16 hex digits) in the input "
                                              "column instead of its path.")
@click.option("--dicomweb", "dicomweb_url", default=None, metavar="URL",
              help="Also score the instances a DICOMweb archive lists (QIDO-RS), each retrieved by WADO-RS on the "
                   "actor's node and deleted after; e.g. http://pacs:8042/dicom-web.")
@click.option("--query", "queries", multiple=True, metavar="KEY=VALUE",
              help="QIDO-RS filter for --dicomweb, repeatable: Modality=CR, StudyDate=20250101-20250131.")
@click.option("--dicomweb-user", default=None, help="HTTP basic user for --dicomweb.")
@click.option("--dicomweb-password-file", type=click.Path(dir_okay=False), default=None,
              help="File holding that user's password (read on every node: same path everywhere).")
@click.option("--dicomweb-token-file", type=click.Path(dir_okay=False), default=None,
              help="File holding a bearer token for --dicomweb (read on every node).")
@click.option("--sr", "sr_dir", type=click.Path(file_okay=False), default=None,
              help="Also write each reported DICOM scan's draft as a DICOM Comprehensive SR into this folder, named "
                   "<source SOP Instance UID>.sr.dcm (the actors write it: shared storage on a cluster).")
@click.option("--verify", is_flag=True, help="Hash every bundle file again on every node before loading it.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Ray Data's progress bars on stderr.")
@cli_errors(interrupted="interrupted; the rows written so far are kept: run the same command again to resume")
def main(inputs, out_dir, bundle_dir, manifests, address, actors, cpus_per_actor, gpus_per_actor, threads,
         rows_per_file, batch, local_cpus, quant, frontend, providers, gpu_layers, max_new_tokens, on_conflict,
         on_implausible, redact, dicomweb_url, queries, dicomweb_user, dicomweb_password_file, dicomweb_token_file,
         sr_dir, verify, progress) -> None:
    """Write a draft report for every INPUT (DICOM or PNG file, folder searched recursively, or quoted glob
    such as 'archive/**/*.dcm'), every row of --manifest and every instance a --dicomweb archive lists
    for the --query filters, on a Ray cluster or a local Ray, into a
    Parquet dataset in --out: one row per input with the report, token ids, findings, guard checks,
    anatomy-gate verdict, timings, bundle id, or the one-line reason the input was refused.

    \b
    CPU tasks read each input's key (SOP Instance UID from the header, else a hash of the file);
    a pool of actors, each holding one loaded bundle, writes the reports exactly as radixpert-run
    does. A rerun with the same --out skips the inputs already there (resume); a bad file is an
    error row, never a failed job. Messages never name files: outputs name inputs by their key.

    \b
    Exit codes: 0 every input reported; 3 at least one input refused (see the error column);
    6 at least one report withheld by a check (none refused); 1 an input failed with an internal
    error (the run finished); 2 usage error; 4 bundle missing or damaged; 7 Ray could not be
    reached or the cluster failed the run (rerun to resume); 130 interrupted (rerun to resume).
    Not for clinical use: every report is a draft for a radiologist to read and sign.
    """
    from rich.console import Console

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    options = {"address": address, "actors": actors, "cpus_per_actor": cpus_per_actor, "gpus_per_actor": gpus_per_actor,
               "threads": threads, "rows_per_file": rows_per_file, "batch": batch, "local_cpus": local_cpus, "quant": quant,
               "frontend": frontend, "providers": providers, "gpu_layers": gpu_layers, "max_new_tokens": max_new_tokens,
               "policy": {"conflict": on_conflict, "implausible": on_implausible}, "redact": redact, "verify": verify,
               "progress": progress, "sr_dir": sr_dir, "queries": queries,
               "archive": archive_of(dicomweb_url, dicomweb_user, dicomweb_password_file, dicomweb_token_file, queries)}
    sys.exit(score(inputs, manifests, out_dir, bundle_dir, options, err.print))


def score(inputs: tuple[str, ...], manifests: tuple[str, ...], out_dir: str, bundle_dir: str | None,
          options: dict[str, Any], say: Callable[[str], None]) -> int:
    """The whole run: collect, connect, key, skip what is done, report, write, summarize; the exit code."""
    from radixpert.atomic import file_lock
    from radixpert.batch import pipeline
    from radixpert.batch.inputs import collect_inputs
    from radixpert.batch.output import read_done
    from radixpert.bundle import bundle_env_default, load_bundle

    paths, skipped_files = collect_inputs(tuple(inputs), tuple(manifests)) if inputs or manifests else ([], 0)
    if options["archive"]:
        from radixpert.batch.dicomweb import Archive, parse_filters, search

        listed = search(Archive(**options["archive"]), parse_filters(options["queries"]))
        say(f"DICOMweb: {len(listed)} instance(s) listed by QIDO-RS")
        paths += listed
    if not paths:
        raise UsageError("no DICOM or PNG files found in the given inputs; name files, folders, globs, --manifest CSVs "
                         "or a --dicomweb archive")
    root = Path(bundle_dir) if bundle_dir else bundle_env_default()
    if not (root / "manifest.json").is_file():
        raise ModelError(f"no bundle at {root}; build one with radixpert-export (or radixpert-export --demo) and pass "
                         "--bundle DIR")
    bundle = load_bundle(root, verify=options["verify"])
    quant = options["quant"] or bundle.manifest["llm"]["default_quant"]
    bundle.llm_path(quant)  # refuses a quant the bundle lacks, before any cluster starts
    from radixpert.runtime.pipeline import check_kv_fits

    check_kv_fits(bundle, options["batch"], None)  # and a --batch whose KV cache is too large
    out = Path(out_dir)
    with file_lock(out, notify=say, what=f"the output {out}"):
        done = read_done(out, bundle.bundle_id, quant)
        resources = pipeline.connect(options["address"], options["local_cpus"])
        try:
            pipeline.configure_data(options["progress"])
            return _run(paths, skipped_files, out, root, bundle.bundle_id, quant, done, resources, options, say)
        finally:
            pipeline.disconnect()


def _run(paths: list[str], skipped_files: int, out: Path, root: Path, bundle_id: str, quant: str, done: set[str],
         resources: dict[str, float], options: dict[str, Any], say: Callable[[str], None]) -> int:
    from radixpert.batch import pipeline
    from radixpert.batch.output import PartWriter
    from radixpert.batch.dicomweb import is_remote
    from radixpert.runtime.outputs import input_id

    pool = pipeline.default_pool(resources, options["actors"], options["cpus_per_actor"], options["gpus_per_actor"],
                                 options["rows_per_file"])
    threads = options["threads"] or max(1, int(-(-pool.cpus // 1)))
    providers = None
    if options["providers"]:
        from radixpert.runtime.frontend import parse_providers

        providers = parse_providers(options["providers"])
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
    settings = pipeline.Settings(bundle=str(root.absolute()), bundle_id=bundle_id, quant=quant, run_id=run_id,
                                 frontend=options["frontend"], threads=threads, gpu_layers=options["gpu_layers"],
                                 providers=providers, max_new_tokens=options["max_new_tokens"],
                                 batch=options["batch"], verify=options["verify"],
                                 redact=options["redact"], policy=options["policy"],
                                 sr_dir=sr_folder(options["sr_dir"]), archive=options["archive"])
    say(f"radixpert-batch: {len(paths)} input(s); Ray with {resources.get('CPU', 0):g} CPU(s), "
        f"{resources.get('GPU', 0):g} GPU(s); {pool.actors} actor(s) of {pool.cpus:g} CPU(s), {pool.gpus:g} GPU(s), "
        f"{threads} thread(s), batch {options['batch']}; bundle {bundle_id} ({quant})")
    keys = pipeline.key_inputs(paths)
    items = [{"index": i, "path": p, "key": k, "input": input_id(p) if options["redact"] and not is_remote(p) else p}
             for i, (p, k) in enumerate(zip(paths, keys)) if k not in done]
    skipped = len(paths) - len(items)
    if skipped:
        say(f"resuming: {skipped} input(s) already in {out}, {len(items)} to do")
    progress = pipeline.Progress(total=len(items), skipped=skipped)
    writer = PartWriter(out, run_id)
    step = max(1, len(items) // 10)
    shown = [0]

    def notify(p: pipeline.Progress) -> None:
        if p.done - shown[0] >= step or p.done == p.total:
            shown[0] = p.done
            say(f"progress: {p.done}/{p.total} ({p.counts['refused']} refused, {p.counts['withheld']} withheld), "
                f"{p.per_hour:.0f} reports/hour")

    try:
        pipeline.stream_rows(pipeline.report_blocks(items, settings, pool), writer.write, progress,
                             {item["index"] for item in items}, notify)
    except KeyboardInterrupt:
        say(f"interrupted after {progress.done} of {progress.total} input(s); they are in {out}")
        raise
    return summarize(progress, skipped_files, out, say)


def archive_of(url: str | None, user: str | None, password_file: str | None, token_file: str | None,
               queries: tuple[str, ...]) -> dict[str, Any] | None:
    """The --dicomweb options as plain data for the actors, or None without --dicomweb."""
    if not url:
        if user or password_file or token_file or queries:
            raise UsageError("--query and the --dicomweb-* options need --dicomweb URL")
        return None
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--dicomweb takes an http:// or https:// URL, got {url!r}")
    return {"url": url.rstrip("/"), "username": user,
            "token_file": str(Path(token_file).absolute()) if token_file else None,
            "password_file": str(Path(password_file).absolute()) if password_file else None}


def sr_folder(sr_dir: str | None) -> str | None:
    """``--sr`` as an absolute path, created here (on a cluster, the actors' nodes must see the same path)."""
    if not sr_dir:
        return None
    folder = Path(sr_dir).absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the --sr folder {folder}: {exc.strerror}") from None
    return str(folder)


def summarize(progress: Any, skipped_files: int, out: Path, say: Callable[[str], None]) -> int:
    """The final summary line and the exit code."""
    c = progress.counts
    line = (f"done: {progress.done} input(s) in {progress.elapsed_s:.1f} s: {c['reported']} reported, "
            f"{c['withheld']} withheld, {c['refused']} refused")
    if c.get("failed"):
        line += f", {c['failed']} failed (internal error)"
    line += f"; {progress.per_hour:.0f} reports/hour"
    if progress.skipped:
        line += f"; {progress.skipped} already done"
    if skipped_files:
        line += f"; {skipped_files} non-image file(s) skipped in folders"
    say(line + f"; dataset {out}")
    if c.get("failed"):
        return EXIT_INTERNAL
    return EXIT_INPUT if c["refused"] else EXIT_WITHHELD if c["withheld"] else EXIT_OK


if __name__ == "__main__":
    main()
