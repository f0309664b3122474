"""TensorRT through ONNX Runtime's TensorRT provider. Without that provider (here and in CI) the
checks that need it skip; the wiring (provider options, engine cache, FP16 from the bundle, the
export step) is tested everywhere with ONNX Runtime's session creation observed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from radixpert.errors import ModelError
from radixpert.export.tensorrt import prebuild, tensorrt_available
from radixpert.runtime import frontend as fe

AVAILABLE, REASON = tensorrt_available()
needs_tensorrt = pytest.mark.skipif(not AVAILABLE, reason=f"TensorRT checks skipped: {REASON}")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    import torch

    from radixpert.config import get_config
    from radixpert.export.onnx_frontend import export_frontend
    from radixpert.model import Frontend

    config = get_config("tiny")
    torch.manual_seed(0)
    return export_frontend(Frontend(config).eval(), config, tmp_path_factory.mktemp("trt") / "frontend.onnx")


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 224, 224)).astype(np.float32)


def test_availability_answers_in_one_line():
    ok, reason = tensorrt_available()
    assert isinstance(ok, bool) and reason and "\n" not in reason
    assert ok == (fe.TENSORRT in fe.available_providers())


def test_prebuild_without_the_provider_is_a_model_error(monkeypatch, tiny_onnx):
    monkeypatch.setattr(fe, "available_providers", lambda: [fe.CPU])
    with pytest.raises(ModelError) as err:
        prebuild(tiny_onnx, _images(1))
    assert "TensorRT" in str(err.value) and "\n" not in str(err.value)


def test_the_export_step_records_why_fp16_stays_off(monkeypatch, tiny_onnx, tmp_path):
    from radixpert.export.pipeline import ExportOptions, tensorrt_step

    monkeypatch.setattr(fe, "available_providers", lambda: [fe.CPU])
    failures: list[str] = []
    files: list = []
    result = tensorrt_step(ExportOptions(tensorrt=True), None, tiny_onnx, tmp_path, _images(1), files, failures)
    assert result["fp16"] is False and "TensorRT" in result["reason"] and not files and not failures
    assert tensorrt_step(ExportOptions(), None, tiny_onnx, tmp_path, _images(1), files, failures)["fp16"] is False


def test_runtime_gives_the_provider_a_cache_keyed_by_the_model_and_fp16_only_when_allowed(monkeypatch, tiny_onnx, tmp_path):
    """The session gets TensorRT first with engine and timing caches under $RADIXPERT_CACHE/tensorrt."""
    monkeypatch.setenv("RADIXPERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fe, "available_providers", lambda: [fe.TENSORRT, fe.CPU])
    seen: list = []
    real = fe.create_session

    def observe(path, providers, threads=None):
        seen.append(list(providers))
        return real(path, [fe.CPU], threads)  # the real provider is not installed here

    monkeypatch.setattr(fe, "create_session", observe)
    fe.OnnxFrontend(tiny_onnx, threads=1)
    fe.OnnxFrontend(tiny_onnx, threads=1, tensorrt_fp16=True)
    (name, fp32), cpu = seen[0]
    assert name == fe.TENSORRT and cpu == fe.CPU
    cache = Path(fp32["trt_engine_cache_path"])
    assert cache.parent == tmp_path / "cache" / "tensorrt" and cache.is_dir()
    from radixpert.bundle import sha256_of

    assert cache.name == sha256_of(tiny_onnx)[:16]
    assert fp32["trt_engine_cache_enable"] == "True" and fp32["trt_timing_cache_path"] == str(cache)
    assert fp32["trt_fp16_enable"] == "False" and seen[1][0][1]["trt_fp16_enable"] == "True"


def test_reporter_takes_fp16_from_the_bundle(monkeypatch, tmp_path):
    from radixpert.runtime import pipeline

    made: list[bool] = []

    class Stop(Exception):
        pass

    def fake_frontend(path, providers=None, threads=None, tensorrt_fp16=False):
        made.append(tensorrt_fp16)
        raise Stop

    monkeypatch.setattr(pipeline, "OnnxFrontend", fake_frontend)
    for parity, expected in (({}, False), ({"tensorrt": {"fp16": False}}, False), ({"tensorrt": {"fp16": True}}, True)):
        bundle = SimpleNamespace(manifest={"parity": parity}, path_of=lambda role: tmp_path / f"{role}.onnx")
        with pytest.raises(Stop):
            pipeline.Reporter(bundle)
        assert made[-1] is expected


@needs_tensorrt
def test_fp16_cache_is_built_and_close_to_the_cpu_provider(monkeypatch, tiny_onnx, tmp_path):
    monkeypatch.setenv("RADIXPERT_CACHE", str(tmp_path))
    report = prebuild(tiny_onnx, _images(2), fp16=True)
    assert report["images"] == 2 and any((tmp_path / "tensorrt").rglob("*"))
    for name in ("visual_tokens", "masks"):
        assert report[name]["rel_l2"] < 2e-2, (name, report)
