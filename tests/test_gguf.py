"""HF -> GGUF conversion and quantization: llama.cpp must tokenize and compute like HF.

Everything is built in code (tiny random Gemma 3 models, the tiny tokenizer): no downloads.
"""

from __future__ import annotations

import ctypes
import json
import random
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from radixpert.benchmarks.synthetic import build_synthetic_text_model  # noqa: E402
from radixpert.config import get_config  # noqa: E402
from radixpert.errors import ModelError, UsageError  # noqa: E402
from radixpert.export import gguf as export  # noqa: E402
from radixpert.hf_models import build_tiny_llm, gemma3_layer_types, load_hf_text_model  # noqa: E402
from radixpert.prompt import DEFAULT_TEMPLATE, SPECIAL_TOKENS  # noqa: E402
from radixpert.tokenizer import _CORPUS, build_tiny_tokenizer  # noqa: E402

SPANISH = [
    "Derrame pleural derecho con pinzamiento del seno costofrénico.",
    "Índice cardiotorácico aumentado; niño de 12 años, señal de pequeña cuantía.",
    "Nódulo de 1,5 cm en el LSD (¿granuloma?). ¡Sin cambios!",
    "  dos  espacios   y\ttabulación\n\nnueva línea\n",
    "«Comillas» — guiones – y … puntos; 3×4 mm, ±2 °C, µg",
    "emoji 🫁🩻😷 y otros: 肺 ✓ ∑ ℃ Ω",
    "Tráquea centrada.\nSilueta cardiomediastínica normal.\n\n\nFin",
    "ÁÉÍÓÚÜÑ áéíóúüñ ç à è ò ã õ",
    "0123456789 10/12/2024 12:30h 1.000,25",
    "<start_of_turn>user\nhola<end_of_turn>\n",
]

# Measured on this build (llama-cpp-python 0.3.36, AVX2), 100-token prompt crossing the
# 64-token sliding window: f32 max|dlogit| 2.7e-3, f16 5.3e-3, both 100% argmax, cosine
# > 0.999999. Without Gemma's +1 on the norms: max|d| 8.9 and 21% argmax; with the sliding
# window off by one: 0.55 past position 64. The bounds leave ~4x margin and still fail those.
F32_MAX_ABS = 1e-2
F16_MAX_ABS = 2e-2
F16_MIN_COS = 0.9999


@pytest.fixture(scope="module", autouse=True)
def _quiet_llama_cpp():
    """llama.cpp logs every load to stderr; silence its C log for these tests only."""
    from llama_cpp import _logger

    silent = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(silent, ctypes.c_void_p(0))
    yield
    llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, model, tokenizer, f32 gguf, f16 gguf) for the tiny random Gemma 3."""
    folder = tmp_path_factory.mktemp("tiny-hf")
    tok = build_tiny_tokenizer()
    model = build_tiny_llm(get_config("tiny"), vocab_size=len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    f32 = export.write_gguf(folder, folder / "tiny-f32.gguf", "f32")
    f16 = export.write_gguf(folder, folder / "tiny-f16.gguf", "f16")
    return folder, model, tok, f32, f16


def _prompt_ids(tok, length: int = 100) -> list[int]:
    """The prompt template's tokens (56 with the tiny tokenizer), cut or topped up with seeded
    random ones to ``length``; the default crosses the tiny model's 64-token sliding window."""
    text = DEFAULT_TEMPLATE.prefix + DEFAULT_TEMPLATE.suffix + DEFAULT_TEMPLATE.target("Derrame pleural derecho.")
    ids = tok(text, add_special_tokens=False)["input_ids"][:length]
    rng = np.random.default_rng(0)
    return ids + [int(i) for i in rng.integers(len(SPECIAL_TOKENS), len(tok), length - len(ids))]


