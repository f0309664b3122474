"""The anatomy gate: is this a chest radiograph the model knows, the right way round?

The frozen U-Net's maps say where it found each structure. On images like the training ones
its maps have a familiar size, place and shape; on a mirrored image the heart sits on the
image's left; on a rotated, inverted, cropped or non-chest image the maps fall apart. Measured
per structure, inside the letterboxed content box (so padding does not count):

* ``area``: the share of the content box where the map is at least 0.5;
* ``cx``, ``cy``: the centroid of that region, as fractions of the box's width and height;
* ``components``: its connected regions (8-connected, scipy.ndimage) larger than 0.1 % of the box.

Export calibrates a range for each measure on training images (:func:`calibrate_gate`, stored
in the bundle). The verdict (:func:`gate_verdict`):

* ``ok``: both lungs found, on their expected sides, the heart's centroid on the image's right
  (the patient's left in a PA or AP view as displayed), and every measure in range;
* ``mirrored``: the heart is on the image's left, and the left-right mirror of the measures
  (x -> 1 - x, with or without right and left maps trading names) is in range: a flipped image, or a rare situs
  inversus. Sides in the report may be swapped;
* ``implausible``: anything else; the reasons name each measure out of range.

This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

MEASURES = ("area", "cx", "cy", "components")
# A region smaller than this share of the content box is noise, not a structure's part.
MIN_COMPONENT = 0.001
_EIGHT = np.ones((3, 3), dtype=bool)


def content_box(display_shape: Sequence[int], size: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the image inside the model's ``size`` square (letterbox geometry)."""
    height, width = int(display_shape[0]), int(display_shape[1])
    side = max(height, width)
    rows, cols = height * size / side, width * size / side
    top, left = (size - rows) / 2.0, (size - cols) / 2.0
    return (int(round(top)), int(round(top + rows)), int(round(left)), int(round(left + cols)))


def anatomy_measures(masks: np.ndarray, names: Sequence[str], display_shape: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per structure: area, centroid and connected components of the map inside the content box."""
    maps = np.asarray(masks, dtype=np.float32)
    top, bottom, left, right = content_box(display_shape, maps.shape[-1])
    out: dict[str, dict[str, float]] = {}
    for name, prob in zip(names, maps):
        region = np.nan_to_num(prob[top:bottom, left:right]) >= 0.5
        total = max(region.size, 1)
        area = float(region.sum()) / total
        if region.any():
            ys, xs = np.nonzero(region)
            cx, cy = float(xs.mean() + 0.5) / region.shape[1], float(ys.mean() + 0.5) / region.shape[0]
        else:
            cx = cy = float("nan")
        labels, count = ndimage.label(region, structure=_EIGHT)
        sizes = np.bincount(labels.ravel())[1:] if count else np.zeros(0)
        components = int((sizes >= MIN_COMPONENT * total).sum())
        out[name] = {"area": area, "cx": cx, "cy": cy, "components": float(components)}
    return out


def mirror_measures(measures: dict[str, dict[str, float]], swap_sides: bool) -> dict[str, dict[str, float]]:
    """The measures of the left-right mirrored image (x -> 1 - x); with ``swap_sides``, right_* and
    left_* maps also trade names (a segmenter that names lungs by their place in the image)."""
    out = {}
    for name, values in measures.items():
        twin = name.replace("right_", "\0").replace("left_", "right_").replace("\0", "left_") if swap_sides else name
        out[twin] = {**values, "cx": 1.0 - values["cx"]}
    return out


def calibrate_gate(samples: Sequence[dict[str, dict[str, float]]], widen: float = 0.5) -> dict[str, Any]:
    """Ranges per structure and measure from training images' measures.

    Each range is [min, max] of the samples widened by ``widen`` times its spread on each side
    (and by at least 0.02, or one component), so that ordinary images of the training kind stay
    inside while a missing, displaced or shattered structure falls out.
    """
    if not samples:
        raise ValueError("the anatomy gate needs at least one calibration image")
    ranges: dict[str, dict[str, list[float]]] = {}
    for name in samples[0]:
        ranges[name] = {}
        for measure in MEASURES:
            values = np.array([s[name][measure] for s in samples], dtype=np.float64)
            values = values[np.isfinite(values)]
            if values.size == 0:
                continue
            lo, hi = float(values.min()), float(values.max())
            pad = max(widen * (hi - lo), 1.0 if measure == "components" else 0.02)
            if measure == "components":
                ranges[name][measure] = [max(1.0, np.floor(lo - pad)), np.ceil(hi + pad)]
            else:
                ranges[name][measure] = [lo - pad, hi + pad]
    return {"ranges": ranges, "images": len(samples), "widen": widen, "min_component": MIN_COMPONENT}


def _out_of_range(measures: dict[str, dict[str, float]], ranges: dict[str, dict[str, list[float]]]) -> list[str]:
    reasons = []
    for name, limits in ranges.items():
        values = measures.get(name)
        if values is None:
            reasons.append(f"{name.replace('_', ' ')} not measured")
            continue
        if not values["area"] > 0:
            reasons.append(f"{name.replace('_', ' ')} not found")
            continue
        for measure, (lo, hi) in limits.items():
            value = values[measure]
            if not lo <= value <= hi:
                reasons.append(f"{name.replace('_', ' ')} {measure} {value:.3g} outside [{lo:.3g}, {hi:.3g}]")
    return reasons


def _sides_wrong(measures: dict[str, dict[str, float]]) -> list[str]:
    """Structures on the unexpected half of the image (the patient's right is the image's left)."""
    expected = {"right_lung": "left", "left_lung": "right", "heart": "right"}
    reasons = []
    for name, half in expected.items():
        cx = measures.get(name, {}).get("cx", float("nan"))
        if not np.isfinite(cx):
            continue
        if (cx >= 0.5) != (half == "right"):
            where = "left" if cx < 0.5 else "right"
            reasons.append(f"{name.replace('_', ' ')} centroid on the image's {where} (x {cx:.2f})")
    return reasons


def gate_verdict(measures: dict[str, dict[str, float]], calibration: dict[str, Any] | None) -> dict[str, Any]:
    """``{"verdict": ok | mirrored | implausible | not checked, "reasons": [...], "measures": ...}``."""
    rounded = {n: {k: (round(v, 4) if np.isfinite(v) else None) for k, v in m.items()} for n, m in measures.items()}
    if not calibration:
        return {"verdict": "not checked", "reasons": ["the bundle has no anatomy ranges; re-export it"], "measures": rounded}
    ranges = calibration["ranges"]
    direct = _out_of_range(measures, ranges) + _sides_wrong(measures)
    if not direct:
        return {"verdict": "ok", "reasons": [], "measures": rounded}
    heart_x = measures.get("heart", {}).get("cx", float("nan"))
    if np.isfinite(heart_x) and heart_x < 0.5:
        # A segmenter may follow the anatomy (the right lung found on the image's right) or the
        # place (the lung on the image's left called right): either way, mirrored back it fits.
        flips = (mirror_measures(measures, swap) for swap in (False, True))
        if any(not (_out_of_range(f, ranges) + _sides_wrong(f)) for f in flips):
            return {"verdict": "mirrored",
                    "reasons": [f"heart on the image's left (x {heart_x:.2f}) and the anatomy matches a left-right "
                                "mirrored chest: sides in the report may be swapped"],
                    "measures": rounded}
    return {"verdict": "implausible", "reasons": direct, "measures": rounded}
