"""Hugging Face -> GGUF for Gemma 3 text models, and quantization with llama.cpp's own quantizer.

``write_gguf`` reads a local HF folder (a ``Gemma3ForCausalLM``, or the text half of a
``Gemma3ForConditionalGeneration`` such as MedGemma-4b-it) and writes an f32 or f16 GGUF for
llama.cpp's ``gemma3`` architecture. It is our own small writer on the PyPI ``gguf`` package;
llama.cpp's converter is neither vendored nor called. Tensors are streamed from safetensors one
at a time (in row chunks), so a 4B model needs no second copy in memory.

Conventions that llama.cpp needs and that are easy to get silently wrong:

* Gemma's RMSNorm computes ``x * (1 + w)``; llama.cpp computes ``x * w``. Every ``*norm.weight``
  (q_norm and k_norm included) is written as ``w + 1``, and kept in f32 inside an f16 file.
* Rope: global layers use ``rope.freq_base`` (plus the linear scaling of MedGemma), sliding
  layers ``rope.freq_base_swa`` and never any scaling (llama.cpp hard-codes scale 1 there).
* Which layers slide is written as a period (``sliding_window_pattern``) that must reproduce
  ``layer_types`` exactly; a layout no period gives is refused.
* bos = 2 and eos = 1 are written explicitly (llama.cpp's SPM defaults are the reverse); no
  automatic <bos> (the prompt template writes it) and no space prefix.

``quantize_gguf`` calls ``llama_cpp.llama_model_quantize`` on such a file.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from radixpert.runtime.llm import silence_llama_logs

from radixpert.errors import ModelError, UsageError

log = logging.getLogger(__name__)

ARCH = "gemma3"
WRITE_DTYPES = ("f32", "f16")
# Quantizations done by llama.cpp from an f16/f32 GGUF, keyed by our name.
_LLAMA_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
QUANTS: tuple[str, ...] = (*WRITE_DTYPES, *_LLAMA_FTYPES)
# f16 is the audit copy: it matches HF fp32 to cosine ~1, so a parity failure points
# at the export, not at quantization noise. q4_k_m is the one we deploy: the fewest bytes per
# token, so the fastest decode on memory-bound hardware, at a cost the export's parity check
# measures for every bundle (min logit cosine 0.990 on the base 270M; a lightly fine-tuned
# model can lose more, see README "Export"). q8_0 stays available; the demo ships it.
DEFAULT_QUANTS: tuple[str, ...] = ("f16", "q4_k_m")

# Added to every "*norm.weight" (Gemma computes x * (1 + w)). A module constant so that the
# tests can write a file without it and prove that the parity test catches the mistake.
_NORM_SHIFT = 1.0

_VLM_TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.", "language_model.lm_head.": "lm_head."}
_VLM_SKIP_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")
_PER_LAYER = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
              "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm")
_CHUNK_ELEMENTS = 1 << 25  # rows converted at a time: bounds the float32 scratch to ~128 MiB


@dataclass(frozen=True)
class _TextSpec:
    """What llama.cpp's gemma3 graph needs to know about the text model."""

    name: str
    n_layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    rms_eps: float
    sliding_window: int
    swa_period: int
    rope_global: float
    rope_local: float
    rope_scaling: tuple[str, float] | None
    final_softcap: float | None
    tied: bool
    is_vlm: bool


@dataclass(frozen=True)
class _Tensor:
    gguf_name: str
    file: Path
    key: str
    shape: tuple[int, ...]
    is_norm: bool


@dataclass
class _Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    source: str


# ---------------------------------------------------------------- public API


