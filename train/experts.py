"""Stand-in pretraining of the two frozen experts on phantoms.

No pretrained chest X-ray weights reach this environment, so the small experts of the
``tiny``/``demo`` presets are pretrained here on phantoms before the report model freezes them:

* the segmenter (``UNet``, g_seg) learns the K anatomy masks with BCE + soft Dice;
* the encoder (``TinyCNNEncoder``, f_vis) learns, through a temporary linear head on globally
  pooled features, which findings are present. By default the head is not told their side.
  The head reads the mean and the max over the grid: a nodule covers one or two of the 196
  cells, and a mean alone dilutes it. Demo preset, seed 0, held-out nodule AUROC: 0.70 with
  the mean (3000 steps); with mean and max, 0.92 at step 3000 and 0.99 at step 5000 of a
  5000-step run. ``sided`` adds a left and a right output per sided finding: a report model
  reads a finding's side when it is part of that finding's own features, and learned to do so
  from neither the anatomy masks nor a side-blind encoder in the runs we tried.

Each run writes exactly the module's ``state_dict()`` as safetensors (what ``build_model``
loads strictly from ``segmenter_path`` / ``encoder_path``) plus a metrics JSON measured on
the held-out ``val`` studies. Runs are deterministic by seed: seeded init, a seeded
permutation per epoch and per-sample augmentation seeds from :func:`augment_params`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from radixpert.config import RadixpertConfig
from radixpert.errors import InputError, UsageError
from radixpert.imageio import letterbox_resize
from radixpert.model import POOLS, EvidenceHead, TinyCNNEncoder, UNet, load_safetensors_into
from radixpert.train.data import ImageCache, Study, augment, augment_params
from radixpert.train.loop import Pick, Progress, run_steps

# Finding presence; the sides, where ``sided`` asks for them, come from the report (side_targets).
FINDINGS: tuple[str, ...] = ("cardiomegaly", "pleural effusion", "pneumothorax", "nodule", "consolidation")

SEGMENTER_FILE = "segmenter.safetensors"
ENCODER_FILE = "encoder.safetensors"
ENCODER_HEAD_FILE = "encoder_head.safetensors"
_EVAL_BATCH = 16


@dataclass
class ExpertSettings:
    """Optimizer settings for one expert run (AdamW, warmup + cosine).

    The defaults suit the encoder. The segmenter needs more updates to tell left from right
    and to find the faint clavicles: 1000 steps of batch 4 at lr 1e-2 reach a held-out mean
    Dice of about 0.96 on 1024² phantoms, while 300 x 8 at 3e-3 stalls near 0.4 (the
    clavicles' Dice stays 0) and 600 x 4 at 1e-2 missed 0.9 once in four runs.
    """

    steps: int = 300
    batch_size: int = 8
    lr: float = 3e-3
    seed: int = 0
    augment: bool = True
    eval_every: int = 100  # also evaluated after the last step; <= 0: only then
    pool: str = "mean-max"  # encoder head only: "mean-max" or "mean" (global average alone)
    sided: bool = False  # encoder head only: also learn each sided finding's side (left / right)
    init_from: str | None = None  # encoder only: start from this encoder.safetensors


# --------------------------------------------------------------------------- shared pieces


def _stack_images(studies: list[Study], cache: ImageCache) -> np.ndarray:
    """(N, 3, S, S) float16 model inputs, each read once through the runtime reader."""
    return np.stack([cache.get(s) for s in studies])


def _check_settings(settings: ExpertSettings) -> None:
    if settings.steps < 1 or settings.batch_size < 1 or settings.lr <= 0:
        got = f"{settings.steps}, {settings.batch_size}, {settings.lr}"
        raise UsageError(f"steps, batch size and lr must be positive, got {got}")


def _require(studies: list[Study], name: str) -> None:
    if not studies:
        raise InputError(f"the {name} split is empty; use more studies or patients")


def _save_state(module: nn.Module, path: Path, what: str) -> None:
    from safetensors.torch import save_file

    state = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    save_file(state, str(path), metadata={"radixpert": what})


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- segmenter


def _check_masks(config: RadixpertConfig, studies: list[Study]) -> None:
    from radixpert.phantom import MASK_NAMES

    missing = [s.image_id for s in studies if not s.mask_path]
    if missing:
        raise InputError(
            f"{len(missing)} studies have no anatomy masks (first: {missing[0]}); the segmenter trains on phantoms "
            "with a MaskPath column (radixpert-phantom)"
        )
    if tuple(config.mask_names) != MASK_NAMES:
        raise UsageError(f"phantom masks are {', '.join(MASK_NAMES)}; the config's mask_names must match that order")


def load_masks(studies: list[Study], size: int) -> np.ndarray:
    """(N, K, S, S) float16 mask coverage on the model's geometry (the image's own letterbox)."""
    from radixpert.phantom import read_masks

    out = []
    for study in studies:
        try:
            masks = read_masks(study.mask_path)
        except (OSError, ValueError) as exc:
            name = Path(study.mask_path).name
            raise InputError(f"{name}: mask unreadable ({exc.__class__.__name__}); regenerate the phantoms") from None
        out.append(letterbox_resize(masks, size).astype(np.float16))
    return np.stack(out)


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice on sigmoid outputs per structure, averaged over structures.

    Sums are pooled over the batch: per-image Dice learned the thin clavicles more slowly here.
    """
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(0, 2, 3))
    total = prob.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3))
    return 1.0 - ((2.0 * inter + eps) / (total + eps)).mean()


