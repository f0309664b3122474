"""Refit the encoder's presence/side head as a linear probe on a frozen encoder.

An encoder trained before its head was kept (or one from elsewhere) gets its evidence head
back without changing a single weight of the encoder: the report model was trained on those
weights, so they must stay bit-identical. The encoder file's sha256 is checked before and after,
and the features are computed once, under ``torch.no_grad``, from the encoder in eval mode.

The probe is the same :class:`EvidenceHead` that ``radixpert-train encoder`` trains (global mean
and max pooling, one linear layer), fitted full-batch with AdamW on binary cross-entropy.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from radixpert.bundle import sha256_of
from radixpert.config import RadixpertConfig
from radixpert.errors import ModelError, UsageError
from radixpert.model import EvidenceHead, TinyCNNEncoder, load_safetensors_into
from radixpert.train.data import ImageCache, Study
from radixpert.train.experts import (
    ENCODER_HEAD_FILE,
    FINDINGS,
    _auroc_summary,
    _macro_auroc,
    _require,
    _stack_images,
    _write_json,
    encoder_targets,
    head_outputs,
)

_BATCH = 32


@torch.no_grad()
def encoder_features(encoder: TinyCNNEncoder, images: np.ndarray) -> torch.Tensor:
    """(N, D_v, G, G) features of the frozen encoder (eval mode), batch by batch."""
    encoder.eval()
    out = [encoder(torch.from_numpy(images[i : i + _BATCH].astype(np.float32))) for i in range(0, len(images), _BATCH)]
    return torch.cat(out)


def fit_encoder_head(config: RadixpertConfig, train: list[Study], val: list[Study], encoder_path: str | Path,
                     out_dir: Path, *, sided: bool = True, pool: str = "mean-max", steps: int = 1500,
                     lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0) -> dict:
    """Fit ``EvidenceHead`` on the frozen encoder; write ``encoder_head.safetensors`` and metrics.

    Returns the metrics: held-out AUROC per finding, side AUROC, and the encoder's sha256 before
    and after (equal, or ModelError).
    """
    if steps < 1 or lr <= 0:
        raise UsageError(f"steps and lr must be positive, got {steps} and {lr}")
    _require(train, "train")
    _require(val, "val")
    encoder_path = Path(encoder_path)
    before = sha256_of(encoder_path)
    encoder = TinyCNNEncoder(config)
    load_safetensors_into(encoder, encoder_path, "encoder")
    encoder.requires_grad_(False)

    started = time.perf_counter()
    cache = ImageCache(config.image_size)
    train_features = encoder_features(encoder, _stack_images(train, cache))
    val_features = encoder_features(encoder, _stack_images(val, cache))
    train_truth = torch.from_numpy(encoder_targets(train, sided))
    val_targets = encoder_targets(val, sided)
    features_s = time.perf_counter() - started

    torch.manual_seed(seed)
    head = EvidenceHead(config.vision_dim, head_outputs(sided), pool)
    with torch.no_grad():
        pooled_train = head.pooled(train_features)
        pooled_val = head.pooled(val_features)
    optimizer = torch.optim.AdamW(head.linear.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head.linear(pooled_train), train_truth)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scores = head.linear(pooled_val).numpy()
    summary = _auroc_summary(scores[:, : len(FINDINGS)], val_targets[:, : len(FINDINGS)])
    if sided:
        summary["side_macro_auroc"] = _macro_auroc(scores[:, len(FINDINGS):], val_targets[:, len(FINDINGS):])

    after = sha256_of(encoder_path)
    if after != before:
        raise ModelError(f"{encoder_path} changed while its head was fitted; restore it from the checkpoint")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    head.save(out_dir / ENCODER_HEAD_FILE, "encoder head (linear probe on a frozen encoder)")
    metrics = {
        **summary,
        "outputs": head.outputs,
        "pool": pool,
        "final_train_loss": round(float(loss.detach()), 5),
        "steps": steps,
        "lr": lr,
        "encoder_sha256_before": before,
        "encoder_sha256_after": after,
        "train_studies": len(train),
        "val_studies": len(val),
        "features_seconds": round(features_s, 2),
    }
    _write_json(out_dir / "encoder_head_metrics.json", metrics)
    return metrics