def _llama_logits(path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _compare(got: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(max |dlogit|, argmax agreement, min cosine over positions)."""
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    return float(np.abs(got - ref).max()), float(np.mean(got.argmax(-1) == ref.argmax(-1))), float(cos.min())


def _fields(path) -> tuple[dict, dict]:
    """(metadata values, tensors by name) as gguf's reader sees them."""
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def _vocab(path):
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


# ---------------------------------------------------------------- metadata and tokenizer


def test_tiny_gguf_has_the_metadata_llama_cpp_needs(tiny):
    folder, model, tok, _, f16 = tiny
    fields, tensors = _fields(f16)
    c = model.config
    expected = {
        "general.architecture": "gemma3",
        "gemma3.block_count": c.num_hidden_layers,
        "gemma3.embedding_length": c.hidden_size,
        "gemma3.feed_forward_length": c.intermediate_size,
        "gemma3.attention.head_count": c.num_attention_heads,
        "gemma3.attention.head_count_kv": c.num_key_value_heads,
        "gemma3.attention.key_length": c.head_dim,
        "gemma3.attention.value_length": c.head_dim,
        "gemma3.context_length": c.max_position_embeddings,
        "gemma3.attention.sliding_window": c.sliding_window,
        # [sliding, full]: not Gemma's usual 5:1, so the period must be written (2).
        "gemma3.attention.sliding_window_pattern": 2,
        "gemma3.rope.freq_base": 1e6,
        "gemma3.rope.freq_base_swa": 1e4,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
    }
    assert {k: fields.get(k) for k in expected} == pytest.approx(expected)
    assert "gemma3.rope.scaling.type" not in fields
    assert len(fields["tokenizer.ggml.tokens"]) == len(tok)
    # Norms stay f32 in an f16 file and carry Gemma's +1; the tied lm_head is not written.
    assert "output.weight" not in tensors
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    norm = tensors["blk.0.attn_k_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_allclose(norm.data, model.model.layers[0].self_attn.k_norm.weight.detach().numpy() + 1, rtol=0, atol=1e-7)


def test_sliding_period_reproduces_layer_types():
    assert export._swa_period(gemma3_layer_types(34)) == 6  # MedGemma-4b: 5 sliding : 1 full
    assert export._swa_period(["sliding_attention", "full_attention"]) == 2
    assert export._swa_period(["full_attention", "full_attention"]) == 1
    assert export._swa_period(["sliding_attention"] * 3) == 4
    assert export._swa_period(["full_attention", "sliding_attention"]) is None


def _random_unicode(rng: random.Random, n: int) -> list[str]:
    """Strings mixing Spanish, whitespace runs and code points the tiny vocab lacks (byte fallback)."""
    alphabet = list("abcdefghijklmnopqrstuvwxyzáéíóúüñÑ ¿?¡!.,;:()0123456789\n\t-") + list("  \n\n")
    ranges = [(0x20, 0x7E), (0xA0, 0x2FF), (0x370, 0x52F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
    out = []
    for _ in range(n):
        chars = [rng.choice(alphabet) if rng.random() < 0.6 else chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 40))]
        out.append("".join(chars))
    return out


def test_llama_cpp_tokenizes_and_detokenizes_like_hf(tiny):
    _, _, tok, f32, _ = tiny
    template = DEFAULT_TEMPLATE
    strings = [template.prefix, template.suffix, template.target("Sin hallazgos patológicos."),
               template.prefix + template.suffix + template.target(SPANISH[0]), *SPANISH, *_CORPUS,
               *_random_unicode(random.Random(0), 150)]
    vocab = _vocab(f32)
    try:
        for text in strings:
            expected = tok(text, add_special_tokens=False)["input_ids"]
            got = vocab.tokenize(text.encode(), add_bos=False, special=True)
            assert got == expected, text
            assert vocab.detokenize(got, special=True) == text.encode(), text
        prefix = vocab.tokenize(template.prefix.encode(), add_bos=False, special=True)
        assert prefix[0] == 2 and prefix[1] == tok.convert_tokens_to_ids("<start_of_turn>")
    finally:
        vocab.close()


# ---------------------------------------------------------------- logits


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_token_logits_match_hf(tiny, dtype):
    _, model, tok, f32, f16 = tiny
    ids = _prompt_ids(tok)
    max_abs, agree, cos = _compare(_llama_logits(f32 if dtype == "f32" else f16, ids), _hf_logits(model, ids))
    if dtype == "f32":
        assert max_abs < F32_MAX_ABS and agree == 1.0, (max_abs, agree)
    else:
        assert max_abs < F16_MAX_ABS and cos > F16_MIN_COS and agree == 1.0, (max_abs, cos, agree)


@pytest.mark.parametrize("mistake", ["no_norm_shift", "sliding_window_plus_one"])
def test_logit_parity_catches_conversion_mistakes(tiny, tmp_path, monkeypatch, mistake):
    """Negative controls: the parity check above fails for a writer with these bugs."""
    folder, model, tok, _, _ = tiny
    if mistake == "no_norm_shift":
        monkeypatch.setattr(export, "_NORM_SHIFT", 0.0)
    else:
        import dataclasses

        read_spec = export._read_spec
        monkeypatch.setattr(export, "_read_spec", lambda f: dataclasses.replace(read_spec(f), sliding_window=read_spec(f).sliding_window + 1))
    wrong = export.write_gguf(folder, tmp_path / "wrong.gguf", "f32")
    ids = _prompt_ids(tok)
    max_abs, _, _ = _compare(_llama_logits(wrong, ids), _hf_logits(model, ids))
    assert max_abs > 10 * F32_MAX_ABS


# ---------------------------------------------------------------- MedGemma-shaped VLM folders


def _vlm_config(text_fields: dict):
    from transformers import Gemma3Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    vocab = text_fields["vocab_size"]
    return Gemma3Config(text_config=text_fields, vision_config=vision.to_dict(), mm_tokens_per_image=4,
                        image_token_index=vocab - 1, boi_token_index=6, eoi_token_index=7)


@pytest.fixture(scope="module")
def medgemma_like(tmp_path_factory):
    """MedGemma-4b-it's text shape and rope/window config, 2 layers, 640 tokens + 64 spare rows.

    Written as transformers 5 keeps a Gemma3ForConditionalGeneration in memory (keys under
    ``model.language_model.``, a vision tower and projector beside it), in fp16, with random
    weights drawn directly (HF's init of ~190M parameters is slow). The two layers are
    [sliding, full] so both ropes run: theta 1e4 on the sliding layer, 1e6 scaled x8 on the
    global one. (With 5:1 and 2 layers no global layer would exist.)
    """
    from safetensors.torch import save_file
    from transformers import Gemma3ForConditionalGeneration

    folder = tmp_path_factory.mktemp("medgemma-like")
    tok = build_tiny_tokenizer()
    text = dict(
        model_type="gemma3_text", vocab_size=len(tok) + 64, hidden_size=2560, intermediate_size=10240, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=131072, rms_norm_eps=1e-6,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    config = _vlm_config(text)
    with torch.device("meta"):
        skeleton = Gemma3ForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, param in skeleton.state_dict().items():
        std = 0.2 if name.endswith("norm.weight") else 0.02
        state[name] = (torch.randn(param.shape, generator=generator) * std).to(torch.float16)
    state.pop("lm_head.weight", None)  # tied
    assert any(k.startswith("model.language_model.") for k in state) and any(k.startswith("model.vision_tower.") for k in state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, tok


def test_medgemma_shaped_vlm_converts_with_its_rope_window_and_padded_vocab(medgemma_like, tmp_path):
    folder, tok = medgemma_like
    path = export.write_gguf(folder, tmp_path / "medgemma-like-f16.gguf", "f16")
    fields, tensors = _fields(path)
    assert fields["gemma3.rope.scaling.type"] == "linear"
    assert fields["gemma3.rope.scaling.factor"] == pytest.approx(8.0)
    assert fields["gemma3.rope.freq_base"] == pytest.approx(1e6)
    assert fields["gemma3.rope.freq_base_swa"] == pytest.approx(1e4)
    assert fields["gemma3.attention.sliding_window"] == 1024
    assert fields["gemma3.attention.sliding_window_pattern"] == 2
    assert (fields["gemma3.attention.head_count"], fields["gemma3.attention.head_count_kv"]) == (8, 4)
    assert (fields["gemma3.attention.key_length"], fields["gemma3.embedding_length"]) == (256, 2560)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(tok) + 64 == tensors["token_embd.weight"].shape[1]
    assert tokens[len(tok)] == f"[PAD{len(tok)}]" and set(types[len(tok):]) == {gguf.TokenType.UNUSED}
    assert len(tensors) == 2 + 13 * 2  # no vision tower, no projector, no tied lm_head

    ids = _prompt_ids(tok, length=48)
    reference = load_hf_text_model(folder)
    max_abs, agree, cos = _compare(_llama_logits(path, ids), _hf_logits(reference, ids))
    # Measured: max|d| 3.5e-3 (logits up to ~25), cosine 0.9999997, 100% argmax. Without the x8
    # rope scaling: max|d| 0.93, cosine 0.98.
    assert max_abs < 2e-2 and cos > F16_MIN_COS and agree == 1.0, (max_abs, cos, agree)


def test_tiny_vlm_saved_by_transformers_converts_its_text_half(tmp_path):
    """save_pretrained writes ``language_model.model.*`` keys: the other VLM layout."""
    from safetensors import safe_open
    from transformers import Gemma3ForConditionalGeneration

    tok = build_tiny_tokenizer()
    text = build_tiny_llm(get_config("tiny"), vocab_size=len(tok)).config.to_dict()
    torch.manual_seed(0)
    vlm = Gemma3ForConditionalGeneration(_vlm_config(text)).eval()
    with torch.no_grad():
        for name, param in vlm.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0, 0.2)
    vlm.save_pretrained(tmp_path / "vlm")
    tok.save_pretrained(tmp_path / "vlm")
    with safe_open(str(tmp_path / "vlm" / "model.safetensors"), framework="pt") as handle:
        assert any(k.startswith("language_model.model.") for k in handle.keys())
    path = export.write_gguf(tmp_path / "vlm", tmp_path / "vlm.gguf", "f32")
    ids = _prompt_ids(tok, length=40)
    max_abs, agree, _ = _compare(_llama_logits(path, ids), _hf_logits(vlm, ids))
    assert max_abs < F32_MAX_ABS and agree == 1.0, (max_abs, agree)


def test_transformers_4_rope_fields_of_a_sparse_medgemma_config_are_read(tmp_path):
    """MedGemma-4b-it's config.json (4.x era) omits most text fields and uses rope_scaling."""
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = export._read_spec(tmp_path)
    assert (spec.heads, spec.kv_heads, spec.head_dim, spec.n_layers, spec.swa_period) == (8, 4, 256, 34, 6)
    assert (spec.rope_global, spec.rope_local, spec.rope_scaling) == (1e6, 1e4, ("linear", 8.0))
    assert spec.sliding_window == 1024 and spec.is_vlm and spec.tied


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "not a Gemma 3 model"),
        ({"query_pre_attn_scalar": 64}, "query_pre_attn_scalar"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ({"hidden_activation": "silu"}, "hidden_activation"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}}, "sliding layers"),
        ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "yarn"),
    ],
)
def test_configs_llama_cpp_cannot_represent_are_refused(tiny, tmp_path, edit, message):
    folder = tiny[0]
    config = json.loads((folder / "config.json").read_text())
    config.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=message) as info:
        export.write_gguf(tmp_path, tmp_path / "out.gguf")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out.gguf").exists()


