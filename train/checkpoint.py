"""Training checkpoints in safe formats only: safetensors for tensors, JSON for the rest.

A checkpoint folder ``step-000050/`` holds:

* ``fusion.safetensors``: the Conv1x1 and MLP projector;
* ``adapter/``: the peft LoRA adapter (``adapter_model.safetensors`` + ``adapter_config.json``);
  absent when the config has ``use_lora`` off (the LLM is then not trained at all);
* ``config.json`` and ``split.json``: what the run was trained with;
* ``optimizer.safetensors`` + ``trainer_state.json``: optimizer moments, scheduler, step and RNG
  state, so that ``--resume`` continues exactly;
* ``checksums.json``: the sha256 of every file above, so export refuses a damaged copy.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from radixpert.atomic import atomic_build
from radixpert.bundle import sha256_of
from radixpert.errors import ModelError

FUSION_FILE = "fusion.safetensors"
ADAPTER_DIR = "adapter"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
CHECKSUMS_FILE = "checksums.json"


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().clone().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    numpy_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64))}
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def save_checkpoint(folder: Path, model, optimizer, scheduler, step: int, extra: dict[str, Any], split_path: Path | None) -> Path:
    """Write a complete checkpoint atomically (a partial folder is never left as the latest)."""
    with atomic_build(folder, what=f"checkpoint {folder.name}") as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous() for k, v in model.frontend.fusion.state_dict().items()}, str(tmp / FUSION_FILE))
        if model.config.use_lora:  # without LoRA the LLM is untouched: nothing to save
            model.llm.save_pretrained(str(tmp / ADAPTER_DIR))
        model.config.save(tmp / "config.json")
        if split_path is not None:
            shutil.copyfile(split_path, tmp / "split.json")
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
        rng_tensors, rng_meta = rng_state()
        save_file({**opt_tensors, **rng_tensors}, str(tmp / OPTIMIZER_FILE))
        state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta, **extra}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        write_checksums(tmp)
    return folder


def write_checksums(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE)
    sums = {p.relative_to(folder).as_posix(): sha256_of(p) for p in files}
    (folder / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=1) + "\n", encoding="utf-8")


def verify_checksums(folder: Path) -> bool:
    """Check every recorded file; False when the checkpoint predates checksums.

    Raises ModelError naming the first damaged or missing file.
    """
    path = folder / CHECKSUMS_FILE
    if not path.exists():
        return False
    try:
        sums = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise ModelError(f"{path} is damaged; copy the checkpoint again") from None
    for name, expected in sums.items():
        file = folder / name
        if not file.is_file():
            raise ModelError(f"checkpoint file {name} is missing from {folder}; copy the whole checkpoint folder")
        if sha256_of(file) != expected:
            raise ModelError(f"checkpoint file {name} in {folder} fails its sha256 check; the copy is damaged")
    return True


def latest_checkpoint(run_dir: Path) -> Path | None:
    # Only complete checkpoints carry the plain name: builds in progress or left by a killed
    # process are step-N.partial-*, folders being replaced step-N.old-*.
    folders = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir() and "." not in p.name)
    return folders[-1] if folders else None


def resolve_checkpoint(run_dir: str | Path) -> Path:
    """A checkpoint folder itself, or the latest ``checkpoints/step-*`` of a run folder."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise ModelError(f"run folder {folder} not found; pass the --out folder of radixpert-train or one of its checkpoints")
    if (folder / FUSION_FILE).exists():
        return folder
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise ModelError(f"{folder} holds no checkpoint (no checkpoints/step-*/{FUSION_FILE}); train first")
    return checkpoint


def load_trained_weights(model, folder: Path) -> None:
    """Load the fusion and LoRA weights of a checkpoint into a freshly built model."""
    from peft import set_peft_model_state_dict

    if not (folder / FUSION_FILE).exists():
        raise ModelError(f"{folder} is not a training checkpoint (no {FUSION_FILE})")
    model.frontend.fusion.load_state_dict(load_file(str(folder / FUSION_FILE)))
    if not model.config.use_lora:
        return
    if not (folder / ADAPTER_DIR / "adapter_model.safetensors").exists():
        raise ModelError(f"{folder} has no LoRA adapter but its config has use_lora on; copy the whole checkpoint")
    adapter = load_file(str(folder / ADAPTER_DIR / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model.llm, adapter)
    if getattr(result, "unexpected_keys", None):
        raise ModelError(f"LoRA adapter in {folder} does not fit the model: {result.unexpected_keys[:3]}")


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore everything needed to continue exactly; returns the trainer state."""
    load_trained_weights(model, folder)
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    tensors = load_file(str(folder / OPTIMIZER_FILE))
    _optimizer_from_flat(optimizer, {k: v for k, v in tensors.items() if not k.startswith("rng.")}, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng({k: v for k, v in tensors.items() if k.startswith("rng.")}, state["rng"])
    return state
