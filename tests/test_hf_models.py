"""Tokenizer and LLM loading (radixpert.hf_models): tiny Gemma-style tokenizer, MedGemma-style VLM folders, BioViL."""

from __future__ import annotations

import pytest
import torch

from radixpert.config import get_config
from radixpert.errors import ModelError
from radixpert.prompt import DEFAULT_TEMPLATE, SPECIAL_TOKENS
from radixpert.tokenizer import build_tiny_tokenizer


def test_tiny_tokenizer_has_gemma_special_ids_and_round_trips_spanish():
    tok = build_tiny_tokenizer()
    assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>")] == [0, 1, 2, 3]
    for text in ["Índice cardiotorácico aumentado; niño, pequeña cuantía.", "Nódulo 12 mm ✓ 肺", "  dos  espacios\n"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    ids = tok(DEFAULT_TEMPLATE.prefix, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids("<start_of_image>")
    assert len(set(tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)))) == len(SPECIAL_TOKENS)


def test_tiny_tokenizer_is_deterministic():
    from radixpert import tokenizer as module

    first = build_tiny_tokenizer().backend_tokenizer.to_str()
    module._tiny_tokenizer_json.cache_clear()
    assert build_tiny_tokenizer().backend_tokenizer.to_str() == first


def _tiny_vlm(tmp_path):
    """A random Gemma3ForConditionalGeneration saved like MedGemma-4b-it (text + vision tower)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from radixpert.hf_models import build_tiny_llm

    text = build_tiny_llm(get_config("tiny"), vocab_size=700).config
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=699, boi_token_index=697, eoi_token_index=698)
    torch.manual_seed(0)
    vlm = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in vlm.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.2)
    vlm.save_pretrained(tmp_path / "vlm")
    return vlm


def test_text_half_of_a_gemma3_vlm_folder_matches_the_vlm(tmp_path):
    from radixpert.hf_models import load_hf_text_model

    vlm = _tiny_vlm(tmp_path)
    text_model = load_hf_text_model(tmp_path / "vlm")
    ids = torch.tensor([[2, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        expected = vlm(input_ids=ids).logits
        got = text_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    from radixpert.hf_models import load_hf_text_model

    with pytest.raises(ModelError, match="config.json"):
        load_hf_text_model(tmp_path)


def test_biovil_encoder_gives_the_papers_grid_and_loads_nested_checkpoints(tmp_path):
    pytest.importorskip("torchvision")
    from safetensors.torch import save_file
    from torchvision.models import resnet50

    from radixpert.model import BioViLEncoder, load_safetensors_into

    config = get_config("medgemma-4b")
    torch.manual_seed(1)
    reference = resnet50(weights=None, replace_stride_with_dilation=[False, False, True]).eval()
    # BioViL nests its ResNet under "encoder.encoder." next to a projector we do not use.
    state = {f"encoder.encoder.{k}": v for k, v in reference.state_dict().items()}
    state["projector.projection.weight"] = torch.zeros(128, 2048)
    save_file(state, str(tmp_path / "biovil.safetensors"))
    encoder = BioViLEncoder(config).eval()
    load_safetensors_into(encoder, tmp_path / "biovil.safetensors", "encoder")
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features = encoder(image)
        trunk = torch.nn.Sequential(*list(reference.children())[:-2])(image)
    assert features.shape == (1, 2048, 14, 14)
    torch.testing.assert_close(features, trunk)


def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path, tiny_model):
    from safetensors.torch import save_file

    from radixpert.model import load_safetensors_into

    save_file({"weight": torch.zeros(3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelError, match="does not fit"):
        load_safetensors_into(tiny_model.frontend.segmenter, tmp_path / "bad.safetensors", "segmenter")
