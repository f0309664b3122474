"""radixpert.imageio: DICOM/PNG -> display image -> model input.

The float32 table path is checked against pydicom's own LUT functions, on
pydicom's shipped test files and on synthetic datasets built here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.pixels import get_encoder
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from dicom_builders import PHI_ID, PHI_NAME, lut_item, make_ds, phantom_like, reference_display, save
from radixpert.errors import InputError
from radixpert.imageio import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ScanImage,
    dicom_display,
    letterbox_resize,
    normalize_imagenet,
    read_display,
    read_image,
)

J2K_OK = get_encoder(JPEG2000Lossless).is_available
needs_j2k = pytest.mark.skipif(not J2K_OK, reason="pylibjpeg-openjpeg is not installed")

# --------------------------------------------------------------------------
# The table path against pydicom (builders and reference: dicom_builders.py)
# --------------------------------------------------------------------------


def _pydicom_mono_files() -> list[str]:
    """Single-frame monochrome pydicom test files that decode here."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in get_testdata_files():
            if not Path(f).is_file():
                continue
            try:
                ds = pydicom.dcmread(f)
                if "PixelData" not in ds or ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
                    continue
                if int(ds.get("NumberOfFrames", 1) or 1) != 1:
                    continue
                ds.pixel_array
            except Exception:
                continue
            found.append(f)
    return found


PYDICOM_FILES = _pydicom_mono_files()


def test_pydicom_sample_covers_the_interesting_cases():
    names = {Path(f).name for f in PYDICOM_FILES}
    mono1 = [f for f in PYDICOM_FILES if pydicom.dcmread(f).PhotometricInterpretation == "MONOCHROME1"]
    assert len(mono1) >= 3  # the three 16x16 CR files
    assert {"CT_small.dcm", "MR_small.dcm", "693_J2KI.dcm", "MR_small_bigendian.dcm"} <= names


@pytest.mark.parametrize("path", PYDICOM_FILES, ids=lambda f: Path(f).name)
def test_table_path_matches_pydicom_on_its_test_files(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array
    mine = dicom_display(ds, stored)
    assert mine.dtype == np.float32 and mine.shape == stored.shape
    np.testing.assert_allclose(mine, reference_display(ds, stored), rtol=0, atol=1e-6)


def _synthetic_cases() -> dict[str, tuple[np.ndarray, dict]]:
    u12 = phantom_like(40, 56, 12, seed=1)
    u12[0, :4] = [0, 1, 4094, 4095]  # the ends of the stored range
    s16 = (phantom_like(40, 56, 16, seed=2).astype(np.int32) - 32768).astype(np.int16)
    s13 = (phantom_like(40, 56, 13, seed=3).astype(np.int16) - 4096).astype(np.int16)
    u16 = phantom_like(40, 56, 16, seed=4)
    voi = lut_item(16, np.round(65535 * (np.linspace(0, 1, 3000) ** 0.6)).astype(np.uint16), 500)
    voi8 = lut_item(8, np.round(255 * np.linspace(0, 1, 4096) ** 2).astype(np.uint8), 0)
    mlut = lut_item(16, np.round(np.linspace(60000, 100, 4096)).astype(np.uint16), 0)
    return {
        "window-mono2": (u12, dict(WindowCenter=2000, WindowWidth=1500)),
        "window-mono1": (u12, dict(photometric="MONOCHROME1", WindowCenter=1800, WindowWidth=2400)),
        "no-voi-unsigned": (u12, {}),
        "no-voi-mono1": (u12, dict(photometric="MONOCHROME1")),
        "no-voi-signed-rescale": (s16, dict(bits_stored=16, RescaleSlope=1, RescaleIntercept=-1024)),
        "no-voi-negative-slope": (u12, dict(RescaleSlope=-2.0, RescaleIntercept=100)),
        "signed-13bit-rescale-window": (
            s13,
            dict(bits_stored=13, RescaleSlope=0.5, RescaleIntercept=-100, WindowCenter=-120.5, WindowWidth=900),
        ),
        "window-16bit-narrow": (u16, dict(bits_stored=16, WindowCenter=33000.3, WindowWidth=4000.7)),
        "window-multivalued": (u12, dict(WindowCenter=[1500, 3000], WindowWidth=[1000, 200])),
        "window-width-1": (u12, dict(WindowCenter=2048, WindowWidth=1)),
        "linear-exact": (u12, dict(WindowCenter=2000.25, WindowWidth=0.5 + 1500, VOILUTFunction="LINEAR_EXACT")),
        "sigmoid-mono1": (u12, dict(photometric="MONOCHROME1", WindowCenter=2100, WindowWidth=900, VOILUTFunction="SIGMOID")),
        "voi-lut-sequence": (u12, dict(VOILUTSequence=[voi], WindowCenter=100, WindowWidth=10)),
        "voi-lut-8bit-rescale": (u12, dict(VOILUTSequence=[voi8], RescaleSlope=1, RescaleIntercept=0)),
        "modality-lut-window": (u12, dict(ModalityLUTSequence=[mlut], WindowCenter=1000, WindowWidth=3000)),
        "modality-lut-no-voi-mono1": (u12, dict(photometric="MONOCHROME1", ModalityLUTSequence=[mlut])),
    }


SYNTHETIC = _synthetic_cases()


@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_table_path_matches_pydicom_on_synthetic_datasets(case, tmp_path):
    stored, attrs = SYNTHETIC[case]
    ds = make_ds(stored, **attrs)
    mine = dicom_display(ds, stored)
    ref = reference_display(ds, stored)
    np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-6)
    # The same holds after a round trip through a file and the public reader.
    ds2 = make_ds(stored, **attrs)
    display, meta = read_display(save(ds2, tmp_path / f"{case}.dcm"))
    np.testing.assert_allclose(display, ref, rtol=0, atol=1e-6)
    assert meta["source"] == "dicom" and meta["sop_instance_uid"] == ds2.SOPInstanceUID


