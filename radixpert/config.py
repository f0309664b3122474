"""The one configuration shared by training, export and runtime.

A plain dataclass with JSON save/load and named presets. It imports no torch, so the
runtime can read the copy recorded in a bundle manifest.

Symbols follow the paper (Section IV): N_p = grid_size**2 visual tokens of width D_v
(``vision_dim``), K anatomy masks (``num_masks``) projected to D_emb (``mask_embed_dim``),
and an MLP projector to the LLM width D_llm (``llm_dim``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radixpert.errors import UsageError

# Config fields that name weight files.
WEIGHT_PATHS = ("encoder_path", "encoder_head_path", "segmenter_path", "llm_path")
MASK_NAMES: tuple[str, ...] = ("right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle")

ENCODERS = ("tiny_cnn", "biovil")
SEGMENTERS = ("unet",)
LLM_SOURCES = ("tiny_random", "gemma3_270m_package", "hf_dir")
# Fields older configs and bundle manifests may still carry; nothing reads them, so loading drops
# them: image_attention (always "causal", as both HF and llama.cpp attend) and extra (never used).
REMOVED_FIELDS = ("image_attention", "extra")


@dataclass
class RadixpertConfig:
    """Every dimension of the model, plus where the frozen parts come from."""

    name: str = "tiny"
    seed: int = 0

    # Input image and patch grid: N_p = grid_size ** 2.
    image_size: int = 224
    grid_size: int = 14

    # f_vis: the frozen vision encoder, stride image_size / grid_size.
    encoder: str = "tiny_cnn"
    encoder_path: str | None = None
    # The encoder's presence/side head (radixpert-train encoder or encoder-head): the image's own
    # evidence for the report checks, exported as the frontend's third output. None: no evidence.
    encoder_head_path: str | None = None
    encoder_width: int = 16
    vision_dim: int = 64  # D_v

    # g_seg: the frozen U-Net anatomy head, K sigmoid maps at image_size.
    segmenter: str = "unet"
    segmenter_path: str | None = None
    segmenter_width: int = 8
    segmenter_depth: int = 3
    num_masks: int = 5  # K
    mask_names: tuple[str, ...] = MASK_NAMES

    # Trainable fusion: Conv1x1 (K -> D_emb), concat, MLP projector (D_v + D_emb -> D_llm).
    mask_embed_dim: int = 32  # D_emb
    projector_depth: int = 2  # number of Linear layers
    projector_hidden: int = 128
    # Region tokens: after the N_p patch tokens, 2K more, one pair per anatomy mask: the
    # mask-weighted mean and the in-mask max of H_fused, through the same projector, plus the
    # LLM's embedding of the structure's name. A finding then sits in the token of its structure
    # ("pulmón izquierdo"), which the LLM reads by content, not by its column in the 14x14
    # raster. Adds no trained weights.
    region_tokens: bool = False

    # The LLM (Gemma 3 text). For "tiny_random" the shape fields below build it;
    # for the other sources they must agree with the loaded model (checked at load).
    llm: str = "tiny_random"
    llm_path: str | None = None
    llm_dim: int = 64  # D_llm
    llm_layers: int = 2
    llm_heads: int = 2
    llm_kv_heads: int = 1
    llm_head_dim: int = 32
    llm_ffn: int = 128
    llm_sliding_window: int = 64
    llm_vocab_size: int = 0  # 0: taken from the tokenizer

    # Ablation switches (the paper's Table III). use_anatomy False feeds the fusion all-zero
    # pooled masks: H_seg is then the Conv1x1 bias, the same for every patch, so the LLM gets no
    # anatomy while shapes, export and runtime stay as they are. use_lora False trains no adapter:
    # the LLM stays frozen and only the fusion (Conv1x1 + projector) learns.
    use_anatomy: bool = True
    use_lora: bool = True

    # LoRA on the attention projections.
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    max_new_tokens: int = 128

    @property
    def num_patches(self) -> int:
        """N_p, the number of patch tokens (see num_visual_tokens)."""
        return self.grid_size**2

    @property
    def num_visual_tokens(self) -> int:
        """Tokens the frontend hands the LLM: N_p patches, plus 2K region tokens when on."""
        return self.num_patches + (2 * self.num_masks if self.region_tokens else 0)

    @property
    def encoder_stride(self) -> int:
        return self.image_size // self.grid_size

    def validate(self) -> "RadixpertConfig":
        """Raise UsageError (one line) if the fields are inconsistent."""
        checks = [
            (self.encoder in ENCODERS, f"encoder must be one of {ENCODERS}, got {self.encoder!r}"),
            (self.segmenter in SEGMENTERS, f"segmenter must be one of {SEGMENTERS}, got {self.segmenter!r}"),
            (self.llm in LLM_SOURCES, f"llm must be one of {LLM_SOURCES}, got {self.llm!r}"),
            (self.image_size % self.grid_size == 0, "image_size must be a multiple of grid_size"),
            (len(self.mask_names) == self.num_masks, "mask_names must list num_masks names"),
            (self.use_anatomy or not self.region_tokens, "region_tokens needs use_anatomy (they are read through the masks)"),
            (self.projector_depth >= 1, "projector_depth must be >= 1"),
            (self.lora_rank >= 1 and self.lora_alpha > 0, "lora_rank and lora_alpha must be positive"),
            (
                self.image_size % (2**self.segmenter_depth) == 0,
                "image_size must be divisible by 2**segmenter_depth",
            ),
            (
                self.llm == "tiny_random" or self.llm_path is not None or self.llm == "gemma3_270m_package",
                f"preset {self.name!r} needs llm_path (a local Hugging Face folder)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(f"invalid config: {message}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RadixpertConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k not in REMOVED_FIELDS}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UsageError(f"unknown config field(s): {', '.join(unknown)}; check the spelling or the version")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "RadixpertConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read config {path}: {exc.__class__.__name__}; pass a JSON file") from None
        return cls.from_dict(data)

    def resolve_paths(self, base: str | Path) -> "RadixpertConfig":
        """A copy whose relative weight paths that exist under ``base`` become absolute.

        A packed checkpoint carries its experts beside its config (``encoder.safetensors``), so
        it loads from wherever it was copied to; other relative paths stay relative to the
        working directory, as they were given at training time.
        """
        resolved: dict[str, Any] = {}
        for key in WEIGHT_PATHS:
            value = getattr(self, key)
            if value and not Path(value).is_absolute() and (Path(base) / value).exists():
                resolved[key] = str((Path(base) / value).resolve())
        return dataclasses.replace(self, **resolved) if resolved else self

    def replace(self, **overrides: Any) -> "RadixpertConfig":
        """A copy with typed overrides (values given as strings are converted to the field type)."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        converted: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in fields:
                raise UsageError(f"unknown config field {key!r}; see RadixpertConfig for the list")
            current = getattr(self, key)
            converted[key] = _coerce(key, value, current)
        return dataclasses.replace(self, **converted)


