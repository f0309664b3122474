"""``radixpert-eval``: score Spanish draft reports, a bundle on a split, and the ablation."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import click

from radixpert.errors import InputError, UsageError, cli_errors

# The gate variants (radixpert.evaluation.gate.KINDS), here so that --help does not import the runtime.
KINDS_DEFAULT = ("original", "mirror", "rot90", "invert", "crop", "nonchest")

METRIC_LIBRARIES = ("sacrebleu", "rouge_score", "nltk")  # the eval extra

HELP = """Score Spanish chest X-ray reports against references.

\b
Language metrics (Unicode tokens: lowercase, accents and ñ kept, punctuation dropped):
  BLEU-1..4  corpus n-gram precision (clipped) x brevity penalty, geometric mean up to n
  ROUGE-L    longest common subsequence F-measure (beta 1.2), mean over studies
  METEOR     exact + Spanish-stem unigram alignment, F(alpha 0.9) x fragmentation penalty
  CIDEr-D    TF-IDF 1..4-gram cosine with clipping and a length penalty (sigma 6), x10
Clinical scores (rule-based Spanish labeler on prediction and reference; no model):
  finding P/R/F1   per PadChest label, with micro (pooled) and macro (mean) F1
  laterality acc.  same side as the reference, over findings in both with a stated side
  swap rate        opposite side (right <-> left), over the same findings
  zone accuracy    same lung zones, over findings in both with a stated zone

