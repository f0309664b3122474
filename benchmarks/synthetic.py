"""Full-size models without weights: a random-weight bundle of a real preset's shape.

Compute and memory traffic do not depend on the weights' values, so a random MedGemma-4b-shaped
LLM (real Gemma 3 tokenizer, converted and quantized by our own export path) and a random
BioViL-shaped frontend give the real model's latency on any machine, before anything is trained.

Everything is cached under ``$RADIXPERT_CACHE`` and built once (each step writes to a temporary
name and renames, so an interrupted build is redone, never reused):

    synthetic-<llm>/                 random HF folder (fp16 shards, tokenizer)   7.8 GB for medgemma-4b
    synthetic-<llm>-gguf/<q>.gguf    f16 from write_gguf, then q8_0 / q4_k_m from llama.cpp's quantizer
    synthetic-<llm>-frontend/        frontend.onnx of the preset (random weights)
    bundles/synthetic-<llm>-<q>/     a bundle of links to the above, with its manifest

Building needs the export extra (torch, transformers, onnx, gguf); benchmarking the result does not.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from radixpert.bundle import FORMAT, FORMAT_VERSION, LABELS, MANIFEST, file_entry, label_table, load_bundle
from radixpert.config import get_config
from radixpert.errors import ModelError, RadixpertError, UsageError
from radixpert.paths import cache_dir
from radixpert.prompt import DEFAULT_TEMPLATE

SHAPES = ("medgemma-4b",)
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
    from radixpert.export.gguf import build_synthetic_text_model
    from radixpert.llm import load_gemma3_270m

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build_synthetic_text_model(partial, llm, tokenizer_dir=load_gemma3_270m(cache))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def _hf_complete(folder: Path) -> bool:
    index = folder / "model.safetensors.index.json"
    if not ((folder / "config.json").is_file() and (folder / "tokenizer.json").is_file() and index.is_file()):
        return False
    shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    return all((folder / s).is_file() for s in shards)


def gguf_file(llm: str, quant: str, hf_dir: Path, cache: Path, threads: int | None) -> Path:
    """``synthetic-<llm>-gguf/<quant>.gguf``: f16 from our writer, quantized by llama.cpp."""
    from radixpert.benchmarks.bound import check_complete, read_gguf

    folder = cache / f"synthetic-{llm}-gguf"
    out = folder / f"{quant}.gguf"
    if out.is_file():
        check_complete(read_gguf(out))
        return out
    _need_export_extra()
    from radixpert.export.gguf import quantize_gguf, write_gguf

    f16 = folder / "f16.gguf"
    if not f16.is_file():
        write_gguf(hf_dir, f16, "f16")  # atomic: appears only when complete
    if quant == "f16":
        return f16
    return quantize_gguf(f16, out, quant, threads=threads or 0)


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
    partial = out.with_name("frontend.partial.onnx")
    export_frontend(frontend, config, partial)
    partial.replace(out)
    return out


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
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _link(onnx_path, partial / "frontend.onnx")
    _link(gguf_path, partial / f"llm-{quant}.gguf")
    (partial / LABELS).write_text(json.dumps(label_table(config.mask_names), indent=1) + "\n", encoding="utf-8")
    files = [(partial / "frontend.onnx", "frontend"), (partial / f"llm-{quant}.gguf", f"llm-{quant}"), (partial / LABELS, "labels")]
    entries = [file_entry(path, partial, role) for path, role in files]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bundle_id": hashlib.sha256(json.dumps([config.name, quant, [e["sha256"] for e in entries]]).encode()).hexdigest()[:16],
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "synthetic": "random weights of the preset's shape, for latency only: its reports are noise",
        "source": {"synthetic": config.name},
        "config": config.to_dict(),
        "prompt": template.to_manifest(),
        "tokens": ids,
        "visual": {"num_tokens": config.num_visual_tokens, "dim": config.llm_dim, "image_size": config.image_size,
                   "masks": config.num_masks, "input": "image", "outputs": ["visual_tokens", "masks"]},
        "llm": {"quants": [quant], "default_quant": quant, "n_ctx": n_ctx},
        "labels": LABELS,
        "files": entries,
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    try:
        load_bundle(out)
    except RadixpertError as exc:
        raise ModelError(f"the synthetic bundle at {out} does not load ({exc}); delete it and run again") from None
