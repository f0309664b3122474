"""The report checks on their own: findings rows, the evidence guard and the anatomy gate.

The gate is tested on the phantoms' ground-truth anatomy (not on a U-Net), so these tests
check its geometry and logic independently of any model: maps of upright phantoms are ok,
the same maps mirrored are "mirrored", rotated or emptied maps are "implausible".
"""

from __future__ import annotations

import numpy as np
import pytest

from radixpert.checks.findings import asserted, report_findings
from radixpert.checks.gate import anatomy_measures, calibrate_gate, content_box, gate_verdict
from radixpert.checks.guard import calibrate_guard, evidence_table, flagged, guard_checks
from radixpert.config import MASK_NAMES

SIZE = 224


@pytest.fixture(scope="module")
def phantom_masks():
    """True anatomy maps of 24 phantoms on the model's geometry (letterboxed to 224)."""
    from radixpert.imageio import letterbox_resize
    from radixpert.phantom import generate_sample

    return [letterbox_resize(generate_sample(11, i, size=256).masks, SIZE) for i in range(24)]


@pytest.fixture(scope="module")
def calibration(phantom_masks):
    return calibrate_gate([anatomy_measures(m, MASK_NAMES, (SIZE, SIZE)) for m in phantom_masks[:20]])


def _verdict(masks, calibration, shape=(SIZE, SIZE)):
    return gate_verdict(anatomy_measures(masks, MASK_NAMES, shape), calibration)


def test_findings_rows_keep_presence_side_zone_and_the_written_sentence():
    text = "No se observa derrame pleural. Neumotórax izquierdo.\nNódulo en lóbulo superior derecho; posible consolidación basal izquierda."
    rows = report_findings(text)
    assert rows == [
        {"label": "pleural effusion", "presence": "negated", "side": None, "zone": [], "sentence": "No se observa derrame pleural"},
        {"label": "pneumothorax", "presence": "positive", "side": "left", "zone": [], "sentence": "Neumotórax izquierdo"},
        {"label": "nodule", "presence": "positive", "side": "right", "zone": ["upper"], "sentence": "Nódulo en lóbulo superior derecho"},
        {"label": "consolidation", "presence": "uncertain", "side": "left", "zone": ["lower"],
         "sentence": "posible consolidación basal izquierda"},
    ]
    assert asserted(text) == {"pneumothorax": {"presence": "positive", "side": "left"},
                              "nodule": {"presence": "positive", "side": "right"},
                              "consolidation": {"presence": "uncertain", "side": "left"}}
    assert report_findings("Sin hallazgos.")[-1]["label"] == "normal"


OUTPUTS = ["presence:nodule", "presence:pneumothorax", "left:nodule", "right:nodule", "left:pneumothorax", "right:pneumothorax"]
THRESHOLDS = {"presence": {"nodule": {"omission": 0.8, "unsupported": 0.05},
                           "pneumothorax": {"omission": 0.8, "unsupported": 0.05}},
              "side_margin": {"nodule": 0.1, "pneumothorax": 0.1}}


def _evidence(nodule, ptx, nodule_left, nodule_right, ptx_left=0.0, ptx_right=0.0):
    return evidence_table(OUTPUTS, np.array([nodule, ptx, nodule_left, nodule_right, ptx_left, ptx_right]))


def test_guard_calls_side_conflicts_and_agreements():
    left_nodule = _evidence(0.95, 0.01, 0.9, 0.05)
    checks = guard_checks(asserted("Nódulo izquierdo."), left_nodule, THRESHOLDS)
    assert [(c["kind"], c["label"], c["verdict"]) for c in checks] == [("laterality", "nodule", "consistent")]
    checks = guard_checks(asserted("Nódulo derecho."), left_nodule, THRESHOLDS)
    assert [(c["kind"], c["verdict"]) for c in checks] == [("laterality", "conflict")]
    assert "on the right, the image evidence on the left" in checks[0]["message"]
    # Within the calibrated margin, the stated side stands.
    close = _evidence(0.95, 0.01, 0.55, 0.50)
    assert guard_checks(asserted("Nódulo derecho."), close, THRESHOLDS)[0]["verdict"] == "consistent"
    # Neither side reaches 0.5: the image says nothing about the side.
    weak = _evidence(0.95, 0.01, 0.3, 0.2)
    assert guard_checks(asserted("Nódulo derecho."), weak, THRESHOLDS)[0]["verdict"] == "no evidence"


