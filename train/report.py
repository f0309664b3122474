"""Report training: frozen experts, trainable Conv1x1 + MLP + LoRA, loss on report tokens only.

The same loop runs on one CPU, one GPU or several processes under ``torchrun`` (DDP; gloo on
CPU, NCCL on GPU). Batches are a pure function of (seed, step), so ``--resume`` continues
exactly where a run stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from radixpert.config import RadixpertConfig
from radixpert.model import RadixpertModel, build_model
from radixpert.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_trained_weights,
    resolve_checkpoint,
    save_checkpoint,
    write_checksums,
)
from radixpert.train.data import ImageCache, Study, augment, augment_params
from radixpert.train.schedule import warmup_cosine


@dataclass
class TrainSettings:
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    eval_every: int = 50
    save_every: int = 50
    num_samples: int = 2
    augment: bool = True
    gradient_checkpointing: bool = False
    stop_after: int | None = None  # stop early (as if interrupted) after this step
    side_weight: float = 1.0  # loss weight of the tokens that name a side (derecho, izquierda, bilateral...)
    side_probe_weight: float = 0.0  # weight of the auxiliary side loss on the visual tokens (0: off)
    init_from: str | None = None  # start from these trained weights (fresh optimizer and schedule)


PROBE_FILE = "side_probe.safetensors"  # training-only; pack and export ignore it

# A side word decides laterality, the error our users care most about, yet it is one token in
# about forty; weighting it makes the loss pay for reading the side from the image.
SIDE_WORD = re.compile(r"\b(?:derech|izquierd|bilater)\w*", re.IGNORECASE)


def side_token_weights(tokenizer, texts: list[str], weight: float) -> list[list[float]]:
    """Per token of each text (as ``tokenizer`` splits it): ``weight`` on the token where a side word starts, else 1."""
    rows = []
    for text in texts:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = [m.start() for m in SIDE_WORD.finditer(text)]
        rows.append([weight if any(a <= s < b for s in starts) else 1.0 for a, b in encoded["offset_mapping"]])
    return rows


# The sided findings that phantom and PadChest reports name with a side; the probe's outputs, in order.
SIDED_LABELS = ("pleural effusion", "pneumothorax", "nodule", "consolidation", "atelectasis", "mass")


def side_targets(reports: list[str]) -> torch.Tensor:
    """(B, 2 * len(SIDED_LABELS)): for each sided finding, is it present on the left / on the right."""
    from radixpert.checks.labeler import present, label_report

    rows = []
    for report in reports:
        findings = present(label_report(report))
        row = []
        for label in SIDED_LABELS:
            side = findings[label].side if label in findings else None
            row += [float(side in ("left", "bilateral")), float(side in ("right", "bilateral"))]
        rows.append(row)
    return torch.tensor(rows)


class SideProbe(torch.nn.Module):
    """Training-only head: finding-and-side from the mean visual token.

    The LLM learns early to read findings from the tokens as a whole, where a finding's side
    averages away. This loss makes the fusion write the side of each finding into every token,
    where that readout finds it. The head is dropped after training; nothing else changes.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.linear = torch.nn.Linear(dim, 2 * len(SIDED_LABELS))

    def forward(self, visual_tokens: torch.Tensor, reports: list[str]) -> torch.Tensor:
        logits = self.linear(visual_tokens.float().mean(dim=1))
        targets = side_targets(reports).to(logits.device)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the torchrun process group when launched by torchrun; otherwise a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return World(rank=rank, size=size, device=torch.device(f"cuda:{local}" if use_cuda else "cpu"))


def sample_positions(num_items: int, seed: int, step: int, per_step: int) -> list[tuple[int, int, int]]:
    """(epoch, position, item) for the ``per_step`` samples of ``step``: a seeded permutation per epoch."""
    out = []
    for global_position in range(step * per_step, (step + 1) * per_step):
        epoch, position = divmod(global_position, num_items)
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append((epoch, position, int(order[position])))
    return out


def _batch(studies: list[Study], cache: ImageCache, picks: list[tuple[int, int, int]], seed: int, do_augment: bool):
    images, reports = [], []
    for epoch, position, item in picks:
        image = torch.from_numpy(cache.get(studies[item]).astype("float32"))
        if do_augment:
            image = augment(image, augment_params(seed, epoch, position))
        images.append(image)
        reports.append(studies[item].report)
    return torch.stack(images), reports


def sample_scores(predictions: list[str], references: list[str]) -> dict:
    """Finding micro-F1 and laterality of greedy validation reports, scored as ``radixpert-eval`` does.

    Validation loss can fall while the side stays at chance; these catch that during training.
    """
    from radixpert.evaluation.clinical import score_findings
    from radixpert.checks.labeler import label_report, present

    scores = score_findings([present(label_report(p)) for p in predictions], [present(label_report(r)) for r in references])
    return {"val_micro_f1": scores["micro_f1"], "val_laterality": scores["laterality_accuracy"],
            "val_laterality_checked": scores["laterality_checked"]}