def _coerce(key: str, value: Any, current: Any) -> Any:
    if not isinstance(value, str) or isinstance(current, str) or current is None:
        return value
    try:
        if isinstance(current, bool):
            return value.lower() in ("1", "true", "yes", "on")
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            return tuple(v.strip() for v in value.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"config field {key!r} expects {type(current).__name__}, got {value!r}") from None
    return value


def _tiny() -> RadixpertConfig:
    """Tests: everything random and small. A random LLM knows no language to adapt, so its
    LoRA also covers the MLP projections; the real presets follow the paper (attention only)."""
    return RadixpertConfig(
        llm_dim=128,
        llm_ffn=512,
        llm_heads=4,
        projector_hidden=256,
        lora_rank=16,
        lora_alpha=32,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    )


def _demo() -> RadixpertConfig:
    """Real Gemma 3 270M (from the PyPI package) with a small phantom-trained frontend."""
    return RadixpertConfig(
        name="demo",
        encoder_width=32,
        vision_dim=256,
        segmenter_width=16,
        segmenter_depth=4,
        mask_embed_dim=64,
        projector_hidden=640,
        llm="gemma3_270m_package",
        llm_dim=640,
        llm_layers=18,
        llm_heads=4,
        llm_kv_heads=1,
        llm_head_dim=256,
        llm_ffn=2048,
        llm_sliding_window=512,
        llm_vocab_size=262144,
        lora_rank=16,
        lora_alpha=32,
    )


def _medgemma_4b() -> RadixpertConfig:
    """The paper's model: BioViL ResNet-50 (dilated, 14x14x2048), U-Net K=5, MedGemma-4b-it text."""
    return RadixpertConfig(
        name="medgemma-4b",
        encoder="biovil",
        vision_dim=2048,
        segmenter_width=32,
        segmenter_depth=4,
        mask_embed_dim=256,
        projector_hidden=2560,
        llm="hf_dir",
        llm_dim=2560,
        llm_layers=34,
        llm_heads=8,
        llm_kv_heads=4,
        llm_head_dim=256,
        llm_ffn=10240,
        llm_sliding_window=1024,
        llm_vocab_size=262208,
        lora_rank=16,
        lora_alpha=32,
        max_new_tokens=256,
    )


PRESETS = {"tiny": _tiny, "demo": _demo, "medgemma-4b": _medgemma_4b}


def get_config(name: str, **overrides: Any) -> RadixpertConfig:
    """A preset by name, with optional typed overrides."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = PRESETS[name]()
    return config.replace(**overrides) if overrides else config
