"""``radixpert-train``: split the data, pretrain the stand-in experts, train the report model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from radixpert.config import PRESETS, RadixpertConfig, get_config
from radixpert.errors import UsageError, cli_errors

DATA_HELP = "PadChest-format CSV (ImageID, ImageDir, PatientID, Projection, Labels, report column)."


def data_options(func):
    """Options shared by every subcommand that reads a table."""
    options = [
        click.option("--data", "csv_path", required=True, type=click.Path(dir_okay=False), help=DATA_HELP),
        click.option("--images", type=click.Path(file_okay=False), default=None,
                      help="Root of the numbered ImageDir folders of PNGs [default: the CSV's folder, or its images/]."),
        click.option("--dicom-dir", type=click.Path(file_okay=False), default=None,
                      help="Read <DIR>/<ImageID stem>.dcm instead of PNGs (a CSV plus a folder of DICOMs)."),
        click.option("--report-column", default="Report", show_default=True,
                     help="Column with the report text. PadChest's own 'Report' is lowercased, accent-stripped and "
                          "stemmed, so a model trained on it writes stemmed Spanish; prefer a natural-text column when you have one."),
        click.option("--projections", default="PA,AP,AP_horizontal", show_default=True,
                     help="Comma-separated Projection values to keep ('' keeps all)."),
        click.option("--subset", type=int, default=None,
                     help="Draw a stratified subset of N studies, with minimum quotas for rare labels."),
        click.option("--min-per-label", type=int, default=20, show_default=True, help="Quota per rare label in --subset."),
        click.option("--split", "split_path", type=click.Path(dir_okay=False), default=None,
                     help="Reuse this split file [default: <OUT>/split.json, created if missing]."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for subset, split, order and init."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def model_options(func):
    options = [
        click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
                     help="Model preset: tiny (tests), demo (Gemma 3 270M), medgemma-4b (local weights)."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="A config JSON (overrides --preset)."),
        click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
                     help="Override a config field, e.g. --set llm_path=/models/medgemma-4b-it (repeatable)."),
        click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def resolve_config(preset: str, config_path: str | None, overrides: tuple[str, ...]) -> RadixpertConfig:
    config = RadixpertConfig.load(config_path) if config_path else get_config(preset)
    pairs = {}
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        pairs[key.strip()] = value
    return config.replace(**pairs).validate()


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun launch, which stay quiet."""
    return os.environ.get("RANK", "0") == "0"


