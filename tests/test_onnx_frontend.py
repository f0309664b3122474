"""The frontend as one ONNX graph: parity with PyTorch, dynamic batch, torch-free runtime, INT8, errors."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch

from radixpert.config import get_config
from radixpert.errors import InputError, ModelError, UsageError
from radixpert.export.onnx_frontend import (
    export_frontend,
    frontend_parity,
    measure_int8,
    quantize_frontend_int8,
)
from radixpert.imageio import read_image
from radixpert.model import Frontend
from radixpert.phantom import write_dataset
from radixpert.runtime.frontend import (
    CPU,
    CUDA,
    TENSORRT,
    OnnxFrontend,
    available_providers,
    default_providers,
    parse_providers,
)


@pytest.fixture(scope="module")
def config():
    return get_config("tiny")


@pytest.fixture(scope="module")
def frontend(config):
    torch.manual_seed(1234)
    return Frontend(config).eval()


@pytest.fixture(scope="module")
def onnx_path(frontend, config, tmp_path_factory):
    return export_frontend(frontend, config, tmp_path_factory.mktemp("onnx") / "frontend.onnx")


@pytest.fixture(scope="module")
def images(config, tmp_path_factory):
    """Two random normal images and one phantom radiograph read from DICOM, as the runtime would."""
    out = tmp_path_factory.mktemp("phantoms")
    with open(write_dataset(out, n=2, seed=0, size=256, workers=1, progress=False), encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    phantom = read_image(out / rows[0]["DicomPath"], size=config.image_size).model_input
    noise = np.random.default_rng(0).standard_normal((2, 3, config.image_size, config.image_size)).astype(np.float32)
    return np.concatenate([noise, phantom[None]]).astype(np.float32)


def test_exported_graph_has_the_documented_signature(onnx_path, config):
    model = onnx.load(str(onnx_path))
    (image,) = model.graph.input
    assert image.name == "image"
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, config.image_size, config.image_size]
    assert [o.name for o in model.graph.output] == ["visual_tokens", "masks"]
    assert all(o.type.tensor_type.shape.dim[0].dim_param for o in model.graph.output)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["radixpert.config"] == "tiny" and meta["radixpert.num_visual_tokens"] == str(config.num_visual_tokens)


def test_onnxruntime_matches_pytorch(frontend, onnx_path, images, config):
    report = frontend_parity(frontend, onnx_path, images)
    assert report["images"] == 3
    for name in ("visual_tokens", "masks"):
        assert report[name]["max_abs"] < 1e-4, (name, report[name])
        assert report[name]["rel_l2"] < 1e-5, (name, report[name])
    session = OnnxFrontend(onnx_path, threads=1)
    tokens, masks = session.run(images)
    assert tokens.shape == (3, config.num_patches, config.llm_dim) and tokens.dtype == np.float32
    assert masks.shape == (3, config.num_masks, config.image_size, config.image_size)
    assert session.providers_used[-1] == CPU
    assert (session.image_size, session.num_tokens, session.token_dim, session.num_masks) == (
        config.image_size, config.num_patches, config.llm_dim, config.num_masks)


def test_region_tokens_export_and_match_pytorch(images, tmp_path):
    config = get_config("tiny", region_tokens=True)
    torch.manual_seed(1234)
    frontend = Frontend(config).eval()
    frontend.fusion.region_anchors.normal_()  # the LLM's name embeddings, here random
    path = export_frontend(frontend, config, tmp_path / "frontend.onnx")
    report = frontend_parity(frontend, path, images)
    assert report["visual_tokens"]["max_abs"] < 1e-4 and report["visual_tokens"]["rel_l2"] < 1e-5, report
    session = OnnxFrontend(path, threads=1)
    tokens, _ = session.run(images)
    assert session.num_tokens == config.num_visual_tokens == config.num_patches + 2 * config.num_masks
    assert tokens.shape == (3, config.num_visual_tokens, config.llm_dim)


def test_dynamic_batch_rows_match_single_image_runs(onnx_path, images):
    session = OnnxFrontend(onnx_path, threads=1)
    batch4 = np.concatenate([images, images[:1] * 0.5])
    tokens4, masks4 = session.run(batch4)
    assert tokens4.shape[0] == masks4.shape[0] == 4
    for i in range(4):
        tokens1, masks1 = session.run(batch4[i : i + 1])
        np.testing.assert_allclose(tokens4[i], tokens1[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(masks4[i], masks1[0], rtol=0, atol=1e-6)


NO_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "torchvision", "transformers", "peft", "onnx", "onnxscript"}:
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, NoTorch())
    import numpy as np
    from radixpert.runtime.frontend import OnnxFrontend, available_providers

    session = OnnxFrontend(sys.argv[1], threads=1)
    tokens, masks = session.run(np.zeros((2, 3, session.image_size, session.image_size), np.float32))
    assert not any(m.split(".")[0] in {"torch", "onnx"} for m in sys.modules), "torch or onnx was imported"
    print("ran", tokens.shape, masks.shape, session.providers_used, available_providers())
    """
)


