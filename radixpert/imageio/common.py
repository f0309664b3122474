"""Limits and message helpers shared by the DICOM and PNG readers."""

from __future__ import annotations

from radixpert.errors import InputError

# A chest radiograph is a few thousand pixels a side; beyond this, decoding alone would take
# gigabytes, so such files are refused from their header. (Too-small images are a policy of
# the report runtime, not of the reader.)
MAX_SIDE = 16384


def check_size(rows: int, columns: int, name: str) -> None:
    """Refuse an image larger than ``MAX_SIDE`` a side before decoding it."""
    if max(rows, columns) > MAX_SIDE:
        raise InputError(f"{name}: image is {columns}x{rows} pixels, larger than {MAX_SIDE} a side; "
                         "downsample it before reporting")


def short_message(exc: BaseException) -> str:
    """One line from an exception, for a message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