def write_gguf(hf_dir: Path, out_path: Path, dtype: str = "f16", progress: Callable[[int, int], None] | None = None) -> Path:
    """Convert a local Gemma 3 (text or VLM) HF folder to a GGUF of ``dtype`` "f32" or "f16".

    ``progress(done, total)`` is called after each tensor. The file appears atomically at
    ``out_path`` only when complete. Raises ModelError for folders llama.cpp cannot represent.
    """
    import gguf

    if dtype not in WRITE_DTYPES:
        raise UsageError(f"write_gguf dtype must be one of {WRITE_DTYPES}, got {dtype!r}; quantize with quantize_gguf")
    folder = Path(hf_dir)
    out = Path(out_path)
    spec = _read_spec(folder)
    tensors = _plan_tensors(folder, spec)
    vocab_rows = next(t.shape[0] for t in tensors if t.gguf_name == "token_embd.weight")
    vocab = _read_vocab(folder, vocab_rows)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), ARCH)
    try:
        _add_metadata(writer, spec, dtype)
        _add_vocab(writer, vocab)
        targets = [np.dtype(np.float16 if dtype == "f16" and len(t.shape) > 1 else np.float32) for t in tensors]
        for t, target in zip(tensors, targets):
            writer.add_tensor_info(t.gguf_name, t.shape, target, math.prod(t.shape) * target.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (t, target) in enumerate(zip(tensors, targets)):
            writer.write_tensor_data(_load_tensor(t, target))
            if progress is not None:
                progress(i + 1, len(tensors))
        writer.close()
        partial.replace(out)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    log.info("wrote %s (%s, %d tensors, tokenizer from %s)", out, dtype, len(tensors), vocab.source)
    return out


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int = 0) -> Path:
    """Quantize an f16/f32 GGUF with llama.cpp's own quantizer; quant is "q8_0" or "q4_k_m".

    ``threads=0`` lets llama.cpp use every core. The file appears at ``dst`` only when complete.
    """
    import llama_cpp

    if quant not in _LLAMA_FTYPES:
        raise UsageError(f"quantize_gguf quant must be one of {tuple(_LLAMA_FTYPES)}, got {quant!r}; f16/f32 come from write_gguf")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ModelError(f"no GGUF at {src}; write one with write_gguf first")
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(dst.name + ".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _LLAMA_FTYPES[quant])
    params.nthread = int(threads)
    llama_cpp.llama_backend_init()
    # llama.cpp logs a line per tensor (and a warning per fallback type); failures show in the code.
    silence_llama_logs()
    try:
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params))
        if code != 0 or not partial.is_file():
            raise ModelError(f"llama.cpp could not quantize {src} to {quant} (code {code}); is it an f16/f32 GGUF from write_gguf?")
        partial.replace(dst)
    finally:
        partial.unlink(missing_ok=True)
    return dst


# ---------------------------------------------------------------- config