def load_splits(csv_path, images, dicom_dir, report_column, projections, subset, min_per_label, split_path, seed, out_dir):
    """(studies per split, split file path), creating and saving the split when needed."""
    from radixpert.train.data import label_proportions, patient_split, read_table, save_split, select, stratified_subset
    from radixpert.train.data import load_split

    keep = tuple(p.strip() for p in projections.split(",") if p.strip()) or None
    studies = read_table(csv_path, images=images, report_column=report_column, projections=keep, dicom_dir=dicom_dir)
    if subset:
        studies = stratified_subset(studies, subset, seed, min_per_label)
    path = Path(split_path) if split_path else Path(out_dir) / "split.json"
    if path.exists():
        split = load_split(path)
    else:
        split = patient_split(studies, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_split(path, split, seed, csv_path)
        if is_main_process():
            click.echo(f"split written to {path}: " + ", ".join(f"{k} {len(v)}" for k, v in split.items()), err=True)
    parts = {name: select(studies, ids) if ids else [] for name, ids in split.items()}
    return parts, path, {name: label_proportions(studies, ids) for name, ids in split.items()}


class DefaultGroup(click.Group):
    """A group whose subcommand defaults to ``report``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["report", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Train Radixpert: the encoder and segmenter stay frozen; the Conv1x1, MLP projector and
    LoRA train on the report tokens. Without a subcommand, `report` runs.

    \b
    Typical phantom run:
      radixpert-phantom --n 64 --seed 0 --out data
      radixpert-train segmenter --data data/phantoms.csv --out runs/seg
      radixpert-train encoder   --data data/phantoms.csv --out runs/enc
      radixpert-train report    --data data/phantoms.csv --out runs/tiny \\
          --set segmenter_path=runs/seg/segmenter.safetensors --set encoder_path=runs/enc/encoder.safetensors

    Several GPUs (or CPU processes): torchrun --nproc_per_node N -m radixpert.train.cli report ...
    """


@cli.command()
@data_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for split.json.")
def split(csv_path, images, dicom_dir, report_column, projections, subset, min_per_label, split_path, seed, out_dir):
    """Write the patient-grouped 80/10/10 split and print the label proportions per split."""
    parts, path, proportions = load_splits(csv_path, images, dicom_dir, report_column, projections, subset,
                                           min_per_label, split_path, seed, out_dir)
    labels = sorted(next(iter(proportions.values())))
    click.echo(f"{'label':<22}" + "".join(f"{name:>8}" for name in parts))
    for label in labels:
        click.echo(f"{label:<22}" + "".join(f"{proportions[name][label]:>8.2f}" for name in parts))
    click.echo("studies: " + ", ".join(f"{name} {len(v)}" for name, v in parts.items()) + f"  ({path})")


@cli.command()
@data_options
@model_options
@click.option("--steps", type=int, default=100, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Studies per micro-batch (per process).")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate (AdamW); the tiny preset's random LLM needs about 2e-2.")
@click.option("--warmup-steps", type=int, default=10, show_default=True, help="Linear warmup, then cosine decay.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="AdamW weight decay.")
@click.option("--clip", type=float, default=1.0, show_default=True, help="Gradient-norm clipping.")
@click.option("--eval-every", type=int, default=50, show_default=True, help="Validation loss and samples every N steps.")
@click.option("--save-every", type=int, default=50, show_default=True, help="Checkpoint every N steps.")
@click.option("--num-samples", type=int, default=2, show_default=True, help="Greedy sample reports at each validation, scored for finding F1 and laterality (use 32+ for a usable score).")
@click.option("--no-augment", is_flag=True, help="Disable augmentation (small affine + contrast; never flips).")
@click.option("--gradient-checkpointing", is_flag=True, help="Trade compute for memory in the LLM.")
@click.option("--side-weight", type=float, default=1.0, show_default=True,
              help="Loss weight of tokens that name a side (derecho, izquierda, bilateral); >1 pushes the model to read the side from the image.")
@click.option("--side-probe-weight", type=float, default=0.0, show_default=True,
              help="Weight of an auxiliary loss that predicts each finding's side from the mean visual token "
                   "(training only; one process). Makes the fusion carry the side where the LLM reads it.")
@click.option("--init-from", type=click.Path(file_okay=False), default=None,
              help="Start from the fusion and LoRA of this run or checkpoint, with a fresh optimizer and schedule.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option("--stop-after", type=int, default=None, hidden=True)
def report(csv_path, images, dicom_dir, report_column, projections, subset, min_per_label, split_path, seed,
           preset, config_path, overrides, out_dir, steps, batch_size, grad_accum, lr, warmup_steps, weight_decay,
           clip, eval_every, save_every, num_samples, no_augment, gradient_checkpointing, side_weight,
           side_probe_weight, init_from, resume, stop_after):
    """Train the fusion (Conv1x1 + MLP) and LoRA on reports (the default subcommand)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from radixpert.train.report import TrainSettings, plot_losses, train_report

    config = resolve_config(preset, config_path, overrides)
    out = Path(out_dir)
    parts, path, _ = load_splits(csv_path, images, dicom_dir, report_column, projections, subset, min_per_label,
                                 split_path, seed, out_dir)
    settings = TrainSettings(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
                             weight_decay=weight_decay, clip=clip, eval_every=eval_every, save_every=save_every,
                             num_samples=num_samples, augment=not no_augment,
                             gradient_checkpointing=gradient_checkpointing, stop_after=stop_after,
                             side_weight=side_weight, side_probe_weight=side_probe_weight,
                             init_from=init_from)
    with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[status]}"), TimeRemainingColumn(), disable=not is_main_process()) as bar:
        task = bar.add_task("train", total=steps, status="")

        def show(row: dict) -> None:
            status = f"loss {row['loss']:.3f} lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s"
            if "val_loss" in row:
                status += f" val {row['val_loss']:.3f}"
            if row.get("val_laterality") is not None:
                status += f" F1 {row['val_micro_f1']:.2f} side {row['val_laterality']:.2f}"
            bar.update(task, completed=row["step"], status=status)

        _, rows = train_report(config, parts["train"], parts["val"], settings, out, path, resume=resume, seed=seed, progress=show)
    if is_main_process() and (out / "metrics.jsonl").exists() and rows:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        click.echo(json.dumps({"last_loss": rows[-1]["loss"], "steps": rows[-1]["step"], "out": str(out)}))


# (steps, batch size, lr). The segmenter needs ~1000 steps: the thin clavicles are learned last.
EXPERT_DEFAULTS = {"segmenter": (1000, 4, 1e-2), "encoder": (300, 8, 3e-3)}


def _expert_command(kind: str):
    """The `segmenter` and `encoder` subcommands: stand-in expert pretraining on phantoms."""

    @data_options
    @model_options
    @click.option("--steps", type=int, default=EXPERT_DEFAULTS[kind][0], show_default=True, help="Optimizer steps.")
    @click.option("--batch-size", type=int, default=EXPERT_DEFAULTS[kind][1], show_default=True, help="Images per step.")
    @click.option("--lr", type=float, default=EXPERT_DEFAULTS[kind][2], show_default=True, help="Learning rate (AdamW).")
    @click.option("--no-augment", is_flag=True, help="Disable augmentation (small affine + contrast; never flips).")
    def command(csv_path, images, dicom_dir, report_column, projections, subset, min_per_label, split_path, seed,
                preset, config_path, overrides, out_dir, steps, batch_size, lr, no_augment, pool="mean-max",
                sided=False, init_from=None):
        from rich.progress import BarColumn, Progress, TextColumn

        from radixpert.train import experts

        config = resolve_config(preset, config_path, overrides)
        parts, _, _ = load_splits(csv_path, images, dicom_dir, report_column, projections, subset, min_per_label,
                                  split_path, seed, out_dir)
        settings = experts.ExpertSettings(steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                          augment=not no_augment, pool=pool, sided=sided, init_from=init_from)
        run = experts.train_segmenter if kind == "segmenter" else experts.train_encoder
        with Progress(TextColumn(f"[bold]{kind}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[status]}")) as bar:
            task = bar.add_task(kind, total=steps, status="")
            result = run(config, parts["train"], parts["val"], settings, Path(out_dir),
                         progress=lambda row: bar.update(task, completed=row["step"], status=f"loss {row['loss']:.4f}"))
        click.echo(json.dumps(result, indent=1))

    command.__doc__ = {
        "segmenter": "Pretrain the U-Net anatomy head on phantom masks; writes segmenter.safetensors and reports "
                     "Dice per structure on held-out patients.",
        "encoder": "Pretrain the small vision encoder on phantom images (finding presence, by default without "
                   "side; --sided adds each finding's side); writes encoder.safetensors and held-out AUROC.",
    }[kind]
    if kind == "encoder":
        command = click.option(
            "--pool", type=click.Choice(["mean-max", "mean"]), default="mean-max", show_default=True,
            help="How the temporary presence head pools the grid. The max keeps small findings (a nodule "
                 "fills one or two of the 14x14 cells) from being averaged away.")(command)
        command = click.option(
            "--sided", is_flag=True,
            help="Also learn each sided finding's side (left/right, read from the report), so a finding's "
                 "features differ with its lung and the report model can read the side from them.")(command)
        command = click.option(
            "--init-from", type=click.Path(exists=True, dir_okay=False), default=None,
            help="Start from this encoder.safetensors of an earlier encoder run (the head starts fresh).")(command)
    return cli.command(name=kind)(command)


segmenter = _expert_command("segmenter")
encoder = _expert_command("encoder")


@cli.command(name="encoder-head")
@data_options
@model_options
@click.option("--encoder", "encoder_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The frozen encoder.safetensors to fit the head on (never modified; its sha256 is checked).")
@click.option("--pool", type=click.Choice(["mean-max", "mean"]), default="mean-max", show_default=True,
              help="How the head pools the grid (mean-max keeps small findings).")
@click.option("--side-blind", is_flag=True, help="Presence outputs only, no left/right outputs.")
@click.option("--steps", type=int, default=1500, show_default=True, help="Full-batch AdamW steps.")
@click.option("--lr", type=float, default=1e-2, show_default=True, help="Learning rate (AdamW).")
def encoder_head(csv_path, images, dicom_dir, report_column, projections, subset, min_per_label, split_path, seed,
                 preset, config_path, overrides, out_dir, encoder_path, pool, side_blind, steps, lr):
    """Fit the encoder's presence and side head again, as a linear probe on a FROZEN encoder.

    For an encoder whose head was not kept: the runtime's evidence guard reads the image through
    this head. Writes OUT/encoder_head.safetensors and encoder_head_metrics.json (held-out AUROC,
    the encoder's sha256 before and after). Point a report run at it with
    --set encoder_head_path=OUT/encoder_head.safetensors, or put it beside a packed checkpoint.
    """
    from radixpert.train.evidence import fit_encoder_head

    config = resolve_config(preset, config_path, overrides)
    parts, _, _ = load_splits(csv_path, images, dicom_dir, report_column, projections, subset, min_per_label,
                              split_path, seed, out_dir)
    click.echo(f"fitting the head on {len(parts['train'])} training images (encoder frozen)", err=True)
    result = fit_encoder_head(config, parts["train"], parts["val"], encoder_path, Path(out_dir), sided=not side_blind,
                              pool=pool, steps=steps, lr=lr, seed=seed)
    click.echo(json.dumps(result, indent=1))


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write (replaced if it exists).")
@click.option("--encoder-head", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Add this encoder_head.safetensors (radixpert-train encoder-head) as the encoder's evidence head.")
def pack(run_dir, out_dir, encoder_head):
    """Copy a run's latest checkpoint (or RUN_DIR itself, if it is a checkpoint) into a small,
    self-contained folder for radixpert-export: config, fusion, LoRA adapter and the frozen
    encoder and segmenter it was trained with, all with sha256 checksums. Optimizer state stays behind.
    Run it from the folder training ran in, so relative expert paths resolve.
    """
    from radixpert.export.pack import pack_checkpoint
    from radixpert.train.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(run_dir)
    out = pack_checkpoint(checkpoint, Path(out_dir), Path(encoder_head) if encoder_head else None)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    click.echo(f"packed {checkpoint} into {out} ({total / 2**20:.1f} MiB)", err=True)


@cli_errors(interrupted="interrupted; rerun with --resume to continue from the last checkpoint")
def main() -> None:
    """Entry point: one-line errors with documented exit codes, never a traceback for bad input."""
    cli.main(standalone_mode=False)


if __name__ == "__main__":
    main()
