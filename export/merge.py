"""Load a training run and merge its LoRA into the LLM (peft ``merge_and_unload``)."""

from __future__ import annotations

from pathlib import Path

import torch

from radixpert.config import RadixpertConfig
from radixpert.errors import ModelError, RadixpertError
from radixpert.model import RadixpertModel, build_model
from radixpert.train.checkpoint import load_trained_weights, resolve_checkpoint, verify_checksums


def load_run(run_dir: str | Path) -> tuple[RadixpertModel, Path, bool]:
    """(model in eval mode with the trained fusion and LoRA, checkpoint folder, checksums verified?)."""
    checkpoint = resolve_checkpoint(run_dir)
    verified = verify_checksums(checkpoint)
    try:
        config = RadixpertConfig.load(checkpoint / "config.json").resolve_paths(checkpoint)
    except RadixpertError as exc:
        raise ModelError(f"checkpoint {checkpoint} has no usable config.json ({exc})") from None
    model = build_model(config)
    try:
        load_trained_weights(model, checkpoint)
    except RadixpertError:
        raise
    except Exception as exc:  # safetensors, peft and torch each raise their own types
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:160]
        raise ModelError(f"checkpoint {checkpoint} does not load into preset {config.name!r} ({first}); "
                         "is the adapter from another base model, or the file damaged?") from None
    return model.eval(), checkpoint, verified


def merge_lora(model: RadixpertModel) -> RadixpertModel:
    """Fold the LoRA into the LLM weights in place; the model then holds a plain Gemma 3."""
    if hasattr(model.llm, "merge_and_unload"):
        model.llm = model.llm.merge_and_unload()
    model.llm.eval()
    return model


def save_merged(model: RadixpertModel, out_dir: Path) -> Path:
    """The merged LLM and its tokenizer as an HF folder (safetensors, float32)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.llm.to(torch.float32).save_pretrained(str(out_dir), safe_serialization=True)
    model.tokenizer.save_pretrained(str(out_dir))
    return out_dir
