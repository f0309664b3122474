"""How well the runtime checks work, scored against reference reports (torch-free).

For each study the prediction and the reference are read by the same Spanish labeler, then:

* **laterality guard**: among findings present in both whose sides are both right or left,
  those with the correct side (the guard should stay quiet: ``false_alarm_rate`` is the share
  called ``conflict``) and those on the opposite side (``caught_rate``: the share called ``conflict``);
* **possible omission**: among findings the image head covers, those the reference has and the
  report misses (``caught_rate``: the share flagged), and those absent from both
  (``false_fire_rate``: the share flagged);
* **unsupported**: flags on findings the reference also has (false) and on findings it lacks (true);
* **anatomy gate**: verdict counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from radixpert.checks.findings import asserted

_SIDES = ("right", "left")


def _rate(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def score_checks(rows: Iterable[dict[str, Any]], covered: Iterable[str]) -> dict[str, Any]:
    """``rows``: dicts with ``report``, ``reference``, ``checks`` and ``gate`` (as radixpert-run's JSON);
    ``covered``: the labels the bundle's encoder head gives a presence probability for."""
    covered = set(covered)
    side = {"correct": 0, "correct_flagged": 0, "swapped": 0, "swapped_caught": 0, "no_evidence": 0}
    omission = {"missed": 0, "missed_caught": 0, "absent": 0, "absent_flagged": 0}
    unsupported = {"flags": 0, "on_reference_findings": 0}
    gates: Counter[str] = Counter()
    examples: dict[str, list[int]] = {"swapped_not_caught": [], "correct_flagged": [], "missed_not_caught": []}
    for index, row in enumerate(rows):
        gates[row["gate"]["verdict"]] += 1
        pred, ref = asserted(row["report"]), asserted(row["reference"])
        verdicts = {(c["kind"], c["label"]): c["verdict"] for c in row["checks"]}
        for label in set(pred) & set(ref):
            said, truth = pred[label]["side"], ref[label]["side"]
            if said not in _SIDES or truth not in _SIDES:
                continue
            verdict = verdicts.get(("laterality", label))
            side["no_evidence"] += verdict == "no evidence"
            if said == truth:
                side["correct"] += 1
                side["correct_flagged"] += verdict == "conflict"
                if verdict == "conflict":
                    examples["correct_flagged"].append(index)
            else:
                side["swapped"] += 1
                side["swapped_caught"] += verdict == "conflict"
                if verdict != "conflict":
                    examples["swapped_not_caught"].append(index)
        for label in covered:
            flagged = verdicts.get(("omission", label)) == "possible omission"
            if label in ref and label not in pred:
                omission["missed"] += 1
                omission["missed_caught"] += flagged
                if not flagged:
                    examples["missed_not_caught"].append(index)
            elif label not in ref and label not in pred:
                omission["absent"] += 1
                omission["absent_flagged"] += flagged
        for (kind, label), verdict in verdicts.items():
            if kind == "unsupported" and verdict == "unsupported":
                unsupported["flags"] += 1
                unsupported["on_reference_findings"] += label in ref
    return {
        "laterality": {**side, "false_alarm_rate": _rate(side["correct_flagged"], side["correct"]),
                       "caught_rate": _rate(side["swapped_caught"], side["swapped"])},
        "omission": {**omission, "caught_rate": _rate(omission["missed_caught"], omission["missed"]),
                     "false_fire_rate": _rate(omission["absent_flagged"], omission["absent"])},
        "unsupported": unsupported,
        "gate": dict(sorted(gates.items())),
        "examples": {k: v[:10] for k, v in examples.items()},
    }


def markdown(checks: dict[str, Any]) -> str:
    """The checks' scores as a short Markdown section."""
    side, om, un = checks["laterality"], checks["omission"], checks["unsupported"]
    lines = [
        "## Checks",
        "",
        "| check | measured | count |",
        "|---|---|---|",
        f"| laterality guard: false alarms on correctly sided findings | {side['false_alarm_rate']} | "
        f"{side['correct_flagged']} / {side['correct']} |",
        f"| laterality guard: swapped sides caught | {side['caught_rate']} | {side['swapped_caught']} / {side['swapped']} |",
        f"| possible omission: missed findings caught | {om['caught_rate']} | {om['missed_caught']} / {om['missed']} |",
        f"| possible omission: fires on findings absent from both | {om['false_fire_rate']} | "
        f"{om['absent_flagged']} / {om['absent']} |",
        f"| unsupported: flags (of them on reference findings) | | {un['flags']} ({un['on_reference_findings']}) |",
        "",
        "Anatomy gate: " + ", ".join(f"{k} {v}" for k, v in checks["gate"].items()),
        "",
    ]
    return "\n".join(lines)