def test_window_darkens_and_brightens_the_right_ends():
    stored = np.array([[0, 1000, 2000, 3000, 4095]], np.uint16)
    mono2 = dicom_display(make_ds(stored, WindowCenter=2000, WindowWidth=1001), stored)
    assert mono2[0, 0] == 0.0 and mono2[0, -1] == 1.0 and abs(mono2[0, 2] - 0.5) < 1e-3
    mono1 = dicom_display(make_ds(stored, photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=1001), stored)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-7)


@pytest.mark.parametrize(
    "window",
    [
        None,  # stored range: v/M and 1 - (M - v)/M agree
        ("LINEAR", 1500.0, 1200.0),
        ("LINEAR_EXACT", 1500.0, 1200.0),
        ("SIGMOID", 1500.0, 1200.0),
    ],
    ids=lambda w: "no-window" if w is None else w[0],
)
def test_monochrome1_and_monochrome2_encodings_read_the_same(window, tmp_path):
    top = 4095
    v = phantom_like(64, 48, 12, seed=7)
    a2: dict = {}
    a1: dict = {}
    if window is not None:
        func, c, w = window
        # Inverting stored values maps centre c to top - c for LINEAR_EXACT and SIGMOID;
        # LINEAR's (c - 0.5) offset makes it top - c + 1.
        c1 = top - c + 1 if func == "LINEAR" else top - c
        a2 = dict(WindowCenter=c, WindowWidth=w, VOILUTFunction=func)
        a1 = dict(WindowCenter=c1, WindowWidth=w, VOILUTFunction=func)
    d2, m2 = read_display(save(make_ds(v, **a2), tmp_path / "m2.dcm"))
    d1, m1 = read_display(save(make_ds((top - v).astype(np.uint16), photometric="MONOCHROME1", **a1), tmp_path / "m1.dcm"))
    assert (m1["photometric"], m2["photometric"]) == ("MONOCHROME1", "MONOCHROME2")
    np.testing.assert_allclose(d1, d2, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------
# Compressed transfer syntaxes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned12", "signed16"])
@pytest.mark.parametrize("syntax", [RLELossless, pytest.param(JPEG2000Lossless, marks=needs_j2k)], ids=["rle", "j2k"])
def test_compressed_reads_identically_to_uncompressed(syntax, signed, tmp_path):
    if signed:
        stored = (phantom_like(72, 60, 16, seed=11).astype(np.int32) - 30000).astype(np.int16)
        attrs = dict(bits_stored=16, RescaleSlope=1, RescaleIntercept=-24, WindowCenter=-500, WindowWidth=30000)
    else:
        stored = phantom_like(72, 60, 12, seed=12)
        attrs = dict(photometric="MONOCHROME1", WindowCenter=1900, WindowWidth=2500)
    plain, _ = read_display(save(make_ds(stored, **attrs), tmp_path / "plain.dcm"))
    ds = make_ds(stored, **attrs)
    ds.compress(syntax)
    packed, meta = read_display(save(ds, tmp_path / "packed.dcm"))
    assert meta["transfer_syntax"] == str(syntax)
    np.testing.assert_array_equal(packed, plain)


# --------------------------------------------------------------------------
# Refusals: one line, InputError (exit code 3), no patient data
# --------------------------------------------------------------------------


def _refusal(path: Path | str) -> str:
    with pytest.raises(InputError) as info:
        read_image(path)
    msg = str(info.value)
    assert info.value.exit_code == 3
    assert "\n" not in msg and msg.strip() == msg and len(msg) < 300
    assert PHI_NAME not in msg and PHI_ID not in msg and "Doe" not in msg
    return msg


def test_refuses_missing_file(tmp_path):
    assert "not found" in _refusal(tmp_path / "nope.dcm")


def test_refuses_a_directory(tmp_path):
    assert "not a file" in _refusal(tmp_path)


def test_refuses_non_image_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image at all\n" * 20)
    assert "not a DICOM or PNG" in _refusal(tmp_path / "notes.txt")
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert "not a DICOM or PNG" in _refusal(tmp_path / "empty.dcm")
    (tmp_path / "noise.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    assert "not a DICOM or PNG" in _refusal(tmp_path / "noise.bin")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "xray.jpg")
    assert "JPEG images are not supported" in _refusal(tmp_path / "xray.jpg")


def test_refuses_dicom_without_pixel_data(tmp_path):
    ds = make_ds(phantom_like(8, 8))
    del ds.PixelData
    assert "no pixel data" in _refusal(save(ds, tmp_path / "header_only.dcm"))
    # A structured report is refused by its modality before that.
    assert "SR" in _refusal(get_testdata_file("reportsi.dcm"))


def test_refuses_colour(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    ds = make_ds(np.zeros((16, 16), np.uint16))
    ds.set_pixel_data(rgb, "RGB", 8)
    assert "colour" in _refusal(save(ds, tmp_path / "rgb.dcm"))


def test_refuses_multi_frame(tmp_path):
    ds = make_ds(np.stack([phantom_like(16, 16), phantom_like(16, 16, seed=1)]))
    assert ds.NumberOfFrames == 2
    assert "multi-frame" in _refusal(save(ds, tmp_path / "two_frames.dcm"))


def test_refuses_ct_and_other_non_radiographs(tmp_path):
    assert "CT" in _refusal(save(make_ds(phantom_like(16, 16), modality="CT"), tmp_path / "ct.dcm"))
    assert "CT" in _refusal(get_testdata_file("CT_small.dcm"))
    assert "MR" in _refusal(get_testdata_file("MR_small.dcm"))
    assert "US" in _refusal(save(make_ds(phantom_like(16, 16), modality="US"), tmp_path / "us.dcm"))


def test_refuses_truncated_pixel_data(tmp_path):
    path = save(make_ds(phantom_like(64, 64)), tmp_path / "full.dcm")
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 3000])
    assert "cut.dcm" in _refusal(cut)


def test_refuses_missing_photometric(tmp_path):
    ds = make_ds(phantom_like(16, 16))
    del ds.PhotometricInterpretation
    assert "photometric" in _refusal(save(ds, tmp_path / "nophoto.dcm"))


def test_refuses_corrupt_compressed_pixel_data(tmp_path):
    ds = make_ds(phantom_like(16, 16))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\x00\x00"])
    message = _refusal(save(ds, tmp_path / "jls.dcm"))
    assert "decod" in message


def test_common_radiograph_compressions_decode():
    """JPEG Lossless (.70) and JPEG-LS are common in CR/DX archives: they must decode here."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    assert get_decoder(JPEGLosslessSV1).is_available and get_decoder(JPEGLSLossless).is_available


def test_refuses_colour_png_but_reads_gray_rgb(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "colour.png")
    assert "colour" in _refusal(tmp_path / "colour.png")
    g = rng.integers(0, 255, (12, 12), dtype=np.uint8)
    Image.fromarray(np.stack([g, g, g], -1)).save(tmp_path / "gray_rgb.png")
    Image.fromarray(g).save(tmp_path / "gray.png")
    a, _ = read_display(tmp_path / "gray_rgb.png")
    b, _ = read_display(tmp_path / "gray.png")
    np.testing.assert_array_equal(a, b)


def test_refuses_corrupt_png(tmp_path):
    Image.fromarray(phantom_like(64, 64, 16)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "bad.png").write_bytes(data[: len(data) // 2])
    assert "bad.png" in _refusal(tmp_path / "bad.png")


# --------------------------------------------------------------------------
# Warnings and metadata
# --------------------------------------------------------------------------


def test_warnings_for_unusual_but_readable_headers(tmp_path):
    img = phantom_like(16, 16)
    _, meta = read_display(save(make_ds(img), tmp_path / "ok.dcm"))
    assert meta["warnings"] == [] and meta["modality"] == "DX" and meta["voi"] == "none"
    _, meta = read_display(save(make_ds(img, modality="OT"), tmp_path / "ot.dcm"))
    assert any("OT" in w for w in meta["warnings"])
    _, meta = read_display(save(make_ds(img, modality=None), tmp_path / "nomod.dcm"))
    assert any("modality is missing" in w for w in meta["warnings"])
    _, meta = read_display(save(make_ds(img, body_part="KNEE"), tmp_path / "knee.dcm"))
    assert any("KNEE" in w for w in meta["warnings"])
    _, meta = read_display(save(make_ds(img, body_part="TORAX"), tmp_path / "torax.dcm"))
    assert meta["warnings"] == []
    _, meta = read_display(save(make_ds(img, PresentationIntentType="FOR PROCESSING"), tmp_path / "raw.dcm"))
    assert any("FOR PROCESSING" in w for w in meta["warnings"])
    # FOR PRESENTATION: the stored window is applied as usual, without a warning.
    ds = make_ds(img, PresentationIntentType="FOR PRESENTATION", WindowCenter=2000, WindowWidth=500)
    d, meta = read_display(save(ds, tmp_path / "pres.dcm"))
    np.testing.assert_allclose(d, reference_display(ds, img), atol=1e-6)
    assert meta["warnings"] == [] and meta["voi"] == "window LINEAR"


def test_more_header_warnings(tmp_path):
    img = phantom_like(16, 16)
    _, meta = read_display(save(make_ds(img, PresentationLUTShape="INVERSE"), tmp_path / "inv.dcm"))
    assert any("INVERSE" in w for w in meta["warnings"])
    ds = make_ds(img, photometric="MONOCHROME1", PresentationLUTShape="INVERSE")
    _, meta = read_display(save(ds, tmp_path / "mono1.dcm"))
    assert meta["warnings"] == []
    flat = (img // 16).astype(np.uint16)  # 8 bits of content in a 16-bit container
    _, meta = read_display(save(make_ds(flat, bits_stored=16), tmp_path / "flat.dcm"))
    assert any("look flat" in w for w in meta["warnings"])
    # pydicom's 16x16 MONOCHROME1 CR sample: read, windowed, with a body-part warning.
    path = get_testdata_file("6154")
    d, meta = read_display(path)
    ds = pydicom.dcmread(path)
    np.testing.assert_allclose(d, reference_display(ds, ds.pixel_array), atol=1e-6)
    assert meta["photometric"] == "MONOCHROME1" and meta["modality"] == "CR"
    assert any("CSPINE" in w for w in meta["warnings"])


def test_invalid_window_falls_back_with_a_warning(tmp_path):
    img = phantom_like(16, 16)
    d, meta = read_display(save(make_ds(img, WindowCenter=100, WindowWidth=0), tmp_path / "w0.dcm"))
    np.testing.assert_allclose(d, img / 4095.0, atol=1e-6)
    assert any("window width" in w for w in meta["warnings"])


def test_metadata_carries_no_patient_data(tmp_path):
    scan = read_image(save(make_ds(phantom_like(16, 16), modality="OT", body_part="KNEE"), tmp_path / "x.dcm"))
    _, meta = read_display(tmp_path / "x.dcm")
    text = repr(meta) + repr(scan.warnings)
    assert PHI_NAME not in text and PHI_ID not in text


# --------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------


def test_png_16_and_8_bit(tmp_path):
    v16 = phantom_like(30, 20, 16)
    v16[0, 0], v16[0, 1] = 0, 65535
    Image.fromarray(v16).save(tmp_path / "a.png")
    d, meta = read_display(tmp_path / "a.png")
    assert meta["source"] == "png" and meta["bits"] == 16 and d.dtype == np.float32
    np.testing.assert_allclose(d, v16 / 65535.0, atol=1e-7)
    assert d[0, 0] == 0.0 and d[0, 1] == 1.0
    v8 = (v16 >> 8).astype(np.uint8)
    Image.fromarray(v8).save(tmp_path / "b.png")
    d, meta = read_display(tmp_path / "b.png")
    assert meta["bits"] == 8
    np.testing.assert_allclose(d, v8 / 255.0, atol=1e-7)


def test_dicom_and_its_png_twin_give_the_same_model_input(tmp_path):
    stored = phantom_like(300, 260, 12)
    ds = make_ds(stored, photometric="MONOCHROME1", WindowCenter=2100, WindowWidth=2600)
    dicom = read_image(save(ds, tmp_path / "a.dcm"))
    png = np.round(dicom.display.astype(np.float64) * 65535).astype(np.uint16)
    Image.fromarray(png).save(tmp_path / "a.png")
    twin = read_image(tmp_path / "a.png")
    assert twin.source == "png" and twin.sop_instance_uid is None
    assert np.abs(dicom.model_input - twin.model_input).max() < 1e-3


# --------------------------------------------------------------------------
# Geometry and normalization
# --------------------------------------------------------------------------


def test_letterbox_keeps_aspect_and_position():
    img = np.zeros((100, 200), np.float32)
    img[20:40, 50:150] = 1.0  # a 20 x 100 bright bar
    out = letterbox_resize(img, 50)
    assert out.shape == (50, 50) and out.dtype == np.float32
    # Scale 1/4 after padding 50 rows above: the bar covers rows 17.5..22.5, cols 12.5..37.5.
    np.testing.assert_allclose(out[18:22, 13:37], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[[17, 22], 20], 0.5, atol=1e-6)
    np.testing.assert_allclose(out[20, [12, 37]], 0.5, atol=1e-6)
    assert out[:17].max() == 0.0 and out[23:].max() == 0.0 and out[:, :12].max() == 0.0
    assert abs(out.sum() * 16 - 20 * 100) < 1e-3  # area is conserved
    # Tall images are padded left and right.
    tall = letterbox_resize(img.T.copy(), 50)
    np.testing.assert_allclose(tall, out.T, atol=1e-6)


def test_letterbox_odd_padding_and_identity():
    img = np.ones((3, 4), np.float32)
    out = letterbox_resize(img, 4)  # the odd padding row goes to the bottom
    np.testing.assert_array_equal(out, np.array([[1] * 4, [1] * 4, [1] * 4, [0] * 4], np.float32))
    out = letterbox_resize(np.ones((2, 5), np.float32), 5)  # 3 rows of padding: 1 above, 2 below
    np.testing.assert_array_equal(out[:, 0], [0, 1, 1, 0, 0])
    sq = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    np.testing.assert_array_equal(letterbox_resize(sq, 8), sq)


def test_masks_follow_the_image_geometry():
    img = np.zeros((100, 200), np.float32)
    masks = np.zeros((2, 100, 200), bool)
    masks[0, 20:40, 50:150] = True
    masks[1, 60:90, 10:30] = True
    img[masks[0]] = 1.0
    out = letterbox_resize(masks, 50)
    assert out.shape == (2, 50, 50) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0  # coverage: pixels wholly outside and wholly inside
    np.testing.assert_allclose(out[0], letterbox_resize(img, 50), atol=1e-6)
    np.testing.assert_allclose(out, letterbox_resize(masks.astype(np.uint8), 50), atol=0)
    np.testing.assert_allclose(out[1], letterbox_resize(masks[1], 50), atol=0)


def test_normalize_imagenet():
    d = np.full((5, 5), 0.5, np.float32)
    out = normalize_imagenet(d)
    assert out.shape == (3, 5, 5) and out.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(out[c], (0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rtol=1e-6)


def test_read_image_returns_model_input(tmp_path):
    stored = phantom_like(180, 150, 12)
    path = save(make_ds(stored, WindowCenter=2000, WindowWidth=3000), tmp_path / "x.dcm")
    scan = read_image(path, size=64)
    assert isinstance(scan, ScanImage)
    assert scan.model_input.shape == (3, 64, 64) and scan.model_input.dtype == np.float32
    assert scan.display.shape == (180, 150) and scan.display.dtype == np.float32
    assert scan.source == "dicom" and scan.path == str(path) and scan.warnings == []
    assert scan.sop_instance_uid == pydicom.dcmread(path).SOPInstanceUID
    expected = normalize_imagenet(letterbox_resize(scan.display, 64))
    np.testing.assert_array_equal(scan.model_input, expected)
    assert read_image(path).model_input.shape == (3, 224, 224)


# --------------------------------------------------------------------------
# No torch
# --------------------------------------------------------------------------

NO_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ImportError("torch is blocked in this test")

    sys.meta_path.insert(0, NoTorch())
    from radixpert.imageio import read_image
    scan = read_image(sys.argv[1])
    assert scan.model_input.shape == (3, 224, 224)
    assert not any(m.split(".")[0] == "torch" for m in sys.modules)
    print("ok", scan.model_input.dtype)
    """
)


