"""PadChest-format data: read the table, draw a stratified subset, split by patient, serve tensors.

PadChest's CSV keeps list columns (``Labels``, ``Localizations``) as Python literals; they are
parsed with ``ast.literal_eval``. Images are 16-bit PNGs under numbered ``ImageDir`` folders, or
DICOMs (a ``DicomPath`` column relative to the CSV, or ``<dicom_dir>/<ImageID stem>.dcm``).
Every image goes through the runtime's own reader (:mod:`radixpert.imageio`).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radixpert.errors import InputError
from radixpert.imageio import read_image

REQUIRED_COLUMNS = ("ImageID", "PatientID", "Labels")
DEFAULT_PROJECTIONS = ("PA", "AP", "AP_horizontal")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Study:
    """One image with its report and labels; no other patient data is kept."""

    image_id: str
    image_path: str
    patient_id: str
    report: str
    labels: tuple[str, ...]
    localizations: tuple[str, ...] = ()
    mask_path: str | None = None  # anatomy masks, where the CSV has a MaskPath column (phantoms)


def _literal_list(text: str, column: str, row: int) -> tuple[str, ...]:
    if not text or text.strip().lower() in ("nan", "none"):
        return ()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise InputError(f"row {row}: column {column} is not a Python list literal; check the CSV") from None
    if not isinstance(value, (list, tuple)):
        raise InputError(f"row {row}: column {column} is not a list; check the CSV")
    return tuple(sorted({str(v).strip() for v in value if str(v).strip() and str(v).strip().lower() != "nan"}))


def read_table(
    csv_path: str | Path,
    images: str | Path | None = None,
    report_column: str = "Report",
    projections: tuple[str, ...] | None = DEFAULT_PROJECTIONS,
    dicom_dir: str | Path | None = None,
) -> list[Study]:
    """Studies from a PadChest-format CSV, filtered by projection, without empty reports.

    PNGs are looked up as ``<images>/<ImageDir>/<ImageID>``; ``images`` defaults to the CSV's
    folder, or its ``images/`` subfolder when that exists.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise InputError(f"CSV {path} not found; pass a PadChest-format CSV")
    root = path.parent
    image_root = Path(images) if images else (root / "images" if (root / "images").is_dir() else root)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        needed = set(REQUIRED_COLUMNS) | {report_column}
        if projections:
            needed.add("Projection")
        if dicom_dir is None and "DicomPath" not in columns:
            needed.add("ImageDir")
        missing = sorted(needed - columns)
        if missing:
            raise InputError(f"{path.name} lacks column(s) {', '.join(missing)}; is it PadChest-format? (see --report-column)")
        studies = []
        for row_number, row in enumerate(reader, start=2):
            if projections and row["Projection"].strip() not in projections:
                continue
            report = (row[report_column] or "").strip()
            if not report or report.lower() == "nan":
                continue
            if dicom_dir is not None:
                image = Path(dicom_dir) / (Path(row["ImageID"]).stem + ".dcm")
            elif row.get("DicomPath"):
                image = root / row["DicomPath"]
            else:
                image = image_root / row["ImageDir"].strip() / row["ImageID"]
            studies.append(
                Study(
                    image_id=row["ImageID"],
                    image_path=str(image),
                    patient_id=row["PatientID"],
                    report=report,
                    labels=_literal_list(row["Labels"], "Labels", row_number),
                    localizations=_literal_list(row.get("Localizations", ""), "Localizations", row_number),
                    mask_path=str(root / row["MaskPath"]) if row.get("MaskPath") else None,
                )
            )
    if not studies:
        raise InputError(f"{path.name} has no usable studies (projection filter {projections}, empty reports dropped)")
    return studies


def label_matrix(groups: list[tuple[str, ...]], vocabulary: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(vocabulary)}
    matrix = np.zeros((len(groups), len(vocabulary)), dtype=np.int64)
    for row, labels in enumerate(groups):
        for label in labels:
            matrix[row, index[label]] = 1
    return matrix


def _vocabulary(studies: list[Study]) -> list[str]:
    return sorted({label for s in studies for label in s.labels})


def _stratified_pick(features: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of a multilabel-stratified sample of ``size`` rows (iterative stratification)."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    if size <= 0:
        return np.array([], dtype=np.int64)
    if size >= len(features):
        return np.arange(len(features))
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=size, random_state=seed)
    _, picked = next(splitter.split(np.zeros(len(features)), features))
    return np.sort(picked)


def stratified_subset(studies: list[Study], size: int, seed: int, min_per_label: int = 20) -> list[Study]:
    """A subset of ``size`` studies: rare labels first get up to ``min_per_label`` studies each,
    the rest is filled by iterative stratification, so co-occurrences keep their proportions."""
    if size >= len(studies):
        return list(studies)
    rng = random.Random(seed)
    vocabulary = _vocabulary(studies)
    counts = {label: sum(label in s.labels for s in studies) for label in vocabulary}
    chosen: set[int] = set()
    for label in sorted(vocabulary, key=lambda lab: (counts[lab], lab)):
        have = sum(label in studies[i].labels for i in chosen)
        pool = [i for i, s in enumerate(studies) if label in s.labels and i not in chosen]
        rng.shuffle(pool)
        for i in pool[: max(0, min(min_per_label, size - len(chosen)) - have)]:
            chosen.add(i)
    rest = [i for i in range(len(studies)) if i not in chosen]
    features = label_matrix([studies[i].labels for i in rest], vocabulary)
    for j in _stratified_pick(features, size - len(chosen), seed):
        chosen.add(rest[j])
    return [studies[i] for i in sorted(chosen)]


