"""Read a chest radiograph (DICOM or PNG) into the model's input.

Everything here uses numpy, pydicom and Pillow only: this module must never
import torch, because it runs on the offline GPU workstation that has none.

Pipeline, in this order
-----------------------
DICOM:

1. Decode the stored values (``ds.pixel_array``): native and RLE by pydicom,
   JPEG 2000 through the pylibjpeg + openjpeg plugin.
2. Modality LUT: *Rescale Slope* / *Rescale Intercept* when both are present
   (as pydicom does), or the *Modality LUT Sequence*.
3. VOI: the *VOI LUT Sequence* when present (pydicom's default preference),
   else the first *Window Center* / *Window Width* pair with the *VOI LUT
   Function* (LINEAR, the default, LINEAR_EXACT or SIGMOID; PS3.3 C.11.2.1),
   else none. A VOI LUT is scaled by its own output range ``0..2**bits - 1``;
   with no VOI the values are scaled over the range they *could* take
   (from *Bits Stored*, *Pixel Representation* and the rescale), never by
   the image's own min/max, so the same stored value always gives the same
   brightness.
4. MONOCHROME1 inversion ``1 - y``, after the VOI, so that bright = dense.

   The result is the float32 *display* image in [0, 1].

   Steps 2-4 are a pure function of the stored value, so they are evaluated
   once, in float64, for every value between the image's min and max, and
   the image is then gathered from that float32 table. This is exact to
   float32 rounding against pydicom's ``apply_modality_lut`` +
   ``apply_voi_lut`` (the tests prove it) and several times faster.

   Images marked "FOR PRESENTATION" get the VOI their header stores, like any
   other: that flag says processing is done, not that the window is applied.
   "FOR PROCESSING" (raw detector) images are read the same way with a
   warning. *Presentation LUT Shape* is not applied: for radiographs it only
   restates the photometric interpretation (INVERSE goes with MONOCHROME1),
   so a disagreement between the two is reported as a warning and the
   photometric interpretation wins.

PNG (PadChest style): ``display = value / 65535`` for 16-bit and
``value / 255`` for 8-bit grayscale. An RGB(A) or palette PNG is refused as
colour unless all its colour channels are equal, then one is taken.

Model input (both sources):

5. Letterbox to a square: the shorter side is padded symmetrically with 0
   (black, the background of a radiograph; an odd extra pixel goes to the
   bottom/right). The aspect ratio is kept because anatomy (heart width
   against chest width) is what the report is about; stretching would fake
   cardiomegaly or hide it.
6. Resize to ``size`` x ``size`` (default 224) with Pillow's BOX filter on a
   float32 ("F") image: when shrinking this is an exact area average, so
   there is no aliasing and mask coverage stays a true fraction. (An image
   smaller than ``size`` is enlarged by the same filter, which then acts
   almost like nearest neighbour.)
7. ImageNet normalization, the gray image replicated to 3 channels:
   float32 ``(3, size, size)``.

Steps 5-6 are :func:`letterbox_resize`, which masks go through too.

Policies (refusals raise :class:`~radixpert.errors.InputError`, one line)
-------------------------------------------------------------------------
* Multi-frame (*Number of Frames* > 1): refused. A chest radiograph is one
  frame; silently taking the first frame of a tomosynthesis or dual-energy
  series would report on the wrong image.
* Modality: CR, DX, DR and RG are read. Cross-sectional and other
  non-radiograph modalities (CT, MR, PT, NM, US, MG, XA, RF, RT*, SR, ...;
  see ``REFUSED_MODALITIES``) are refused. A missing, OT or unfamiliar
  modality is read with a warning, as is a *Body Part Examined* that is
  present and not chest-like (a missing one is common and not warned about).
* Colour (*Samples per Pixel* != 1, or a photometric interpretation other
  than MONOCHROME1/2), no pixel data, truncated or undecodable pixel data,
  a file that is neither DICOM nor PNG, a missing file: refused.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder

from radixpert.errors import InputError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DEFAULT_SIZE",
    "ACCEPTED_MODALITIES",
    "REFUSED_MODALITIES",
    "ScanImage",
    "read_display",
    "read_image",
    "dicom_display",
    "letterbox_resize",
    "normalize_imagenet",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224
# A chest radiograph is a few thousand pixels a side; beyond this, decoding alone would take
# gigabytes, so such files are refused from their header. (Too-small images are a policy of
# the report runtime, not of the reader.)
MAX_SIDE = 16384

# Projection radiography. DR is not a DICOM code but some vendors write it.
ACCEPTED_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})

# Known modalities that cannot be a chest radiograph, with the reason shown.
REFUSED_MODALITIES: dict[str, str] = {
    **dict.fromkeys(("CT", "MR", "PT", "NM", "US", "OCT", "IVUS", "IVOCT"), "a cross-sectional image"),
    **dict.fromkeys(("MG", "IO", "PX", "DG", "BMD", "BDUS"), "a radiograph of another body part"),
    **dict.fromkeys(("XA", "RF"), "an angiography/fluoroscopy image"),
    **dict.fromkeys(("RTIMAGE", "RTDOSE", "RTSTRUCT", "RTPLAN", "RTRECORD"), "a radiotherapy object"),
    **dict.fromkeys(("XC", "ES", "SM", "GM", "OP", "OPT"), "a photograph or microscopy image"),
    **dict.fromkeys(
        ("SR", "KO", "PR", "SEG", "REG", "DOC", "ECG", "EEG", "EMG", "HD", "AU", "PLAN", "RWV"),
        "not an image",
    ),
}

_CHEST_WORDS = ("CHEST", "THORA", "TORAX", "TÓRAX", "TORACE", "LUNG", "PECHO", "PULMO")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Stored values spanning more than this are mapped directly instead of through
# a table (only 32-bit or float data gets there; radiographs are <= 16 bits).
_MAX_TABLE = 1 << 17


@dataclass
class ScanImage:
    """One radiograph read for the model."""

    path: str
    display: np.ndarray  # float32 (H, W) in [0, 1], bright = dense
    model_input: np.ndarray  # float32 (3, size, size), ImageNet-normalized
    sop_instance_uid: str | None
    source: str  # "dicom" | "png"
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def read_image(path: str | os.PathLike[str], size: int = DEFAULT_SIZE) -> ScanImage:
    """Read a DICOM or PNG radiograph into the display image and model input."""
    display, meta = read_display(path)
    model_input = normalize_imagenet(letterbox_resize(display, size))
    return ScanImage(
        path=str(path),
        display=display,
        model_input=model_input,
        sop_instance_uid=meta.get("sop_instance_uid"),
        source=meta["source"],
        warnings=list(meta["warnings"]),
    )


def read_display(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Return the float32 display image in [0, 1] (bright = dense) and metadata.

    The metadata holds no patient data: source, modality, body part, view
    position, photometric interpretation, transfer syntax, SOP Instance UID,
    shape, how the VOI was done, and a list of warnings.
    """
    p = Path(path)
    name = p.name
    if not p.exists():
        raise InputError(f"{name}: file not found; check the path")
    if not p.is_file():
        raise InputError(f"{name}: not a file; give a DICOM or PNG file")
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        raise InputError(f"{name}: cannot be read ({exc.strerror}); check its permissions") from None

    if head.startswith(_PNG_MAGIC):
        return _read_png(p)
    if head[128:132] == b"DICM":
        return _read_dicom(p, force=False)
    # DICOM without the 128-byte preamble starts with a group 0002 or 0008 tag
    # (little or big endian).
    if head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08") and len(head) >= 8:
        return _read_dicom(p, force=True)
    raise InputError(f"{name}: {_describe_unknown(p)}; give a DICOM file or a grayscale PNG")


