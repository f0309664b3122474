"""DICOM inputs for the node's tests: PHI-carrying copies of real files, and the bad inputs of acceptance 5."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

# Every PHI field written into the test inputs; the logs of a full run must contain none of them.
PHI = {
    "PatientName": "Zorrilla^Quintanilla^Eustaquia",
    "PatientID": "HC-7731942",
    "PatientBirthDate": "19410317",
    "AccessionNumber": "ACC55821907",
    "OtherPatientIDs": "NHC-55012299",
    "ReferringPhysicianName": "Villaverde^Anselmo",
    "InstitutionName": "Hospital Ficticio San Telmo",
    "PatientAddress": "Calle Inventada 42, Zamora",
}


def phi_values() -> list[str]:
    """Every PHI value and its parts as they could appear in a log (names split, dates reformatted)."""
    values = set(PHI.values())
    for name in ("PatientName", "ReferringPhysicianName"):
        values.update(part for part in PHI[name].split("^") if len(part) >= 4)
    d = PHI["PatientBirthDate"]
    values.update({f"{d[:4]}-{d[4:6]}-{d[6:]}", f"{d[6:]}/{d[4:6]}/{d[:4]}"})
    return sorted(values)


def with_phi(source: Path, dest: Path, new_uid: bool = False) -> Path:
    """A copy of ``source`` carrying :data:`PHI` (and a fresh SOP Instance UID when asked)."""
    ds = pydicom.dcmread(source)
    for key, value in PHI.items():
        setattr(ds, key, value)
    if new_uid:
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _base(sop_class: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    for key, value in PHI.items():
        setattr(ds, key, value)
    return ds


def _image(ds: Dataset, rows: int, cols: int, pixels: bytes) -> Dataset:
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels
    return ds


def bad_inputs(folder: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (file, extra storescu options) for each bad input the node must turn into a failed job."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out: dict[str, tuple[Path, list[str]]] = {}

    text = _base("1.2.840.10008.5.1.4.1.1.88.11", "SR")  # Basic Text SR: not an image
    text.ValueType, text.CompletionFlag, text.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    out["non-image SOP class"] = (_save(text, folder / "text-sr.dcm"), [])

    ct = _image(_base("1.2.840.10008.5.1.4.1.1.2", "CT"), 128, 128,
                rng.integers(0, 4095, (128, 128), dtype=np.uint16).tobytes())
    out["CT image"] = (_save(ct, folder / "ct.dcm"), [])

    corrupt = _image(_base("1.2.840.10008.5.1.4.1.1.1.1", "DX"), 512, 512, b"")
    corrupt.file_meta.TransferSyntaxUID = JPEG2000Lossless
    corrupt.PixelData = encapsulate([b"\xff\x4f\xff\x51" + rng.integers(0, 255, 4000, dtype=np.uint8).tobytes()])
    corrupt["PixelData"].VR = "OB"
    out["corrupt pixel data"] = (_save(corrupt, folder / "corrupt-j2k.dcm"), ["-xv"])

    truncated = _image(_base("1.2.840.10008.5.1.4.1.1.1.1", "DX"), 1024, 1024,
                       rng.integers(0, 4095, (512, 1024), dtype=np.uint16).tobytes())  # half the rows declared
    out["truncated pixel data"] = (_save(truncated, folder / "truncated.dcm"), [])

    huge = _image(_base("1.2.840.10008.5.1.4.1.1.1.1", "DX"), 65535, 65535, bytes(64))
    out["65535x65535 header"] = (_save(huge, folder / "huge.dcm"), [])
    return out


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path
