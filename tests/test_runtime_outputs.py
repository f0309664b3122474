"""The runtime's file outputs: the draft DICOM SR and the anatomy overlay PNG."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ComprehensiveSRStorage
from radixpert.runtime.outputs import (
    MANUFACTURER,
    SERIES_DESCRIPTION,
    write_overlay,
    write_sr,
)

from radixpert.bundle import label_table
from radixpert.errors import InputError, UsageError
from radixpert.imageio import letterbox_resize

SPANISH = "derrame pleural, índice cardiotorácico, niño"
REPORT = f"Hallazgos: {SPANISH}.\n\n  Sin neumotórax.  \n"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[Path]:
    """Three phantom DICOMs: uncompressed, RLE and JPEG 2000."""
    from radixpert.phantom import write_dataset

    out = tmp_path_factory.mktemp("phantoms")
    csv_path = write_dataset(out, n=3, seed=3, size=256, workers=1, progress=False)
    return [out / row["DicomPath"] for row in csv.DictReader(open(csv_path, encoding="utf-8"))]


def _items(ds) -> list:
    """Every content item of an SR tree, depth first."""
    found = []
    for item in ds.get("ContentSequence", []):
        found.append(item)
        found.extend(_items(item))
    return found


def _named(ds, meaning: str) -> list:
    return [i for i in _items(ds) if i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


# ----------------------------------------------------------------------------- SR


def test_sr_is_a_draft_comprehensive_sr_in_the_source_study(phantoms, tmp_path):
    for n, source in enumerate(phantoms):
        out = write_sr(source, REPORT, tmp_path / f"{n}.sr.dcm", bundle_id="b0123456789abcde", model_name="tiny")
        src = pydicom.dcmread(source, stop_before_pixels=True)
        sr = pydicom.dcmread(out)
        assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
        assert sr.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                        "AccessionNumber", "StudyDate"):
            assert sr[keyword].value == src[keyword].value, keyword
        assert sr.SeriesInstanceUID != src.SeriesInstanceUID and sr.SOPInstanceUID != src.SOPInstanceUID
        assert sr.SeriesDescription == SERIES_DESCRIPTION and len(SERIES_DESCRIPTION) <= 64
        assert sr.Manufacturer == MANUFACTURER and sr.ManufacturerModelName == "tiny"
        assert sr.SoftwareVersions == "b0123456789abcde"
        assert (sr.VerificationFlag, sr.CompletionFlag, sr.PreliminaryFlag) == ("UNVERIFIED", "PARTIAL", "PRELIMINARY")
        assert int(sr.SeriesNumber) > 0 and int(sr.InstanceNumber) == 1

        assert sr.ConceptNameCodeSequence[0].CodeValue == "18748-4"
        assert sr.ConceptNameCodeSequence[0].CodingSchemeDesignator == "LN"
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == src.StudyInstanceUID
        ref = evidence.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == src.SeriesInstanceUID
        assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID

        (image,) = [i for i in _items(sr) if i.ValueType == "IMAGE"]
        assert image.ReferencedSOPSequence[0].ReferencedSOPClassUID == src.SOPClassUID
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        (language,) = _named(sr, "Language of Content Item and Descendants")
        assert language.ConceptCodeSequence[0].CodeValue == "es"
        assert [i.TextValue for i in _named(sr, "Finding")] == [f"Hallazgos: {SPANISH}.", "Sin neumotórax."]
        assert _named(sr, "Algorithm Name")[0].TextValue == "tiny"
        assert _named(sr, "Algorithm Version")[0].TextValue == "b0123456789abcde"
        assert "BORRADOR" in _named(sr, "Comment")[0].TextValue


def test_sr_spanish_round_trips_as_declared_utf8(phantoms, tmp_path):
    out = write_sr(phantoms[0], SPANISH, tmp_path / "es.sr.dcm", bundle_id="b", model_name="m")
    sr = pydicom.dcmread(out)
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert _named(sr, "Finding")[0].TextValue == SPANISH
    assert SPANISH.encode("utf-8") in out.read_bytes()


def test_sr_reads_back_with_highdicom(phantoms, tmp_path):
    import highdicom as hd

    out = write_sr(phantoms[1], REPORT, tmp_path / "hd.sr.dcm", bundle_id="b", model_name="m")
    sr = hd.sr.srread(out)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    (root,) = sr.content
    assert isinstance(root, hd.sr.ContainerContentItem) and root.name.value == "18748-4"
    (findings,) = [i for i in root.ContentSequence if i.name.meaning == "Findings"]
    texts = [i.value for i in findings.ContentSequence if isinstance(i, hd.sr.TextContentItem)]
    assert texts == [f"Hallazgos: {SPANISH}.", "Sin neumotórax."]
    (image,) = [i for i in findings.ContentSequence if isinstance(i, hd.sr.ImageContentItem)]
    assert image.referenced_sop_instance_uid == pydicom.dcmread(phantoms[1], stop_before_pixels=True).SOPInstanceUID


def test_sr_keeps_a_latin1_patient_name_and_tolerates_a_sparse_header(phantoms, tmp_path):
    ds = pydicom.dcmread(phantoms[0])
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Muñoz^José"
    for keyword in ("PatientSex", "PatientBirthDate", "AccessionNumber", "StudyID"):
        del ds[keyword]
    source = tmp_path / "latin1.dcm"
    ds.save_as(source)
    assert "Muñoz".encode("latin-1") in source.read_bytes()

    sr = pydicom.dcmread(write_sr(source, REPORT, tmp_path / "l.sr.dcm", bundle_id="b", model_name="m"))
    assert str(sr.PatientName) == "Muñoz^José" and sr.SpecificCharacterSet == "ISO_IR 192"
    assert sr.PatientSex == "" and sr.AccessionNumber == ""


def test_sr_warnings_are_comments_marked_english_and_uids_are_new_each_time(phantoms, tmp_path):
    warning = "image is FOR PROCESSING (raw detector data)"
    a = pydicom.dcmread(write_sr(phantoms[2], REPORT, tmp_path / "a.dcm", bundle_id="b", model_name="m",
                                 warnings=[warning]))
    b = pydicom.dcmread(write_sr(phantoms[2], REPORT, tmp_path / "b.dcm", bundle_id="b", model_name="m"))
    (note,) = [i for i in _named(a, "Comment") if i.TextValue == warning]
    assert note.ContentSequence[0].ConceptCodeSequence[0].CodeValue == "en"
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    assert not list(tmp_path.glob(".*.tmp"))


def test_sr_refuses_a_png_or_non_dicom_source_in_one_line(tmp_path):
    png = tmp_path / "scan.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    text = tmp_path / "notes.txt"
    text.write_text("not a scan")
    for source in (png, text):
        with pytest.raises(UsageError, match="--sr needs a DICOM input") as caught:
            write_sr(source, REPORT, tmp_path / "x.sr.dcm", bundle_id="b", model_name="m")
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "x.sr.dcm").exists()


def test_sr_refuses_a_dicom_without_instance_uids(phantoms, tmp_path):
    ds = pydicom.dcmread(phantoms[0])
    del ds.SeriesInstanceUID
    source = tmp_path / "no-series.dcm"
    ds.save_as(source)
    with pytest.raises(InputError, match="lacks SeriesInstanceUID"):
        write_sr(source, REPORT, tmp_path / "x.sr.dcm", bundle_id="b", model_name="m")


# ----------------------------------------------------------------------------- overlay

LABELS = label_table(("right_lung", "heart", "left_clavicle"))


def _frame(shape: tuple[int, int], size: int) -> tuple[float, int, int]:
    """Scale and (top, left) padding that map original pixels into the letterboxed square."""
    h, w = shape
    side = max(h, w)
    return size / side, (side - h) // 2, (side - w) // 2


@pytest.mark.parametrize("shape", [(200, 300), (300, 200), (256, 256)])
def test_overlay_is_in_registration_with_the_image(tmp_path, shape):
    h, w = shape
    display = np.full(shape, 0.3, np.float32)
    square = np.zeros(shape, bool)
    square[h // 10 : h * 4 // 10, w // 10 : w * 4 // 10] = True  # top-left quadrant
    display[square] = 1.0
    corner = np.zeros(shape, bool)
    corner[h * 7 // 10 :, w * 7 // 10 :] = True  # bottom-right, for the second label
    masks = np.stack([letterbox_resize(square, 224), letterbox_resize(corner, 224), np.zeros((224, 224), np.float32)])

    out = write_overlay(display, masks, LABELS, tmp_path / "o.png", title="scan.dcm")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        png = np.asarray(im).astype(int)
    assert png.shape[1] == 512 and png.shape[0] > 512

    scale, top, left = _frame(shape, 512)

    def at(r: float, c: float) -> np.ndarray:
        return png[int((r + top) * scale), int((c + left) * scale)]

    blue = np.array(LABELS[0]["colour"])
    assert np.abs(at(h * 0.25, w * 0.25) - (0.65 * 255 + 0.35 * blue)).max() <= 2  # tinted bright square
    grey = at(h * 0.55, w * 0.55)  # far from both structures: untouched grey
    assert grey[0] == grey[1] == grey[2] and abs(grey[0] - 0.3 * 255) <= 1
    # Just outside the square's edges (a few output pixels) the image is untinted.
    for r, c in [(h // 10 - 4 / scale, w * 0.25), (h * 0.25, w * 4 // 10 + 4 / scale)]:
        px = at(r, c)
        assert px[0] == px[1] == px[2], (r, c, px)
    # The contour, in the exact label colour, lies on the square's boundary.
    rows, cols = np.nonzero((png[:512, :512] == blue).all(axis=2))
    assert rows.size
    r0, r1 = (h // 10 + top) * scale, (h * 4 // 10 + top) * scale
    c0, c1 = (w // 10 + left) * scale, (w * 4 // 10 + left) * scale
    assert r0 - 1.5 <= rows.min() <= r0 + 1.5 and r1 - 3 <= rows.max() <= r1 + 1.5
    assert c0 - 1.5 <= cols.min() <= c0 + 1.5 and c1 - 3 <= cols.max() <= c1 + 1.5
    if top:  # letterbox padding is black
        assert (png[: int(top * scale) - 1, :512] == 0).all()
    if left:
        assert (png[:512, : int(left * scale) - 1] == 0).all()


def test_overlay_legend_band_shows_every_label_colour(tmp_path):
    labels = label_table(("right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle", "trachea"))
    masks = np.zeros((len(labels), 64, 64), np.float32)
    out = write_overlay(np.zeros((100, 80), np.float32), masks, labels, tmp_path / "legend.png", title="título ñ")
    png = np.asarray(Image.open(out).convert("RGB"))
    band = png[512:]
    assert band.shape[0] > 20
    for label in labels:
        assert (band == np.array(label["colour"])).all(axis=2).sum() >= 50, label["name"]
    assert (png[:512] == 0).all()  # empty masks and a black display: nothing drawn on the image


def test_overlay_refuses_masks_that_do_not_match_the_labels(tmp_path):
    with pytest.raises(ValueError, match="3 channels but 2 labels") as caught:
        write_overlay(np.zeros((50, 50), np.float32), np.zeros((3, 32, 32), np.float32), LABELS[:2], tmp_path / "x.png")
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=r"\(K, S, S\)"):
        write_overlay(np.zeros((50, 50), np.float32), np.zeros((2, 32, 16), np.float32), LABELS[:2], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- torch-free

NO_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "torchvision", "transformers", "peft"}:
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, NoTorch())
    import numpy as np
    from radixpert.runtime.outputs import write_overlay, write_sr
    write_overlay(np.zeros((40, 30), np.float32), np.zeros((1, 16, 16), np.float32),
                  [{"index": 0, "name": "heart", "colour": [1, 2, 3]}], sys.argv[1] + "/o.png", size=64)
    assert not any(m.split(".")[0] == "torch" for m in sys.modules)
    print("outputs ok")
    """
)


def test_outputs_import_where_torch_cannot_be_imported(tmp_path):
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(tmp_path)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "outputs ok" in done.stdout
