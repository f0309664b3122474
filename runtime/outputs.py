"""The runtime's file outputs: an anatomy-overlay PNG (torch-free), and how scans are named in file
names, logs and errors. The DICOM SR draft report lives in :mod:`radixpert.runtime.sr`; its names
are re-exported here, loaded on first use, so that the overlay alone never imports highdicom.

Hospital exports name files after the patient or the accession number, so no output name, log
line or error message carries an input's file name: a scan is named by its SOP Instance UID, or
by a hash of its bytes (see :func:`input_id`). Only numpy and Pillow are used here;
nothing here logs, so no patient data leaves the files the caller asked for.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from radixpert.bundle import sha256_of
from radixpert.errors import UsageError
from radixpert.imageio import letterbox_resize

__all__ = ["MANUFACTURER", "SERIES_DESCRIPTION", "input_id", "safe_uid", "scrub", "write_overlay", "write_sr"]

# Names of radixpert.runtime.sr that callers have imported from here.
_SR_NAMES = ("MANUFACTURER", "SERIES_DESCRIPTION", "DISCLAIMER", "write_sr", "read_sr_findings", "read_sr_verdicts")


def __getattr__(name: str) -> Any:
    """The SR names, imported from :mod:`radixpert.runtime.sr` on first use (PEP 562)."""
    if name in _SR_NAMES:
        from radixpert.runtime import sr

        return getattr(sr, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# A DICOM UID (VR UI): digits and dots, at most 64 characters. Anything else in the header is not
# used in a name, since a malformed file could carry any text there.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def safe_uid(uid: object) -> str | None:
    """``uid`` when it is a well-formed DICOM UID, else None."""
    text = str(uid).strip() if uid is not None else ""
    return text if len(text) <= 64 and _UID.fullmatch(text) else None


def input_id(path: str | os.PathLike[str]) -> str:
    """A pseudonym for an input: ``sha256:`` and the first 16 hex digits of the file's sha256.

    The bytes, not the name, are hashed: a hash of a name built from an accession number could be
    reversed by trying every number. ``sha256sum FILE`` gives the same digits, so a user who has
    the files can map results back. A file that cannot be read is named by a hash of its path.
    """
    try:
        return f"sha256:{sha256_of(path)[:16]}"
    except OSError:
        return f"path-sha256:{hashlib.sha256(os.fsencode(os.fspath(path))).hexdigest()[:16]}"


def scrub(message: str, path: str | os.PathLike[str], label: str) -> str:
    """``message`` with the input's path, file name and stem replaced by ``label``.

    Readers name the file in their one-line errors; the command line shows the label instead.
    Stems shorter than four characters are left alone: replacing them would garble words.
    """
    p = Path(path)
    names = {os.fspath(path), str(p), str(p.absolute()), p.name}
    if len(p.stem) >= 4:
        names.add(p.stem)
    # One pass, longest first, so that a name is never replaced inside a label already put in.
    pattern = "|".join(re.escape(n) for n in sorted((n for n in names if n), key=len, reverse=True))
    return re.sub(pattern, lambda _: label, message)


def write_overlay(display: np.ndarray, masks: np.ndarray, labels: list[dict[str, Any]], out_path: Path, *,
                  title: str | None = None, threshold: float = 0.5, size: int = 512, alpha: float = 0.35,
                  notes: Sequence[str] = ()) -> Path:
    """Write a PNG of the radiograph with the anatomy maps in colour and a legend band below it.

    Geometry: the maps live in the model's letterboxed input square, so the display is put through
    the same :func:`letterbox_resize` at ``size`` and the maps are bilinearly upsampled to it. Both
    are then the same square frame scaled, which keeps them in registration exactly, and the PNG
    shows what the model saw, padding included. Each map at or above ``threshold`` is filled
    translucently (``alpha``) and outlined with an opaque contour just inside its edge.
    No orientation letters are drawn: the label names say which side is which.
    """
    image = np.asarray(display, dtype=np.float32)
    maps = np.asarray(masks, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"display must be a 2-D image, got shape {image.shape}")
    if maps.ndim != 3 or maps.shape[1] != maps.shape[2]:
        raise ValueError(f"masks must be (K, S, S), got shape {maps.shape}")
    if maps.shape[0] != len(labels):
        raise ValueError(f"masks have {maps.shape[0]} channels but {len(labels)} labels were given")

    gray = np.clip(np.nan_to_num(letterbox_resize(image, size)), 0.0, 1.0)
    canvas = np.repeat(gray[..., None] * 255.0, 3, axis=2)
    inside = [_upsample(np.nan_to_num(m), size) >= threshold for m in maps]
    for region, label in zip(inside, labels):
        colour = np.asarray(label["colour"][:3], np.float32)
        canvas[region] = (1.0 - alpha) * canvas[region] + alpha * colour
    for region, label in zip(inside, labels):  # contours after all fills, so none is washed over
        canvas[_contour(region, width=max(1, size // 256))] = label["colour"][:3]

    if notes:  # a flagged draft gets a red frame, so that no thumbnail of it looks clean
        edge = max(3, size // 96)
        canvas[:edge], canvas[-edge:], canvas[:, :edge], canvas[:, -edge:] = _ALERT, _ALERT, _ALERT, _ALERT
    picture = Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")
    legend = _legend(labels, size, title)
    bands = [picture, *([_notes_band(notes, size)] if notes else []), legend]
    sheet = Image.new("RGB", (size, sum(b.height for b in bands)))
    y = 0
    for band in bands:
        sheet.paste(band, (0, y))
        y += band.height
    _atomic_write(Path(out_path), lambda tmp: sheet.save(tmp, format="PNG"))
    return Path(out_path)


def _upsample(prob: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of one (S, S) map to (size, size): pixel centres stay aligned, as in the image."""
    pil = Image.fromarray(np.ascontiguousarray(prob, dtype=np.float32), "F")
    return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _contour(region: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``region`` within ``width`` (4-neighbour steps) of its edge, so lines stay inside it."""
    core = region.copy()
    for _ in range(width):
        padded = np.pad(core, 1, constant_values=False)
        core = core & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return region & ~core


_ALERT = (200, 30, 30)


def _notes_band(notes: Sequence[str], width: int) -> Image.Image:
    """The checks' flags, one per line (wrapped to ``width``), dark red on pale red."""
    font = ImageFont.load_default(size=13)
    pad, row = 8, 17
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for note in notes:
        line = ""
        for word in str(note).split():
            trial = f"{line} {word}" if line else word
            if line and draw.textlength(trial, font=font) > width - 2 * pad:
                lines.append(line)
                line = "  " + word  # continuation lines are indented
            else:
                line = trial
        lines.append(line)
    band = Image.new("RGB", (width, len(lines) * row + 2 * pad), (255, 228, 228))
    draw = ImageDraw.Draw(band)
    for k, line in enumerate(lines):
        draw.text((pad, pad + k * row), line, fill=(140, 0, 0), font=font)
    return band


def _legend(labels: list[dict[str, Any]], width: int, title: str | None) -> Image.Image:
    """A white band with the title, then a swatch and name per label, wrapped to ``width``."""
    font = ImageFont.load_default(size=14)
    pad, swatch, row = 8, 14, 22
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    places, x, y = [], pad, pad + (row if title else 0)
    for label in labels:
        need = swatch + 6 + int(draw.textlength(str(label["name"]), font=font)) + 2 * pad
        if x > pad and x + need > width:
            x, y = pad, y + row
        places.append((x, y))
        x += need
    band = Image.new("RGB", (width, y + row + pad), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    for (x, y), label in zip(places, labels):
        draw.rectangle([x, y + 2, x + swatch - 1, y + 1 + swatch], fill=tuple(label["colour"][:3]),
                       outline=(96, 96, 96) if sum(label["colour"][:3]) > 600 else None)
        draw.text((x + swatch + 6, y), str(label["name"]), fill=(0, 0, 0), font=font)
    return band


def _atomic_write(out_path: Path, write: Any) -> None:
    """Write through a temporary file and rename, so a failure never leaves half a file."""
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, out_path)
    except OSError as exc:
        raise UsageError(f"cannot write {out_path}: {exc.strerror or exc}; check the --out folder") from None
    finally:
        tmp.unlink(missing_ok=True)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
