"""Stand-in expert pretraining on phantoms: the segmenter learns, the encoder learns, both save
weights that the report model loads strictly, and wrong inputs are refused in one line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from radixpert.errors import InputError, ModelError
from radixpert.model import TinyCNNEncoder, UNet, load_safetensors_into
from radixpert.train.data import ImageCache, patient_split, read_table, select
from radixpert.train.experts import ExpertSettings, evaluate_segmenter, train_encoder, train_segmenter


@pytest.fixture(scope="module")
def phantom_csv(tmp_path_factory):
    from radixpert.phantom import write_dataset

    return write_dataset(tmp_path_factory.mktemp("phantoms"), n=24, seed=5, size=256, workers=1, progress=False)


@pytest.fixture(scope="module")
def phantom_splits(phantom_csv):
    studies = read_table(phantom_csv)
    split = patient_split(studies, seed=0)
    return select(studies, split["train"]), select(studies, split["val"])


@pytest.fixture(scope="module")
def segmenter_run(phantom_splits, tiny_config, tmp_path_factory):
    train, val = phantom_splits
    out = tmp_path_factory.mktemp("seg")
    rows: list[dict] = []
    settings = ExpertSettings(steps=40, batch_size=4, lr=1e-2, seed=0, eval_every=20)
    metrics = train_segmenter(tiny_config, train, val, settings, out, progress=rows.append)
    return metrics, out, rows


def test_segmenter_improves_held_out_dice(segmenter_run, phantom_splits, tiny_config):
    metrics, out, rows = segmenter_run
    _, val = phantom_splits
    torch.manual_seed(0)
    untrained = evaluate_segmenter(UNet(tiny_config), tiny_config, val)
    assert set(metrics["dice"]) == set(tiny_config.mask_names)
    # A few dozen steps find the lungs (left/right and the small structures take hundreds).
    assert metrics["mean_dice"] > untrained["mean_dice"] + 0.1, (metrics["mean_dice"], untrained["mean_dice"])
    assert max(metrics["dice"]["right_lung"], metrics["dice"]["left_lung"]) > 0.5, metrics["dice"]
    assert metrics["untrained_mean_dice"] == untrained["mean_dice"]
    assert [r["step"] for r in rows] == list(range(1, 41)) and all(np.isfinite(r["loss"]) for r in rows)
    saved = json.loads((out / "segmenter_metrics.json").read_text())
    assert saved["mean_dice"] == metrics["mean_dice"] and saved["steps"] == 40


def test_segmenter_weights_load_strictly_and_reproduce_outputs(segmenter_run, phantom_splits, tiny_config):
    metrics, out, _ = segmenter_run
    _, val = phantom_splits
    fresh = UNet(tiny_config)
    load_safetensors_into(fresh, out / "segmenter.safetensors", "segmenter")  # strict load
    # The reloaded network scores exactly what the run reported, so it is the trained one.
    assert evaluate_segmenter(fresh, tiny_config, val) == {"dice": metrics["dice"], "mean_dice": metrics["mean_dice"]}
    # In frozen use (eval mode) the right-lung map covers part of a held-out image, not all or none.
    image = torch.from_numpy(ImageCache(tiny_config.image_size).get(val[0]).astype(np.float32))[None]
    with torch.no_grad():
        maps = torch.sigmoid(fresh.eval()(image))
    assert maps.shape == (1, tiny_config.num_masks, tiny_config.image_size, tiny_config.image_size)
    assert 0.02 < float((maps[0, 0] > 0.5).float().mean()) < 0.5


def test_segmenter_is_deterministic_by_seed(phantom_splits, tiny_config, tmp_path):
    train, val = phantom_splits
    settings = ExpertSettings(steps=2, batch_size=2, seed=3)
    losses = []
    for name in ("a", "b"):
        rows: list[dict] = []
        train_segmenter(tiny_config, train, val[:2], settings, tmp_path / name, progress=rows.append)
        losses.append([r["loss"] for r in rows])
    assert losses[0] == losses[1]
    weights = [(tmp_path / name / "segmenter.safetensors").read_bytes() for name in ("a", "b")]
    assert weights[0] == weights[1]


@pytest.mark.parametrize("pool", ["mean-max", "mean"])
def test_encoder_loss_falls_and_weights_load(phantom_splits, tiny_config, tmp_path, pool):
    """Whatever the temporary head pools, the saved encoder is the same network, loaded strictly."""
    train, val = phantom_splits
    rows: list[dict] = []
    settings = ExpertSettings(steps=30, batch_size=8, lr=3e-3, seed=0, augment=False, eval_every=0, pool=pool)
    metrics = train_encoder(tiny_config, train, val, settings, tmp_path, progress=rows.append)
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    encoder = TinyCNNEncoder(tiny_config)
    load_safetensors_into(encoder, tmp_path / "encoder.safetensors", "encoder")  # strict: no head, no prefix
    # The file holds the trained encoder, not the one the run started from (same seed, one step at
    # a negligible learning rate: lr must be positive).
    start = dataclasses.replace(settings, steps=1, lr=1e-12)
    train_encoder(tiny_config, train, val, start, tmp_path / "start")
    initial = TinyCNNEncoder(tiny_config)
    load_safetensors_into(initial, tmp_path / "start" / "encoder.safetensors", "encoder")
    trained_state, initial_state = encoder.state_dict(), initial.state_dict()
    assert all(not torch.allclose(trained_state[k], initial_state[k], atol=1e-4) for k in trained_state if k.endswith("weight"))
    # AUROC is undefined exactly where the held-out set lacks a class; the macro mean skips those.
    assert set(metrics["auroc"]) == {"cardiomegaly", "pleural effusion", "pneumothorax", "nodule", "consolidation"}
    undefined = [f for f, value in metrics["auroc"].items() if value is None]
    assert undefined == [f for f, prevalence in metrics["val_prevalence"].items() if prevalence in (0.0, 1.0)]
    defined = [value for value in metrics["auroc"].values() if value is not None]
    assert metrics["macro_auroc"] == (pytest.approx(np.mean(defined), abs=1e-4) if defined else None)
    assert json.loads((tmp_path / "encoder_metrics.json").read_text())["settings"]["pool"] == pool


def test_sided_encoder_targets_name_each_finding_side(phantom_splits):
    """With --sided, a right-lung finding and a left-lung finding get different targets."""
    from radixpert.train.experts import FINDINGS, encoder_targets
    from radixpert.train.report import SIDED_LABELS

    train, _ = phantom_splits
    study = dataclasses.replace(train[0], report="Derrame pleural derecho. Nódulo en el lóbulo superior izquierdo.",
                                labels=("pleural effusion", "nodule"))
    plain, sided = encoder_targets([study], sided=False), encoder_targets([study], sided=True)
    assert plain.shape == (1, len(FINDINGS)) and np.array_equal(sided[:, : len(FINDINGS)], plain)
    left_right = dict(zip(SIDED_LABELS, sided[0, len(FINDINGS):].reshape(-1, 2).tolist()))
    assert left_right["pleural effusion"] == [0.0, 1.0] and left_right["nodule"] == [1.0, 0.0]
    assert left_right["pneumothorax"] == [0.0, 0.0]


def test_sided_encoder_continues_from_earlier_weights(phantom_splits, tiny_config, tmp_path):
    """--init-from starts from the earlier encoder; the sided head's side AUROC is reported."""
    train, val = phantom_splits
    first = ExpertSettings(steps=2, batch_size=4, seed=0, augment=False, eval_every=0)
    train_encoder(tiny_config, train, val, first, tmp_path / "a")
    start = tmp_path / "a" / "encoder.safetensors"
    resumed = dataclasses.replace(first, steps=1, lr=1e-9, sided=True, init_from=str(start))
    metrics = train_encoder(tiny_config, train, val, resumed, tmp_path / "b")
    before, after = TinyCNNEncoder(tiny_config), TinyCNNEncoder(tiny_config)
    load_safetensors_into(before, start, "encoder")
    load_safetensors_into(after, tmp_path / "b" / "encoder.safetensors", "encoder")
    # The same run without --init-from: where run b would have started had the file been ignored.
    ignored = dataclasses.replace(resumed, init_from=None)
    train_encoder(tiny_config, train, val, ignored, tmp_path / "ignored")
    own_start = TinyCNNEncoder(tiny_config)
    load_safetensors_into(own_start, tmp_path / "ignored" / "encoder.safetensors", "encoder")
    weights = [key for key, value in before.state_dict().items() if key.endswith("weight")]
    for key in weights:  # BatchNorm running statistics move with any forward pass; the weights barely do
        torch.testing.assert_close(after.state_dict()[key], before.state_dict()[key], atol=1e-6, rtol=1e-6)
    assert all(not torch.allclose(own_start.state_dict()[key], before.state_dict()[key], atol=1e-4) for key in weights)
    assert "side_macro_auroc" in metrics and metrics["settings"]["sided"] is True


