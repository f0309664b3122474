"""The evidence guard: the report's findings and sides against the image's own evidence.

The frontend's third output is the frozen encoder's presence and side head (``presence:LABEL``,
``left:LABEL``, ``right:LABEL`` probabilities). The report model was trained on that same
encoder, but nothing forces its text to agree with it; this guard says where it does not:

* **laterality**, for each finding the report asserts (positive or uncertain) with a right or
  left side: ``conflict`` when the other side's probability exceeds the stated side's by more
  than the calibrated margin, ``consistent`` otherwise, ``no evidence`` when neither side
  reaches 0.5 or the bundle's head has no side outputs. A bilateral statement is ``consistent``
  when both sides reach 0.5, else ``no evidence``.
* **possible omission**, for each finding the image evidence calls present at or above the
  calibrated ``omission`` threshold that the report omits or negates.
* **unsupported**, for each finding the report asserts whose presence probability is at or
  below the calibrated ``unsupported`` threshold.

Thresholds come from the bundle (:func:`calibrate_guard`, run at export on training images).
This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

FLAGS = ("conflict", "possible omission", "unsupported")
# Quantiles of the training images' probabilities that set the thresholds (see calibrate_guard).
OMISSION_QUANTILE = 0.99
UNSUPPORTED_QUANTILE = 0.01
SIDE_QUANTILE = 0.99
# Bounds on the calibrated thresholds: an omission needs the head to call the finding present
# (p >= 0.5), and "unsupported" means very low evidence (p <= 0.2), however cleanly the training
# images separate (on the demo's they do: every quantile lands beyond these bounds).
OMISSION_MIN = 0.5
UNSUPPORTED_MAX = 0.2


def evidence_table(outputs: Sequence[str], probabilities: np.ndarray) -> dict[str, dict[str, float]]:
    """``{label: {"presence": p, "left": p, "right": p}}`` from the head's named outputs."""
    table: dict[str, dict[str, float]] = {}
    for name, value in zip(outputs, np.asarray(probabilities, dtype=np.float64).ravel()):
        kind, _, label = name.partition(":")
        table.setdefault(label, {})[kind] = round(float(value), 4)
    return table


def _side_evidence(evidence: dict[str, float] | None) -> tuple[float, float] | None:
    if not evidence or "left" not in evidence or "right" not in evidence:
        return None
    return evidence["right"], evidence["left"]


