"""The anatomy gate on images the model never saw: the same scans mirrored, rotated, inverted,
cropped, and non-chest pictures, each written as a DICOM with the source's header (torch-free).

Each variant changes only the pixels (and Rows/Columns where the shape changes): a mirrored
radiograph that a PACS export flipped still says PA and DX in its header, which is exactly the
error the gate must catch. Only the frontend runs (the gate reads the U-Net's maps), through the
bundle's ONNX Runtime session, as ``radixpert-run`` runs it.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from radixpert.bundle import Bundle
from radixpert.checks.gate import anatomy_measures, gate_verdict
from radixpert.errors import UsageError
from radixpert.imageio import letterbox_resize, normalize_imagenet, read_display
from radixpert.runtime.frontend import OnnxFrontend, frontend_path

KINDS = ("original", "mirror", "rot90", "invert", "crop", "nonchest")
# What each kind should get from the gate.
EXPECTED = {"original": "ok", "mirror": "mirrored", "rot90": "implausible", "invert": "implausible",
            "crop": "implausible", "nonchest": "implausible"}


def _nonchest_picture(shape: tuple[int, int], maximum: int) -> np.ndarray:
    """A photograph (matplotlib's sample portrait), grey, at ``shape``, in stored values 0..maximum."""
    try:
        from matplotlib import cbook
    except ImportError:
        raise UsageError("the nonchest variant uses matplotlib's sample photograph; pip install matplotlib") from None
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        grey = Image.open(handle).convert("L").resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(grey, dtype=np.float64) / 255.0 * maximum


def variant_pixels(stored: np.ndarray, kind: str, maximum: int) -> np.ndarray:
    """The stored pixel values of ``kind`` (see KINDS)."""
    h, w = stored.shape
    if kind == "original":
        return stored
    if kind == "mirror":
        return stored[:, ::-1]
    if kind == "rot90":
        return np.rot90(stored)
    if kind == "invert":  # the stored values inverted, the header's photometric interpretation kept
        return maximum - stored.astype(np.int64)
    if kind == "crop":  # the central quarter of the image: the mediastinum and the lungs' inner halves
        return stored[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
    if kind == "nonchest":
        return _nonchest_picture((h, w), maximum)
    raise UsageError(f"unknown variant {kind!r}; choose from {', '.join(KINDS)}")


def write_variant(source: Path, kind: str, out: Path) -> Path:
    """``source`` with its pixels replaced by ``kind``'s, the rest of the header unchanged."""
    ds = pydicom.dcmread(source)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    stored = ds.pixel_array
    maximum = (1 << int(ds.BitsStored)) - 1
    pixels = np.clip(np.rint(variant_pixels(stored, kind, maximum)), 0, maximum).astype(stored.dtype)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def gate_rates(bundle: Bundle, scans: Sequence[Path], kinds: Sequence[str], threads: int | None = None,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Gate verdict counts and the expected verdict's rate per kind, over ``scans`` (DICOM files)."""
    from radixpert.checks.checker import Checker

    session = OnnxFrontend(frontend_path(bundle, "fp32"), threads=threads)
    checker = Checker(bundle.manifest, bundle.config.mask_names)
    if not checker.gate_calibration:
        raise UsageError("this bundle has no anatomy ranges (exported before the gate existed); re-export it")
    counts: dict[str, Counter[str]] = {kind: Counter() for kind in kinds}
    done = 0
    with tempfile.TemporaryDirectory(prefix="radixpert-gate-") as tmp:
        for index, scan in enumerate(scans):
            for kind in kinds:
                path = write_variant(Path(scan), kind, Path(tmp) / f"{index}-{kind}.dcm")
                display, _ = read_display(path)
                image = normalize_imagenet(letterbox_resize(display, session.image_size))[None]
                masks = session.run(image)[1][0]
                verdict = gate_verdict(anatomy_measures(masks, checker.mask_names, display.shape),
                                       checker.gate_calibration)["verdict"]
                counts[kind][verdict] += 1
                os.unlink(path)
            done += 1
            if progress is not None:
                progress(done)
    return {kind: {"images": sum(c.values()), "verdicts": dict(sorted(c.items())), "expected": EXPECTED[kind],
                   "expected_rate": round(c[EXPECTED[kind]] / max(1, sum(c.values())), 4)}
            for kind, c in counts.items()}


def markdown(result: dict[str, Any], title: str) -> str:
    lines = [f"# {title}", "", "| images | n | expected verdict | rate | all verdicts |", "|---|---|---|---|---|"]
    for kind, row in result["kinds"].items():
        verdicts = ", ".join(f"{k} {v}" for k, v in row["verdicts"].items())
        lines.append(f"| {kind} | {row['images']} | {row['expected']} | {row['expected_rate']} | {verdicts} |")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)