def test_encoder_refuses_weights_of_another_preset(phantom_splits, tiny_config, tmp_path):
    train, val = phantom_splits
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"body.0.weight": torch.zeros(1)}, str(wrong))
    with pytest.raises(ModelError) as info:
        train_encoder(tiny_config, train, val, ExpertSettings(steps=1, init_from=str(wrong)), tmp_path / "c")
    assert "\n" not in str(info.value) and "does not fit" in str(info.value)


def test_encoder_refuses_unknown_pooling(phantom_splits, tiny_config, tmp_path):
    train, val = phantom_splits
    with pytest.raises(InputError) as info:
        train_encoder(tiny_config, train, val, ExpertSettings(steps=1, pool="median"), tmp_path)
    assert "\n" not in str(info.value) and "mean-max" in str(info.value)
    assert not (tmp_path / "encoder.safetensors").exists()


def test_segmenter_refuses_studies_without_masks(phantom_splits, tiny_config, tmp_path):
    train, val = phantom_splits
    unmasked = [dataclasses.replace(train[0], mask_path=None)] + train[1:]
    with pytest.raises(InputError) as info:
        train_segmenter(tiny_config, unmasked, val, ExpertSettings(steps=1), tmp_path)
    assert "\n" not in str(info.value) and train[0].image_id in str(info.value)
    assert not (tmp_path / "segmenter.safetensors").exists()


