"""Write phantom studies to disk: DICOM, its 16-bit display PNG twin, masks and the CSV.

Each study depends only on ``(seed, index, size)``, so the output is identical for any
number of worker processes.
"""

from __future__ import annotations

import csv
import hashlib
import os
import unicodedata
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from radixpert.errors import UsageError
from radixpert.phantom.findings import _TAG_META, _rng
from radixpert.phantom.render import (
    _EVR,
    _FOV_MM,
    _J2K,
    _RLE,
    MASK_NAMES,
    MIN_SIZE,
    PhantomSample,
    _Variant,
    generate_sample,
)

PREVIEW_MAX = 16


def _uid(seed: int, index: int, kind: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["radixpert-phantom", str(seed), str(index), kind])


def _stored_values(sample: PhantomSample, var: _Variant) -> np.ndarray:
    """Stored pixel values whose modality LUT gives the phantom (MONOCHROME1: its inverse)."""
    img = sample.image.astype(np.int32)
    rescaled = var.top - img if var.photometric == "MONOCHROME1" else img
    # slopes are 1 or 1/2, so integer arithmetic is exact (and faster than floats)
    stored = (rescaled - int(var.intercept)) * int(round(1 / var.slope))
    if stored.min() < 0 or stored.max() > 4095:
        raise AssertionError("stored values outside 12 bits")  # a bug in _RESCALES, not bad input
    return stored.astype(np.uint16)


def _window(sample: PhantomSample, var: _Variant, rng: np.random.Generator) -> tuple[float, float]:
    """Window centre/width in rescaled units covering the data, with mild clipping at most."""
    img = sample.image[::4, ::4]
    lo, hi = (float(v) for v in np.percentile(img, [0.2, 99.9]))
    if var.photometric == "MONOCHROME1":
        lo, hi = var.top - hi, var.top - lo
    width = max(16.0, (hi - lo) * float(rng.uniform(0.95, 1.15)))
    centre = (lo + hi) / 2 + (hi - lo) * float(rng.uniform(-0.03, 0.03))
    return float(round(centre)), float(round(width))


