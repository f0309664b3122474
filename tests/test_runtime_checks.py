"""The checks in the exported chain: the frontend's evidence output against PyTorch, the
calibration the bundle records, and what radixpert-run prints, writes and exits with."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "runtime" / "run-output.schema.json"


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> list[Path]:
    from radixpert.phantom import write_dataset

    table = write_dataset(tmp_path_factory.mktemp("scans"), n=4, seed=12, size=256, workers=1)
    with open(table, newline="", encoding="utf-8") as handle:
        return [table.parent / row["DicomPath"] for row in csv.DictReader(handle)]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "radixpert.runtime.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_evidence_output_matches_pytorch(bundle, run_dir, scans):
    """ORT's evidence output against the PyTorch head on the PyTorch encoder, on real scans."""
    import torch

    from radixpert.export.merge import load_run
    from radixpert.imageio import read_image
    from radixpert.runtime.frontend import OnnxFrontend

    out, manifest = bundle
    model, _, _ = load_run(run_dir)
    images = np.stack([read_image(p, model.config.image_size).model_input for p in scans]).astype(np.float32)
    with torch.no_grad():
        features = model.frontend.encoder(torch.from_numpy(images))
        reference = torch.sigmoid(model.frontend.evidence.linear(torch.cat(
            [features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1))).numpy()
    session = OnnxFrontend(out / "frontend.onnx", providers=["CPUExecutionProvider"], threads=2)
    evidence = session.run_outputs(images)["evidence"]
    assert evidence.shape == reference.shape == (len(scans), len(model.frontend.evidence.outputs))
    assert float(np.abs(evidence - reference).max()) < 1e-4
    assert manifest["visual"]["evidence"]["outputs"] == model.frontend.evidence.outputs
    assert manifest["parity"]["frontend"]["evidence"]["max_abs"] < 1e-4


def test_bundle_records_calibrated_checks(bundle):
    _, manifest = bundle
    checks = manifest["checks"]
    assert checks["calibration_images"] == 24
    assert checks["gate"]["images"] == 24 and set(checks["gate"]["ranges"]) == set(manifest["config"]["mask_names"])
    assert checks["guard"]["images"] == 24
    for limits in checks["guard"]["presence"].values():
        assert limits["omission"] >= 0.5 and limits["unsupported"] <= 0.2


def test_json_rows_validate_against_the_schema_and_carry_the_checks(bundle, scans):
    import jsonschema

    out, _ = bundle
    done = _run(*map(str, scans), "--bundle", str(out), "--format", "json", "--max-new-tokens", "16",
                "--on-implausible", "warn")
    assert done.returncode == 0, done.stderr[-2000:]
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == len(scans)
    for row in rows:
        jsonschema.validate(row, schema)
        assert row["gate"]["verdict"] in ("ok", "mirrored", "implausible")
        assert row["flagged"] == bool(row["flags"])
    broken = dict(rows[0], gate={"verdict": "fine", "reasons": [], "measures": {}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def _impossible_gate(bundle_dir: Path, tmp_path: Path) -> Path:
    """A copy of the bundle whose anatomy ranges no image can meet (re-sealed, so it loads)."""
    from radixpert.bundle import MANIFEST, seal_manifest

    copy = tmp_path / "strict"
    shutil.copytree(bundle_dir, copy)
    manifest = json.loads((copy / MANIFEST).read_text(encoding="utf-8"))
    for limits in manifest["checks"]["gate"]["ranges"].values():
        limits["area"] = [2.0, 3.0]
    (copy / MANIFEST).write_text(json.dumps(seal_manifest(manifest), indent=1), encoding="utf-8")
    return copy


def test_an_implausible_image_is_withheld_or_flagged_never_clean(bundle, scans, tmp_path):
    out, _ = bundle
    strict = _impossible_gate(out, tmp_path)
    withheld = _run(str(scans[0]), "--bundle", str(strict), "--max-new-tokens", "8")
    assert withheld.returncode == 6, withheld.stderr[-2000:]
    assert withheld.stdout.startswith("[RETENIDO / withheld:")
    assert len(withheld.stdout.strip().splitlines()) == 1  # no report text
    assert any(line.startswith("gate: scan 1") and "implausible" in line for line in withheld.stderr.splitlines())
    as_json = _run(str(scans[0]), "--bundle", str(strict), "--max-new-tokens", "8", "--format", "json")
    row = json.loads(as_json.stdout)
    assert as_json.returncode == 6 and row["report"] is None and row["withheld"] and row["gate"]["verdict"] == "implausible"

    warned = _run(str(scans[0]), "--bundle", str(strict), "--max-new-tokens", "8", "--on-implausible", "warn",
                  "--out", str(tmp_path / "files"), "--overlay")
    assert warned.returncode == 0, warned.stderr[-2000:]
    first, *rest = warned.stdout.splitlines()
    assert first.startswith("[REVISAR] ") and "anatomy gate implausible" in first and rest  # the report follows
    overlay = next((tmp_path / "files").glob("*.overlay.png"))
    from PIL import Image

    pixels = np.asarray(Image.open(overlay).convert("RGB"))
    assert tuple(pixels[0, 0]) == (200, 30, 30)  # the red frame of a flagged draft


def test_withhold_policy():
    from radixpert.checks.checker import Checked
    from radixpert.runtime.cli import withheld_because

    conflict = [{"kind": "laterality", "label": "nodule", "verdict": "conflict", "stated_side": "left",
                 "evidence": None, "message": "m"}]
    ok_gate = {"verdict": "ok", "reasons": [], "measures": {}}
    checked = Checked([], conflict, ok_gate, None)
    assert withheld_because(checked, {"conflict": "warn", "implausible": "withhold"}) is None
    assert "laterality conflict" in withheld_because(checked, {"conflict": "withhold"})
    mirrored = Checked([], [], {"verdict": "mirrored", "reasons": ["r"], "measures": {}}, None)
    assert withheld_because(mirrored, {"conflict": "withhold", "implausible": "withhold"}) is None
    assert mirrored.flags == ["anatomy gate mirrored: r"]
