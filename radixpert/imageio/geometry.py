"""Model input geometry: letterbox to a square, area-resize, ImageNet normalization."""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224


def letterbox_resize(arr: np.ndarray, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Pad to a centred square with 0, then area-resize to ``size`` x ``size``.

    ``arr`` is ``(H, W)`` or ``(K, H, W)``. Float input is resized as values.
    Bool or integer input is taken as masks (nonzero = inside) and comes back
    as float coverage in [0, 1], on exactly the geometry the image gets.
    Returns float32 ``(size, size)`` or ``(K, size, size)``.
    """
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    a = np.asarray(arr)
    if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
        a = (a != 0).astype(np.float32)
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32, copy=False)
    else:
        raise ValueError(f"cannot resize an array of dtype {a.dtype}")
    if a.ndim == 2:
        return _letterbox_one(a, int(size))
    if a.ndim == 3:
        out = np.empty((a.shape[0], size, size), np.float32)
        for k in range(a.shape[0]):
            out[k] = _letterbox_one(a[k], int(size))
        return out
    raise ValueError(f"expected an (H, W) or (K, H, W) array, got shape {a.shape}")


def normalize_imagenet(display: np.ndarray) -> np.ndarray:
    """ImageNet-normalize a ``(S, S)`` display image into float32 ``(3, S, S)``."""
    d = np.asarray(display, dtype=np.float32)
    if d.ndim != 2:
        raise ValueError(f"expected a 2-D display image, got shape {d.shape}")
    out = np.empty((3, *d.shape), np.float32)
    for c in range(3):
        np.subtract(d, np.float32(IMAGENET_MEAN[c]), out=out[c])
        out[c] /= np.float32(IMAGENET_STD[c])
    return out


def _letterbox_one(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape
    if h == 0 or w == 0:
        raise ValueError("cannot resize an empty image")
    side = max(h, w)
    if h != w:
        canvas = np.zeros((side, side), np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top : top + h, left : left + w] = img
        img = canvas
    if side == size:
        return np.array(img, dtype=np.float32)
    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32))  # mode "F"
    return np.asarray(pil.resize((size, size), Image.Resampling.BOX), dtype=np.float32).copy()