def test_guard_flags_omissions_and_unsupported_findings():
    evidence = _evidence(0.97, 0.02, 0.9, 0.05)
    omitted = guard_checks(asserted("No se observan nódulos."), evidence, THRESHOLDS)
    assert [(c["kind"], c["label"], c["verdict"]) for c in omitted] == [("omission", "nodule", "possible omission")]
    assert "(left)" in omitted[0]["message"]
    unsupported = guard_checks(asserted("Neumotórax derecho."), evidence, THRESHOLDS)
    assert ("unsupported", "pneumothorax", "unsupported") in [(c["kind"], c["label"], c["verdict"]) for c in unsupported]
    # The omitted nodule and the unsupported pneumothorax; "no evidence" for its side is not a flag.
    assert [c["verdict"] for c in flagged(unsupported)] == ["possible omission", "unsupported"]
    # Below the omission threshold nothing is flagged.
    assert flagged(guard_checks(asserted("Sin hallazgos."), _evidence(0.7, 0.02, 0.6, 0.1), THRESHOLDS)) == []


def test_guard_without_a_head_answers_no_evidence():
    checks = guard_checks(asserted("Derrame pleural izquierdo."), None, None)
    assert [(c["verdict"], c["evidence"]) for c in checks] == [("no evidence", None)]
    assert "no evidence head" in checks[0]["message"]


def test_guard_calibration_takes_the_quantiles_it_documents():
    rng = np.random.default_rng(0)
    truth, tables = [], []
    for i in range(200):
        has = i % 2 == 0
        side = "left" if i % 4 == 0 else "right"
        p = rng.uniform(0.6, 1.0) if has else rng.uniform(0.0, 0.7)
        left, right = (0.9, 0.1) if side == "left" else (0.1, 0.9)
        tables.append(_evidence(p, 0.0, left if has else 0.0, right if has else 0.0))
        truth.append({"nodule": {"presence": "positive", "side": side}} if has else {})
    calibrated = calibrate_guard(tables, truth)
    negatives = [t["nodule"]["presence"] for t, r in zip(tables, truth) if not r]
    positives = [t["nodule"]["presence"] for t, r in zip(tables, truth) if r]
    assert calibrated["presence"]["nodule"]["omission"] == pytest.approx(max(0.5, np.quantile(negatives, 0.99)), abs=1e-4)
    assert calibrated["presence"]["nodule"]["unsupported"] == pytest.approx(min(0.2, np.quantile(positives, 0.01)), abs=1e-4)
    assert calibrated["side_margin"]["nodule"] == 0.0  # the wrong side is always 0.8 below the right one


def test_content_box_follows_the_letterbox():
    assert content_box((1000, 1000), 224) == (0, 224, 0, 224)
    assert content_box((500, 1000), 224) == (56, 168, 0, 224)
    assert content_box((1000, 250), 224) == (0, 224, 84, 140)


def test_gate_passes_upright_phantoms(phantom_masks, calibration):
    assert [_verdict(m, calibration)["verdict"] for m in phantom_masks[20:]] == ["ok"] * 4


def test_gate_calls_a_left_right_mirror_mirrored(phantom_masks, calibration):
    for masks in phantom_masks[20:]:
        verdict = _verdict(masks[:, :, ::-1], calibration)
        assert verdict["verdict"] == "mirrored", verdict["reasons"]
        assert "heart on the image's left" in verdict["reasons"][0]


def test_gate_calls_broken_anatomy_implausible(phantom_masks, calibration):
    masks = phantom_masks[21]
    rotated = np.rot90(masks, k=1, axes=(1, 2))
    assert _verdict(rotated, calibration)["verdict"] == "implausible"
    no_left_lung = masks.copy()
    no_left_lung[1] = 0
    verdict = _verdict(no_left_lung, calibration)
    assert verdict["verdict"] == "implausible" and "left lung not found" in verdict["reasons"]
    crop = masks[:, 40:130, 30:200]  # the upper chest only, stretched back to the square
    from radixpert.imageio import letterbox_resize

    assert _verdict(letterbox_resize(crop, SIZE), calibration)["verdict"] == "implausible"
    assert _verdict(np.zeros_like(masks), calibration)["verdict"] == "implausible"


def test_gate_without_calibration_says_so(phantom_masks):
    assert _verdict(phantom_masks[0], None)["verdict"] == "not checked"


def test_gate_side_rule_holds_even_when_ranges_are_wide(phantom_masks):
    """Ranges calibrated on upright and mirrored maps admit both; the expected sides still decide."""
    measures = [anatomy_measures(m, MASK_NAMES, (SIZE, SIZE)) for m in phantom_masks[:20]]
    measures += [anatomy_measures(m[:, :, ::-1], MASK_NAMES, (SIZE, SIZE)) for m in phantom_masks[:20]]
    wide = calibrate_gate(measures)
    assert _verdict(phantom_masks[22], wide)["verdict"] == "ok"
    verdict = _verdict(phantom_masks[22][:, :, ::-1], wide)
    assert verdict["verdict"] == "mirrored"
