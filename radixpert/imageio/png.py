"""PNG (PadChest style) -> display image: ``value / 65535`` (16-bit) or ``value / 255`` (8-bit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from radixpert.errors import InputError
from radixpert.imageio.common import check_size, short_message


def read_png(p: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a grayscale PNG into the float32 display image in [0, 1] and its metadata."""
    name = p.name
    try:
        with Image.open(p) as im:
            check_size(im.height, im.width, name)
            im.load()
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                mode = im.mode
            elif mode == "1":
                im = im.convert("L")
                mode = "L"
            arr = np.array(im)
    except InputError:
        raise
    except Exception as exc:  # truncated or corrupt PNGs raise OSError/SyntaxError/ValueError
        raise InputError(f"{name}: PNG cannot be read ({short_message(exc)}); check the file") from None

    warns: list[str] = []
    if mode in ("RGB", "RGBA", "LA"):
        if mode == "LA":
            gray = arr[..., 0]
        else:
            rgb = arr[..., :3]
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise InputError(f"{name}: colour PNG (channels differ); give a grayscale radiograph")
            gray = rgb[..., 0]
        if mode in ("RGBA", "LA") and not np.all(arr[..., -1] == 255):
            warns.append("PNG transparency was ignored")
        arr, mode = gray, "L"

    if mode == "L":
        bits, scale = 8, 255.0
    elif mode.startswith("I;16") or mode == "I":
        # Pillow opens 16-bit grayscale PNGs as I;16 (or I in older versions).
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise InputError(f"{name}: PNG values fall outside 0..65535; give an 8- or 16-bit grayscale PNG")
        bits, scale = 16, 65535.0
    else:
        raise InputError(f"{name}: PNG mode {mode} is not supported; give an 8- or 16-bit grayscale PNG")
    if arr.ndim != 2 or arr.size == 0:
        raise InputError(f"{name}: PNG has no usable image (shape {arr.shape})")

    display = arr.astype(np.float32)
    display *= np.float32(1.0 / scale)
    np.clip(display, 0.0, 1.0, out=display)  # 1/65535 in float32 can overshoot 1 by an ulp
    meta = {
        "source": "png",
        "modality": None,
        "photometric": None,
        "transfer_syntax": None,
        "sop_instance_uid": None,
        "bits": bits,
        "rows": int(arr.shape[0]),
        "columns": int(arr.shape[1]),
        "warnings": warns,
    }
    return display, meta
