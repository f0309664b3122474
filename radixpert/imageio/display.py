"""Stored DICOM values -> display image: modality LUT -> VOI -> MONOCHROME1 inversion -> padding.

Steps 2-4 of the pipeline (see :mod:`radixpert.imageio`) are a pure function of the stored
value, so they are evaluated once, in float64, for every value between the image's min and
max, and the image is gathered from that float32 table. Pixel padding is a property of the
stored value too, so it is applied to the same table.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi

from radixpert.errors import InputError
from radixpert.imageio.common import short_message

# Stored values spanning more than this are mapped directly instead of through
# a table (only 32-bit or float data gets there; radiographs are <= 16 bits).
_MAX_TABLE = 1 << 17
# Display value of padding: black, the darkest level of the (bright = dense) display image,
# whatever the photometric interpretation. It is also what the letterbox pads with.
PADDING_DISPLAY = 0.0


def dicom_display(ds: Dataset, stored: np.ndarray, warnings: list[str] | None = None) -> np.ndarray:
    """Map decoded stored values to the display image: modality LUT -> VOI -> MONOCHROME1 -> padding.

    Applies no modality/frame/colour policy (that is :func:`read_display`'s
    job), so it works on any single-frame monochrome dataset. Returns float32
    in [0, 1], bright = dense; pixel padding is black. Header problems that
    still allow a sensible image are appended to ``warnings``.
    """
    warns = warnings if warnings is not None else []
    padding = pixel_padding(ds, warns) if np.issubdtype(stored.dtype, np.integer) else None
    display = _display_values(ds, stored, warns, padding)
    # The only statistic taken from the pixels; padding is not part of the image.
    shown = display if padding is None else display[~padding_mask(stored, padding)]
    if padding is not None and display.size and not shown.size:
        warns.append("every pixel is pixel padding; the image is blank")
    if _voi_kind(ds) == "none" and shown.size:
        spread = float(shown.max() - shown.min())
        if spread < 0.25:
            warns.append(
                f"no VOI window in the header and the pixels span only {spread:.0%} of the stored range; "
                "the image will look flat"
            )
    return display


def pixel_padding(ds: Dataset, warnings: list[str] | None = None) -> tuple[int, int] | None:
    """The inclusive range of stored values that are padding, or None.

    *Pixel Padding Value* (0028,0120) alone marks one stored value; with *Pixel
    Padding Range Limit* (0028,0121) every value between the two, inclusive, in
    either order. Both are in stored-pixel units, before the modality LUT. A value
    written with the other signedness than *Pixel Representation* (US for signed
    data, SS for unsigned) is reinterpreted in *Bits Allocated* bits.
    """
    warns = warnings if warnings is not None else []
    try:
        value = _padding_value(ds, "PixelPaddingValue")
        limit = _padding_value(ds, "PixelPaddingRangeLimit")
    except (TypeError, ValueError, IndexError):
        warns.append("pixel padding value is unreadable; padding was treated as image")
        return None
    if value is None:
        if limit is not None:
            warns.append("pixel padding range limit without a pixel padding value was ignored")
        return None
    if limit is None:
        return value, value
    return min(value, limit), max(value, limit)


def padding_mask(stored: np.ndarray, padding: tuple[int, int]) -> np.ndarray:
    """Bool mask of the stored values inside the inclusive padding range."""
    lo, hi = padding
    return (stored >= lo) & (stored <= hi)


def _padding_value(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (bytes, bytearray)):
        raise ValueError("undecoded value")
    v = int(_first(value))
    bits = int(ds.get("BitsAllocated", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if signed and v >= 2 ** (bits - 1):
        v -= 2**bits
    elif not signed and v < 0:
        v += 2**bits
    return v


def _display_values(ds: Dataset, stored: np.ndarray, warns: list[str],
                    padding: tuple[int, int] | None = None) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    invert = photometric == "MONOCHROME1"
    if np.issubdtype(stored.dtype, np.integer):
        lo, hi = int(stored.min()), int(stored.max())
        unsigned = np.issubdtype(stored.dtype, np.unsignedinteger)
        # Unsigned data indexes a table that starts at 0, saving a subtraction pass.
        start = 0 if unsigned and hi < _MAX_TABLE else lo
        if hi - start < _MAX_TABLE:
            values = np.arange(start, hi + 1, dtype=np.int64)
            table = _grayscale(values, ds, invert, warns).astype(np.float32)
            if padding is not None:
                # After the VOI and the inversion: padding is black in either photometric.
                table[padding_mask(values, padding)] = PADDING_DISPLAY
            if start == 0 and unsigned:
                return table[stored]
            return table[np.subtract(stored, start, dtype=np.int64)]
    out = _grayscale(stored, ds, invert, warns).astype(np.float32)
    if padding is not None:
        out[padding_mask(stored, padding)] = PADDING_DISPLAY
    return out


def _grayscale(values: np.ndarray, ds: Dataset, invert: bool, warns: list[str]) -> np.ndarray:
    """Modality LUT -> VOI -> [0, 1] -> optional inversion, in float64."""
    try:
        lo, hi = _modality_range(ds)
    except (AttributeError, IndexError, TypeError, ValueError):
        raise InputError("modality LUT descriptor or bits stored is malformed; check the file header") from None
    if ds.get("ModalityLUTSequence"):
        try:
            m = apply_modality_lut(np.asarray(values).astype(np.int64), ds).astype(np.float64)
        except Exception as exc:  # malformed descriptors or LUT data
            raise InputError(f"modality LUT sequence cannot be applied ({short_message(exc)}); check the file header") from None
    else:
        m = np.asarray(values, dtype=np.float64)
        rescale = _rescale(ds)
        if rescale is not None:
            # Same operation order as pydicom, so the values agree bit for bit.
            m = m * rescale[0]
            m += rescale[1]

    y: np.ndarray | None = None
    if _has_voi_lut(ds):
        try:
            depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            # The LUT indexes integers; floor == pydicom's truncation for inputs >= first_map.
            out = apply_voi(np.floor(m).astype(np.int64), ds, 0)
        except Exception as exc:  # malformed descriptors or LUT data
            raise InputError(f"VOI LUT sequence cannot be applied ({short_message(exc)}); check the file header") from None
        y = out.astype(np.float64) / float(2**depth - 1)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        y = _window(m, ds, warns)
    if y is None:
        if hi <= lo:
            y = np.zeros_like(m)
        else:
            y = (m - lo) / (hi - lo)
    np.clip(y, 0.0, 1.0, out=y)
    if invert:
        y = 1.0 - y
    return y


def _window(m: np.ndarray, ds: Dataset, warns: list[str]) -> np.ndarray | None:
    """PS3.3 C.11.2.1.2/3 window as a fraction in [0, 1]; None when the window is unusable."""
    try:
        center = float(_first(ds["WindowCenter"].value))
        width = float(_first(ds["WindowWidth"].value))
    except (TypeError, ValueError, IndexError):
        warns.append("window center/width is unreadable; normalized over the stored range instead")
        return None
    if not (math.isfinite(center) and math.isfinite(width)):
        warns.append("window center/width is not finite; normalized over the stored range instead")
        return None
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if func not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        warns.append(f"VOI LUT function {func} is unknown; LINEAR was used")
        func = "LINEAR"
    if func == "LINEAR":
        if width < 1:
            warns.append(f"window width {width:g} < 1 is invalid; normalized over the stored range instead")
            return None
        if width == 1:
            # The limit of the formula: a threshold at center - 0.5.
            return (m > center - 0.5).astype(np.float64)
        return (m - (center - 0.5)) / (width - 1) + 0.5
    if width <= 0:
        warns.append(f"window width {width:g} <= 0 is invalid; normalized over the stored range instead")
        return None
    if func == "LINEAR_EXACT":
        return (m - center) / width + 0.5
    return 1.0 / (1.0 + np.exp(-4.0 * (m - center) / width))


def _modality_range(ds: Dataset) -> tuple[float, float]:
    """The range the modality-LUT output can span (as pydicom's windowing defines it)."""
    if ds.get("ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**depth - 1)
    bits = int(ds.get("BitsStored", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 0:
        a, b = 0.0, float(2**bits - 1)
    else:
        a, b = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    rescale = _rescale(ds)
    if rescale is not None:
        a, b = a * rescale[0] + rescale[1], b * rescale[0] + rescale[1]
    return min(a, b), max(a, b)


def _rescale(ds: Dataset) -> tuple[float, float] | None:
    """(slope, intercept) when both are present, as pydicom requires; else None."""
    if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
        return None
    slope, intercept = ds.RescaleSlope, ds.RescaleIntercept
    if slope is None or intercept is None:
        return None
    return float(slope), float(intercept)  # ValueError here is caught by _check_dicom first


def _has_voi_lut(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    if not seq:
        return False
    item = seq[0]
    return item.get("LUTDescriptor") is not None and item.get("LUTData") is not None


def _voi_kind(ds: Dataset) -> str:
    if _has_voi_lut(ds):
        return "voi_lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window " + str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    return "none"


def _first(value: Any) -> Any:
    """The first of a multi-valued attribute (e.g. several windows), else the value."""
    if isinstance(value, (list, tuple, MultiValue)):
        return value[0]
    return value

