"""Synthetic PA chest radiograph phantoms with masks, findings and Spanish reports.

Everything is a pure function of ``(seed, index, size)`` so datasets are reproducible
whatever the number of worker processes. This package must stay free of torch: the
runtime and its tests build phantoms in torch-free processes. It also avoids scipy,
which the base (runtime) install does not ship.

Modules: ``findings`` (random streams, findings, PadChest labels), ``report`` (Spanish
report text), ``anatomy`` and ``render`` (the image and its masks), ``writers`` (DICOM,
PNG twins, masks, CSV) and ``cli`` (``radixpert-phantom``).

Image convention: column 0 is the patient's RIGHT (radiographs are displayed as if
facing the patient), and pixel values are in MONOCHROME2 sense (dense = bright).

``radixpert-phantom --n N --seed S --out DIR`` writes into DIR:

* ``dicom/<stem>.dcm``: DX For Presentation, 12 bits stored, MONOCHROME1/2, varied rescale
  and window, Explicit VR Little Endian / RLE Lossless / JPEG 2000 Lossless;
* ``images/<ImageDir>/<stem>.png``: 16-bit display twin, i.e. the DICOM after rescale ->
  linear VOI window -> MONOCHROME1 inversion, scaled to 0..65535 (bright = dense);
* ``masks/<stem>.png``: uint8, bit k set where mask ``MASK_NAMES[k]`` holds (see ``read_masks``);
* ``phantoms.csv``: PadChest columns (ImageID, ImageDir, PatientID, StudyID, Report, Labels,
  Localizations, ...) plus DicomPath, MaskPath, PhotometricInterpretation, TransferSyntax,
  WindowCenter, WindowWidth, Seed, Index;
* ``preview.png`` with ``--preview``: captioned contact sheet of the first 16 studies.
"""

from __future__ import annotations

from radixpert.phantom.cli import main
from radixpert.phantom.findings import Finding, labels_and_localizations, sample_findings
from radixpert.phantom.render import MASK_NAMES, MIN_SIZE, PhantomSample, generate_sample
from radixpert.phantom.report import spanish_report
from radixpert.phantom.writers import (
    CSV_COLUMNS,
    PREVIEW_MAX,
    display_lut,
    read_masks,
    stored_values,
    write_dataset,
)

__all__ = [
    "CSV_COLUMNS",
    "MASK_NAMES",
    "MIN_SIZE",
    "PREVIEW_MAX",
    "Finding",
    "PhantomSample",
    "display_lut",
    "generate_sample",
    "labels_and_localizations",
    "main",
    "read_masks",
    "sample_findings",
    "spanish_report",
    "stored_values",
    "write_dataset",
]
