"""Calibrate the runtime checks at export, on training images: the evidence guard's thresholds
and the anatomy gate's ranges, recorded in the manifest under ``checks``.

The exported ONNX frontend (fp32, ONNX Runtime) gives the maps and the evidence, so the ranges
and thresholds are those of the graph the runtime runs, and the reference reports of the same
images say which findings are present (read by the same Spanish labeler the runtime uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from radixpert.checks.findings import asserted
from radixpert.checks.gate import anatomy_measures, calibrate_gate
from radixpert.checks.guard import calibrate_guard, evidence_table
from radixpert.runtime.frontend import CPU, OnnxFrontend

_BATCH = 16


def calibrate_checks(onnx_path: Path, samples: Any, mask_names: tuple[str, ...], evidence_outputs: list[str] | None,
                     threads: int | None = None) -> dict[str, Any]:
    """``{"gate": ..., "guard": ... or None, "evidence": {...} or None}`` from ``samples`` (export's Samples)."""
    session = OnnxFrontend(onnx_path, providers=[CPU], threads=threads)
    measures, tables = [], []
    for start in range(0, len(samples.images), _BATCH):
        outputs = session.run_outputs(samples.images[start : start + _BATCH])
        for i, masks in enumerate(outputs["masks"]):
            measures.append(anatomy_measures(masks, mask_names, samples.shapes[start + i]))
            if evidence_outputs and "evidence" in outputs:
                tables.append(evidence_table(evidence_outputs, outputs["evidence"][i]))
    guard = None
    if evidence_outputs:
        guard = calibrate_guard(tables, [asserted(r) for r in samples.reports])
    return {"gate": calibrate_gate(measures), "guard": guard}
