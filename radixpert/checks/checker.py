"""All checks of one draft, from what the runtime already has: the report text, the U-Net's
maps and the encoder head's evidence. The bundle's manifest says what the frontend outputs and
holds the calibrated thresholds and ranges. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from radixpert.checks.findings import asserted, report_findings
from radixpert.checks.gate import anatomy_measures, gate_verdict
from radixpert.checks.guard import evidence_table, flagged, guard_checks


@dataclass
class Checked:
    """The checks of one report."""

    findings: list[dict[str, Any]]  # every finding mention (report_findings)
    checks: list[dict[str, Any]]  # guard verdicts (guard_checks)
    gate: dict[str, Any]  # anatomy gate verdict (gate_verdict)
    evidence: dict[str, dict[str, float]] | None  # the head's probabilities by label, or None

    @property
    def flags(self) -> list[str]:
        """One short line per thing a reader must look at; empty for a clean draft."""
        lines = [f"{c['verdict']}: {c['message']}" for c in flagged(self.checks)]
        if self.gate["verdict"] not in ("ok", "not checked"):
            lines.append(f"anatomy gate {self.gate['verdict']}: {'; '.join(self.gate['reasons'])}")
        return lines

    @property
    def conflicts(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if c["verdict"] == "conflict"]


class Checker:
    """The checks a bundle supports, configured from its manifest."""

    def __init__(self, manifest: dict[str, Any], mask_names: Sequence[str]):
        visual = manifest.get("visual", {})
        evidence = visual.get("evidence")
        self.evidence_outputs: list[str] | None = list(evidence["outputs"]) if evidence else None
        checks = manifest.get("checks") or {}
        self.gate_calibration = checks.get("gate")
        self.guard_thresholds = checks.get("guard")
        self.mask_names = list(mask_names)

    def gate(self, masks: np.ndarray, display_shape: Sequence[int]) -> dict[str, Any]:
        """The anatomy gate alone: it needs only the maps, so it is known before any text."""
        return gate_verdict(anatomy_measures(masks, self.mask_names, display_shape), self.gate_calibration)

    def check(self, report: str, masks: np.ndarray, evidence: np.ndarray | None,
              display_shape: Sequence[int]) -> Checked:
        """Findings, guard checks and the gate verdict for one scan (``masks`` (K, S, S), ``evidence`` (E,))."""
        table = (evidence_table(self.evidence_outputs, evidence)
                 if self.evidence_outputs is not None and evidence is not None else None)
        findings = report_findings(report)
        checks = guard_checks(asserted(report), table, self.guard_thresholds)
        return Checked(findings, checks, self.gate(masks, display_shape), table)