def display_lut(slope: float, intercept: float, centre: float, width: float, monochrome1: bool) -> np.ndarray:
    """uint16 display value for every 12-bit stored value: rescale -> linear VOI window -> MONOCHROME1 inversion.

    The window is DICOM PS3.3 C.11.2.1.2.1 'LINEAR' mapped onto [0, 1].
    """
    x = np.arange(4096, dtype=np.float64) * slope + intercept
    y = np.clip((x - (centre - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    if monochrome1:
        y = 1.0 - y
    return np.rint(y * 65535.0).astype(np.uint16)


def _dicom(sample: PhantomSample, seed: int, index: int, stored: np.ndarray, var: _Variant,
           centre: float, width: float, spacing: float):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, JPEG2000Lossless, RLELossless

    meta = sample.meta
    rows, cols = stored.shape
    sop_class = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
    study_uid = _uid(seed, index, "study")
    sop_uid = _uid(seed, index, "sop")
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = UID(_EVR)
    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    date = meta["study_date"].strftime("%Y%m%d")
    time = f"{8 + index % 10:02d}{(index * 7) % 60:02d}{(index * 13) % 60:02d}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time
    ds.AccessionNumber = f"A{seed % 1000:03d}{index:07d}"[:16]
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "Radixpert"
    ds.ManufacturerModelName = "Phantom"
    ds.InstitutionName = "Radixpert Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "RX TORAX PA"
    ds.SeriesDescription = "TORAX PA"
    ds.PatientName = f"PHANTOM^{meta['patient']:04d}"
    ds.PatientID = _patient_id(seed, meta["patient"])
    ds.PatientBirthDate = meta["birth"].strftime("%Y%m%d")
    ds.PatientSex = meta["sex"]
    age = meta["study_date"].year - meta["birth"].year
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]  # rows run toward the patient's left, columns toward the feet
    ds.KVP = 110 + index % 3 * 5
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = _uid(seed, index, "series")
    ds.StudyID = f"{index % 10**8}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = var.photometric
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    ds.ImagerPixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = f"{var.intercept:g}"
    ds.RescaleSlope = f"{var.slope:g}"
    ds.RescaleType = "US"
    ds.WindowCenter = f"{centre:g}"
    ds.WindowWidth = f"{width:g}"
    ds.VOILUTFunction = "LINEAR"
    ds.PresentationLUTShape = "INVERSE" if var.photometric == "MONOCHROME1" else "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PixelData = stored.tobytes()
    if var.transfer_syntax == _RLE:
        ds.compress(RLELossless, stored, generate_instance_uid=False)
    elif var.transfer_syntax == _J2K:
        ds.compress(JPEG2000Lossless, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    return ds


def _patient_id(seed: int, patient: int) -> str:
    return f"PH{seed}-{patient:05d}"


def _study_id(seed: int, index: int) -> str:
    # PadChest StudyIDs are opaque hashes; keep ours opaque but reproducible.
    return hashlib.sha1(f"radixpert-phantom/{seed}/{index}".encode()).hexdigest()[:32]


def _stem(seed: int, index: int) -> str:
    return f"phantom_{seed}_{index:06d}"


def _image_dir(index: int) -> int:
    return index // 250


CSV_COLUMNS = ("ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
               "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Report",
               "MethodLabel", "Labels", "Localizations", "DicomPath", "MaskPath", "PhotometricInterpretation",
               "TransferSyntax", "WindowCenter", "WindowWidth", "Seed", "Index")


def _write_one(task: tuple[str, int, int, int, bool]) -> tuple[int, dict, tuple[np.ndarray, str] | None]:
    """Generate one study and write its DICOM, display PNG and mask PNG; return its CSV row."""
    out_s, seed, index, size, want_thumb = task
    out = Path(out_s)
    sample = generate_sample(seed, index, size)
    var: _Variant = sample.meta["variant"]
    stem = _stem(seed, index)
    centre, width = _window(sample, var, _rng(seed, index, _TAG_META, 1))
    stored = _stored_values(sample, var)
    spacing = _FOV_MM / size
    ds = _dicom(sample, seed, index, stored, var, centre, width, spacing)
    dicom_rel = f"dicom/{stem}.dcm"
    ds.save_as(out / dicom_rel, enforce_file_format=True)

    display = display_lut(var.slope, var.intercept, centre, width, var.photometric == "MONOCHROME1")[stored]
    image_rel = f"images/{_image_dir(index)}/{stem}.png"
    _write_png16(out / image_rel, display)
    mask_rel = f"masks/{stem}.png"
    bits = np.zeros(sample.masks.shape[1:], np.uint8)
    for k in range(len(MASK_NAMES)):
        bits |= sample.masks[k].astype(np.uint8) << k
    Image.fromarray(bits).save(out / mask_rel, compress_level=6)

    meta = sample.meta
    row = {
        "ImageID": f"{stem}.png",
        "ImageDir": _image_dir(index),
        "StudyDate_DICOM": meta["study_date"].strftime("%Y%m%d"),
        "StudyID": _study_id(seed, index),
        "PatientID": _patient_id(seed, meta["patient"]),
        "PatientBirth": meta["birth"].year,
        "PatientSex_DICOM": meta["sex"],
        "ViewPosition_DICOM": "POSTEROANTERIOR",
        "Projection": "PA",
        "MethodProjection": "Manual review of DICOM fields",
        "Report": sample.report,
        "MethodLabel": "Physician",
        "Labels": repr(sample.labels),
        "Localizations": repr(sample.localizations),
        "DicomPath": dicom_rel,
        "MaskPath": mask_rel,
        "PhotometricInterpretation": var.photometric,
        "TransferSyntax": var.transfer_syntax,
        "WindowCenter": f"{centre:g}",
        "WindowWidth": f"{width:g}",
        "Seed": seed,
        "Index": index,
    }
    thumb = None
    if want_thumb:
        small = Image.fromarray((display >> 8).astype(np.uint8)).resize((256, 256), Image.BOX)
        thumb = (np.asarray(small), meta["caption"])
    return index, row, thumb


def _write_png16(path: Path, a: np.ndarray) -> None:
    """Write a 16-bit grayscale PNG (fast zlib level: these are regenerated, not archived)."""
    Image.fromarray(a.astype(np.uint16)).save(path, format="PNG", compress_level=1)


def read_masks(path: str | Path) -> np.ndarray:
    """Decode a mask PNG written by ``write_dataset`` into bool (5, H, W) in MASK_NAMES order."""
    bits = np.asarray(Image.open(path))
    if bits.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel mask PNG")
    return np.stack([(bits >> k) & 1 for k in range(len(MASK_NAMES))]).astype(bool)


def _contact_sheet(thumbs: list[tuple[int, np.ndarray, str]], path: Path) -> None:
    """Grid of thumbnails with the findings written under each (D = patient's right)."""
    cols = min(4, len(thumbs))
    rows = (len(thumbs) + cols - 1) // cols
    cell_w, cell_h, cap_h = 256, 256, 36
    sheet = Image.new("RGB", (cols * cell_w, rows * (cell_h + cap_h)), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=13)
        big = ImageFont.load_default(size=20)
    except TypeError:  # Pillow without FreeType
        font = big = ImageFont.load_default()
    for k, (index, thumb, caption) in enumerate(thumbs):
        x, y = (k % cols) * cell_w, (k // cols) * (cell_h + cap_h)
        sheet.paste(Image.fromarray(thumb).convert("RGB"), (x, y))
        draw.text((x + 8, y + 6), "R", fill=(255, 80, 80), font=big)  # patient's right on the image's left
        words, lines = caption.split(", "), [f"#{index}:"]
        for w in words:
            if len(lines[-1]) + len(w) + 2 > 34:
                lines.append(w)
            else:
                lines[-1] = f"{lines[-1]} {w}" if lines[-1].endswith(":") else f"{lines[-1]}, {w}"
        # Pillow's bundled font lacks accented glyphs: write captions in plain ASCII
        text = unicodedata.normalize("NFKD", "\n".join(lines[:2])).encode("ascii", "ignore").decode()
        draw.multiline_text((x + 4, y + cell_h + 2), text, fill=(235, 235, 235), font=font, spacing=2)
    sheet.save(path)


def write_dataset(out: str | Path, n: int, seed: int, size: int = 1024, preview: bool = False,
                  workers: int | None = None, progress: bool = True) -> Path:
    """Write n phantoms (DICOM, display PNGs, masks, PadChest-style CSV) under ``out``; return the CSV path.

    Output is identical for any worker count: each study depends only on (seed, index, size).
    """
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    if size < MIN_SIZE:
        raise UsageError(f"--size must be at least {MIN_SIZE}, got {size}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} exists and is not a folder")
    workers = max(1, min(workers or os.cpu_count() or 1, n))
    try:
        for sub in ["dicom", "masks"] + [f"images/{d}" for d in range(_image_dir(n - 1) + 1)]:
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out}: {exc.strerror}") from exc

    tasks = [(str(out), seed, i, size, preview and i < PREVIEW_MAX) for i in range(n)]
    rows: dict[int, dict] = {}
    thumbs: list[tuple[int, np.ndarray, str]] = []

    def collect(result: tuple[int, dict, tuple | None]) -> None:
        index, row, thumb = result
        rows[index] = row
        if thumb is not None:
            thumbs.append((index, thumb[0], thumb[1]))

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("phantoms"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), disable=not progress, transient=False)
    with bar:
        job = bar.add_task("phantoms", total=n)
        if workers == 1:
            for t in tasks:
                collect(_write_one(t))
                bar.advance(job)
        else:
            # spawn, not fork: callers (tests, the runtime) may hold threads that fork would copy
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                for fut in as_completed([pool.submit(_write_one, t) for t in tasks]):
                    collect(fut.result())
                    bar.advance(job)

    csv_path = out / "phantoms.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for i in range(n):
            writer.writerow(rows[i])
    if preview:
        _contact_sheet(sorted(thumbs, key=lambda t: t[0]), out / "preview.png")
    return csv_path


def stored_values(sample: PhantomSample) -> np.ndarray:
    """The stored pixel values ``write_dataset`` puts in the DICOM of ``sample`` (uint16, 12 bits)."""
    return _stored_values(sample, sample.meta["variant"])
