"""The physical limit of decoding: bytes read per token, from the GGUF itself (torch-free).

Decoding one token is a pass over every weight the graph touches plus the KV cache, so on a
memory-bound machine ``tokens/s <= bandwidth / bytes_per_token``. The bytes come from the GGUF
header (tensor types and shapes), read here with a small parser so the base install (no
``gguf`` package) can do it.

What one token reads:

* every tensor of every layer, the final norm, and the output head. Gemma ties the output head
  to ``token_embd``: that table is read whole *as the head*; the input lookup reads one row.
  An untied model reads its ``output`` tensor whole and one row of ``token_embd``;
* the KV cache: K and V (f16, llama.cpp's default) for every layer and every cached position.
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
KV_CACHE_BYTES = 2  # f16 K and V, llama.cpp's default cache type


@dataclass
class GgufTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(1, _rows(self.shape))


@dataclass
class GgufInfo:
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
            raise ModelError(f"{path.name}: tensor {name} has ggml type {kind}, unknown to radixpert-bench")
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


def bytes_per_token(info: GgufInfo, positions: float) -> dict[str, Any]:
    """Bytes one decode step reads: weights (see the module docstring) and KV at ``positions``."""
    names = {t.name: t for t in info.tensors}
    embed = names.get("token_embd.weight")
    untied = "output.weight" in names
    weights = sum(t.nbytes for t in info.tensors)
    if embed is not None and untied:
        weights += embed.row_bytes - embed.nbytes  # only the looked-up row of the input table
    elif embed is not None:
        weights += embed.row_bytes  # the lookup row, on top of the whole table read as the head
    layers = int(info.meta("block_count", 0))
    kv_heads = int(info.meta("attention.head_count_kv", 0) or 0)
    heads = int(info.meta("attention.head_count", 0) or 0)
    embd = int(info.meta("embedding_length", 0))
    k_len = int(info.meta("attention.key_length", 0) or (embd // heads if heads else 0))
    v_len = int(info.meta("attention.value_length", 0) or k_len)
    kv_per_position = layers * kv_heads * (k_len + v_len) * KV_CACHE_BYTES
    kv = kv_per_position * positions
    by_type: dict[str, int] = {}
    for t in info.tensors:
        key = GGML_NAMES.get(t.ggml_type, str(t.ggml_type))
        by_type[key] = by_type.get(key, 0) + t.nbytes
    return {
        "weights": int(weights),
        "output_head": int((names["output.weight"] if untied else embed).nbytes) if (untied or embed) else 0,
        "tied_embeddings": not untied,
        "kv": int(kv),
        "kv_per_position": int(kv_per_position),
        "positions": float(positions),
        "total": int(weights + kv),
        "by_type": by_type,
    }


def decode_bound(bandwidth_gb_s: float, nbytes: float) -> float:
    """Tokens/s a machine with this read bandwidth (GB/s, 1e9) cannot exceed at this many bytes/token."""
    return bandwidth_gb_s * 1e9 / nbytes if nbytes > 0 else 0.0


def mean_decode_positions(prompt_tokens: int, new_tokens: int) -> float:
    """Mean number of cached positions over the decode steps (step k attends prompt + k tokens)."""
    steps = max(1, new_tokens - 1)
    return prompt_tokens + 1 + (steps - 1) / 2


def bound_report(gguf_path: str | Path, prompt_tokens: int, new_tokens: int, achieved_tok_s: float,
                 cpu_bandwidth: list[dict[str, Any]], threads: int, gpu_bandwidth: dict[str, Any] | None = None,
                 gpu_layers: int = 0) -> dict[str, Any]:
    """Decode bound and achieved share, on the GPU's bandwidth when the LLM is offloaded, else the CPU's."""
    from radixpert.benchmarks.bandwidth import at_threads

    info = read_gguf(gguf_path)
    nbytes = bytes_per_token(info, mean_decode_positions(prompt_tokens, new_tokens))
    gpu = gpu_bandwidth or {}
    if gpu_layers > 0 and "median_gb_s" in gpu:
        bandwidth, where = float(gpu["median_gb_s"]), f"GPU {gpu.get('name')}, LLM offloaded"
    else:
        bandwidth, where = at_threads(cpu_bandwidth, threads), f"CPU, {threads} threads"
    bound = decode_bound(bandwidth, nbytes["total"])
    return {"where": where, "gguf": Path(gguf_path).name, "bytes_per_token": nbytes, "bandwidth_gb_s": bandwidth,
            "bound_tok_s": bound, "achieved_tok_s": achieved_tok_s, "share": achieved_tok_s / bound if bound else 0.0,
            "achieved_gb_s": achieved_tok_s * nbytes["total"] / 1e9, "cpu_bandwidth": cpu_bandwidth,
            "gpu_bandwidth": gpu_bandwidth}
