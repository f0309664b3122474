"""The one config and the one prompt template (both torch-free)."""

from __future__ import annotations

import pytest

from radixpert.config import PRESETS, RadixpertConfig, get_config
from radixpert.errors import UsageError
from radixpert.prompt import DEFAULT_TEMPLATE, PromptTemplate


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(tmp_path, name):
    config = get_config(name)
    path = tmp_path / "config.json"
    config.save(path)
    assert RadixpertConfig.load(path) == config


def test_configs_written_before_fields_were_removed_still_load():
    old = {**get_config("demo").to_dict(), "image_attention": "causal", "extra": {}}
    assert RadixpertConfig.from_dict(old) == get_config("demo")
    assert not hasattr(RadixpertConfig(), "image_attention") and not hasattr(RadixpertConfig(), "extra")


def test_paper_dimensions_are_fields():
    config = get_config("medgemma-4b")
    assert config.num_patches == 196 and config.grid_size == 14
    assert (config.vision_dim, config.num_masks, config.llm_dim) == (2048, 5, 2560)
    assert config.encoder == "biovil" and config.encoder_stride == 16
    demo = get_config("demo")
    assert demo.llm_dim == 640 and demo.llm == "gemma3_270m_package"


def test_overrides_are_typed():
    config = get_config("tiny", lora_rank="4", lora_dropout="0.1", lora_targets="q_proj,v_proj")
    assert config.lora_rank == 4 and config.lora_dropout == 0.1
    assert config.lora_targets == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    "call",
    [
        lambda: get_config("gpt-5"),
        lambda: get_config("tiny", no_such_field=1),
        lambda: get_config("tiny", lora_rank="many"),
        lambda: get_config("tiny", grid_size=15).validate(),
        lambda: get_config("medgemma-4b").validate(),  # no llm_path
        lambda: get_config("tiny", region_tokens=True, use_anatomy=False).validate(),
        lambda: RadixpertConfig.from_dict({"name": "x", "typo_field": 3}),
    ],
)
def test_bad_configs_fail_with_one_line(call):
    with pytest.raises(UsageError) as info:
        call()
    assert "\n" not in str(info.value)


def test_prompt_layout_puts_the_fixed_instruction_first():
    t = DEFAULT_TEMPLATE
    assert t.prefix.startswith("<bos><start_of_turn>user\n") and t.prefix.endswith("<start_of_image>")
    assert t.suffix == "<end_of_image><end_of_turn>\n<start_of_turn>model\n"
    assert t.target(" Derrame pleural derecho. ") == "Derrame pleural derecho.<end_of_turn>"
    assert "español" in t.instruction
    assert PromptTemplate.from_manifest(t.to_manifest()) == t