def _read_spec(folder: Path) -> _TextSpec:
    """The text model's hyperparameters, refusing what llama.cpp's gemma3 graph cannot run."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"no config.json in {folder}; pass a local Hugging Face model folder")
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_type = raw.get("model_type")
    if model_type not in ("gemma3", "gemma3_text"):
        arch = ",".join(raw.get("architectures") or []) or "?"
        raise ModelError(f"{folder} is not a Gemma 3 model (model_type {model_type!r}, {arch}); only Gemma 3 converts to GGUF here")

    # transformers fills the defaults a sparse config.json leaves out (MedGemma omits many) and
    # turns 4.x rope fields (rope_theta, rope_local_base_freq, rope_scaling) into rope_parameters.
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    is_vlm = model_type == "gemma3"
    text = config.get_text_config() if is_vlm else config

    def refuse(why: str) -> ModelError:
        return ModelError(f"{folder}: {why}, which llama.cpp's gemma3 graph cannot represent")

    n_layers, hidden, heads = int(text.num_hidden_layers), int(text.hidden_size), int(text.num_attention_heads)
    head_dim = int(text.head_dim)
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer 27B (hidden/heads).
    expected_scalar = hidden // heads if n_layers == 62 else head_dim
    if float(text.query_pre_attn_scalar) != float(expected_scalar):
        raise refuse(f"query_pre_attn_scalar {text.query_pre_attn_scalar} != {expected_scalar}")
    if getattr(text, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise refuse(f"hidden_activation {text.hidden_activation!r}")
    if getattr(text, "attention_bias", False):
        raise refuse("attention_bias=True")
    if getattr(text, "attn_logit_softcapping", None):
        raise refuse("attn_logit_softcapping")
    if getattr(text, "use_bidirectional_attention", False):
        raise refuse("bidirectional attention")

    layer_types = list(getattr(text, "layer_types", None) or [])
    if len(layer_types) != n_layers or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise ModelError(f"{folder}: layer_types must list sliding_attention/full_attention for each of {n_layers} layers")
    period = _swa_period(layer_types)
    if period is None:
        raise refuse(f"layer_types {layer_types} (not one sliding/full period)")
    rope_global, rope_local, scaling = _rope(text, folder)
    softcap = getattr(text, "final_logit_softcapping", None)
    tied = bool(getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", True)))
    return _TextSpec(
        name=folder.name, n_layers=n_layers, hidden=hidden, ffn=int(text.intermediate_size), heads=heads,
        kv_heads=int(text.num_key_value_heads), head_dim=head_dim, context=int(text.max_position_embeddings),
        rms_eps=float(text.rms_norm_eps), sliding_window=int(text.sliding_window or 0), swa_period=period,
        rope_global=rope_global, rope_local=rope_local, rope_scaling=scaling,
        final_softcap=float(softcap) if softcap else None, tied=tied, is_vlm=is_vlm,
    )


def _swa_period(layer_types: list[str]) -> int | None:
    """llama.cpp's set_swa_pattern(p): layer i slides iff i % p < p - 1. Find p, or None."""
    n = len(layer_types)
    for p in range(1, n + 2):
        if all((t == "sliding_attention") == (i % p < p - 1) for i, t in enumerate(layer_types)):
            return p
    return None


def _rope(text: Any, folder: Path) -> tuple[float, float, tuple[str, float] | None]:
    """(global theta, sliding theta, global scaling) from rope_parameters or the 4.x fields."""
    params = getattr(text, "rope_parameters", None) or {}
    if "full_attention" in params or "sliding_attention" in params:
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:  # 4.x style (or a flat rope_parameters): one dict for the global layers
        full = dict(params or getattr(text, "rope_scaling", None) or {})
        full.setdefault("rope_theta", getattr(text, "rope_theta", 1_000_000.0))
        local = {"rope_type": "default", "rope_theta": getattr(text, "rope_local_base_freq", 10_000.0)}

    def kind(p: dict) -> str:
        return str(p.get("rope_type") or p.get("type") or "default")

    if kind(local) != "default":
        raise ModelError(f"{folder}: rope scaling {kind(local)!r} on sliding layers, which llama.cpp's gemma3 graph cannot represent")
    scaling: tuple[str, float] | None = None
    if kind(full) == "linear" and float(full.get("factor", 1.0)) != 1.0:
        scaling = ("linear", float(full["factor"]))
    elif kind(full) not in ("default", "linear"):
        raise ModelError(f"{folder}: rope type {kind(full)!r} on global layers; only default and linear convert")
    return float(full.get("rope_theta", 1_000_000.0)), float(local.get("rope_theta", 10_000.0)), scaling


def _add_metadata(writer: Any, spec: _TextSpec, dtype: str) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(spec.name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.hidden)
    writer.add_block_count(spec.n_layers)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_key_length(spec.head_dim)  # needed: head_dim != hidden / heads in Gemma 3
    writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_freq_base(spec.rope_global)
    writer.add_rope_freq_base_swa(spec.rope_local)
    if spec.rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(spec.rope_scaling[0]))
        writer.add_rope_scaling_factor(spec.rope_scaling[1])
    writer.add_sliding_window(spec.sliding_window)
    writer.add_sliding_window_pattern(spec.swa_period)
    if spec.final_softcap is not None:
        writer.add_final_logit_softcapping(spec.final_softcap)


# ---------------------------------------------------------------- tensors


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise ModelError(f"no model.safetensors (or index) in {folder}; save the model with safe_serialization")


