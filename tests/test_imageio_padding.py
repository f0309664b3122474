"""Pixel Padding Value (0028,0120) and Pixel Padding Range Limit (0028,0121) in radixpert.imageio.

A padded phantom: anatomy in the middle, a border of padding values chosen so that, windowed
like anatomy, the border would look bright (dense). The reference is pydicom's own modality
LUT + VOI on the non-padding pixels only, with the border (known from how the image was
built, not from its values) black.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_builders import make_ds, phantom_like, reference_display, save
from radixpert.imageio import dicom_display, letterbox_resize, read_display, read_image

BORDER = 6


def _padded(h: int, w: int, anatomy: tuple[int, int], padding: tuple[int, int], seed: int,
            dtype: type = np.uint16) -> tuple[np.ndarray, np.ndarray]:
    """Stored image with anatomy in ``anatomy`` (inclusive) and a border drawn from ``padding``."""
    lo, hi = anatomy
    base = phantom_like(h, w, 16, seed=seed).astype(np.int64)
    stored = lo + base * (hi - lo) // 65535
    border = np.ones((h, w), bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    values = np.random.default_rng(seed).integers(padding[0], padding[1] + 1, int(border.sum()))
    values[:2] = padding  # both ends of an inclusive range
    stored[border] = values
    return stored.astype(dtype), border


WINDOW = dict(WindowCenter=2000, WindowWidth=3000)
# name: (photometric, Pixel Padding Value, Range Limit or None, anatomy range, dataset attributes)
CASES: dict[str, tuple] = {
    "mono2-value": ("MONOCHROME2", 4000, None, (500, 3500), WINDOW),
    "mono1-value": ("MONOCHROME1", 100, None, (500, 3500), WINDOW),
    "mono2-range": ("MONOCHROME2", 3900, 4095, (500, 3500), WINDOW),
    "mono1-range": ("MONOCHROME1", 200, 0, (500, 3500), WINDOW),  # the limit below the value
    "mono2-value-no-voi-rescale": ("MONOCHROME2", 4095, None, (300, 3000),
                                   dict(RescaleSlope=0.5, RescaleIntercept=-100)),
    "mono1-range-sigmoid": ("MONOCHROME1", 0, 300, (600, 3600),
                            dict(WindowCenter=2100, WindowWidth=2000, VOILUTFunction="SIGMOID")),
}


def _case(name: str, seed: int = 3):
    photometric, value, limit, anatomy, attrs = CASES[name]
    padding = (value, value) if limit is None else (min(value, limit), max(value, limit))
    stored, border = _padded(48, 40, anatomy, padding, seed)
    ds = make_ds(stored, photometric=photometric, **attrs)
    ds.PixelPaddingValue = value
    if limit is not None:
        ds.PixelPaddingRangeLimit = limit
    return ds, stored, border, padding


def _expected(ds, stored: np.ndarray, border: np.ndarray) -> np.ndarray:
    """pydicom's display of the non-padding pixels; padding black."""
    expected = np.zeros(stored.shape, np.float64)
    expected[~border] = reference_display(ds, stored[~border])
    return expected


@pytest.mark.parametrize("name", list(CASES))
def test_padding_is_black_and_the_rest_matches_pydicom(name: str, tmp_path: Path) -> None:
    ds, stored, border, padding = _case(name)
    # Without the padding tags the border would be shown as bright anatomy.
    assert reference_display(ds, stored[border]).min() > 0.8
    expected = _expected(ds, stored, border)
    np.testing.assert_allclose(dicom_display(ds, stored), expected, rtol=0, atol=1e-6)
    display, meta = read_display(save(ds, tmp_path / f"{name}.dcm"))
    np.testing.assert_allclose(display, expected, rtol=0, atol=1e-6)
    assert meta["pixel_padding"] == list(padding) and meta["warnings"] == []


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("written_as", ["SS", "US"])
def test_signed_padding_with_rescale(photometric: str, written_as: str, tmp_path: Path) -> None:
    """Signed data; the value may be written as US (two's complement), as some archives do."""
    # Padding at the end that this photometric interpretation would show as bright.
    padding = (-32768, -30000) if photometric == "MONOCHROME1" else (30000, 32767)
    stored, border = _padded(40, 48, (-20000, 20000), padding, seed=5, dtype=np.int16)
    ds = make_ds(stored, photometric=photometric, bits_stored=16, RescaleSlope=1, RescaleIntercept=-1024,
                 WindowCenter=0, WindowWidth=36000)
    value, limit = (padding[1], padding[0]) if photometric == "MONOCHROME1" else padding
    if written_as == "US":
        ds.add_new(0x00280120, "US", value & 0xFFFF)
        ds.add_new(0x00280121, "US", limit & 0xFFFF)
    else:
        ds.PixelPaddingValue, ds.PixelPaddingRangeLimit = value, limit
    assert reference_display(ds, stored[border]).min() > 0.8
    display, meta = read_display(save(ds, tmp_path / "signed.dcm"))
    np.testing.assert_allclose(display, _expected(ds, stored, border), rtol=0, atol=1e-6)
    assert meta["pixel_padding"] == list(padding)


def test_padding_stays_black_in_the_model_input(tmp_path: Path) -> None:
    ds, stored, border, _ = _case("mono1-value")
    scan = read_image(save(ds, tmp_path / "p.dcm"), size=40)
    assert scan.display[border].max() == 0.0
    # 48 x 40 pads 4 columns a side to 48 x 48, then shrinks by 5/6: output columns 0-7 and
    # rows 0-4 lie wholly in the letterbox or the padded border, both black.
    small = letterbox_resize(scan.display, 40)
    assert small[:, :8].max() == 0.0 and small[:5].max() == 0.0 and small[20, 20] > 0.0


def test_padding_is_left_out_of_the_pixel_statistics(tmp_path: Path) -> None:
    """No VOI: a narrow anatomy range looks flat, however far the padding value lies from it."""
    stored, _ = _padded(32, 32, (2000, 2300), (4095, 4095), seed=2)
    ds = make_ds(stored)
    _, meta = read_display(save(ds, tmp_path / "plain.dcm"))
    assert not any("look flat" in w for w in meta["warnings"])  # the border widens the spread
    ds.PixelPaddingValue = 4095
    _, meta = read_display(save(ds, tmp_path / "padded.dcm"))
    assert any("look flat" in w for w in meta["warnings"]), meta["warnings"]


def test_all_padding_and_a_lone_range_limit_warn(tmp_path: Path) -> None:
    stored = np.full((16, 16), 7, np.uint16)
    ds = make_ds(stored, PixelPaddingValue=7)
    display, meta = read_display(save(ds, tmp_path / "blank.dcm"))
    assert display.max() == 0.0 and any("every pixel is pixel padding" in w for w in meta["warnings"])
    stored, _ = _padded(16, 16, (500, 3500), (4000, 4000), seed=1)
    ds = make_ds(stored, PixelPaddingRangeLimit=4000, **WINDOW)
    display, meta = read_display(save(ds, tmp_path / "limit.dcm"))
    np.testing.assert_allclose(display, reference_display(ds, stored), atol=1e-6)  # nothing masked
    assert meta["pixel_padding"] is None and any("range limit" in w for w in meta["warnings"])
