"""Clinical scores from labeled findings: per-finding P/R/F1, micro and macro F1, laterality.

Both sides of a pair are labeled the same way (the rule-based labeler on the prediction and on
the reference text), so a score measures what the report says, not how it is worded.

* A label counts as present where the report asserts it, uncertain mentions included
  ("compatible con derrame"); ``normal`` is a label like the others.
* **micro F1** pools true/false positives and false negatives over all labels; **macro F1** is
  the mean F1 over the labels seen in the references or the predictions.
* **Laterality accuracy**: over the findings present in both prediction and reference whose
  reference states a side, the share where the prediction states the same side (a prediction
  with no side, or bilateral for unilateral, is wrong but not a swap).
* **Swap rate**: over the same findings, the share placed on the opposite side (right <-> left).
* **Zone accuracy**: over the findings present in both whose reference states a zone, the share
  with the same zones.

This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from radixpert.checks.labeler import LABELS, Finding

_OPPOSITE = {"right": "left", "left": "right"}


@dataclass
class StudyComparison:
    """What one prediction got right and wrong against its reference."""

    missed: list[str]
    extra: list[str]
    side_checked: int
    side_correct: int
    swapped: list[str]
    wrong_side: list[str]


def describe(findings: dict[str, Finding]) -> str:
    """'pleural effusion (right); nodule (left, upper)' in label order."""
    parts = []
    for label in sorted(findings, key=lambda lab: (LABELS.index(lab) if lab in LABELS else len(LABELS), lab)):
        f = findings[label]
        where = ", ".join(([f.side] if f.side else []) + list(f.zones))
        hedge = "?" if f.status == "uncertain" else ""
        parts.append(f"{label}{hedge}" + (f" ({where})" if where else ""))
    return "; ".join(parts)


def compare(pred: dict[str, Finding], ref: dict[str, Finding]) -> StudyComparison:
    """Compare the present findings of one prediction with its reference."""
    both = [label for label in ref if label in pred]
    sided = [label for label in both if ref[label].side]
    swapped = [label for label in sided if pred[label].side == _OPPOSITE.get(ref[label].side)]
    wrong = [label for label in sided if pred[label].side != ref[label].side]
    return StudyComparison(
        missed=[label for label in ref if label not in pred],
        extra=[label for label in pred if label not in ref],
        side_checked=len(sided),
        side_correct=len(sided) - len(wrong),
        swapped=swapped,
        wrong_side=wrong,
    )


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def score_findings(preds: Sequence[dict[str, Finding]], refs: Sequence[dict[str, Finding]]) -> dict:
    """Per-label and pooled scores over paired present-finding dicts (see :func:`labeler.present`)."""
    counts: dict[str, list[int]] = {}
    side_checked = side_correct = swaps = zone_checked = zone_correct = 0
    for pred, ref in zip(preds, refs):
        for label in set(pred) | set(ref):
            tp_fp_fn = counts.setdefault(label, [0, 0, 0])
            tp_fp_fn[0 if (label in pred and label in ref) else 1 if label in pred else 2] += 1
        result = compare(pred, ref)
        side_checked += result.side_checked
        side_correct += result.side_correct
        swaps += len(result.swapped)
        for label in ref:
            if label in pred and ref[label].zones:
                zone_checked += 1
                zone_correct += pred[label].zones == ref[label].zones
    order = sorted(counts, key=lambda lab: (LABELS.index(lab) if lab in LABELS else len(LABELS), lab))
    per_label = {}
    for label in order:
        tp, fp, fn = counts[label]
        p, r, f1 = _prf(tp, fp, fn)
        per_label[label] = {"precision": p, "recall": r, "f1": f1, "support": tp + fn, "predicted": tp + fp,
                            "tp": tp, "fp": fp, "fn": fn}
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    micro_p, micro_r, micro_f1 = _prf(tp, fp, fn)
    return {
        "per_label": per_label,
        "micro_precision": micro_p,
        "micro_recall": micro_r,
        "micro_f1": micro_f1,
        "macro_f1": sum(v["f1"] for v in per_label.values()) / len(per_label) if per_label else 0.0,
        "laterality_checked": side_checked,
        "laterality_accuracy": side_correct / side_checked if side_checked else None,
        "swaps": swaps,
        "swap_rate": swaps / side_checked if side_checked else None,
        "zone_checked": zone_checked,
        "zone_accuracy": zone_correct / zone_checked if zone_checked else None,
    }