def _plan_tensors(folder: Path, spec: _TextSpec) -> list[_Tensor]:
    """Every text tensor with its GGUF name, read from the safetensors headers only."""
    import gguf
    from safetensors import safe_open

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, spec.n_layers)
    found: dict[str, _Tensor] = {}
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                hf_name = _text_name(key, spec.is_vlm)
                if hf_name is None or (hf_name == "lm_head.weight" and spec.tied):
                    continue
                gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ModelError(f"{folder}: unexpected tensor {key!r} for a Gemma 3 text model")
                shape = tuple(int(d) for d in handle.get_slice(key).get_shape())
                found[gguf_name] = _Tensor(gguf_name, file, key, shape, hf_name.endswith("norm.weight"))

    required = {"token_embd.weight", "output_norm.weight"}
    required |= {f"blk.{i}.{part}.weight" for i in range(spec.n_layers) for part in _PER_LAYER}
    if not spec.tied:
        required.add("output.weight")
    missing = sorted(required - set(found))
    if missing:
        raise ModelError(f"{folder} is not a complete Gemma 3 checkpoint: {len(missing)} tensors missing, e.g. {missing[0]}")
    extra = sorted(set(found) - required)
    if extra:
        raise ModelError(f"{folder}: unexpected tensors for a {spec.n_layers}-layer Gemma 3, e.g. {extra[0]}")
    embd = found["token_embd.weight"].shape
    if embd[1:] != (spec.hidden,):
        raise ModelError(f"{folder}: embedding shape {embd} does not match hidden_size {spec.hidden}")

    def order(name: str) -> tuple[int, str]:
        m = re.match(r"blk\.(\d+)\.", name)
        return (int(m.group(1)) if m else (-1 if name == "token_embd.weight" else 1 << 30), name)

    return [found[n] for n in sorted(found, key=order)]


def _text_name(key: str, is_vlm: bool) -> str | None:
    """The Gemma3ForCausalLM name of a checkpoint key, or None for a tensor we skip."""
    if not is_vlm:
        return key
    if key.startswith(_VLM_SKIP_PREFIXES):
        return None
    for prefix, repl in _VLM_TEXT_PREFIXES.items():
        if key.startswith(prefix):
            return repl + key[len(prefix):]
    if key == "lm_head.weight":
        return key
    raise ModelError(f"unexpected tensor {key!r} in a Gemma 3 VLM checkpoint (expected language_model / vision_tower / projector)")


def _load_tensor(t: _Tensor, target: np.dtype) -> np.ndarray:
    """One tensor as ``target``, converted in row chunks (no second full-size float32 copy)."""
    from safetensors import safe_open

    out = np.empty(t.shape, dtype=target)
    rows = t.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, math.prod(t.shape[1:])))
    with safe_open(str(t.file), framework="pt") as handle:
        view = handle.get_slice(t.key)
        for start in range(0, rows, step):
            chunk = view[start:start + step].float().numpy()
            if t.is_norm:
                chunk = chunk + np.float32(_NORM_SHIFT)
            out[start:start + step] = chunk
    if target == np.float16 and not np.isfinite(out).all():
        raise ModelError(f"tensor {t.key} overflows float16; write the GGUF with dtype='f32'")
    return out


# ---------------------------------------------------------------- tokenizer


def _read_vocab(folder: Path, n_rows: int) -> _Vocab:
    """Token pieces, SPM scores and types; padded with unused tokens up to the embedding rows."""
    if (folder / "tokenizer.model").is_file():
        vocab = _spm_vocab(folder / "tokenizer.model")
    elif (folder / "tokenizer.json").is_file():
        vocab = _json_vocab(folder / "tokenizer.json")
    else:
        raise ModelError(f"no tokenizer.model or tokenizer.json in {folder}; copy the Gemma 3 tokenizer next to the weights")
    if len(vocab.tokens) > n_rows:
        raise ModelError(f"{folder}: the tokenizer has {len(vocab.tokens)} tokens but the embedding only {n_rows} rows")
    if len(set(vocab.tokens)) != len(vocab.tokens):
        raise ModelError(f"{folder}: the tokenizer has duplicate pieces; llama.cpp needs them unique")
    # MedGemma's embedding has 262,208 rows for 262,144 tokens: llama.cpp needs one token per row.
    for i in range(len(vocab.tokens), n_rows):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.scores.append(-1000.0)
        vocab.types.append(5)  # UNUSED
    return vocab


