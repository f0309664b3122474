"""The guarded TensorRT path. Engine tests need the tensorrt module and a CUDA GPU and skip elsewhere;
the availability checks run everywhere."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from radixpert.errors import ModelError, UsageError
from radixpert.export.tensorrt import TensorRTFrontend, build_engine, engine_parity, tensorrt_available

AVAILABLE, REASON = tensorrt_available()
needs_tensorrt = pytest.mark.skipif(not AVAILABLE, reason=f"TensorRT engine tests skipped: {REASON}")


def _gpu_and_tensorrt_present() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def test_tensorrt_available_answers_cleanly_here():
    ok, reason = tensorrt_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason and "\n" not in reason
    if not _gpu_and_tensorrt_present():
        assert ok is False


def test_missing_module_gives_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    ok, reason = tensorrt_available()
    assert ok is False and "tensorrt" in reason


def test_no_gpu_gives_a_reason(monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.0.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, reason = tensorrt_available()
    assert ok is False and "GPU" in reason


def test_build_engine_without_tensorrt_is_a_model_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    onnx_file = tmp_path / "frontend.onnx"
    onnx_file.write_bytes(b"placeholder")
    with pytest.raises(ModelError) as err:
        build_engine(onnx_file, tmp_path / "frontend.engine", max_batch=2)
    assert "TensorRT" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError):
        build_engine(onnx_file, tmp_path / "frontend.engine", max_batch=0)
    with pytest.raises(ModelError):
        TensorRTFrontend(tmp_path / "missing.engine")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from radixpert.export.onnx_frontend import export_frontend

    from radixpert.config import get_config
    from radixpert.model import Frontend

    config = get_config("tiny")
    torch.manual_seed(0)
    return export_frontend(Frontend(config).eval(), config, tmp_path_factory.mktemp("trt") / "frontend.onnx")


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 224, 224)).astype(np.float32)


@needs_tensorrt
def test_fp32_engine_matches_onnxruntime(tiny_onnx, tmp_path):
    engine = build_engine(tiny_onnx, tmp_path / "frontend-fp32.engine", max_batch=2, fp16=False)
    assert TensorRTFrontend(engine).max_batch == 2
    report = engine_parity(engine, tiny_onnx, _images(3))  # 3 > max_batch: runs in chunks
    assert report["images"] == 3
    for name in ("visual_tokens", "masks"):
        assert report[name]["rel_l2"] < 1e-3, (name, report)


@needs_tensorrt
def test_fp16_engine_is_close_to_onnxruntime(tiny_onnx, tmp_path):
    engine = build_engine(tiny_onnx, tmp_path / "frontend-fp16.engine", max_batch=4, fp16=True)
    report = engine_parity(engine, tiny_onnx, _images(2))
    for name in ("visual_tokens", "masks"):
        assert report[name]["rel_l2"] < 2e-2, (name, report)