@torch.no_grad()
def dice_scores(model: nn.Module, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, K) hard Dice per image and structure: prediction sigmoid > 0.5, truth coverage > 0.5.

    An image where both prediction and truth are empty counts as 1.
    """
    was_training = model.training
    model.eval()
    rows = []
    for start in range(0, len(images), _EVAL_BATCH):
        x = torch.from_numpy(images[start : start + _EVAL_BATCH].astype(np.float32))
        pred = model(x) > 0.0  # sigmoid > 0.5
        truth = torch.from_numpy(masks[start : start + _EVAL_BATCH].astype(np.float32)) > 0.5
        inter = (pred & truth).sum(dim=(2, 3)).double()
        total = pred.sum(dim=(2, 3)).double() + truth.sum(dim=(2, 3)).double()
        rows.append(torch.where(total > 0, 2.0 * inter / total.clamp(min=1), torch.ones_like(total)).numpy())
    model.train(was_training)
    return np.concatenate(rows)


def evaluate_segmenter(model: nn.Module, config: RadixpertConfig, studies: list[Study],
                       cache: ImageCache | None = None) -> dict:
    """Held-out Dice per structure (mean over images) and their mean."""
    cache = cache or ImageCache(config.image_size)
    scores = dice_scores(model, _stack_images(studies, cache), load_masks(studies, config.image_size))
    return _dice_summary(config, scores)


def _dice_summary(config: RadixpertConfig, scores: np.ndarray) -> dict:
    per_class = scores.mean(axis=0)
    return {
        "dice": {name: round(float(v), 4) for name, v in zip(config.mask_names, per_class)},
        "mean_dice": round(float(per_class.mean()), 4),
    }


def train_segmenter(config: RadixpertConfig, train: list[Study], val: list[Study], settings: ExpertSettings,
                    out_dir: Path, progress: Progress = None) -> dict:
    """Train ``UNet(config)`` on phantom masks; save its weights and held-out Dice.

    Writes ``out_dir/segmenter.safetensors`` (the UNet state dict, no prefix) and
    ``out_dir/segmenter_metrics.json``; returns the same metrics.
    """
    _check_settings(settings)
    _require(train, "train")
    _require(val, "val")
    _check_masks(config, train + val)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    loaded = time.perf_counter()
    cache = ImageCache(config.image_size)
    train_images, train_masks = _stack_images(train, cache), load_masks(train, config.image_size)
    val_images, val_masks = _stack_images(val, cache), load_masks(val, config.image_size)
    load_seconds = time.perf_counter() - loaded

    torch.manual_seed(settings.seed)
    model = UNet(config)
    untrained = _dice_summary(config, dice_scores(model, val_images, val_masks))
    model.train()

    def batch_loss(picks: list[Pick]) -> torch.Tensor:
        xs, ys = [], []
        for epoch, item in picks:
            x = torch.from_numpy(train_images[item].astype(np.float32))
            y = torch.from_numpy(train_masks[item].astype(np.float32))
            if settings.augment:
                # One warp for image and masks, so they stay aligned.
                x, y = augment(x, augment_params(settings.seed, epoch, item), masks=y)
            xs.append(x)
            ys.append(y)
        images, target = torch.stack(xs), torch.stack(ys)
        logits = model(images)
        return F.binary_cross_entropy_with_logits(logits, target) + _soft_dice_loss(logits, target)

    history, train_seconds = run_steps(
        model.parameters(), settings, len(train), batch_loss,
        lambda: _dice_summary(config, dice_scores(model, val_images, val_masks)), ("val_mean_dice", "mean_dice"), progress,
    )
    final = history[-1]  # the last step is always evaluated
    metrics = {
        "dice": final["dice"],
        "mean_dice": final["mean_dice"],
        "untrained_mean_dice": untrained["mean_dice"],
        "threshold": 0.5,
        "steps": settings.steps,
        "seconds_per_step": round(train_seconds / max(1, settings.steps), 4),
        "load_seconds": round(load_seconds, 2),
        "train_studies": len(train),
        "val_studies": len(val),
        "settings": {k: v for k, v in asdict(settings).items() if k != "pool"},  # pool: encoder only
        "history": history,
    }
    _save_state(model, out_dir / SEGMENTER_FILE, "segmenter unet")
    _write_json(out_dir / "segmenter_metrics.json", metrics)
    return metrics


# --------------------------------------------------------------------------- encoder


class _PresenceProbe(nn.Module):
    """Encoder + its presence (and side) head; the head is saved beside the encoder."""

    def __init__(self, config: RadixpertConfig, pool: str, outputs: list[str]):
        super().__init__()
        self.encoder = TinyCNNEncoder(config)
        self.head = EvidenceHead(config.vision_dim, outputs, pool)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head.logits(self.encoder(image))


def head_outputs(sided: bool) -> list[str]:
    """The head's output names, in the order of :func:`encoder_targets`' columns."""
    from radixpert.train.report import SIDED_LABELS

    names = [f"presence:{f}" for f in FINDINGS]
    if sided:
        names += [f"{side}:{label}" for label in SIDED_LABELS for side in ("left", "right")]
    return names


def presence_targets(studies: list[Study]) -> np.ndarray:
    """(N, F) 0/1 presence of each finding in FINDINGS; localizations are ignored on purpose."""
    return np.array([[float(f in s.labels) for f in FINDINGS] for s in studies], dtype=np.float32)


def encoder_targets(studies: list[Study], sided: bool) -> np.ndarray:
    """Presence targets, then with ``sided`` each sided finding's (left, right) read from the report."""
    presence = presence_targets(studies)
    if not sided:
        return presence
    from radixpert.train.report import side_targets

    return np.concatenate([presence, side_targets([s.report for s in studies]).numpy()], axis=1)


