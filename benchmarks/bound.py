"""The physical limit of decoding: bytes read per token, from the GGUF itself (torch-free).

Decoding one token is a pass over every weight the graph touches plus the KV cache, so on a
memory-bound machine ``tokens/s <= bandwidth / bytes_per_token``. The bytes come from the GGUF
header (tensor types and shapes), read by :mod:`radixpert.export.gguf_read`, which needs no
``gguf`` package, so the base install can do it.

What one token reads:

* every tensor of every layer, the final norm, and the output head. Gemma ties the output head
  to ``token_embd``: that table is read whole *as the head*; the input lookup reads one row.
  An untied model reads its ``output`` tensor whole and one row of ``token_embd``;
* the KV cache: K and V (f16, llama.cpp's default) for every layer and every cached position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from radixpert.export.gguf_read import GGML_NAMES, GgufInfo, read_gguf

KV_CACHE_BYTES = 2  # f16 K and V, llama.cpp's default cache type


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
