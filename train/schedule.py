"""The learning-rate schedule every training loop here uses: linear warmup, then cosine decay."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, floor: float) -> float:
    """LR factor at ``step`` (0-based): linear warmup over ``warmup`` steps, then a cosine from 1
    down to ``floor`` (a fraction of the peak) at ``total``, held there after."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