@torch.no_grad()
def validate(model: RadixpertModel, studies: list[Study], cache: ImageCache, batch_size: int, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(studies), batch_size):
        chunk = studies[start : start + batch_size]
        images = torch.stack([torch.from_numpy(cache.get(s).astype("float32")) for s in chunk]).to(device)
        total += float(model(images, [s.report for s in chunk])) * len(chunk)
        count += len(chunk)
    model.train()
    return total / max(1, count)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_report(
    config: RadixpertConfig,
    train_studies: list[Study],
    val_studies: list[Study],
    settings: TrainSettings,
    out_dir: Path,
    split_path: Path | None = None,
    resume: bool = False,
    seed: int = 0,
    progress=None,
) -> tuple[RadixpertModel, list[dict]]:
    """Train and checkpoint into ``out_dir``; returns the trained model and this process's metrics rows."""
    world = init_world()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(config).to(world.device)
    if settings.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable()
        model.llm.enable_input_require_grads()
    model.train()
    if settings.side_probe_weight > 0 and world.size > 1:
        raise ValueError("the side probe trains in one process only; run without torchrun or without --side-probe-weight")
    probe = SideProbe(config.llm_dim).to(world.device) if settings.side_probe_weight > 0 else None
    trainable = [p for p in model.parameters() if p.requires_grad] + (list(probe.parameters()) if probe else [])
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    # Linear warmup, then cosine decay to 10 % of the peak.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, settings.steps, settings.warmup_steps, 0.1))
    metrics_path = out_dir / "metrics.jsonl"
    start_step = 0
    if resume and (checkpoint := latest_checkpoint(out_dir)) is not None:
        start_step = load_checkpoint(checkpoint, model, optimizer, scheduler)["step"]
        if probe is not None:
            probe.load_state_dict(load_file(str(checkpoint / PROBE_FILE)))
        if world.main and metrics_path.exists():
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line).get("step", 0) <= start_step]
            metrics_path.write_text("".join(line + "\n" for line in kept))
    else:
        if world.main and metrics_path.exists():
            metrics_path.unlink()
        if settings.init_from:
            load_trained_weights(model, resolve_checkpoint(settings.init_from))
    runner = torch.nn.parallel.DistributedDataParallel(model) if world.size > 1 else model
    cache = ImageCache(config.image_size)
    per_rank = settings.batch_size * settings.grad_accum
    rows: list[dict] = []
    last = min(settings.steps, settings.stop_after or settings.steps)
    for step in range(start_step, last):
        started = time.perf_counter()
        picks = sample_positions(len(train_studies), seed, step, per_rank * world.size)
        mine = picks[world.rank * per_rank : (world.rank + 1) * per_rank]
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_side_loss, tokens = 0.0, 0.0, 0
        for micro in range(settings.grad_accum):
            chunk = mine[micro * settings.batch_size : (micro + 1) * settings.batch_size]
            images, reports = _batch(train_studies, cache, chunk, seed, settings.augment)
            sync = micro == settings.grad_accum - 1 or world.size == 1
            ids = model.encode_reports(reports)
            weights = None
            if settings.side_weight != 1.0:
                targets = [model.template.target(r) for r in reports]
                weights = side_token_weights(model.tokenizer, targets, settings.side_weight)
            with (contextlib.nullcontext() if sync else runner.no_sync()), _autocast(world.device):
                if probe is None:
                    loss = runner(images.to(world.device), reports, weights) / settings.grad_accum
                else:  # one process (checked above): the frontend runs once for both losses
                    visual_tokens = model.frontend(images.to(world.device))[0]
                    side_loss = probe(visual_tokens, reports)
                    loss = (model.report_loss(visual_tokens, reports, weights)
                            + settings.side_probe_weight * side_loss) / settings.grad_accum
                    step_side_loss += float(side_loss.detach()) / settings.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
            tokens += sum(len(row) for row in ids)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, settings.clip))
        optimizer.step()
        scheduler.step()
        if world.size > 1:
            reduced = torch.tensor([step_loss, float(tokens)])
            dist.all_reduce(reduced)
            step_loss, tokens = float(reduced[0]) / world.size, int(reduced[1])
        elapsed = time.perf_counter() - started
        row = {"step": step + 1, "loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               "tokens_per_s": tokens / elapsed, "seconds": elapsed}
        if probe is not None:
            row["side_probe_loss"] = step_side_loss
        done = step + 1
        if val_studies and (done % settings.eval_every == 0 or done == settings.steps):
            row["val_loss"] = validate(model, val_studies, cache, settings.batch_size, world.device)
            if world.main and settings.num_samples:
                samples = val_studies[: settings.num_samples]
                images = torch.stack([torch.from_numpy(cache.get(s).astype("float32")) for s in samples]).to(world.device)
                model.eval()
                row["samples"] = model.generate_text(images, max_new_tokens=96)
                model.train()
                row.update(sample_scores(row["samples"], [s.report for s in samples]))
        rows.append(row)
        if world.main:
            with metrics_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            if progress is not None:
                progress(row)
        if world.main and (done % settings.save_every == 0 or done == last):
            folder = save_checkpoint(out_dir / "checkpoints" / f"step-{done:06d}", model, optimizer, scheduler, done,
                                     {"settings": asdict(settings), "seed": seed}, split_path)
            if probe is not None:
                save_file(probe.state_dict(), str(folder / PROBE_FILE))
                write_checksums(folder)
        if world.size > 1:
            dist.barrier()
    return model, rows


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """A loss-curve PNG (train, and validation where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    val = [r for r in rows if "val_loss" in r]
    if val:
        axis.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (report tokens)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)