def test_runtime_runs_where_torch_cannot_be_imported(onnx_path, config):
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(onnx_path)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"ran (2, {config.num_patches}, {config.llm_dim}) (2, {config.num_masks}" in done.stdout


def test_int8_runs_and_stays_close_to_fp32(onnx_path, images, config, tmp_path):
    int8_path = quantize_frontend_int8(onnx_path, tmp_path / "frontend-int8.onnx", images)
    ops = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    tokens, masks = OnnxFrontend(int8_path, threads=1).run(images)
    assert tokens.shape == (3, config.num_patches, config.llm_dim)
    assert masks.shape == (3, config.num_masks, config.image_size, config.image_size)
    report = measure_int8(onnx_path, int8_path, images, threads=1, runs=2, warmup=0)
    # Measured on this tiny random frontend: tokens rel L2 ~0.015, masks rel L2 ~0.0013 (max abs ~0.002).
    assert report["visual_tokens"]["rel_l2"] < 0.1, report
    assert report["masks"]["rel_l2"] < 0.02 and report["masks"]["max_abs"] < 0.05, report
    assert report["speedup"] == pytest.approx(report["fp32_ms"] / report["int8_ms"])


def test_int8_refuses_bad_calibration_images(onnx_path, tmp_path):
    with pytest.raises(UsageError):
        quantize_frontend_int8(onnx_path, tmp_path / "q.onnx", np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ModelError):
        quantize_frontend_int8(tmp_path / "missing.onnx", tmp_path / "q.onnx", np.zeros((1, 3, 8, 8), np.float32))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def test_missing_and_corrupt_models_are_model_errors(tmp_path):
    with pytest.raises(ModelError) as missing:
        OnnxFrontend(tmp_path / "nope.onnx")
    assert "not found" in _one_line(missing)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage, not a protobuf" * 10)
    with pytest.raises(ModelError) as bad:
        OnnxFrontend(corrupt)
    assert "corrupt.onnx" in _one_line(bad)
    # A valid ONNX that is not a frontend.
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other", [x], [y])
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(other))
    with pytest.raises(ModelError) as wrong:
        OnnxFrontend(other)
    assert "not a radixpert frontend" in _one_line(wrong)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((3, 224, 224), np.float32),  # one image without the batch axis
        np.zeros((1, 3, 112, 112), np.float32),  # wrong size
        np.zeros((1, 1, 224, 224), np.float32),  # grayscale
        np.zeros((0, 3, 224, 224), np.float32),  # empty batch
        np.zeros((1, 3, 224, 224), np.float64),  # wrong dtype
        np.full((1, 3, 224, 224), np.nan, np.float32),
        [[0.0]],
    ],
)
def test_bad_inputs_are_input_errors(onnx_path, bad):
    with pytest.raises(InputError) as err:
        OnnxFrontend(onnx_path).run(bad)
    _one_line(err)


def test_provider_parsing_and_order():
    assert parse_providers("cuda,cpu") == [CUDA, CPU]
    assert parse_providers(" TensorRT , CPU,cpu ") == [TENSORRT, CPU]
    assert parse_providers("CPUExecutionProvider") == [CPU]
    for text in ("foo", "cuda,bar", " , "):
        with pytest.raises(UsageError) as err:
            parse_providers(text)
        _one_line(err)
    assert default_providers([CPU, CUDA, TENSORRT, "AzureExecutionProvider"]) == [TENSORRT, CUDA, CPU]
    assert default_providers([CPU]) == [CPU]
    assert CPU in available_providers() and default_providers()[-1] == CPU


def test_unavailable_provider_is_a_usage_error(onnx_path):
    if CUDA in available_providers():
        pytest.skip("this onnxruntime build offers CUDA")
    with pytest.raises(UsageError) as err:
        OnnxFrontend(onnx_path, providers=[CUDA, CPU])
    assert "cuda" in _one_line(err)
    with pytest.raises(UsageError):
        OnnxFrontend(onnx_path, threads=0)
