"""A report as structured findings: one row per finding mention, for JSON, the SR and the guard."""

from __future__ import annotations

from typing import Any

from radixpert.checks.labeler import NEGATIVE, POSITIVE, UNCERTAIN, label_report, mentions, present, sentences

# The labeler's statuses as the outputs name them.
PRESENCE = {POSITIVE: "positive", NEGATIVE: "negated", UNCERTAIN: "uncertain"}


def report_findings(text: str) -> list[dict[str, Any]]:
    """Every finding the report mentions, in reading order.

    Each row: ``label`` (PadChest name), ``presence`` (positive / negated / uncertain), ``side``
    (right / left / bilateral / None), ``zone`` (list of upper / middle / lower) and ``sentence``
    (the sentence it came from, as written). ``normal`` is added, positive, when the report asserts
    no finding at all, as the labeler scores it.
    """
    written = sentences(text)
    rows = [{"label": m.label, "presence": PRESENCE[m.status], "side": m.side, "zone": list(m.zones),
             "sentence": written[m.sentence]} for m in mentions(text)]
    if "normal" in present(label_report(text)) and not any(r["label"] == "normal" for r in rows):
        rows.append({"label": "normal", "presence": "positive", "side": None, "zone": [], "sentence": None})
    return rows


def asserted(text: str) -> dict[str, dict[str, Any]]:
    """Per label, what the whole report asserts: ``{"presence": ..., "side": ...}`` for positive and
    uncertain labels (the labeler's per-report reading: a positive mention wins over a negation)."""
    return {label: {"presence": PRESENCE[f.status], "side": f.side}
            for label, f in present(label_report(text)).items()}
