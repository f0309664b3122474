"""DICOM datasets built in memory for the image reader tests, and pydicom's own display as the reference."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian

PHI_NAME, PHI_ID = "Doe^Jane", "PID-998877"

# --------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------


def make_ds(
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    modality: str | None = "DX",
    body_part: str | None = "CHEST",
    **attrs: object,
) -> Dataset:
    """A single-frame DICOM image with patient data that must never leak."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.PatientName = PHI_NAME
    ds.PatientID = PHI_ID
    if modality is not None:
        ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.set_pixel_data(stored, photometric, bits_stored)  # also sets SOPInstanceUID
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def phantom_like(h: int = 96, w: int = 128, bits: int = 12, seed: int = 0) -> np.ndarray:
    """Smooth structure plus noise over most of the stored range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    top = 2**bits - 1
    img = 0.5 + 0.35 * np.sin(xx / 9.0) * np.cos(yy / 7.0) + rng.normal(0, 0.05, (h, w))
    return np.clip(np.round(img * top), 0, top).astype(np.uint16)


def lut_item(depth: int, entries: np.ndarray, first: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(entries), first, depth]
    item.LUTData = [int(v) for v in entries]
    item["LUTDescriptor"].VR = "US"
    item["LUTData"].VR = "US"
    return item


# --------------------------------------------------------------------------
# Reference: pydicom's LUT functions, scaled to [0, 1] by their output range
# --------------------------------------------------------------------------


def reference_display(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns when a VOI LUT gets float input
        m = apply_modality_lut(stored, ds)
        out = apply_voi_lut(m, ds).astype(np.float64)
    # Output range of the modality LUT / rescale (pydicom's apply_windowing docs).
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, 2.0 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    elif ds.PixelRepresentation == 0:
        y_min, y_max = 0.0, 2.0**ds.BitsStored - 1
    else:
        y_min, y_max = -(2.0 ** (ds.BitsStored - 1)), 2.0 ** (ds.BitsStored - 1) - 1
    if "RescaleSlope" in ds and "RescaleIntercept" in ds and not ds.get("ModalityLUTSequence"):
        y_min, y_max = (y_min * ds.RescaleSlope + ds.RescaleIntercept, y_max * ds.RescaleSlope + ds.RescaleIntercept)

    if ds.get("VOILUTSequence"):
        y = out / (2.0 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1)
    elif "WindowCenter" in ds:
        y = (out - y_min) / (y_max - y_min)  # windowing output spans [y_min, y_max]
    else:
        lo, hi = min(y_min, y_max), max(y_min, y_max)
        y = (np.asarray(m, np.float64) - lo) / (hi - lo)
    y = np.clip(y, 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        y = 1.0 - y
    return y