def test_bad_inputs_are_one_line_errors(tiny, tmp_path):
    folder, _, _, f16, _ = tiny
    with pytest.raises(ModelError, match="config.json"):
        export.write_gguf(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(UsageError, match="dtype"):
        export.write_gguf(folder, tmp_path / "x.gguf", dtype="q4_k_m")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelError, match="model.safetensors"):
        export.write_gguf(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(UsageError, match="quant"):
        export.quantize_gguf(f16, tmp_path / "x.gguf", "q3_k")
    with pytest.raises(ModelError, match="no GGUF"):
        export.quantize_gguf(tmp_path / "missing.gguf", tmp_path / "x.gguf", "q8_0")
    (tmp_path / "garbage.gguf").write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ModelError, match="could not quantize"):
        export.quantize_gguf(tmp_path / "garbage.gguf", tmp_path / "x.gguf", "q8_0")
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------- quantization


# Measured on the 48-token prompt: q8_0 cosine 0.9996, q4_k_m 0.987, both 100% argmax. Tiny
# random models are harsh on quantization (85% argmax for Q8_0 was seen with llama.cpp's own converter), so the bounds
# are loose, yet a broken file (wrong types, garbage weights) fails them.
@pytest.mark.parametrize("quant, min_cos, min_agree", [("q8_0", 0.999, 0.9), ("q4_k_m", 0.95, 0.8)])
def test_quantized_gguf_is_smaller_and_still_computes(tiny, tmp_path, quant, min_cos, min_agree):
    _, model, tok, _, f16 = tiny
    path = export.quantize_gguf(f16, tmp_path / f"tiny-{quant}.gguf", quant, threads=2)
    assert path.stat().st_size < f16.stat().st_size
    _, tensors = _fields(path)
    # 128-wide rows fit Q8_0's 32-blocks but not Q4_K's 256: llama.cpp falls back for those.
    if quant == "q8_0":
        assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    ids = _prompt_ids(tok, length=48)
    _, agree, cos = _compare(_llama_logits(path, ids), _hf_logits(model, ids))
    assert cos > min_cos and agree >= min_agree, (cos, agree)