def auroc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Area under the ROC curve (scikit-learn); None when one class is absent from ``truth``."""
    from sklearn.metrics import roc_auc_score

    positives = truth > 0.5
    if positives.all() or not positives.any():
        return None
    return float(roc_auc_score(positives, scores))


@torch.no_grad()
def _presence_scores(probe: nn.Module, images: np.ndarray) -> np.ndarray:
    was_training = probe.training
    probe.eval()
    out = [probe(torch.from_numpy(images[i : i + _EVAL_BATCH].astype(np.float32))).numpy()
           for i in range(0, len(images), _EVAL_BATCH)]
    probe.train(was_training)
    return np.concatenate(out)


def _macro_auroc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Mean AUROC over the columns where ``truth`` holds both classes; None if none does."""
    defined = [v for j in range(truth.shape[1]) if (v := auroc(scores[:, j], truth[:, j])) is not None]
    return round(float(np.mean(defined)), 4) if defined else None


def _auroc_summary(scores: np.ndarray, truth: np.ndarray) -> dict:
    per_finding = {f: auroc(scores[:, j], truth[:, j]) for j, f in enumerate(FINDINGS)}
    return {
        "auroc": {f: (round(v, 4) if v is not None else None) for f, v in per_finding.items()},
        "macro_auroc": _macro_auroc(scores, truth),
    }


