"""DICOM policies and decoding: which files are read, refused or read with a warning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder

from radixpert.errors import InputError
from radixpert.imageio.common import check_size, short_message
from radixpert.imageio.display import _first, _rescale, _voi_kind, dicom_display, pixel_padding

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

# Decoding plugins in order of preference (see _decode).
_PLUGIN_ORDER = ("pylibjpeg", "pydicom", "pyjpegls", "pillow", "gdcm")

_CHEST_WORDS = ("CHEST", "THORA", "TORAX", "TÓRAX", "TORACE", "LUNG", "PECHO", "PULMO")


def read_dicom(p: Path, force: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a DICOM file into the float32 display image and its metadata, applying the policies."""
    name = p.name
    try:
        ds = pydicom.dcmread(p, force=force)
    except Exception as exc:  # pydicom raises many types on corrupt files
        raise InputError(f"{name}: not a readable DICOM file ({short_message(exc)}); check the file") from None
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

    check_size(_header_int(ds, "Rows", name, default=0), _header_int(ds, "Columns", name, default=0), name)
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

    padding = pixel_padding(ds)  # its warnings come with the display image
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
        "pixel_padding": None if padding is None else list(padding),  # stored values, inclusive
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
        # One plugin, never a fall-through to GDCM after another failed: GDCM aborts the whole process
        # (an uncaught C++ exception) on corrupt codestreams, so it is used only where it is the only one.
        plugin = next(p for p in (*_PLUGIN_ORDER, *decoder.available_plugins) if p in decoder.available_plugins)
        ds.pixel_array_options(decoding_plugin=plugin)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # truncated data, bad codestreams, missing attributes
        raise InputError(f"{name}: pixel data cannot be decoded ({short_message(exc)}); check the file") from None
    if arr.ndim != 2:
        raise InputError(f"{name}: decoded pixel data has shape {arr.shape}, expected one 2-D frame")
    if arr.size == 0:
        raise InputError(f"{name}: image is empty (0 rows or columns)")
    return arr


def _header_int(ds: Dataset, keyword: str, name: str, default: int) -> int:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    try:
        return int(_first(value))
    except (TypeError, ValueError, IndexError):
        raise InputError(f"{name}: header attribute {keyword} is not a number; check the file") from None

