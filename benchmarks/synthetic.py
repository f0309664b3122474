"""Full-size models without weights: a random-weight bundle of a real preset's shape.

Compute and memory traffic do not depend on the weights' values, so a random MedGemma-4b-shaped
LLM (real Gemma 3 tokenizer, converted and quantized by our own export path) and a random
BioViL-shaped frontend give the real model's latency on any machine, before anything is trained.

Everything is cached under ``$RADIXPERT_CACHE`` and built once (each step builds under a lock
into a temporary name and renames, so an interrupted build is redone, never reused, and a second
process waits for the first one's build; see :mod:`radixpert.atomic`):

    synthetic-<llm>/                 random HF folder (fp16 shards, tokenizer)   7.8 GB for medgemma-4b
    synthetic-<llm>-gguf/<q>.gguf    f16 from write_gguf, then q8_0 / q4_k_m from llama.cpp's quantizer
    synthetic-<llm>-frontend/        frontend.onnx of the preset (random weights)
    bundles/synthetic-<llm>-<q>/     a bundle of links to the above, with its manifest

Building needs the export extra (torch, transformers, onnx, gguf); benchmarking the result does not.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from radixpert.atomic import atomic_build, build_once
from radixpert.bundle import (FORMAT, FORMAT_VERSION, LABELS, MANIFEST, file_entry, label_table, load_bundle,
                              portable_config, seal_manifest)
from radixpert.config import get_config
from radixpert.errors import ModelError, RadixpertError, UsageError
from radixpert.paths import cache_dir
from radixpert.prompt import DEFAULT_TEMPLATE

# Text shapes of real Gemma 3 checkpoints, keyed by the preset that uses them.
SYNTHETIC_SHAPES: dict[str, dict[str, Any]] = {
    "medgemma-4b": dict(
        vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=1024, max_position_embeddings=131072, rms_norm_eps=1e-6,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    ),
}
SHAPES = tuple(SYNTHETIC_SHAPES)
QUANTS = ("q4_k_m", "q8_0", "f16")
Step = Callable[[str], Any]  # a context manager factory: with step("what"): ...


def _need_export_extra() -> None:
    try:
        import gguf  # noqa: F401
        import onnx  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"building the synthetic model needs {exc.name}; install radixpert-edge[export] "
                         "(only once: the result is cached)") from None


def hf_folder(llm: str, cache: Path) -> Path:
    """The random HF text model, built once (the real Gemma 3 tokenizer from the demo package)."""
    out = cache / f"synthetic-{llm}"
    if _hf_complete(out):
        return out
    _need_export_extra()
    from radixpert.hf_models import load_gemma3_270m

    tokenizer_dir = load_gemma3_270m(cache)
    return build_once(out, lambda partial: build_synthetic_text_model(partial, llm, tokenizer_dir=tokenizer_dir),
                      done=_hf_complete, what=f"the synthetic {llm} model")


def _hf_complete(folder: Path) -> bool:
    index = folder / "model.safetensors.index.json"
    if not ((folder / "config.json").is_file() and (folder / "tokenizer.json").is_file() and index.is_file()):
        return False
    shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    return all((folder / s).is_file() for s in shards)


def build_synthetic_text_model(out_dir: Path, shape: str | Mapping[str, Any] = "medgemma-4b", tokenizer_dir: Path | None = None,
                               seed: int = 0, shard_bytes: int = 2 << 30) -> Path:
    """A random Gemma3ForCausalLM folder of a real model's shape, in fp16, written shard by shard.

    ``shape`` is a key of SYNTHETIC_SHAPES or a dict of Gemma3TextConfig fields. The tokenizer
    files are copied from ``tokenizer_dir`` (e.g. the Gemma 3 270M folder: same tokenizer as
    MedGemma). Weights never exist all at once in memory: at most one shard (``shard_bytes``).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma3TextConfig

    if isinstance(shape, str) and shape not in SYNTHETIC_SHAPES:
        raise UsageError(f"unknown synthetic shape {shape!r}; choose one of {', '.join(SYNTHETIC_SHAPES)}")
    fields = dict(SYNTHETIC_SHAPES[shape] if isinstance(shape, str) else shape)
    n_layers = int(fields["num_hidden_layers"])
    fields.setdefault("layer_types", ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)])
    config = Gemma3TextConfig(**fields, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                              architectures=["Gemma3ForCausalLM"], dtype="float16")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, out / name)

    d, f, q, kv = config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (config.vocab_size, d))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (q, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                   (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, q)),
                   (p + "self_attn.q_norm.weight", (config.head_dim,)), (p + "self_attn.k_norm.weight", (config.head_dim,)),
                   (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)), (p + "mlp.down_proj.weight", (d, f))]
        shapes += [(p + n + ".weight", (d,)) for n in ("input_layernorm", "post_attention_layernorm",
                                                       "pre_feedforward_layernorm", "post_feedforward_layernorm")]
    shapes.append(("model.norm.weight", (d,)))

    # Shards first (names only), so that the index can name "-00001-of-0000N" files up front.
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in shapes:
        nbytes = 2 * math.prod(dims)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        state = {}
        for name, dims in shard:
            # Norm weights near 0 (scale ~1 in Gemma's 1 + w), matrices at the usual 0.02 init.
            std = 0.1 if len(dims) == 1 else config.initializer_range
            state[name] = (torch.randn(dims, generator=generator, dtype=torch.float32) * std).to(torch.float16)
            weight_map[name] = file
        save_file(state, str(out / file), metadata={"format": "pt"})
        del state
    total = sum(2 * math.prod(dims) for _, dims in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return out


def gguf_file(llm: str, quant: str, hf_dir: Path, cache: Path, threads: int | None) -> Path:
    """``synthetic-<llm>-gguf/<quant>.gguf``: f16 from our writer, quantized by llama.cpp."""
    from radixpert.export.gguf_read import check_complete, read_gguf

    folder = cache / f"synthetic-{llm}-gguf"
    out = folder / f"{quant}.gguf"
    if out.is_file():
        check_complete(read_gguf(out))
        return out
    _need_export_extra()
    from radixpert.export.gguf import quantize_gguf, write_gguf

    f16 = build_once(folder / "f16.gguf", lambda partial: write_gguf(hf_dir, partial, "f16"), done=lambda path: path.is_file(),
                     what="the synthetic f16 GGUF")
    if quant == "f16":
        return f16
    return build_once(out, lambda partial: quantize_gguf(f16, partial, quant, threads=threads or 0),
                      done=lambda path: path.is_file(), what=f"the synthetic {quant} GGUF")


def frontend_onnx(llm: str, cache: Path) -> Path:
    """The preset's frontend (BioViL ResNet-50 + U-Net + fusion) with random weights, as ONNX."""
    out = cache / f"synthetic-{llm}-frontend" / "frontend.onnx"
    if out.is_file():
        return out
    _need_export_extra()
    import torch

    from radixpert.export.onnx_frontend import export_frontend
    from radixpert.model import Frontend

    config = get_config(llm)
    torch.manual_seed(0)
    frontend = Frontend(config).eval()
    return build_once(out, lambda partial: export_frontend(frontend, config, partial), done=lambda path: path.is_file(),
                      what=f"the synthetic {llm} frontend")


def _link(src: Path, dst: Path) -> None:
    """Hard link (no copy of gigabytes), else a symlink across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        dst.symlink_to(src.resolve())


def synthetic_bundle(llm: str, quant: str, tokens: int, threads: int | None = None, step: Step | None = None) -> Path:
    """A runnable bundle of the preset's shape with random weights; cached, rebuilt only when missing."""
    if llm not in SHAPES:
        raise UsageError(f"unknown --llm {llm!r}; choose one of {', '.join(SHAPES)}")
    if quant not in QUANTS:
        raise UsageError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANTS)}")
    cache = cache_dir()
    out = cache / "bundles" / f"synthetic-{llm}-{quant}"
    config = get_config(llm)
    if (out / MANIFEST).is_file():
        try:
            bundle = load_bundle(out)
            from radixpert.benchmarks.stages import token_room

            if token_room(bundle) >= tokens:
                return out
        except RadixpertError:
            pass  # damaged or stale: rebuild the bundle (the cached parts stay)

    step = step or (lambda _: contextlib.nullcontext())
    try:
        with step(f"random {llm} text model (HF, fp16; once)"):
            hf_dir = hf_folder(llm, cache)
        with step(f"GGUF {quant} (our writer, llama.cpp quantizer; once)"):
            gguf_path = gguf_file(llm, quant, hf_dir, cache, threads)
        with step(f"{llm} frontend ONNX (random BioViL + U-Net; once)"):
            onnx_path = frontend_onnx(llm, cache)
        with step("bundle manifest"):
            _assemble(out, config.replace(llm_path=str(hf_dir)), hf_dir, gguf_path, onnx_path, quant, tokens)
    except OSError as exc:
        if exc.errno == 28:
            raise UsageError(f"the disk under {cache} filled up building the synthetic model (it needs about 16 GB once); "
                             "free space or set RADIXPERT_CACHE elsewhere") from None
        raise
    return out