def letterbox_resize(arr: np.ndarray, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Pad to a centred square with 0, then area-resize to ``size`` x ``size``.

    ``arr`` is ``(H, W)`` or ``(K, H, W)``. Float input is resized as values.
    Bool or integer input is taken as masks (nonzero = inside) and comes back
    as float coverage in [0, 1], on exactly the geometry the image gets.
    Returns float32 ``(size, size)`` or ``(K, size, size)``.
    """
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    a = np.asarray(arr)
    if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
        a = (a != 0).astype(np.float32)
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32, copy=False)
    else:
        raise ValueError(f"cannot resize an array of dtype {a.dtype}")
    if a.ndim == 2:
        return _letterbox_one(a, int(size))
    if a.ndim == 3:
        out = np.empty((a.shape[0], size, size), np.float32)
        for k in range(a.shape[0]):
            out[k] = _letterbox_one(a[k], int(size))
        return out
    raise ValueError(f"expected an (H, W) or (K, H, W) array, got shape {a.shape}")


def normalize_imagenet(display: np.ndarray) -> np.ndarray:
    """ImageNet-normalize a ``(S, S)`` display image into float32 ``(3, S, S)``."""
    d = np.asarray(display, dtype=np.float32)
    if d.ndim != 2:
        raise ValueError(f"expected a 2-D display image, got shape {d.shape}")
    out = np.empty((3, *d.shape), np.float32)
    for c in range(3):
        np.subtract(d, np.float32(IMAGENET_MEAN[c]), out=out[c])
        out[c] /= np.float32(IMAGENET_STD[c])
    return out


def dicom_display(ds: Dataset, stored: np.ndarray, warnings: list[str] | None = None) -> np.ndarray:
    """Map decoded stored values to the display image: modality LUT -> VOI -> MONOCHROME1.

    Applies no modality/frame/colour policy (that is :func:`read_display`'s
    job), so it works on any single-frame monochrome dataset. Returns float32
    in [0, 1], bright = dense. Header problems that still allow a sensible
    image are appended to ``warnings``.
    """
    warns = warnings if warnings is not None else []
    display = _display_values(ds, stored, warns)
    if _voi_kind(ds) == "none" and display.size:
        spread = float(display.max() - display.min())
        if spread < 0.25:
            warns.append(
                f"no VOI window in the header and the pixels span only {spread:.0%} of the stored range; "
                "the image will look flat"
            )
    return display


def _display_values(ds: Dataset, stored: np.ndarray, warns: list[str]) -> np.ndarray:
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
            if start == 0 and unsigned:
                return table[stored]
            return table[np.subtract(stored, start, dtype=np.int64)]
    return _grayscale(stored, ds, invert, warns).astype(np.float32)


# --------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------


def _read_dicom(p: Path, force: bool) -> tuple[np.ndarray, dict[str, Any]]:
    name = p.name
    try:
        ds = pydicom.dcmread(p, force=force)
    except Exception as exc:  # pydicom raises many types on corrupt files
        raise InputError(f"{name}: not a readable DICOM file ({_short(exc)}); check the file") from None
    if force and "PixelData" not in ds and "SOPClassUID" not in ds:
        raise InputError(f"{name}: not a DICOM or PNG file; give a DICOM file or a grayscale PNG")

    warns: list[str] = []
    meta = _check_dicom(ds, name, warns)
    stored = _decode(ds, name)
    try:
        display = dicom_display(ds, stored, warns)
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None
    meta["warnings"] = warns
    return display, meta


def _check_dicom(ds: Dataset, name: str, warns: list[str]) -> dict[str, Any]:
    """Apply the modality, pixel-data, frame and colour policies; return metadata."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in REFUSED_MODALITIES:
        raise InputError(
            f"{name}: modality {modality} ({REFUSED_MODALITIES[modality]}) is not a chest radiograph; "
            "give a CR or DX image"
        )
    if not modality:
        warns.append("modality is missing; read as a projection radiograph")
    elif modality not in ACCEPTED_MODALITIES:
        warns.append(f"modality {modality} is not CR/DX; read as a projection radiograph")

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InputError(f"{name}: DICOM file has no pixel data (not an image, or truncated); give an image file")

    frames = _header_int(ds, "NumberOfFrames", name, default=1)
    if frames > 1:
        raise InputError(
            f"{name}: multi-frame image ({frames} frames) is not a single radiograph; "
            "export the frame you want as its own file"
        )
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = _header_int(ds, "SamplesPerPixel", name, default=1)
    if samples == 1 and not photometric:
        raise InputError(
            f"{name}: photometric interpretation is missing, so the image cannot be displayed; check the file"
        )
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(
            f"{name}: colour image ({photometric or 'no photometric interpretation'}, {samples} samples per "
            "pixel); give a grayscale radiograph"
        )

    _check_size(_header_int(ds, "Rows", name, default=0), _header_int(ds, "Columns", name, default=0), name)
    try:
        rescale = _rescale(ds)
    except (TypeError, ValueError):
        raise InputError(f"{name}: rescale slope/intercept is not a number; check the file header") from None
    if rescale is not None and rescale[0] == 0:
        raise InputError(f"{name}: rescale slope is 0, so the image holds no contrast; check the file header")

    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body_part and not any(w in body_part for w in _CHEST_WORDS):
        warns.append(f"body part examined is {body_part}, not chest")
    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    if intent == "FOR PROCESSING":
        warns.append("image is FOR PROCESSING (raw detector data); expect a flatter look than clinical images")
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if (shape == "INVERSE") != (photometric == "MONOCHROME1") and shape in ("INVERSE", "IDENTITY"):
        warns.append(f"presentation LUT shape {shape} disagrees with {photometric}; {photometric} was followed")

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return {
        "source": "dicom",
        "modality": modality or None,
        "body_part": body_part or None,
        "view_position": str(ds.get("ViewPosition", "") or "").strip().upper() or None,
        "photometric": photometric,
        "transfer_syntax": str(ts) if ts else None,
        "transfer_syntax_name": ts.name if ts else None,
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "") or "") or None,
        "presentation_intent": intent or None,
        "rows": _header_int(ds, "Rows", name, default=0),
        "columns": _header_int(ds, "Columns", name, default=0),
        "bits_stored": _header_int(ds, "BitsStored", name, default=0),
        "voi": _voi_kind(ds),
    }