def train_encoder(config: RadixpertConfig, train: list[Study], val: list[Study], settings: ExpertSettings,
                  out_dir: Path, progress: Progress = None) -> dict:
    """Pretrain ``TinyCNNEncoder(config)`` on finding presence; save it and held-out AUROC.

    By default the head learns presence without side. ``settings.sided`` adds a (left, right)
    output per sided finding, so a finding's features differ with its lung; ``settings.init_from``
    continues from an earlier encoder (the temporary head starts fresh).

    Writes ``out_dir/encoder.safetensors`` (the encoder state dict), ``out_dir/encoder_head.safetensors``
    (the head, kept: the runtime's evidence guard reads the image through it) and ``out_dir/encoder_metrics.json``; returns the same metrics. AUROC per finding is None
    where the held-out studies hold only one class of it; the macro mean skips those.
    """
    if config.encoder == "biovil":
        raise InputError("BioViL is pretrained; pass encoder_path instead of pretraining it here")
    _check_settings(settings)
    if settings.pool not in POOLS:
        raise InputError(f"unknown encoder head pooling {settings.pool!r}; use one of {', '.join(POOLS)}")
    _require(train, "train")
    _require(val, "val")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    loaded = time.perf_counter()
    cache = ImageCache(config.image_size)
    train_images, val_images = _stack_images(train, cache), _stack_images(val, cache)
    train_truth = encoder_targets(train, settings.sided)
    val_targets = encoder_targets(val, settings.sided)
    val_truth, val_sides = val_targets[:, : len(FINDINGS)], val_targets[:, len(FINDINGS):]
    load_seconds = time.perf_counter() - loaded

    torch.manual_seed(settings.seed)
    probe = _PresenceProbe(config, settings.pool, head_outputs(settings.sided))
    if settings.init_from:
        load_safetensors_into(probe.encoder, settings.init_from, "encoder")
    probe.train()

    def batch_loss(picks: list[Pick]) -> torch.Tensor:
        xs, ys = [], []
        for epoch, item in picks:
            x = torch.from_numpy(train_images[item].astype(np.float32))
            xs.append(augment(x, augment_params(settings.seed, epoch, item)) if settings.augment else x)
            ys.append(torch.from_numpy(train_truth[item]))
        return F.binary_cross_entropy_with_logits(probe(torch.stack(xs)), torch.stack(ys))

    def evaluate() -> dict:
        scores = _presence_scores(probe, val_images)
        summary = _auroc_summary(scores[:, : len(FINDINGS)], val_truth)
        if settings.sided:
            summary["side_macro_auroc"] = _macro_auroc(scores[:, len(FINDINGS):], val_sides)
        return summary

    history, train_seconds = run_steps(probe.parameters(), settings, len(train), batch_loss, evaluate,
                                       ("val_macro_auroc", "macro_auroc"), progress)
    final = history[-1]  # the last step is always evaluated
    metrics = {
        "auroc": final["auroc"],
        "macro_auroc": final["macro_auroc"],
        "side_macro_auroc": final.get("side_macro_auroc"),
        "findings": list(FINDINGS),
        "val_prevalence": {f: round(float(p), 4) for f, p in zip(FINDINGS, val_truth.mean(axis=0))},
        "steps": settings.steps,
        "seconds_per_step": round(train_seconds / max(1, settings.steps), 4),
        "load_seconds": round(load_seconds, 2),
        "train_studies": len(train),
        "val_studies": len(val),
        "settings": asdict(settings),
        "history": history,
    }
    _save_state(probe.encoder, out_dir / ENCODER_FILE, "encoder tiny_cnn")
    probe.head.save(out_dir / ENCODER_HEAD_FILE, "encoder head")
    _write_json(out_dir / "encoder_metrics.json", metrics)
    return metrics