def _assemble(out: Path, config: Any, hf_dir: Path, gguf_path: Path, onnx_path: Path, quant: str, tokens: int) -> None:
    from radixpert.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(hf_dir)
    template = DEFAULT_TEMPLATE
    ids = {
        "prefix": tokenizer(template.prefix, add_special_tokens=False)["input_ids"],
        "suffix": tokenizer(template.suffix, add_special_tokens=False)["input_ids"],
        "stop": sorted(tokenizer.convert_tokens_to_ids(t) for t in template.stop_strings),
    }
    needed = len(ids["prefix"]) + config.num_visual_tokens + len(ids["suffix"]) + max(tokens, config.max_new_tokens) + 8
    n_ctx = int(-(-needed // 256) * 256)  # as export sizes it
    with atomic_build(out, what=str(out)) as partial:
        partial.mkdir(parents=True)
        _write_bundle(partial, config, gguf_path, onnx_path, quant, ids, n_ctx, template)
    try:
        load_bundle(out)
    except RadixpertError as exc:
        raise ModelError(f"the synthetic bundle at {out} does not load ({exc}); delete it and run again") from None


def _write_bundle(partial: Path, config: Any, gguf_path: Path, onnx_path: Path, quant: str, ids: dict[str, Any],
                  n_ctx: int, template: Any) -> None:
    _link(onnx_path, partial / "frontend.onnx")
    _link(gguf_path, partial / f"llm-{quant}.gguf")
    (partial / LABELS).write_text(json.dumps(label_table(config.mask_names), indent=1) + "\n", encoding="utf-8")
    files = [(partial / "frontend.onnx", "frontend"), (partial / f"llm-{quant}.gguf", f"llm-{quant}"), (partial / LABELS, "labels")]
    entries = [file_entry(path, partial, role) for path, role in files]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bundle_id": "",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "synthetic": "random weights of the preset's shape, for latency only: its reports are noise",
        "source": {"synthetic": config.name},
        "config": portable_config(config.to_dict()),
        "prompt": template.to_manifest(),
        "tokens": ids,
        "visual": {"num_tokens": config.num_visual_tokens, "dim": config.llm_dim, "image_size": config.image_size,
                   "masks": config.num_masks, "input": "image", "outputs": ["visual_tokens", "masks"]},
        "llm": {"quants": [quant], "default_quant": quant, "n_ctx": n_ctx},
        "labels": LABELS,
        "files": entries,
    }
    manifest = seal_manifest(manifest)
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