def test_imports_and_reads_without_torch(tmp_path):
    path = save(make_ds(phantom_like(64, 64), WindowCenter=2000, WindowWidth=3000), tmp_path / "x.dcm")
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok float32" in done.stdout


# --------------------------------------------------------------------------
# Phantom twins (radixpert.phantom writes DICOM variants and their PNG twin)
# --------------------------------------------------------------------------


def test_phantom_dicoms_match_their_png_twins_and_lungs_are_dark(tmp_path):
    import csv

    from radixpert.phantom import MASK_NAMES, read_masks, write_dataset

    csv_path = write_dataset(tmp_path, n=8, seed=3, size=512, workers=1)
    rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
    assert rows
    lungs = [MASK_NAMES.index("right_lung"), MASK_NAMES.index("left_lung")]
    heart = MASK_NAMES.index("heart")
    seen = set()
    for row in rows:
        dicom = read_image(tmp_path / row["DicomPath"])
        png = read_image(tmp_path / "images" / row["ImageDir"] / row["ImageID"])
        variant = (row["PhotometricInterpretation"], row["TransferSyntax"])
        seen.add(variant)
        diff = float(np.abs(dicom.model_input - png.model_input).max())
        assert diff < 1e-3, f"{row['ImageID']} {variant}: max diff {diff}"

        masks = letterbox_resize(read_masks(tmp_path / row["MaskPath"]), 224) > 0.5
        small = letterbox_resize(dicom.display, 224)
        lung = small[masks[lungs].any(axis=0)].mean()
        heart_mean = small[masks[heart]].mean()
        assert lung < heart_mean, f"{row['ImageID']} {variant}: lung {lung:.3f} !< heart {heart_mean:.3f}"
    assert len(seen) == 6, seen  # MONOCHROME1/2 x uncompressed/RLE/J2K
