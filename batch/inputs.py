"""What an archive run reads: folders, globs and CSV manifests, and the key each input is known by.

An input's key says whether it is already in the output (resume). A DICOM file is keyed by its SOP
Instance UID (``uid:1.2.3...``), read from the header only; anything else (a PNG, a file whose
header has no valid UID, a file that cannot be read) by a hash of its bytes, or of its path when it
cannot be read (``sha256:...`` / ``path-sha256:...``, :func:`radixpert.runtime.outputs.input_id`).
Keys never contain a file name.
"""

from __future__ import annotations

import csv
import glob
from pathlib import Path

from radixpert.errors import InputError, UsageError
from radixpert.runtime.cli import collect_scans
from radixpert.runtime.outputs import input_id, safe_uid

# A manifest with one of these columns lists files directly (relative to the CSV's folder).
PATH_COLUMNS = ("path", "Path", "DicomPath", "file", "File")


def collect_inputs(items: tuple[str, ...], manifests: tuple[str, ...] = ()) -> tuple[list[str], int]:
    """Input files in a stable order, without repeats: (paths, non-image files skipped in folders).

    ``items`` are files, folders (searched recursively, as ``radixpert-run`` does) or glob patterns
    (``'archive/**/*.dcm'``, quoted so that the shell leaves them alone). ``manifests`` are CSVs:
    PadChest format (``ImageID`` ...) or with a path column.
    """
    expanded: list[str] = []
    for item in items:
        if glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise UsageError(f"the pattern {item!r} matches no file")
            expanded.extend(matches)
        else:
            expanded.append(item)
    scans, skipped = collect_scans(tuple(expanded)) if expanded else ([], 0)
    paths = [str(p) for p in scans if not p.is_dir()]
    for manifest in manifests:
        paths.extend(manifest_paths(manifest))
    seen: set[str] = set()
    unique = [p for p in paths if not (p in seen or seen.add(p))]
    return unique, skipped


def manifest_paths(csv_path: str | Path) -> list[str]:
    """The image files a CSV manifest names.

    A CSV with a path column (``path``, ``DicomPath``, ...) lists files relative to its own folder
    (absolute paths are kept). Otherwise it must be PadChest format, read by the training reader
    (:func:`radixpert.train.data.read_table`: frontal projections with a report, images under
    ``<ImageDir>/<ImageID>``).
    """
    path = Path(csv_path)
    if not path.is_file():
        raise UsageError(f"manifest {path} not found")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        column = next((c for c in PATH_COLUMNS if c in (reader.fieldnames or ())), None)
        if column is not None:
            files = [row[column].strip() for row in reader if (row.get(column) or "").strip()]
            return [str(path.parent / f) for f in files]
    from radixpert.train.data import read_table

    try:
        studies = read_table(path)
    except InputError as exc:
        raise UsageError(f"manifest: {exc}") from None
    return [study.image_path for study in studies]


def input_key(path: str) -> str:
    """``uid:<SOP Instance UID>`` for a DICOM with a valid one in its header (or a DICOMweb input), else a
    hash of the file."""
    from radixpert.batch.dicomweb import is_remote, remote_key

    if is_remote(path):
        return remote_key(path)
    uid = header_uid(path)
    return f"uid:{uid}" if uid else input_id(path)


def header_uid(path: str) -> str | None:
    """The SOP Instance UID from a DICOM header (pixel data is not read), or None."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return safe_uid(ds.get("SOPInstanceUID"))
    except Exception:  # not DICOM, unreadable, damaged: keyed by its bytes instead
        return None