def _spm_vocab(path: Path) -> _Vocab:
    """tokenizer.model read from its protobuf, keeping USER_DEFINED pieces.

    gguf's SentencePieceVocab types user-defined pieces ("\\n\\n", runs of spaces,
    <start_of_image>) as NORMAL; llama.cpp then never matches them before its SPM merges, and
    runs of spaces (written with real spaces in Gemma's model) never match at all.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        if (path.parent / "tokenizer.json").is_file():
            log.warning("sentencepiece/protobuf missing: reading the tokenizer from tokenizer.json instead")
            return _json_vocab(path.parent / "tokenizer.json")
        raise ModelError("reading tokenizer.model needs the packages sentencepiece and protobuf: pip install sentencepiece protobuf") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    pieces = list(proto.pieces)
    # SentencePiece piece types use gguf's TokenType numbers (NORMAL=1 ... BYTE=6).
    types = [int(p.type) for p in pieces]
    scores = [-1000.0 if t in (3, 4) else float(p.score) for p, t in zip(pieces, types)]
    return _Vocab([p.piece for p in pieces], scores, types, "tokenizer.model")


def _json_vocab(path: Path) -> _Vocab:
    """A BPE tokenizer.json as an SPM vocabulary for llama.cpp.

    llama.cpp's SPM tokenizer merges the adjacent pair whose concatenation has the highest
    score. With score = -(rank of the first merge producing the piece) it merges in BPE order.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ModelError(f"{path}: a {model.get('type')!r} tokenizer; a Gemma 3 tokenizer.json is BPE")
    if "Prepend" in json.dumps(data.get("normalizer")) or "Metaspace" in json.dumps(data.get("pre_tokenizer")):
        raise ModelError(f"{path}: the tokenizer adds a space prefix; not a Gemma 3 tokenizer")

    pieces: dict[int, str] = {int(i): p for p, i in model["vocab"].items()}
    special: dict[int, bool] = {}
    for added in data.get("added_tokens") or []:
        pieces[int(added["id"])] = added["content"]
        special[int(added["id"])] = bool(added.get("special"))
    first_merge: dict[str, int] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        first_merge.setdefault(left + right, rank)
    # Pieces no merge produces are unreachable in BPE; in SPM they come last.
    unreachable = -float(len(first_merge) + 1)

    tokens, scores, types = [], [], []
    for i in range(max(pieces) + 1):
        piece = pieces.get(i)
        if piece is None:  # a hole in the ids: keep the numbering
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(5)
        elif i in special:
            tokens.append(piece)
            scores.append(-1000.0)
            types.append(3 if special[i] else 4)  # CONTROL or USER_DEFINED
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            tokens.append(piece)
            scores.append(0.0)
            types.append(6)  # BYTE
        else:
            tokens.append(piece)
            scores.append(-float(first_merge[piece]) if piece in first_merge else (0.0 if len(piece) == 1 else unreachable))
            types.append(1)  # NORMAL
    return _Vocab(tokens, scores, types, "tokenizer.json")


def _add_vocab(writer: Any, vocab: _Vocab) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    index = {t: i for i, t in enumerate(vocab.tokens)}
    if index.get("<bos>") is None or index.get("<eos>") is None:
        raise ModelError("the tokenizer has no <bos>/<eos>; use a Gemma 3 tokenizer")
    writer.add_bos_token_id(index["<bos>"])
    writer.add_eos_token_id(index["<eos>"])
    for piece, add in (("<unk>", writer.add_unk_token_id), ("<pad>", writer.add_pad_token_id), ("<end_of_turn>", writer.add_eot_token_id)):
        if piece in index:
            add(index[piece])
    writer.add_add_bos_token(False)  # the prompt template writes <bos> itself
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)