def patient_split(studies: list[Study], seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, list[str]]:
    """ImageIDs per split; patients never cross splits.

    Each patient is one row labelled with the union of its studies' labels, split by iterative
    multilabel stratification (``iterstrat``): first train vs the rest, then the rest into
    val and test.
    """
    patients = sorted({s.patient_id for s in studies})
    if len(patients) < 3:
        raise InputError(f"only {len(patients)} patient(s): a train/val/test split needs at least 3")
    by_patient: dict[str, set[str]] = {p: set() for p in patients}
    for s in studies:
        by_patient[s.patient_id].update(s.labels or ("(none)",))
    vocabulary = sorted({label for labels in by_patient.values() for label in labels})
    features = label_matrix([tuple(by_patient[p]) for p in patients], vocabulary)
    n_rest = max(2, round(len(patients) * (fractions[1] + fractions[2])))
    rest = _stratified_pick(features, n_rest, seed)
    n_test = max(1, round(len(rest) * fractions[2] / (fractions[1] + fractions[2])))
    test_local = _stratified_pick(features[rest], n_test, seed + 1)
    test = {patients[rest[j]] for j in test_local}
    val = {patients[i] for i in rest} - test
    split_of = {p: "test" if p in test else "val" if p in val else "train" for p in patients}
    result: dict[str, list[str]] = {name: [] for name in SPLITS}
    for s in studies:
        result[split_of[s.patient_id]].append(s.image_id)
    for name in SPLITS:
        if not result[name]:
            raise InputError(f"the {name} split is empty; use more studies or patients")
    return result


def label_proportions(studies: list[Study], ids: list[str]) -> dict[str, float]:
    """Share of studies carrying each label, within the given ImageIDs."""
    wanted = set(ids)
    members = [s for s in studies if s.image_id in wanted]
    return {label: sum(label in s.labels for s in members) / max(1, len(members)) for label in _vocabulary(studies)}


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_split(path: str | Path, split: dict[str, list[str]], seed: int, csv_path: str | Path) -> None:
    payload = {"seed": seed, "csv": Path(csv_path).name, "csv_sha256": file_digest(csv_path), "splits": split}
    # Written by every rank of a multi-process launch: same content, atomic rename.
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_split(path: str | Path) -> dict[str, list[str]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return {name: list(data["splits"][name]) for name in SPLITS}
    except (OSError, ValueError, KeyError):
        raise InputError(f"split file {path} is missing or invalid; rerun without --split to create one") from None


def select(studies: list[Study], ids: list[str]) -> list[Study]:
    wanted = set(ids)
    chosen = [s for s in studies if s.image_id in wanted]
    if not chosen:
        raise InputError("the split selects no study of this CSV; was the split made for another CSV?")
    return chosen


class ImageCache:
    """Model inputs read once through the runtime reader and kept as float16 (3, S, S)."""

    def __init__(self, size: int):
        self.size = size
        self._store: dict[str, np.ndarray] = {}

    def get(self, study: Study) -> np.ndarray:
        if study.image_path not in self._store:
            self._store[study.image_path] = read_image(study.image_path, self.size).model_input.astype(np.float16)
        return self._store[study.image_path]


def augment_params(seed: int, epoch: int, index: int) -> tuple[float, float, float, float, float, float]:
    """(rotation deg, scale, shift x, shift y, contrast, brightness) drawn from a per-sample seed,
    so a resumed run draws the same augmentations. No flips: they would swap laterality."""
    rng = random.Random(f"{seed}-{epoch}-{index}")
    return (
        rng.uniform(-5.0, 5.0),
        rng.uniform(0.95, 1.05),
        rng.uniform(-0.03, 0.03),
        rng.uniform(-0.03, 0.03),
        rng.uniform(0.9, 1.1),
        rng.uniform(-0.1, 0.1),
    )


def augment(image, params, masks=None):
    """A small affine warp and contrast/brightness change of (3,S,S) [and (K,S,S)] tensors."""
    import torch
    import torch.nn.functional as F

    angle, scale, dx, dy, contrast, brightness = params
    theta = math.radians(angle)
    matrix = torch.tensor(
        [[math.cos(theta) / scale, -math.sin(theta) / scale, dx], [math.sin(theta) / scale, math.cos(theta) / scale, dy]],
        dtype=torch.float32,
    )
    grid = F.affine_grid(matrix[None], [1, *image.shape], align_corners=False)
    # Pad with each channel's normalized black, the radiograph background.
    black = torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225])[:, None, None]
    warped = F.grid_sample((image - black)[None], grid, align_corners=False, padding_mode="zeros")[0] + black
    warped = (warped - black) * contrast + black + brightness
    if masks is None:
        return warped
    warped_masks = F.grid_sample(masks[None].float(), grid, align_corners=False, padding_mode="zeros")[0]
    return warped, warped_masks