def guard_checks(asserted: dict[str, dict[str, Any]], evidence: dict[str, dict[str, float]] | None,
                 thresholds: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The checks of one report: a list of ``{kind, label, verdict, stated_side, evidence, message}``.

    ``asserted``: per label, the report's ``presence`` and ``side`` (:func:`radixpert.checks.findings.asserted`).
    ``evidence`` None (a bundle without an encoder head) gives ``no evidence`` for every sided finding.
    """
    checks: list[dict[str, Any]] = []
    for label, stated in asserted.items():
        side = stated.get("side")
        if side is None:
            continue
        seen = (evidence or {}).get(label)
        checks.append(_laterality(label, side, seen, thresholds, evidence is None))
    if evidence is None or not thresholds:
        return checks
    presence = thresholds.get("presence", {})
    for label, seen in evidence.items():
        limits = presence.get(label)
        if limits is None or "presence" not in seen:
            continue
        p = seen["presence"]
        if label not in asserted and p >= limits["omission"]:
            where = _likely_side(seen)
            checks.append(_check("omission", label, "possible omission", None, seen,
                                 f"the image evidence shows {label}{where} (p {p:.2f} >= {limits['omission']:.2f}) "
                                 "but the report omits or negates it"))
        if label in asserted and p <= limits["unsupported"]:
            checks.append(_check("unsupported", label, "unsupported", asserted[label].get("side"), seen,
                                 f"the report states {label} but the image evidence is very low "
                                 f"(p {p:.2f} <= {limits['unsupported']:.2f})"))
    return checks


def _laterality(label: str, side: str, seen: dict[str, float] | None, thresholds: dict[str, Any] | None,
                no_head: bool) -> dict[str, Any]:
    sides = _side_evidence(seen)
    if sides is None:
        why = "the bundle's encoder has no evidence head" if no_head else f"the encoder has no side output for {label}"
        return _check("laterality", label, "no evidence", side, seen, f"{label} ({side}): no image evidence ({why})")
    right, left = sides
    if side == "bilateral":
        verdict = "consistent" if min(right, left) >= 0.5 else "no evidence"
        return _check("laterality", label, verdict, side, seen,
                      f"{label} (bilateral): image evidence right {right:.2f}, left {left:.2f}")
    if max(right, left) < 0.5:
        return _check("laterality", label, "no evidence", side, seen,
                      f"{label} ({side}): neither side reaches 0.5 (right {right:.2f}, left {left:.2f})")
    stated, other = (right, left) if side == "right" else (left, right)
    margin = float(((thresholds or {}).get("side_margin") or {}).get(label, 0.0))
    if other - stated > margin:
        opposite = "left" if side == "right" else "right"
        return _check("laterality", label, "conflict", side, seen,
                      f"the report puts {label} on the {side}, the image evidence on the {opposite} "
                      f"({opposite} {other:.2f} vs {side} {stated:.2f})")
    return _check("laterality", label, "consistent", side, seen,
                  f"{label} ({side}): image evidence agrees (right {right:.2f}, left {left:.2f})")


def _likely_side(seen: dict[str, float]) -> str:
    sides = _side_evidence(seen)
    if sides is None or max(sides) < 0.5:
        return ""
    right, left = sides
    return " (bilateral)" if min(sides) >= 0.5 else (" (right)" if right > left else " (left)")


def _check(kind: str, label: str, verdict: str, side: str | None, seen: dict[str, float] | None,
           message: str) -> dict[str, Any]:
    return {"kind": kind, "label": label, "verdict": verdict, "stated_side": side, "evidence": seen, "message": message}


def flagged(checks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checks that need a radiologist's attention (conflicts, possible omissions, unsupported findings)."""
    return [c for c in checks if c["verdict"] in FLAGS]


def calibrate_guard(evidence: Sequence[dict[str, dict[str, float]]],
                    truth: Sequence[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Thresholds from training images: their evidence tables and what their reference reports assert.

    Per finding, ``omission`` is the 99th percentile of its presence probability on images
    without it (at least 0.5), so at most about 1 % of clean training images would raise a false
    omission; ``unsupported`` is the 1st percentile on images with it (at most 0.2), so at most
    about 1 % of true findings would be called unsupported. ``side_margin`` is the 99th percentile, over
    training findings with a stated right or left side, of (wrong side's probability - right
    side's), and at least 0: about 1 % of correctly sided findings would conflict.
    """
    if len(evidence) != len(truth) or not evidence:
        raise ValueError("guard calibration needs one reference per image, and at least one image")
    presence: dict[str, dict[str, float]] = {}
    margins: dict[str, float] = {}
    counts: dict[str, dict[str, int]] = {}
    for label in evidence[0]:
        p = np.array([e[label].get("presence", np.nan) for e in evidence])
        has = np.array([label in t for t in truth])
        if np.isfinite(p).all():
            neg, pos = p[~has], p[has]
            omission = max(OMISSION_MIN, float(np.quantile(neg, OMISSION_QUANTILE))) if neg.size else OMISSION_MIN
            unsupported = min(UNSUPPORTED_MAX, float(np.quantile(pos, UNSUPPORTED_QUANTILE))) if pos.size else 0.0
            presence[label] = {"omission": round(omission, 4), "unsupported": round(unsupported, 4)}
            counts[label] = {"with": int(pos.size), "without": int(neg.size)}
        gaps = [e[label][_opposite(t[label]["side"])] - e[label][t[label]["side"]]
                for e, t in zip(evidence, truth)
                if label in t and t[label].get("side") in ("right", "left") and "left" in e[label]]
        if gaps:
            margins[label] = round(max(0.0, float(np.quantile(gaps, SIDE_QUANTILE))), 4)
            counts.setdefault(label, {})["sided"] = len(gaps)
    return {"presence": presence, "side_margin": margins, "images": len(evidence), "counts": counts,
            "quantiles": {"omission": OMISSION_QUANTILE, "unsupported": UNSUPPORTED_QUANTILE, "side": SIDE_QUANTILE}}


def _opposite(side: str) -> str:
    return "left" if side == "right" else "right"
