"""Public entry points: read a DICOM or PNG radiograph into the display image and model input."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from radixpert.errors import InputError
from radixpert.imageio.dicom import read_dicom
from radixpert.imageio.geometry import DEFAULT_SIZE, letterbox_resize, normalize_imagenet
from radixpert.imageio.png import read_png

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class ScanImage:
    """One radiograph read for the model."""

    path: str
    display: np.ndarray  # float32 (H, W) in [0, 1], bright = dense
    model_input: np.ndarray  # float32 (3, size, size), ImageNet-normalized
    sop_instance_uid: str | None
    source: str  # "dicom" | "png"
    warnings: list[str] = field(default_factory=list)



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
    shape, how the VOI was done, the pixel padding range, and a list of warnings.
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
        return read_png(p)
    if head[128:132] == b"DICM":
        return read_dicom(p, force=False)
    # DICOM without the 128-byte preamble starts with a group 0002 or 0008 tag
    # (little or big endian).
    if head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08") and len(head) >= 8:
        return read_dicom(p, force=True)
    raise InputError(f"{name}: {_describe_unknown(p)}; give a DICOM file or a grayscale PNG")


def _describe_unknown(p: Path) -> str:
    """Name a non-DICOM, non-PNG file's type when Pillow knows it."""
    try:
        with Image.open(p) as im:
            fmt = im.format
    except (UnidentifiedImageError, OSError, ValueError):
        return "not a DICOM or PNG file"
    return f"{fmt} images are not supported (DICOM and PNG only)"