\b
Subcommands: score (JSON Lines from radixpert-run vs a CSV), bundle (run a bundle on a
split, then score), ablation (base / +LoRA / +anatomy on phantoms), mirror (does the
bundle read sides from the image?), label (show the labeler).
See docs/evaluation.md.
"""


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    pass


def _uncertain_option(func):
    return click.option("--uncertain", type=click.Choice(["present", "absent"]), default="present", show_default=True,
                        help="How hedged findings ('posible', 'compatible con') count.")(func)


def _finish(metrics: dict, rows: list[dict], out: Path, title: str) -> None:
    from radixpert.evaluation.scoring import markdown, write_outputs

    paths = write_outputs(out, metrics, rows, title)
    click.echo(markdown(metrics, title))
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()), err=True)


@cli.command()
@click.option("--pred", "pred_path", required=True, type=click.Path(dir_okay=False),
              help="JSON Lines from radixpert-run --format json (fields input, report, optional error).")
@click.option("--ref", "ref_path", required=True, type=click.Path(dir_okay=False),
              help="PadChest-format CSV with ImageID (and DicomPath) and the reference report column.")
@click.option("--report-column", default="Report", show_default=True, help="Column with the reference text.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for metrics.json, metrics.md, per_study.csv [default: <PRED stem>-eval beside PRED].")
@_uncertain_option
def score(pred_path, ref_path, report_column, out_dir, uncertain) -> None:
    """Score predictions against references, matched by file stem (input vs ImageID or DicomPath)."""
    require_metric_libraries()
    from radixpert.evaluation.scoring import (
        evaluate,
        pair_up,
        read_predictions,
        read_references,
    )

    reported, refused = read_predictions(pred_path)
    pairs, empty = pair_up(reported, read_references(ref_path, report_column))
    metrics, rows = evaluate(pairs, uncertain == "present")
    metrics.update({"refused": len(refused), "empty_references": empty, "predictions": str(pred_path),
                    "references": str(ref_path)})
    out = Path(out_dir) if out_dir else Path(pred_path).with_name(Path(pred_path).stem + "-eval")
    _finish(metrics, rows, out, f"Evaluation of {Path(pred_path).name}")


@cli.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False), help="Bundle from radixpert-export.")
@click.option("--data", "csv_path", required=True, type=click.Path(dir_okay=False), help="PadChest-format CSV.")
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="test", show_default=True,
              help="Which studies to run ('all': every study of the CSV).")
@click.option("--split-file", type=click.Path(dir_okay=False), default=None,
              help="The training run's split.json (RUN/split.json); needed unless --split all.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N studies of the split.")
@click.option("--report-column", default="Report", show_default=True, help="Column with the reference text.")
@click.option("--images", type=click.Path(file_okay=False), default=None, help="Root of the ImageDir folders of PNGs.")
@click.option("--dicom-dir", type=click.Path(file_okay=False), default=None, help="Read <DIR>/<ImageID stem>.dcm.")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads for the runtime.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=None, help="Report length limit.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for predictions.jsonl and the scores [default: eval-<bundle name>-<split>].")
@_uncertain_option
@click.option("--frontend", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="Frontend model: fp32, or the INT8 one of a bundle exported with radixpert-export --int8.")
@click.option("--batch", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Scans decoded together (the same reports as one at a time, faster).")
@click.option("--speculative/--no-speculative", default=None,
              help="Verify drafts from the bundle's n-gram index [default: as radixpert-run, on where it gives exactly "
                   "plain decoding's reports: CPU with q8_0, or f32/f16 with llama.cpp built with "
                   "-DGGML_LLAMAFILE=OFF]. Forced on elsewhere, some reports differ (docs/throughput.md).")
@click.option("--same-as", "same_as", type=click.Path(dir_okay=False, exists=True), default=None,
              help="predictions.jsonl of another run (e.g. with --no-speculative): count the reports identical to "
                   "it, scan by scan, into metrics.json.")
def bundle(bundle_dir, csv_path, split, split_file, limit, report_column, images, dicom_dir, threads, max_new_tokens,
           out_dir, uncertain, frontend, batch, speculative, same_as) -> None:
    """Run a bundle (the torch-free runtime) on a split's images, then score the reports."""
    require_metric_libraries()  # before the reports, not after them
    earlier = _reports_by_input(Path(same_as)) if same_as else None
    from radixpert.evaluation.checks import markdown as checks_markdown
    from radixpert.evaluation.checks import score_checks
    from radixpert.evaluation.scoring import Pair, evaluate
    from radixpert.runtime.llm import build_features
    from radixpert.runtime.pipeline import SPECULATIVE_NOT_EXACT, Reporter
    from radixpert.train.data import load_split, read_table, select
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from radixpert.bundle import load_bundle

    studies = read_table(csv_path, images=images, report_column=report_column, dicom_dir=dicom_dir)
    if split != "all":
        if not split_file:
            raise UsageError(f"--split {split} needs --split-file (the training run's split.json), or use --split all")
        studies = select(studies, load_split(split_file)[split])
    studies = studies[:limit] if limit else studies
    out = Path(out_dir) if out_dir else Path(f"eval-{Path(bundle_dir).name}-{split}")
    out.mkdir(parents=True, exist_ok=True)
    reporter = Reporter(load_bundle(Path(bundle_dir)), threads=threads, max_new_tokens=max_new_tokens,
                        frontend_variant=frontend, batch=batch, speculative=speculative)
    if not reporter.speculative_exact:
        click.echo(SPECULATIVE_NOT_EXACT, err=True)
    pairs, refused, checked = [], 0, []
    started = time.perf_counter()
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as handle, \
            Progress(TextColumn("[bold]report"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("report", total=len(studies))
        results = reporter.report_many([Path(s.image_path) for s in studies])
        for study, result in zip(studies, results):
            record: dict = {"input": study.image_path}
            try:
                if isinstance(result, InputError):
                    raise result
                gate = {k: v for k, v in result.checked.gate.items() if k != "measures"}
                record.update({"report": result.report, "checks": result.checked.checks, "gate": gate})
                pairs.append(Pair(study.image_id, study.image_path, record["report"], study.report))
                checked.append({**record, "reference": study.report})
            except InputError as exc:  # one unreadable scan must not stop the evaluation
                record["error"] = {"code": exc.code, "exit_code": exc.exit_code, "message": str(exc)}
                refused += 1
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            bar.advance(task)
    report_seconds = time.perf_counter() - started
    covered = [name.split(":", 1)[1] for name in reporter.checker.evidence_outputs or [] if name.startswith("presence:")]
    reporter.close()
    metrics, rows = evaluate(pairs, uncertain == "present")
    metrics.update({"refused": refused, "bundle": str(bundle_dir), "data": str(csv_path), "split": split,
                    "frontend": frontend, "command": "radixpert-eval " + shlex.join(sys.argv[1:]),
                    "decoding": {"batch": batch, "speculative": reporter.speculative,
                                 "speculative_exact": reporter.speculative_exact, "llama_cpp": build_features(),
                                 "report_seconds": round(report_seconds, 1)},
                    "checks": score_checks(checked, covered)})
    if earlier is not None:
        metrics["decoding"]["same_as"] = _identity(earlier, checked, same_as)
        click.echo("identical to {file}: {identical} of {compared} reports".format(**metrics["decoding"]["same_as"]))
    _finish(metrics, rows, out, f"{Path(bundle_dir).name} on {split}")
    with (out / "metrics.md").open("a", encoding="utf-8") as handle:
        handle.write("\n" + checks_markdown(metrics["checks"]))
    click.echo(checks_markdown(metrics["checks"]))


def _reports_by_input(path: Path) -> dict[str, str | None]:
    """Report text by input path from a predictions.jsonl of radixpert-eval bundle."""
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return {row["input"]: row.get("report") for row in rows}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--same-as {path.name} is not a predictions.jsonl of radixpert-eval bundle ({exc})") from None


def _identity(earlier: dict[str, str | None], checked: list[dict], same_as: str) -> dict[str, Any]:
    """How many of this run's reports equal the earlier run's for the same input, and which differ."""
    compared = [row for row in checked if row["input"] in earlier]
    differ = [row["input"] for row in compared if row["report"] != earlier[row["input"]]]
    return {"file": str(same_as), "compared": len(compared), "identical": len(compared) - len(differ),
            "differ": differ}


@cli.command()
@click.option("--data", "csv_path", required=True, type=click.Path(dir_okay=False),
              help="Phantom CSV (radixpert-phantom) or another PadChest-format CSV with MaskPath.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for runs and tables.")
@click.option("--preset", default="tiny", show_default=True, help="Model preset of all three variants.")
@click.option("--steps", type=click.IntRange(min=1), default=1500, show_default=True, help="Report training steps, each variant.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Studies per step.")
@click.option("--lr", type=float, default=2e-2, show_default=True, help="Peak learning rate (the tiny preset needs ~2e-2).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=20, show_default=True, help="Linear warmup steps.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split, the experts and every variant.")
@click.option("--split-file", type=click.Path(dir_okay=False), default=None, help="Reuse a split [default: a patient split, saved].")
@click.option("--segmenter-steps", type=click.IntRange(min=1), default=400, show_default=True, help="Stand-in U-Net pretraining.")
@click.option("--encoder-steps", type=click.IntRange(min=1), default=300, show_default=True, help="Stand-in encoder pretraining.")
@click.option("--encoder", "encoder_path", type=click.Path(dir_okay=False), default=None, help="Use these encoder weights.")
@click.option("--segmenter", "segmenter_path", type=click.Path(dir_okay=False), default=None, help="Use these U-Net weights.")
@click.option("--llm-pretrain-steps", type=click.IntRange(min=0), default=200, show_default=True,
              help="Text-only pretraining of the tiny preset's random LLM on the training reports, shared by all "
                   "variants (the paper's base freezes a pretrained LLM); 0 keeps it random.")
@click.option("--test-limit", type=click.IntRange(min=1), default=None, help="Score only the first N test studies.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Report length limit [default: the preset's].")
def ablation(csv_path, out_dir, preset, steps, batch_size, lr, warmup_steps, seed, split_file, segmenter_steps, encoder_steps,
             encoder_path, segmenter_path, llm_pretrain_steps, test_limit, max_new_tokens) -> None:
    """Train base (projector only), +LoRA and +anatomy (full) alike; score them on the same test studies."""
    require_metric_libraries()
    from radixpert.evaluation.ablation import run_ablation
    from radixpert.train.ablation import AblationSettings
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from radixpert.config import PRESETS

    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    settings = AblationSettings(preset=preset, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                                seed=seed, segmenter_steps=segmenter_steps, encoder_steps=encoder_steps,
                                llm_pretrain_steps=llm_pretrain_steps, test_limit=test_limit, max_new_tokens=max_new_tokens)
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=console) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, row: dict, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total, status="")
            bar.update(tasks[name], completed=row["step"], status=f"loss {row['loss']:.3f}")

        summary = run_ablation(csv_path, out_dir, settings, split_file, encoder_path, segmenter_path,
                               log=lambda text: bar.console.print(text), progress=progress)
    from radixpert.evaluation.ablation import table

    click.echo(table(summary))
    click.echo(f"wrote {Path(out_dir) / 'ablation.md'} and {Path(out_dir) / 'ablation.json'}", err=True)


@cli.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False), help="Bundle from radixpert-export.")
@click.option("--data", "csv_path", required=True, type=click.Path(dir_okay=False),
              help="PadChest-format CSV whose reports state sides (e.g. radixpert-phantom's phantoms.csv).")
