"""Tests for the synthetic chest phantoms (radixpert.phantom): torch-free, small sizes."""

from __future__ import annotations

import ast
import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from radixpert.errors import UsageError
from radixpert.phantom import (
    MASK_NAMES,
    Finding,
    generate_sample,
    labels_and_localizations,
    main,
    read_masks,
    sample_findings,
    spanish_report,
    stored_values,
    write_dataset,
)

SIZE = 256
PADCHEST_LABELS = {"normal", "cardiomegaly", "pleural effusion", "pneumothorax", "nodule", "consolidation"}
PADCHEST_LOCS = {"loc right", "loc left", "loc bilateral", "loc upper lobe", "loc middle lobe", "loc lower lobe"}
EVR, RLE, J2K = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"


def _rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def ds_a(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a")
    write_dataset(out, n=8, seed=7, size=SIZE, preview=True, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def ds_b(tmp_path_factory) -> Path:
    """Same seed as ds_a but a single worker: must be byte-identical."""
    out = tmp_path_factory.mktemp("b")
    write_dataset(out, n=8, seed=7, size=SIZE, workers=1, progress=False)
    return out


# --------------------------------------------------------------------------- determinism


def test_same_seed_is_identical_whatever_the_workers(ds_a: Path, ds_b: Path) -> None:
    assert (ds_a / "phantoms.csv").read_bytes() == (ds_b / "phantoms.csv").read_bytes()
    for row in _rows(ds_a / "phantoms.csv"):
        for rel in (row["DicomPath"], row["MaskPath"], f"images/{row['ImageDir']}/{row['ImageID']}"):
            assert (ds_a / rel).read_bytes() == (ds_b / rel).read_bytes(), rel
        a = pydicom.dcmread(ds_a / row["DicomPath"]).pixel_array
        b = pydicom.dcmread(ds_b / row["DicomPath"]).pixel_array
        np.testing.assert_array_equal(a, b)


def test_generate_sample_is_deterministic_and_seed_sensitive() -> None:
    a, b = generate_sample(3, 5, SIZE), generate_sample(3, 5, SIZE)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.report == b.report and a.findings == b.findings
    c = generate_sample(4, 5, SIZE)
    assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() > 5


def test_different_seed_gives_different_dataset(ds_a: Path, tmp_path: Path) -> None:
    write_dataset(tmp_path, n=2, seed=8, size=SIZE, workers=1, progress=False)
    for ra, rb in zip(_rows(ds_a / "phantoms.csv")[:2], _rows(tmp_path / "phantoms.csv")):
        pa = np.asarray(Image.open(ds_a / "images" / ra["ImageDir"] / ra["ImageID"]))
        pb = np.asarray(Image.open(tmp_path / "images" / rb["ImageDir"] / rb["ImageID"]))
        assert pa.shape == pb.shape and not np.array_equal(pa, pb)
        assert ra["PatientID"] != rb["PatientID"]


# --------------------------------------------------------------------------- image and masks


def _centroid_x(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean()) / mask.shape[1]


@pytest.mark.parametrize("index", range(6))
def test_mask_geometry_follows_radiographic_convention(index: int) -> None:
    s = generate_sample(11, index, SIZE)
    assert s.image.dtype == np.uint16 and s.image.shape == (SIZE, SIZE) and s.image.max() <= 4095
    assert s.masks.dtype == bool and s.masks.shape == (len(MASK_NAMES), SIZE, SIZE)
    m = dict(zip(MASK_NAMES, s.masks))
    assert all(v.sum() > 50 for v in m.values())
    assert _centroid_x(m["right_lung"]) < 0.5 < _centroid_x(m["left_lung"])  # patient's right on image left
    assert _centroid_x(m["heart"]) > 0.5
    assert _centroid_x(m["right_clavicle"]) < 0.5 < _centroid_x(m["left_clavicle"])
    assert not (m["heart"] & (m["right_lung"] | m["left_lung"])).any()
    # MONOCHROME2 sense: aerated lung darker than the heart
    assert s.image[m["right_lung"]].mean() < s.image[m["heart"]].mean() - 300 * int(s.image.max()) / 4095


def _ctr(masks: np.ndarray) -> float:
    lungs = masks[0] | masks[1]
    cols = np.nonzero(lungs.any(axis=0))[0]
    hcols = np.nonzero(masks[2].any(axis=0))[0]
    return (hcols.max() - hcols.min() + 1) / (cols.max() - cols.min() + 1)


def test_cardiothoracic_ratio_tracks_cardiomegaly() -> None:
    for index in range(8):
        normal = generate_sample(2, index, SIZE, findings=[])
        big = generate_sample(2, index, SIZE, findings=[Finding("cardiomegaly")])
        assert _ctr(normal.masks) < 0.48, index
        assert _ctr(big.masks) > 0.52, index
        assert big.masks[2].sum() > normal.masks[2].sum()
    # drawn samples too, pneumothorax included (it shrinks a lung)
    for index in range(40):
        s = generate_sample(5, index, SIZE)
        assert (_ctr(s.masks) > 0.5) == ("cardiomegaly" in s.labels), (index, s.labels)


def _difference(seed: int, index: int, finding: Finding) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with_f = generate_sample(seed, index, SIZE, findings=[finding])
    without = generate_sample(seed, index, SIZE, findings=[])
    return with_f.image.astype(float) - without.image.astype(float), with_f.masks, without.masks


@pytest.mark.parametrize("label,zone", [("nodule", "upper"), ("consolidation", "lower"),
                                        ("pleural effusion", None), ("pneumothorax", None)])
@pytest.mark.parametrize("side", ["right", "left"])
def test_finding_changes_the_correct_side(label: str, zone: str | None, side: str) -> None:
    diff, with_m, without_m = _difference(9, 3, Finding(label, side, zone))
    half = SIZE // 2
    patient_right, patient_left = np.abs(diff[:, :half]).sum(), np.abs(diff[:, half:]).sum()
    near, far = (patient_right, patient_left) if side == "right" else (patient_left, patient_right)
    assert near > 4 * far, (near, far)
    if label == "pneumothorax":
        k = 0 if side == "right" else 1
        rim = without_m[k] & ~with_m[k]  # pleural space that the lung left
        assert rim.sum() > 100 and diff[rim].mean() < -0.03 * 4095  # lucent: darker
    else:
        changed = diff[:, :half] if side == "right" else diff[:, half:]
        assert changed[np.abs(changed) > 0.05 * 4095].sum() > 0  # denser: brighter


def test_zone_places_lesion_vertically() -> None:
    rows = {}
    for zone in ("upper", "middle", "lower"):
        diff, _, _ = _difference(4, 1, Finding("nodule", "right", zone))
        w = np.clip(diff, 0, None)
        rows[zone] = float((w.sum(axis=1) * np.arange(SIZE)).sum() / w.sum())
    assert rows["upper"] < rows["middle"] < rows["lower"]


def test_drawn_right_sided_finding_is_on_image_left() -> None:
    """Search the drawn samples for one with only right-sided focal findings and check its lesion."""
    for index in range(200):
        s = generate_sample(1, index, SIZE)
        sides = {f.side for f in s.findings if f.label != "cardiomegaly"}
        if sides == {"right"} and not any(f.label == "cardiomegaly" for f in s.findings):
            break
    else:
        pytest.fail("no right-sided sample among 200")
    clean = generate_sample(1, index, SIZE, findings=[])
    diff = np.abs(s.image.astype(float) - clean.image.astype(float))
    assert diff[:, : SIZE // 2].sum() > 4 * diff[:, SIZE // 2:].sum()


def test_pneumothorax_shrinks_the_lung_mask() -> None:
    for side, k in (("right", 0), ("left", 1)):
        _, with_m, without_m = _difference(6, 2, Finding("pneumothorax", side))
        assert with_m[k].sum() < 0.93 * without_m[k].sum()
        assert with_m[1 - k].sum() == without_m[1 - k].sum()


# --------------------------------------------------------------------------- labels and reports

_SIDE_WORDS = {"right": ("derech",), "left": ("izquierd",), "bilateral": ("bilateral", "ambos", "ambas")}
_KEYWORDS = {
    "pleural effusion": r"derrame",
    "pneumothorax": r"neumotórax",
    "nodule": r"nódulo|nodular",
    "consolidation": r"consolidaci|condensaci|alveolar",
    "cardiomegaly": r"cardiomegalia|aumentad",
}


def _negated(sentence: str) -> bool:
    return bool(re.match(r"(no|sin)\b", sentence.lower())) or " sin " in sentence.lower()


def _check_report(report: str, findings: list[Finding], labels: list[str]) -> None:
    assert report.strip() and report == report.strip()
    sentences = [t.strip() for t in re.split(r"(?<=\.)\s+", report) if t.strip()]
    assert all(t.endswith(".") for t in sentences), report
    assert "normal" not in labels or len(labels) == 1
    for label, pattern in _KEYWORDS.items():
        hits = [t for t in sentences if re.search(pattern, t, re.IGNORECASE)]
        positives = [t for t in hits if not _negated(t)]
        present = [f for f in findings if f.label == label]
        if not present:
            assert not positives, (label, report)
            continue
        assert positives, (label, report)
        f = present[0]
        if f.side is None:
            continue
        for t in positives:
            low = t.lower()
            assert any(w in low for w in _SIDE_WORDS[f.side]), (f, t)
            others = [w for s, ws in _SIDE_WORDS.items() if s != f.side and s != "bilateral" for w in ws]
            assert not any(w in low for w in others), (f, t)


def test_reports_agree_with_labels_for_drawn_samples() -> None:
    seen = set()
    for index in range(60):
        s = generate_sample(13, index, SIZE)
        _check_report(s.report, s.findings, s.labels)
        assert set(s.labels) <= PADCHEST_LABELS and set(s.localizations) <= PADCHEST_LOCS
        seen.update(s.labels)
        if not s.findings:
            assert s.labels == ["normal"] and s.localizations == []
        for f in s.findings:
            if f.side:
                assert f"loc {f.side}" in s.localizations
            if f.zone:
                assert f"loc {f.zone} lobe" in s.localizations
    assert seen == PADCHEST_LABELS


def test_reports_agree_with_labels_many_draws() -> None:
    """Report logic alone over many draws: every template and negation gets exercised."""
    texts = set()
    for k in range(1500):
        findings = sample_findings(99, k)
        labels, _ = labels_and_localizations(findings)
        report = spanish_report(findings, 99, k, ctr=0.58, small_effusion=bool(k % 2), nodule_mm=15)
        _check_report(report, findings, labels)
        texts.add(report)
    assert len(texts) > 1200  # varied phrasing


def test_shortcuts_match_generate_sample() -> None:
    """Findings, labels and report text without rendering agree with the rendered study."""
    def words(text: str) -> str:  # the shortcut does not measure the image: numbers may differ
        return re.sub(r"\d+(?:,\d+)?|pequeña|moderada", "#", text)

    for index in range(6):
        s = generate_sample(21, index, SIZE)
        assert sample_findings(21, index) == s.findings
        assert labels_and_localizations(s.findings) == (s.labels, s.localizations)
        assert words(spanish_report(s.findings, 21, index)) == words(s.report)


def test_normal_reports_are_varied_and_accented() -> None:
    normals = {spanish_report([], 1, k) for k in range(200)}
    assert len(normals) > 50
    joined = " ".join(normals)
    assert "á" in joined or "í" in joined or "ó" in joined
    assert not any(re.search(r"derrame pleural (derecho|izquierdo|bilateral)", t) for t in normals)


def test_prevalence_and_co_occurrence() -> None:
    draws = [sample_findings(42, k) for k in range(3000)]
    normal = np.mean([not d for d in draws])
    assert 0.28 < normal < 0.42
    labels = [{f.label for f in d} for d in draws]
    eff = np.array(["pleural effusion" in s for s in labels])
    cardio = np.array(["cardiomegaly" in s for s in labels])
    cons = np.array(["consolidation" in s for s in labels])
    assert eff[cardio].mean() > 2 * eff[~cardio & ~cons].mean()
    assert eff[cons].mean() > 2 * eff[~cardio & ~cons].mean()
    for d in draws:
        assert len({f.label for f in d}) == len(d)
        for f in d:
            assert f.side in {None, "right", "left", "bilateral"}
            assert (f.zone is not None) == (f.label in ("nodule", "consolidation"))


# --------------------------------------------------------------------------- dataset files


def test_dataset_layout_and_csv(ds_a: Path) -> None:
    rows = _rows(ds_a / "phantoms.csv")
    assert len(rows) == 8
    for col in ("ImageID", "ImageDir", "PatientID", "StudyID", "Projection", "ViewPosition_DICOM", "Report",
                "MethodLabel", "Labels", "Localizations", "DicomPath", "MaskPath", "PhotometricInterpretation",
                "TransferSyntax", "Seed", "Index"):
        assert col in rows[0]
    assert (ds_a / "preview.png").stat().st_size > 10_000
    for i, row in enumerate(rows):
        assert row["Index"] == str(i) and row["Seed"] == "7"
        assert row["Projection"] == "PA" and row["ViewPosition_DICOM"] == "POSTEROANTERIOR"
        assert row["MethodLabel"] == "Physician" and row["ImageDir"].isdigit()
        labels, locs = ast.literal_eval(row["Labels"]), ast.literal_eval(row["Localizations"])
        assert isinstance(labels, list) and set(labels) <= PADCHEST_LABELS
        assert isinstance(locs, list) and set(locs) <= PADCHEST_LOCS
        s = generate_sample(7, i, SIZE)
        assert labels == s.labels and locs == s.localizations and row["Report"] == s.report
        np.testing.assert_array_equal(read_masks(ds_a / row["MaskPath"]), s.masks)
    patients = [r["PatientID"] for r in rows]
    assert len(set(patients)) < len(patients)  # some patients have two studies
    assert len({r["StudyID"] for r in rows}) == len(rows)


def test_every_variant_appears_and_decodes_losslessly(ds_a: Path) -> None:
    rows = _rows(ds_a / "phantoms.csv")
    combos = {(r["PhotometricInterpretation"], r["TransferSyntax"]) for r in rows}
    assert combos == {(p, t) for p in ("MONOCHROME1", "MONOCHROME2") for t in (EVR, RLE, J2K)}
    for i, row in enumerate(rows):
        ds = pydicom.dcmread(ds_a / row["DicomPath"])
        assert ds.file_meta.TransferSyntaxUID == row["TransferSyntax"]
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1" and ds.Modality == "DX"
        assert ds.BitsAllocated == 16 and ds.BitsStored == 12 and ds.HighBit == 11 and ds.PixelRepresentation == 0
        assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition == "PA"
        assert ds.PatientID == row["PatientID"] and str(ds.PatientName).startswith("PHANTOM^")
        assert ds.PresentationLUTShape == ("INVERSE" if ds.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY")
        sample = generate_sample(7, i, SIZE)
        arr = ds.pixel_array
        np.testing.assert_array_equal(arr, stored_values(sample))  # lossless
        rescaled = apply_modality_lut(arr, ds)
        expected = sample.image if ds.PhotometricInterpretation == "MONOCHROME2" else sample.meta["variant"].top - sample.image
        np.testing.assert_allclose(rescaled, expected)


def test_png_twin_matches_standard_display_pipeline(ds_a: Path) -> None:
    for row in _rows(ds_a / "phantoms.csv"):
        ds = pydicom.dcmread(ds_a / row["DicomPath"])
        png = np.asarray(Image.open(ds_a / "images" / row["ImageDir"] / row["ImageID"]))
        assert png.dtype == np.uint16
        r = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
        c, w = float(ds.WindowCenter), float(ds.WindowWidth)
        y = np.clip((r - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
        # pydicom's own windowing, normalised over its output range, agrees
        lo = float(ds.RescaleIntercept)
        hi = (2**ds.BitsStored - 1) * float(ds.RescaleSlope) + lo
        np.testing.assert_allclose((apply_voi_lut(r, ds) - lo) / (hi - lo), y, atol=1e-9)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            y = 1 - y
        assert np.abs(png / 65535.0 - y).max() <= 0.5 / 65535 + 1e-12
        # display orientation: bright = dense whatever the photometric interpretation
        masks = read_masks(ds_a / row["MaskPath"])
        assert png[masks[2]].mean() > png[masks[0] | masks[1]].mean()
        assert (y <= 0).mean() < 0.02 and (y >= 1).mean() < 0.02  # mild clipping at most


def test_uids_are_deterministic_and_distinct(ds_a: Path, ds_b: Path) -> None:
    uids = []
    for row in _rows(ds_a / "phantoms.csv"):
        a = pydicom.dcmread(ds_a / row["DicomPath"], stop_before_pixels=True)
        b = pydicom.dcmread(ds_b / row["DicomPath"], stop_before_pixels=True)
        assert (a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID) == (
            b.StudyInstanceUID, b.SeriesInstanceUID, b.SOPInstanceUID)
        assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
        uids += [a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID]
    assert len(set(uids)) == len(uids)


# --------------------------------------------------------------------------- CLI and API errors


def test_cli_writes_all_outputs(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["--n", "2", "--seed", "3", "--out", str(out), "--size", "256",
                                          "--preview", "--workers", "1"])
    assert result.exit_code == 0, result.output
    rows = _rows(out / "phantoms.csv")
    assert len(rows) == 2 and (out / "preview.png").exists()
    for row in rows:
        assert (out / row["DicomPath"]).exists() and (out / row["MaskPath"]).exists()
        assert (out / "images" / row["ImageDir"] / row["ImageID"]).exists()


@pytest.mark.parametrize("args", [
    ["--n", "0", "--out", "X"],
    ["--n", "2", "--out", "X", "--size", "100"],
    ["--n", "2", "--out", "X", "--seed", "-1"],
    ["--n", "two", "--out", "X"],
    ["--n", "2"],
    ["--n", "2", "--out", "X", "--bogus"],
    ["--n", "2", "--out", "X", "--workers", "0"],
])
def test_cli_bad_arguments_give_one_line(args: list[str], tmp_path: Path) -> None:
    args = [str(tmp_path / "o") if a == "X" else a for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("radixpert-phantom: error:"), err
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_cli_refuses_a_file_as_output_folder(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = CliRunner().invoke(main, ["--n", "1", "--out", str(target), "--size", "256"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


def test_api_rejects_bad_size() -> None:
    with pytest.raises(UsageError):
        generate_sample(0, 0, 128)
    with pytest.raises(UsageError):
        generate_sample(-1, 0, 256)


def test_module_does_not_import_torch() -> None:
    code = "import sys, radixpert.phantom as p; p.generate_sample(0, 0, 256); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("bad", [
    [Finding("nodule", "right", None)],
    [Finding("nodule", "bilateral", "upper")],
    [Finding("pneumothorax", "bilateral")],
    [Finding("cardiomegaly", "left")],
    [Finding("effusion", "right")],
    [Finding("pleural effusion", "right", "lower")],
    [Finding("nodule", "left", "upper"), Finding("nodule", "right", "lower")],
])
def test_api_rejects_findings_it_cannot_draw(bad: list[Finding]) -> None:
    with pytest.raises(UsageError):
        generate_sample(0, 0, SIZE, findings=bad)