def test_encoder_refuses_biovil(phantom_splits, tiny_config, tmp_path):
    train, val = phantom_splits
    with pytest.raises(InputError) as info:
        biovil = tiny_config.replace(encoder="biovil", vision_dim=2048)
        train_encoder(biovil, train, val, ExpertSettings(steps=1), tmp_path)
    assert "\n" not in str(info.value) and "encoder_path" in str(info.value)


def test_refuses_non_positive_steps(phantom_splits, tiny_config, tmp_path):
    from radixpert.errors import UsageError

    train, val = phantom_splits
    with pytest.raises(UsageError):
        train_segmenter(tiny_config, train, val, ExpertSettings(steps=0), tmp_path)


def test_cli_pool_is_an_encoder_option(phantom_csv, tmp_path):
    from click.testing import CliRunner

    from radixpert.train.cli import cli

    common = ["--data", str(phantom_csv), "--preset", "tiny", "--steps", "2", "--batch-size", "2"]
    result = CliRunner().invoke(cli, ["encoder", *common, "--out", str(tmp_path / "enc"), "--pool", "mean"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "enc" / "encoder_metrics.json").read_text())["settings"]["pool"] == "mean"
    refused = CliRunner().invoke(cli, ["segmenter", *common, "--out", str(tmp_path / "seg"), "--pool", "mean"])
    assert refused.exit_code == 2 and "--pool" in refused.output


def test_encoder_keeps_its_head_and_it_reproduces_the_training_scores(phantom_splits, tiny_config, tmp_path):
    """The sided head is saved beside the encoder; loaded back onto the encoder it gives the run's own logits."""
    from radixpert.model import EvidenceHead
    from radixpert.train.experts import _PresenceProbe, head_outputs

    train, val = phantom_splits
    settings = ExpertSettings(steps=3, batch_size=4, seed=0, augment=False, eval_every=0, sided=True)
    train_encoder(tiny_config, train, val, settings, tmp_path)
    head = EvidenceHead.load(tmp_path / "encoder_head.safetensors", tiny_config.vision_dim)
    assert head.outputs == head_outputs(sided=True) and head.outputs[0] == "presence:cardiomegaly"
    assert "left:nodule" in head.outputs and head.pool == "mean-max"
    probe = _PresenceProbe(tiny_config, "mean-max", head.outputs)
    load_safetensors_into(probe.encoder, tmp_path / "encoder.safetensors", "encoder")
    probe.head.linear.load_state_dict(head.linear.state_dict())
    image = torch.from_numpy(ImageCache(tiny_config.image_size).get(val[0]).astype(np.float32))[None]
    probe.eval()
    with torch.no_grad():
        features = probe.encoder(image)
        assert torch.allclose(head(features), torch.sigmoid(probe(image)), atol=1e-6)
        # Independent of EvidenceHead.pooled: the mean and the max over the grid, then the linear layer.
        by_hand = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1) @ head.linear.weight.T
        assert torch.allclose(head.logits(features), by_hand + head.linear.bias, atol=1e-5)


def test_encoder_head_probe_leaves_the_encoder_bit_identical(phantom_splits, tiny_config, tmp_path):
    """radixpert-train encoder-head: a linear probe on a frozen encoder; the encoder file never changes."""
    from radixpert.bundle import sha256_of
    from radixpert.model import EvidenceHead
    from radixpert.train.evidence import fit_encoder_head

    train, val = phantom_splits
    # A briefly trained encoder: an untrained one gives nearly the same features for every image.
    train_encoder(tiny_config, train, val, ExpertSettings(steps=30, batch_size=8, seed=0, augment=False, eval_every=0),
                  tmp_path / "enc")
    encoder = tmp_path / "enc" / "encoder.safetensors"
    before = sha256_of(encoder)
    metrics = fit_encoder_head(tiny_config, train, val, encoder, tmp_path / "head", steps=500)
    assert sha256_of(encoder) == before == metrics["encoder_sha256_after"]
    # The probe must beat the best constant predictor (each output's training prevalence).
    from radixpert.train.experts import encoder_targets

    targets = encoder_targets(train, sided=True)
    prevalence = np.clip(targets.mean(axis=0), 1e-6, 1 - 1e-6)
    constant = -np.mean(targets * np.log(prevalence) + (1 - targets) * np.log(1 - prevalence))
    assert metrics["final_train_loss"] < 0.8 * constant, (metrics["final_train_loss"], constant)
    head = EvidenceHead.load(tmp_path / "head" / "encoder_head.safetensors", tiny_config.vision_dim)
    assert head.outputs == metrics["outputs"]
    with pytest.raises(ModelError, match="does not fit"):
        EvidenceHead.load(tmp_path / "head" / "encoder_head.safetensors", tiny_config.vision_dim * 2)
