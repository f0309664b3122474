"""Report training on phantoms: loss falls, experts stay frozen, resume is exact, DDP ranks agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from radixpert.config import get_config
from radixpert.model import Frontend, build_model
from radixpert.train.cli import cli
from radixpert.train.data import ImageCache, patient_split, read_table, select
from radixpert.train.report import (
    SIDED_LABELS,
    TrainSettings,
    sample_scores,
    side_targets,
    side_token_weights,
    train_report,
)

SETTINGS = dict(steps=100, batch_size=4, lr=2e-2, warmup_steps=5, eval_every=50, save_every=50, num_samples=1)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from radixpert.phantom import write_dataset

    return write_dataset(tmp_path_factory.mktemp("phantoms"), n=64, seed=0, size=256)


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> tuple[str, str]:
    """Frozen expert weights as files, as a user passes them with encoder_path / segmenter_path."""
    folder = tmp_path_factory.mktemp("experts")
    torch.manual_seed(7)
    frontend = Frontend(get_config("tiny"))
    save_file(frontend.encoder.state_dict(), str(folder / "encoder.safetensors"))
    save_file(frontend.segmenter.state_dict(), str(folder / "segmenter.safetensors"))
    return str(folder / "encoder.safetensors"), str(folder / "segmenter.safetensors")


@pytest.fixture(scope="module")
def splits(phantoms):
    studies = read_table(phantoms)
    split = patient_split(studies, seed=0)
    return select(studies, split["train"]), select(studies, split["val"])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, splits, experts):
    config = get_config("tiny", encoder_path=experts[0], segmenter_path=experts[1])
    out = tmp_path_factory.mktemp("full")
    model, rows = train_report(config, *splits, TrainSettings(**SETTINGS), out, seed=0)
    return config, model, rows, out


def test_loss_halves_over_100_steps(full_run, splits):
    from radixpert.checks.labeler import label_report, present

    _, _, rows, out = full_run
    losses = [r["loss"] for r in rows]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"mean loss first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last <= 0.5 * first
    assert (out / "checkpoints" / "step-000100" / "adapter" / "adapter_model.safetensors").exists()
    assert "val_loss" in rows[-1] and isinstance(rows[-1]["samples"][0], str)
    # The logged micro-F1 scores the logged sample against its own held-out report, counted here.
    (sample,), reference = rows[-1]["samples"], splits[1][0].report
    said, truth = set(present(label_report(sample))), set(present(label_report(reference)))
    tp = len(said & truth)
    expected = 2 * tp / (len(said) + len(truth)) if tp else 0.0
    print(f"sample {sample!r} vs reference {reference!r}: micro-F1 {expected:.3f}")
    assert rows[-1]["val_micro_f1"] == pytest.approx(expected)


def test_experts_and_base_llm_are_bit_identical_after_training(full_run, experts):
    config, model, _, _ = full_run
    for module, path in zip((model.frontend.encoder, model.frontend.segmenter), experts):
        saved = load_file(path)
        assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())
    from radixpert.hf_models import load_llm

    base, _ = load_llm(config)
    trained = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in model.llm.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(trained[k], v) for k, v in base.state_dict().items())


def test_interrupted_then_resumed_run_repeats_the_same_losses(full_run, splits, tmp_path):
    config, _, rows, _ = full_run
    train_report(config, *splits, TrainSettings(**SETTINGS, stop_after=50), tmp_path, seed=0)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 50
    _, resumed = train_report(config, *splits, TrainSettings(**SETTINGS), tmp_path, resume=True, seed=0)
    assert [r["step"] for r in resumed] == list(range(51, 101))
    logged = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [r["loss"] for r in rows]


def test_side_weight_marks_where_each_side_word_starts():
    from radixpert.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()  # splits side words into pieces, unlike Gemma's vocabulary
    text = "Derrames pleurales bilaterales. Neumotórax izquierdo. Nódulo en la base derecha. Sin derrame."
    weights = side_token_weights(tokenizer, [text], 5.0)[0]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert len(weights) == len(encoded["input_ids"])
    marked = [text[a:b].strip() for (a, b), w in zip(encoded["offset_mapping"], weights) if w == 5.0]
    assert len(marked) == 3
    assert [m[:2].lower() for m in marked] == ["bi", "iz", "de"]  # not "Derrames" nor "derrame"


def test_side_weight_adds_loss_on_side_words_only(full_run, splits):
    config, model, _, _ = full_run
    image = torch.from_numpy(ImageCache(config.image_size).get(splits[1][0]).astype("float32"))[None]
    sided, unsided = "Neumotórax izquierdo. Derrame pleural derecho.", "Sin hallazgos. Silueta cardiaca normal."
    model.eval()

    def loss(report: str, weight: float) -> float:
        weights = side_token_weights(model.tokenizer, [model.template.target(report)], weight)
        return float(model(image, [report], weights))

    with torch.no_grad():
        assert loss(sided, 1.0) == pytest.approx(float(model(image, [sided])), rel=1e-5)
        extra_2, extra_4 = loss(sided, 2.0) - loss(sided, 1.0), loss(sided, 4.0) - loss(sided, 1.0)
        assert extra_2 > 0 and extra_4 == pytest.approx(3 * extra_2, rel=1e-3)
        assert loss(unsided, 4.0) == pytest.approx(loss(unsided, 1.0), rel=1e-6)


def test_init_from_starts_from_a_runs_weights_with_a_fresh_schedule(full_run, splits, tmp_path):
    config, trained, _, source = full_run
    settings = TrainSettings(**{**SETTINGS, "steps": 1, "lr": 0.0, "warmup_steps": 1, "init_from": str(source)})
    model, rows = train_report(config, splits[0], [], settings, tmp_path, seed=3)
    assert rows[0]["step"] == 1  # a new run, not a resume of the source
    expected = {k: v for k, v in trained.named_parameters() if v.requires_grad}
    for name, value in model.named_parameters():
        if value.requires_grad:
            torch.testing.assert_close(value, expected[name])
    # The same run without --init-from keeps its own start, which is not the source's weights.
    plain, _ = train_report(config, splits[0], [], TrainSettings(**{**SETTINGS, "steps": 1, "lr": 0.0, "warmup_steps": 1}),
                            tmp_path / "plain", seed=3)
    start = dict(plain.named_parameters())
    assert all(not torch.allclose(start[name], value) for name, value in expected.items()
               if name.endswith(("mask_proj.weight", "lora_B.default.weight")))


def test_side_targets_read_finding_and_side_from_the_report():
    targets = side_targets(["Derrame pleural derecho. Nódulo en el lóbulo superior izquierdo. Sin neumotórax.",
                            "Derrames pleurales bilaterales.", "Sin hallazgos."])
    column = {(label, side): 2 * i + j for i, label in enumerate(SIDED_LABELS) for j, side in enumerate(("left", "right"))}
    on = [{key for key, col in column.items() if row[col] == 1.0} for row in targets.tolist()]
    assert on == [{("pleural effusion", "right"), ("nodule", "left")},
                  {("pleural effusion", "left"), ("pleural effusion", "right")}, set()]


def test_side_probe_run_trains_the_probe_and_resumes_exactly(splits, experts, tmp_path):
    config = get_config("tiny", encoder_path=experts[0], segmenter_path=experts[1])
    settings = dict(steps=8, batch_size=4, lr=2e-2, warmup_steps=2, eval_every=8, save_every=4, num_samples=0,
                    side_weight=3.0, side_probe_weight=1.0)
    _, whole = train_report(config, *splits, TrainSettings(**settings), tmp_path / "whole", seed=0)
    assert all("side_probe_loss" in row for row in whole)
    assert whole[-1]["side_probe_loss"] < whole[0]["side_probe_loss"]
    train_report(config, *splits, TrainSettings(**settings, stop_after=4), tmp_path / "cut", seed=0)
    _, resumed = train_report(config, *splits, TrainSettings(**settings), tmp_path / "cut", resume=True, seed=0)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole[4:]]


def test_validation_scores_catch_a_side_swap_that_the_loss_would_not():
    references = ["Neumotórax izquierdo.", "Derrame pleural derecho. Cardiomegalia."]
    assert sample_scores(references, references) == {"val_micro_f1": 1.0, "val_laterality": 1.0, "val_laterality_checked": 2}
    swapped = ["Neumotórax derecho.", "Derrame pleural izquierdo. Cardiomegalia."]
    assert sample_scores(swapped, references)["val_laterality"] == 0.0
    assert sample_scores(swapped, references)["val_micro_f1"] == 1.0


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch.distributed as dist
    from pathlib import Path
    from safetensors.torch import save_file
    from radixpert.config import get_config
    from radixpert.train.data import patient_split, read_table, select
    from radixpert.train.report import TrainSettings, train_report

    csv_path, out = sys.argv[1], Path(sys.argv[2])
    studies = read_table(csv_path)
    split = patient_split(studies, seed=0)
    settings = TrainSettings(steps=6, batch_size=2, lr=2e-2, warmup_steps=2, eval_every=6, save_every=6, num_samples=0)
    model, _ = train_report(get_config("tiny"), select(studies, split["train"]), select(studies, split["val"]),
                            settings, out, seed=0)
    trained = {k: v.detach().contiguous() for k, v in model.named_parameters() if v.requires_grad}
    save_file(trained, str(out / f"rank{dist.get_rank()}.safetensors"))
    dist.destroy_process_group()
    """
)


def test_two_process_gloo_ddp_keeps_ranks_identical(phantoms, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(script), str(phantoms), str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / "run" / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    torch.manual_seed(0)  # the weights both ranks started from: train_report seeds before it builds
    initial = dict(build_model(get_config("tiny")).named_parameters())
    for key in ("frontend.fusion.mask_proj.weight", "frontend.fusion.projector.0.weight"):
        moved = (rank0[key] - initial[key]).abs().max().item()
        # Six AdamW steps at lr <= 2e-2 move a weight by at most about 6 x 2e-2 from where it began.
        assert 0 < moved <= 0.13, (key, moved)


def test_cli_help_and_bad_input(tmp_path):
    runner = CliRunner()
    for sub in ([], ["report"], ["split"], ["segmenter"], ["encoder"]):
        result = runner.invoke(cli, [*sub, "--help"])
        assert result.exit_code == 0 and "--" in result.output
    missing = subprocess.run([sys.executable, "-m", "radixpert.train.cli", "report", "--data", str(tmp_path / "no.csv"),
                              "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert missing.returncode == 3
    assert missing.stderr.strip().count("\n") == 0 and "not found" in missing.stderr