def test_quant_names_and_defaults():
    assert set(export.DEFAULT_QUANTS) <= set(export.QUANTS)
    assert export.QUANTS == ("f32", "f16", "q8_0", "q4_k_m")


# ---------------------------------------------------------------- tokenizer.model route


def test_sentencepiece_tokenizer_model_route_matches_sentencepiece(tmp_path):
    """A folder with tokenizer.model (as MedGemma ships) goes through SentencePiece's own pieces."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    import io

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 3), model_writer=buffer, vocab_size=400, model_type="bpe", byte_fallback=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=["<start_of_turn>", "<end_of_turn>"], user_defined_symbols=["\n", "\n\n", "<start_of_image>", "<end_of_image>"],
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        character_coverage=1.0, allow_whitespace_only_pieces=True, minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    build_tiny_llm(get_config("tiny"), vocab_size=processor.vocab_size()).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(buffer.getvalue())
    path = export.write_gguf(tmp_path, tmp_path / "spm.gguf", "f32")

    fields, _ = _fields(path)
    types = fields["tokenizer.ggml.token_type"]
    assert types[processor.piece_to_id("\n\n")] == gguf.TokenType.USER_DEFINED
    assert types[processor.piece_to_id("<start_of_turn>")] == gguf.TokenType.CONTROL
    vocab = _vocab(path)
    try:
        for text in [*SPANISH, *_CORPUS, *_random_unicode(random.Random(1), 50)]:
            got = vocab.tokenize(text.encode(), add_bos=False, special=True)
            if "<start_of_turn>" not in text:
                assert got == processor.encode(text), text
            assert vocab.detokenize(got, special=True) == text.encode(), text
        ids = vocab.tokenize(DEFAULT_TEMPLATE.prefix.encode(), add_bos=False, special=True)
        assert ids[:2] == [2, processor.piece_to_id("<start_of_turn>")] and ids[-1] == processor.piece_to_id("<start_of_image>")
    finally:
        vocab.close()


# ---------------------------------------------------------------- synthetic models


def test_synthetic_text_model_builder_writes_a_sharded_folder_that_converts(tiny, tmp_path):
    folder = tiny[0]
    shape = dict(vocab_size=len(tiny[2]) + 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=16, max_position_embeddings=512)
    out = build_synthetic_text_model(tmp_path / "synthetic", shape, tokenizer_dir=folder, shard_bytes=64 << 10)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    done = []
    path = export.write_gguf(out, tmp_path / "synthetic.gguf", "f16", progress=lambda i, n: done.append((i, n)))
    assert done[-1][0] == done[-1][1] == len(done)
    model = load_hf_text_model(out)
    ids = _prompt_ids(tiny[2], length=24)
    max_abs, agree, _ = _compare(_llama_logits(path, ids), _hf_logits(model, ids))
    assert max_abs < F16_MAX_ABS and agree == 1.0, (max_abs, agree)