def _decode(ds: Dataset, name: str) -> np.ndarray:
    """Decode the single frame, turning every decoder failure into an InputError."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and ts.is_compressed:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise InputError(
                f"{name}: transfer syntax {ts.name} is not supported; convert the file to an uncompressed "
                "or JPEG 2000 transfer syntax"
            ) from None
        if not decoder.is_available:
            raise InputError(
                f"{name}: no decoder installed for {ts.name}; convert the file to an uncompressed or "
                "JPEG 2000 transfer syntax (or install a plugin for it, e.g. pylibjpeg-libjpeg, GPLv3)"
            )
    try:
        arr = ds.pixel_array
    except Exception as exc:  # truncated data, bad codestreams, missing attributes
        raise InputError(f"{name}: pixel data cannot be decoded ({_short(exc)}); check the file") from None
    if arr.ndim != 2:
        raise InputError(f"{name}: decoded pixel data has shape {arr.shape}, expected one 2-D frame")
    if arr.size == 0:
        raise InputError(f"{name}: image is empty (0 rows or columns)")
    return arr


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
            raise InputError(f"modality LUT sequence cannot be applied ({_short(exc)}); check the file header") from None
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
            raise InputError(f"VOI LUT sequence cannot be applied ({_short(exc)}); check the file header") from None
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


def _header_int(ds: Dataset, keyword: str, name: str, default: int) -> int:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    try:
        return int(_first(value))
    except (TypeError, ValueError, IndexError):
        raise InputError(f"{name}: header attribute {keyword} is not a number; check the file") from None


# --------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------


def _check_size(rows: int, columns: int, name: str) -> None:
    if max(rows, columns) > MAX_SIDE:
        raise InputError(f"{name}: image is {columns}x{rows} pixels, larger than {MAX_SIDE} a side; "
                         "downsample it before reporting")


def _read_png(p: Path) -> tuple[np.ndarray, dict[str, Any]]:
    name = p.name
    try:
        with Image.open(p) as im:
            _check_size(im.height, im.width, name)
            im.load()
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                mode = im.mode
            elif mode == "1":
                im = im.convert("L")
                mode = "L"
            arr = np.array(im)
    except InputError:
        raise
    except Exception as exc:  # truncated or corrupt PNGs raise OSError/SyntaxError/ValueError
        raise InputError(f"{name}: PNG cannot be read ({_short(exc)}); check the file") from None

    warns: list[str] = []
    if mode in ("RGB", "RGBA", "LA"):
        if mode == "LA":
            gray = arr[..., 0]
        else:
            rgb = arr[..., :3]
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise InputError(f"{name}: colour PNG (channels differ); give a grayscale radiograph")
            gray = rgb[..., 0]
        if mode in ("RGBA", "LA") and not np.all(arr[..., -1] == 255):
            warns.append("PNG transparency was ignored")
        arr, mode = gray, "L"

    if mode == "L":
        bits, scale = 8, 255.0
    elif mode.startswith("I;16") or mode == "I":
        # Pillow opens 16-bit grayscale PNGs as I;16 (or I in older versions).
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise InputError(f"{name}: PNG values fall outside 0..65535; give an 8- or 16-bit grayscale PNG")
        bits, scale = 16, 65535.0
    else:
        raise InputError(f"{name}: PNG mode {mode} is not supported; give an 8- or 16-bit grayscale PNG")
    if arr.ndim != 2 or arr.size == 0:
        raise InputError(f"{name}: PNG has no usable image (shape {arr.shape})")

    display = arr.astype(np.float32)
    display *= np.float32(1.0 / scale)
    np.clip(display, 0.0, 1.0, out=display)  # 1/65535 in float32 can overshoot 1 by an ulp
    meta = {
        "source": "png",
        "modality": None,
        "photometric": None,
        "transfer_syntax": None,
        "sop_instance_uid": None,
        "bits": bits,
        "rows": int(arr.shape[0]),
        "columns": int(arr.shape[1]),
        "warnings": warns,
    }
    return display, meta


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _letterbox_one(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape
    if h == 0 or w == 0:
        raise ValueError("cannot resize an empty image")
    side = max(h, w)
    if h != w:
        canvas = np.zeros((side, side), np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top : top + h, left : left + w] = img
        img = canvas
    if side == size:
        return np.array(img, dtype=np.float32)
    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32))  # mode "F"
    return np.asarray(pil.resize((size, size), Image.Resampling.BOX), dtype=np.float32).copy()


def _describe_unknown(p: Path) -> str:
    """Name a non-DICOM, non-PNG file's type when Pillow knows it."""
    try:
        with Image.open(p) as im:
            fmt = im.format
    except (UnidentifiedImageError, OSError, ValueError):
        return "not a DICOM or PNG file"
    return f"{fmt} images are not supported (DICOM and PNG only)"


def _short(exc: BaseException) -> str:
    """One line from an exception, for a message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
