"""Pack a training checkpoint into a self-contained folder that ``radixpert-export`` takes from anywhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from radixpert.atomic import atomic_build
from radixpert.errors import ModelError
from radixpert.train.checkpoint import ADAPTER_DIR, FUSION_FILE, verify_checksums, write_checksums

EXPERT_FILES = {"encoder_path": "encoder.safetensors", "encoder_head_path": "encoder_head.safetensors",
                "segmenter_path": "segmenter.safetensors"}


def pack_checkpoint(checkpoint: Path, out_dir: Path, encoder_head: Path | None = None) -> Path:
    """Copy what inference needs from a checkpoint into a self-contained folder.

    The folder holds the config, fusion and LoRA adapter plus the frozen experts the config
    points to, which are copied in and referred to by relative paths; optimizer state and the
    split stay behind. ``checksums.json`` covers every file, so ``radixpert-export`` can take
    the folder from anywhere and refuse a damaged copy. ``encoder_head`` adds (or replaces) the
    encoder's presence/side head, e.g. one refitted by ``radixpert-train encoder-head``.
    """
    from radixpert.config import RadixpertConfig

    verify_checksums(checkpoint)
    config = RadixpertConfig.load(checkpoint / "config.json")
    with atomic_build(out_dir, what=str(out_dir)) as tmp:
        tmp.mkdir(parents=True)
        shutil.copyfile(checkpoint / FUSION_FILE, tmp / FUSION_FILE)
        if config.use_lora:
            (tmp / ADAPTER_DIR).mkdir()
            adapter_in, adapter_out = checkpoint / ADAPTER_DIR, tmp / ADAPTER_DIR
            shutil.copyfile(adapter_in / "adapter_model.safetensors", adapter_out / "adapter_model.safetensors")
            # peft records the training machine's local base-model path; a shared folder names the model instead.
            adapter_config = json.loads((adapter_in / "adapter_config.json").read_text(encoding="utf-8"))
            adapter_config["base_model_name_or_path"] = config.llm
            (adapter_out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n",
                                                             encoding="utf-8")
        located = config.resolve_paths(checkpoint)
        if encoder_head is not None:
            located = located.replace(encoder_head_path=str(Path(encoder_head).resolve()))
        moved: dict[str, str] = {}
        for key, name in EXPERT_FILES.items():
            source = getattr(located, key)
            if source:
                if not Path(source).is_file():
                    raise ModelError(f"{key} {source} of {checkpoint} not found; run from the training folder or fix the path")
                shutil.copyfile(source, tmp / name)
                moved[key] = name
        config.replace(**moved).save(tmp / "config.json")
        write_checksums(tmp)
    return out_dir
