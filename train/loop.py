"""The step loop the two expert pretrainings share (segmenter and encoder).

AdamW with a short warmup and cosine decay to 5 % of the peak, batches drawn from a seeded
permutation per epoch, and a held-out check every ``eval_every`` steps and after the last one.
What differs between the experts (the batch's loss and the held-out metrics) comes in as
functions, so both runs stay deterministic by seed in exactly the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from radixpert.train.schedule import warmup_cosine

if TYPE_CHECKING:
    from radixpert.train.experts import ExpertSettings

Pick = tuple[int, int]  # (epoch, item): the epoch seeds the item's augmentation
Progress = Callable[[dict], None] | None


def sample_stream(num_items: int, seed: int) -> Iterator[Pick]:
    """Endless (epoch, item) pairs: a fresh seeded permutation per epoch."""
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(num_items)
        for item in order:
            yield epoch, int(item)
        epoch += 1


def expert_lr_factor(step: int, steps: int) -> float:
    """Short linear warmup (a tenth of the run, at most 20 steps), then cosine decay to 5 % of the peak."""
    return warmup_cosine(step, steps, max(1, min(20, steps // 10)), 0.05)


def _eval_due(done: int, settings: ExpertSettings) -> bool:
    return done == settings.steps or (settings.eval_every > 0 and done % settings.eval_every == 0)


def run_steps(
    parameters: Iterable[torch.nn.Parameter],
    settings: ExpertSettings,
    num_items: int,
    batch_loss: Callable[[list[Pick]], torch.Tensor],
    evaluate: Callable[[], dict],
    headline: tuple[str, str],
    progress: Progress = None,
) -> tuple[list[dict], float]:
    """Train for ``settings.steps`` steps; returns the held-out history and the seconds spent training.

    ``batch_loss`` gets the step's ``settings.batch_size`` picks and returns the loss to minimise;
    ``evaluate`` returns the held-out summary that goes into the history; ``headline`` names the
    progress row's key and the summary's key it shows (e.g. ``("val_mean_dice", "mean_dice")``).
    The last step is always evaluated, so the history is never empty.
    """
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: expert_lr_factor(s, settings.steps))
    stream = sample_stream(num_items, settings.seed)
    history: list[dict] = []
    train_seconds = 0.0
    for step in range(settings.steps):
        started = time.perf_counter()
        loss = batch_loss([next(stream) for _ in range(settings.batch_size)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        train_seconds += time.perf_counter() - started
        row = {"step": step + 1, "loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0]}
        if _eval_due(step + 1, settings):
            summary = evaluate()
            row[headline[0]] = summary[headline[1]]
            history.append({"step": step + 1, "loss": row["loss"], **summary})
        if progress is not None:
            progress(row)
    return history, train_seconds
