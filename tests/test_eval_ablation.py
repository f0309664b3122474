"""The ablation switches (use_lora, use_anatomy) and the ablation command end to end (tiny, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from radixpert.config import get_config
from radixpert.model import build_model, count_parameters


def test_use_anatomy_off_removes_the_masks_from_the_tokens():
    model = build_model(get_config("tiny", use_anatomy=False))
    fusion = model.frontend.fusion
    features = torch.randn(2, 196, 64)
    masks_a, masks_b = torch.rand(2, 5, 224, 224), torch.rand(2, 5, 224, 224)
    assert torch.equal(fusion(features, masks_a), fusion(features, masks_b))
    full = build_model(get_config("tiny"))
    assert not torch.equal(full.frontend.fusion(features, masks_a), full.frontend.fusion(features, masks_b))
    # same parameters either way: one code path, same export
    assert count_parameters(model) == count_parameters(full)


def test_use_lora_off_trains_only_the_fusion():
    model = build_model(get_config("tiny", use_lora=False))
    assert not hasattr(model.llm, "peft_config")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("frontend.fusion.") for name in trainable)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from radixpert.phantom import write_dataset

    return write_dataset(tmp_path_factory.mktemp("phantoms"), n=24, seed=6, size=256, workers=1, progress=False)


def test_run_without_lora_checkpoints_and_reloads(phantoms, tmp_path):
    from radixpert.export.merge import load_run, merge_lora
    from radixpert.train.data import read_table
    from radixpert.train.report import TrainSettings, train_report

    studies = read_table(phantoms)
    settings = TrainSettings(steps=2, batch_size=2, lr=1e-2, warmup_steps=1, eval_every=100, save_every=2, num_samples=0)
    model, _ = train_report(get_config("tiny", use_lora=False), studies[:8], [], settings, tmp_path, seed=0)
    checkpoint = tmp_path / "checkpoints" / "step-000002"
    assert (checkpoint / "fusion.safetensors").exists() and not (checkpoint / "adapter").exists()
    loaded, _, verified = load_run(tmp_path)
    assert verified and loaded.config.use_lora is False
    image = torch.randn(1, 3, 224, 224)
    model.eval()
    assert loaded.generate(image, 6, ignore_stop=True) == model.generate(image, 6, ignore_stop=True)
    assert merge_lora(loaded).llm is loaded.llm  # nothing to merge


def test_ablation_command_end_to_end(phantoms, tmp_path, capsys):
    """Every stage of the command at a token budget; the experts are given (their training is tested elsewhere)."""
    from safetensors.torch import save_file

    from radixpert.evaluation import cli as eval_cli
    from radixpert.model import Frontend

    frontend = Frontend(get_config("tiny"))
    save_file(frontend.encoder.state_dict(), str(tmp_path / "encoder.safetensors"))
    save_file(frontend.segmenter.state_dict(), str(tmp_path / "segmenter.safetensors"))
    out = tmp_path / "ablation"
    try:
        eval_cli.main(["ablation", "--data", str(phantoms), "--out", str(out), "--steps", "2", "--batch-size", "1",
                       "--encoder", str(tmp_path / "encoder.safetensors"),
                       "--segmenter", str(tmp_path / "segmenter.safetensors"), "--llm-pretrain-steps", "1",
                       "--test-limit", "2", "--max-new-tokens", "4"])
    except SystemExit as exc:
        pytest.fail(f"exit {exc.code}: {capsys.readouterr().err}")
    summary = json.loads((out / "ablation.json").read_text())
    assert [v["variant"] for v in summary["variants"]] == ["base", "+LoRA", "+anatomy (full)"]
    assert [(v["use_lora"], v["use_anatomy"]) for v in summary["variants"]] == [(False, False), (True, False), (True, True)]
    table = (out / "ablation.md").read_text()
    assert "| base |" in table and "| +anatomy (full) |" in table and "swap rate" in table
    for slug in ("base", "lora", "full"):
        assert (out / slug / "eval" / "per_study.csv").exists()
        assert len((out / slug / "predictions.jsonl").read_text().splitlines()) == 2
    assert "| +LoRA |" in capsys.readouterr().out
