"""Read a GGUF file's header without the ``gguf`` package: metadata and tensor types and sizes.

The writer (``radixpert.export.gguf``) needs the export extra; this reader needs only the
standard library, so the base install can check a bundle's GGUF files and size what one decode
step reads. Vocabulary arrays are reduced to their length: they are large and not needed here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from radixpert.errors import ModelError

# ggml type id -> (elements per block, bytes per block); from ggml.h / gguf-py's GGML_QUANT_SIZES.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
}
GGML_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 6: "q5_0", 8: "q8_0", 12: "q4_K", 13: "q5_K", 14: "q6_K", 30: "bf16"}

# GGUF metadata value types -> struct format (8: string, 9: array are handled apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass
class GgufTensor:
    """One tensor's name, ggml type, shape and size in the file."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(1, _rows(self.shape))


@dataclass
class GgufInfo:
    """A GGUF file's metadata and tensors, as :func:`read_gguf` finds them."""

    path: Path
    metadata: dict[str, Any]
    tensors: list[GgufTensor] = field(default_factory=list)
    data_end: int = 0  # where the last tensor ends in the file

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def meta(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{key}", default)


def _rows(shape: tuple[int, ...]) -> int:
    rows = 1
    for d in shape[1:]:
        rows *= d
    return rows


def _read(handle: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = handle.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack(fmt, data)[0]


def _string(handle: BinaryIO) -> str:
    n = _read(handle, "<Q")
    return handle.read(n).decode("utf-8", errors="replace")


def _value(handle: BinaryIO, kind: int) -> Any:
    if kind == 8:
        return _string(handle)
    if kind == 9:
        item_kind, n = _read(handle, "<I"), _read(handle, "<Q")
        if n <= 64:
            return [_value(handle, item_kind) for _ in range(n)]
        # Vocabularies: skip the bulk, keep the length.
        if item_kind in _SCALARS:
            handle.seek(struct.calcsize(_SCALARS[item_kind]) * n, 1)
        else:
            for _ in range(n):
                _value(handle, item_kind)
        return {"length": n}
    if kind not in _SCALARS:
        raise ValueError(f"unknown GGUF value type {kind}")
    return _read(handle, _SCALARS[kind])


def read_gguf(path: str | Path) -> GgufInfo:
    """Metadata (vocabulary arrays reduced to their length) and tensor sizes of a GGUF file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise ModelError(f"{path} is not a GGUF file")
            version = _read(handle, "<I")
            if version < 2:
                raise ModelError(f"{path} is GGUF version {version}; re-export it (version 2 or later is read)")
            n_tensors, n_kv = _read(handle, "<Q"), _read(handle, "<Q")
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = _string(handle)
                metadata[key] = _value(handle, _read(handle, "<I"))
            infos = []
            for _ in range(n_tensors):
                name = _string(handle)
                dims = tuple(_read(handle, "<Q") for _ in range(_read(handle, "<I")))
                infos.append((name, dims, _read(handle, "<I"), _read(handle, "<Q")))
            alignment = int(metadata.get("general.alignment", 32))
            data_start = -(-handle.tell() // alignment) * alignment
    except (EOFError, ValueError, UnicodeDecodeError, struct.error):
        raise ModelError(f"{path} is a damaged GGUF file (its header does not parse); rebuild it") from None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    tensors = []
    for name, dims, kind, _ in infos:
        if kind not in GGML_BLOCKS:
            raise ModelError(f"{path.name}: tensor {name} has ggml type {kind}, unknown to this reader")
        block, size = GGML_BLOCKS[kind]
        elements = 1
        for d in dims:
            elements *= d
        tensors.append(GgufTensor(name, kind, dims, elements // block * size))
    end = max((data_start + offset + t.nbytes for (_, _, _, offset), t in zip(infos, tensors)), default=data_start)
    return GgufInfo(path, metadata, tensors, end)


def check_complete(info: GgufInfo) -> None:
    """A GGUF cut short (an interrupted copy or quantization) is refused."""
    size = info.path.stat().st_size
    if info.data_end > size:
        raise ModelError(f"{info.path} is truncated ({size} of {info.data_end} bytes); rebuild it")
