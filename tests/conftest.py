"""Shared fixtures: tiny random models built in code, no downloads."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_config():
    from radixpert.config import get_config

    return get_config("tiny")


@pytest.fixture()
def tiny_model(tiny_config):
    from radixpert.model import build_model

    return build_model(tiny_config)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A real tiny training run: a few steps on phantoms, checkpointed."""
    from radixpert.config import get_config
    from radixpert.phantom import write_dataset
    from radixpert.train.data import patient_split, read_table, select
    from radixpert.train.report import TrainSettings, train_report

    data = write_dataset(tmp_path_factory.mktemp("phantoms"), n=24, seed=3, size=256, workers=1)
    studies = read_table(data)
    split = patient_split(studies, seed=0)
    out = tmp_path_factory.mktemp("run")
    settings = TrainSettings(steps=40, batch_size=4, lr=2e-2, warmup_steps=4, eval_every=100, save_every=40, num_samples=0)
    config = get_config("tiny").replace(encoder_head_path=str(tiny_encoder_head(out / "encoder_head.safetensors")))
    train_report(config, select(studies, split["train"]), [], settings, out, seed=0)
    return out


def tiny_encoder_head(path: Path) -> Path:
    """A seeded, sided encoder head for the tiny encoder: the frontend's evidence output in tests."""
    import torch

    from radixpert.config import get_config
    from radixpert.model import EvidenceHead
    from radixpert.train.experts import head_outputs

    torch.manual_seed(5)
    EvidenceHead(get_config("tiny").vision_dim, head_outputs(sided=True)).save(path, "test encoder head")
    return path


@pytest.fixture(scope="session")
def bundle(run_dir, tmp_path_factory) -> tuple[Path, dict]:
    """That run exported with f32, f16 and q8_0 LLMs (built once per test session)."""
    from radixpert.export.pipeline import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    options = ExportOptions(quants=("f32", "f16", "q8_0"), samples=2, e2e_tokens=24, threads=2, calibration=24)
    manifest = export_bundle(run_dir, out, options)
    return out, manifest