@click.option("--dicom-dir", type=click.Path(file_okay=False), default=None, help="Read <DIR>/<ImageID stem>.dcm.")
@click.option("--images", type=click.Path(file_okay=False), default=None, help="Root of the ImageDir folders of PNGs.")
@click.option("--limit", type=click.IntRange(min=1), default=40, show_default=True, help="Only the first N studies.")
@click.option("--report-column", default="Report", show_default=True, help="Column with the reference text.")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads for the runtime.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for mirror.json and mirror.md [default: mirror-<bundle name>].")
def mirror(bundle_dir, csv_path, dicom_dir, images, limit, report_column, threads, out_dir) -> None:
    """Does the bundle read each side from the image? Teacher-forced side-word preference, image vs mirrored image."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from radixpert.bundle import load_bundle
    from radixpert.evaluation.mirror import markdown, mirror_probe
    from radixpert.train.data import read_table

    studies = read_table(csv_path, images=images, report_column=report_column, dicom_dir=dicom_dir)[:limit]
    bundle = load_bundle(Path(bundle_dir))
    with Progress(TextColumn("[bold]mirror probe"), BarColumn(), MofNCompleteColumn()) as bar:
        task = bar.add_task("probe", total=len(studies))
        summary = mirror_probe(bundle, [(s.image_path, s.report) for s in studies], threads=threads,
                               progress=lambda done: bar.update(task, completed=done))
    summary.update({"command": "radixpert-eval " + shlex.join(sys.argv[1:]), "data": Path(csv_path).name,
                    "studies": len(studies)})
    out = Path(out_dir) if out_dir else Path(f"mirror-{Path(bundle_dir).name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "mirror.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    text = markdown(summary, f"Mirror probe of {Path(bundle_dir).name} on {len(studies)} studies")
    (out / "mirror.md").write_text(text, encoding="utf-8")
    click.echo(text)
    click.echo(f"wrote {out / 'mirror.json'} and {out / 'mirror.md'}", err=True)


@cli.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False), help="Bundle from radixpert-export.")
@click.option("--data", "csv_path", required=True, type=click.Path(dir_okay=False),
              help="PadChest-format CSV of DICOM scans (e.g. radixpert-phantom's phantoms.csv).")
@click.option("--dicom-dir", type=click.Path(file_okay=False), default=None, help="Read <DIR>/<ImageID stem>.dcm.")
@click.option("--kinds", default=",".join(KINDS_DEFAULT), show_default=True,
              help="Comma list of variants: original, mirror, rot90, invert, crop, nonchest.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N studies.")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads for ONNX Runtime.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for gate.json and gate.md [default: gate-<bundle name>].")
def gate(bundle_dir, csv_path, dicom_dir, kinds, limit, threads, out_dir) -> None:
    """The anatomy gate on variants of each scan (mirrored, rotated 90 degrees, inverted, cropped,
    replaced by a non-chest photograph), each written as a DICOM with the scan's own header."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from radixpert.bundle import load_bundle
    from radixpert.evaluation.gate import KINDS, gate_rates, markdown
    from radixpert.train.data import read_table

    chosen = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in KINDS]
    if unknown or not chosen:
        raise UsageError(f"--kinds must be among {', '.join(KINDS)}, got {kinds!r}")
    studies = read_table(csv_path, dicom_dir=dicom_dir)
    studies = studies[:limit] if limit else studies
    scans = [Path(s.image_path) for s in studies]
    if any(p.suffix.lower() != ".dcm" for p in scans):
        raise UsageError("the gate variants are written as DICOM: give DICOM scans (--dicom-dir or a DicomPath column)")
    with Progress(TextColumn("[bold]anatomy gate"), BarColumn(), MofNCompleteColumn()) as bar:
        task = bar.add_task("gate", total=len(scans))
        rates = gate_rates(load_bundle(Path(bundle_dir)), scans, chosen, threads,
                           progress=lambda done: bar.update(task, completed=done))
    result = {"kinds": rates, "studies": len(scans), "bundle": Path(bundle_dir).name, "data": Path(csv_path).name,
              "command": "radixpert-eval " + shlex.join(sys.argv[1:])}
    out = Path(out_dir) if out_dir else Path(f"gate-{Path(bundle_dir).name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    text = markdown(result, f"Anatomy gate of {Path(bundle_dir).name} on {len(scans)} studies and their variants")
    (out / "gate.md").write_text(text, encoding="utf-8")
    click.echo(text)
    click.echo(f"wrote {out / 'gate.json'} and {out / 'gate.md'}", err=True)


@cli.command()
@click.argument("texts", nargs=-1, required=True)
def label(texts) -> None:
    """Show the labeler's findings for each TEXT (status, side, zones), as JSON Lines."""
    from dataclasses import asdict

    from radixpert.checks.labeler import label_report, padchest_lists

    for text in texts:
        labels, locations = padchest_lists(text)
        found = {name: asdict(f) for name, f in label_report(text).items()}
        click.echo(json.dumps({"text": text, "findings": found, "Labels": labels, "Localizations": locations},
                              ensure_ascii=False))


def require_metric_libraries() -> None:
    """Scoring needs the eval extra; say so before any work is done."""
    import importlib.util

    missing = [name for name in METRIC_LIBRARIES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"scoring needs {', '.join(missing)}: pip install 'radixpert-edge[eval]'")


@cli_errors(interrupted="interrupted")
def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with documented exit codes."""
    cli.main(args=argv, prog_name="radixpert-eval", standalone_mode=False)


if __name__ == "__main__":
    main()
