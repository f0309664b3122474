"""Frontend -> ONNX: one fp32 graph, its parity with PyTorch, and static INT8.

The whole frontend (encoder, U-Net, sigmoid, exact area pooling, Conv1x1, concat, MLP) is
exported as ONE graph with input "image" [batch, 3, S, S] and outputs "visual_tokens"
[batch, N_p, D_llm] and "masks" [batch, K, S, S]. One graph rather than three chained ones
(encoder, segmenter, fusion): measured on the demo preset at batch 1 on 2 CPU threads, the
single graph was 3-7 % faster in most repeats, and it needs one session, no host round trip of
the features and maps, and one file to ship and check.

Timings always run in a separate process without torch (``radixpert.runtime.frontend``), never
next to torch: their thread pools fight (3-20x slowdowns in one process).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from radixpert.config import RadixpertConfig
from radixpert.errors import ModelError, UsageError, first_line
from radixpert.model import Frontend
from radixpert.runtime.frontend import CPU, EVIDENCE_NAME, INPUT_NAME, OUTPUT_NAMES, OnnxFrontend, diff_stats

OPSET = 20
# Protobuf refuses messages over 2 GiB; keep a margin for the graph itself.
INLINE_LIMIT_BYTES = 1_800_000_000
MAX_EXPORT_BATCH = 4096


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (batch-norm running statistics, as inference runs), then the caller's modes back.

    Modes are restored per submodule: a training model keeps its frozen experts in eval mode.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def _export(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    out_path: Path,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """torch.onnx (dynamo) export with a dynamic batch on every input, saved and checked."""
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    large = _tensor_bytes(module) > INLINE_LIMIT_BYTES
    try:
        with _eval_mode(module), warnings.catch_warnings():
            # Graphs with two batched inputs share one Dim; the exporter's note about it is noise.
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
            program = torch.onnx.export(
                module,
                example,
                dynamo=True,
                opset_version=OPSET,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes={name: {0: batch} for name in input_names},
                verbose=False,
            )
    except Exception as exc:  # the dynamo exporter raises many error types
        raise ModelError(
            f"ONNX export of {type(module).__name__} failed ({exc.__class__.__name__}: {first_line(exc)}); "
            "check that torch, onnx and onnxscript match the versions in pyproject.toml"
        ) from exc
    if program is None:
        raise ModelError(f"ONNX export of {type(module).__name__} returned nothing; use the dynamo exporter")
    for key, value in (metadata or {}).items():
        program.model.metadata_props[key] = value
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        # Over 2 GiB the weights go to "<name>.data" next to the graph; ORT and onnx find it there.
        program.save(str(out_path), external_data=large)
    except OSError as exc:
        raise ModelError(f"cannot write {out_path}: {exc.strerror or exc}") from None
    check_onnx(out_path, input_names, output_names)
    return out_path


def check_onnx(path: Path, input_names: Sequence[str], output_names: Sequence[str]) -> None:
    """onnx.checker (full, path-based so external data works) plus names and a dynamic batch."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ModelError(f"exported ONNX {path} failed onnx.checker: {first_line(exc)}") from None
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    if inputs != list(input_names) or outputs != list(output_names):
        raise ModelError(f"exported ONNX {path} has inputs {inputs} and outputs {outputs}, expected {list(input_names)} and {list(output_names)}")
    for value in list(graph.input) + list(graph.output):
        first = value.type.tensor_type.shape.dim[0]
        if first.HasField("dim_value"):
            raise ModelError(f"exported ONNX {path}: {value.name} has a fixed batch of {first.dim_value}; the batch axis must be dynamic")


def _example_images(config: RadixpertConfig, device: torch.device, batch: int = 2) -> torch.Tensor:
    # Batch 2, not 1: torch.export specializes sizes 0 and 1, which would pin the batch axis.
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, config.image_size, config.image_size, generator=generator).to(device)


def frontend_outputs(frontend: Frontend) -> list[str]:
    """The graph's output names: visual_tokens, masks, and evidence when an encoder head is attached."""
    return list(OUTPUT_NAMES) + ([EVIDENCE_NAME] if frontend.evidence is not None else [])


def _check_frontend_shapes(frontend: Frontend, config: RadixpertConfig, example: torch.Tensor) -> None:
    with torch.no_grad():
        tokens, masks = frontend(example)[:2]
    b, s = example.shape[0], config.image_size
    want_tokens = (b, config.num_visual_tokens, config.llm_dim)
    want_masks = (b, config.num_masks, s, s)
    if tuple(tokens.shape) != want_tokens or tuple(masks.shape) != want_masks:
        raise ModelError(
            f"frontend gives tokens {tuple(tokens.shape)} and masks {tuple(masks.shape)}, but config {config.name!r} "
            f"expects {want_tokens} and {want_masks}; export with the config it was built from"
        )


def frontend_metadata(config: RadixpertConfig, frontend: Frontend | None = None) -> dict[str, str]:
    """Facts a runtime can read from the ONNX file itself (ORT custom metadata)."""
    evidence = frontend.evidence if frontend is not None else None
    return {
        **({"radixpert.evidence_outputs": json.dumps(evidence.outputs)} if evidence is not None else {}),
        "radixpert.config": config.name,
        "radixpert.image_size": str(config.image_size),
        "radixpert.num_visual_tokens": str(config.num_visual_tokens),
        "radixpert.llm_dim": str(config.llm_dim),
        "radixpert.mask_names": json.dumps(list(config.mask_names)),
        "radixpert.input": "ImageNet-normalized float32 (batch, 3, S, S), letterboxed",
    }


def export_frontend(frontend: Frontend, config: RadixpertConfig, out_path: str | Path) -> Path:
    """Export the whole frontend as one fp32 ONNX graph with a dynamic batch axis."""
    example = _example_images(config, _device(frontend))
    with _eval_mode(frontend):
        _check_frontend_shapes(frontend, config, example)
    return _export(frontend, (example,), [INPUT_NAME], frontend_outputs(frontend), Path(out_path),
                   frontend_metadata(config, frontend))


# --------------------------------------------------------------------------- timing


def time_isolated(
    pipelines: Mapping[str, Sequence[Path]], image: np.ndarray, threads: int = 2, runs: int = 30, warmup: int = 3
) -> dict[str, dict[str, Any]]:
    """``radixpert.runtime.frontend.time_pipelines`` in a fresh process that never imports torch."""
    with tempfile.TemporaryDirectory(prefix="radixpert-time-") as tmp:
        image_path = Path(tmp) / "image.npy"
        np.save(image_path, np.ascontiguousarray(image, dtype=np.float32))
        spec = {
            "pipelines": {k: [str(p) for p in v] for k, v in pipelines.items()},
            "image": str(image_path),
            "threads": threads,
            "runs": runs,
            "warmup": warmup,
        }
        code = "from radixpert.runtime.frontend import _time_main; _time_main()"
        done = subprocess.run([sys.executable, "-c", code], input=json.dumps(spec), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ModelError(f"timing process failed: {tail[0][:300]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result.pop("_torch_loaded", False):
        raise ModelError("the timing process imported torch, so its numbers would be unreliable")
    return result


# --------------------------------------------------------------------------- parity


def frontend_parity(
    frontend: Frontend, onnx_path: str | Path, images: np.ndarray, providers: list[str] | None = None
) -> dict[str, Any]:
    """ORT (CPU unless ``providers``) vs PyTorch on the same images: max abs and relative L2 per output."""
    session = OnnxFrontend(onnx_path, providers=providers or [CPU])
    outputs = session.run_outputs(images)
    with _eval_mode(frontend), torch.no_grad():
        references = frontend(torch.from_numpy(np.ascontiguousarray(images)).to(_device(frontend)))
    result: dict[str, Any] = {name: diff_stats(outputs[name], ref.float().cpu().numpy())
                              for name, ref in zip(frontend_outputs(frontend), references)}
    if set(outputs) != set(result):
        raise ModelError(f"the ONNX frontend gives {sorted(outputs)}, PyTorch {sorted(result)}; re-export it")
    return {**result, "images": int(images.shape[0]), "providers": session.providers_used}


# --------------------------------------------------------------------------- static INT8


class _ImageReader:
    """Calibration batches of one image, fed to ORT's calibrator."""

    def __init__(self, images: np.ndarray):
        self._images = images
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._images):
            return None
        batch = self._images[self._next : self._next + 1]
        self._next += 1
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._next = 0


def _calibration_reader(images: np.ndarray) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    # Subclass at call time so the quantization tools load only when INT8 is asked for.
    class Reader(_ImageReader, CalibrationDataReader):
        pass

    return Reader(images)


def quantize_frontend_int8(
    onnx_path: str | Path,
    out_path: str | Path,
    calibration_images: np.ndarray,
    activation_type: str = "quint8",
) -> Path:
    """Static INT8 (QDQ, per-channel weights, MinMax calibration) after ``quant_pre_process``.

    ``calibration_images``: (N, 3, S, S) float32 model inputs, ideally real radiographs read
    with ``radixpert.imageio.read_image``. Activations are uint8 by default: on x86 CPUs ORT's
    u8s8 kernels are the fast path (asymmetric u8 and s8 give identical values; in interleaved
    timings on the demo frontend u8 was as fast as or faster than s8).
    Measured on the demo frontend (random weights, calibrated on 8 phantoms, checked on 4
    others): 1.7-2.05x faster than fp32 at batch 1 on 2 CPU threads; visual tokens rel L2
    0.016 (max abs 0.0025), masks rel L2 0.0012 (max abs 0.0015) against fp32 ORT.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(onnx_path), Path(out_path)
    if not src.is_file():
        raise ModelError(f"ONNX model {src} not found; export the frontend first")
    size = _input_size(src)
    images = np.asarray(calibration_images)
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1:] != (3, size, size) or images.dtype != np.float32:
        raise UsageError(f"calibration images must be float32 (N, 3, {size}, {size}), got {images.dtype} {images.shape}")
    act = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}.get(activation_type)
    if act is None:
        raise UsageError(f"activation_type must be quint8 or qint8, got {activation_type!r}")
    large = src.stat().st_size > INLINE_LIMIT_BYTES or any(src.parent.glob(src.name + ".data"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="radixpert-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            # Shape inference and graph fusions first, as ORT's docs ask for static quantization.
            # ONNX's own shape inference only: ORT's symbolic one (made for transformers) loses the
            # shape of the evidence head's ReduceMax (axes as an input since opset 18) and crashes.
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True, save_as_external_data=large,
                              all_tensors_to_one_file=True)
            quantize_static(
                str(prepared),
                str(dst),
                _calibration_reader(np.ascontiguousarray(images)),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=act,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                use_external_data_format=large,
            )
        except (ModelError, UsageError):
            raise
        except Exception as exc:
            raise ModelError(f"INT8 quantization of {src} failed ({exc.__class__.__name__}: {first_line(exc)})") from exc
    try:
        onnx.checker.check_model(str(dst))
    except Exception as exc:
        raise ModelError(f"quantized ONNX {dst} failed onnx.checker: {first_line(exc)}") from None
    return dst


def _input_size(path: Path) -> int:
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim if graph.input else []
    if len(graph.input) != 1 or graph.input[0].name != INPUT_NAME or len(dims) != 4 or not dims[2].HasField("dim_value"):
        raise ModelError(f"{path} is not a radixpert frontend (input must be 'image' (batch, 3, S, S))")
    return int(dims[2].dim_value)


def measure_int8(
    fp32_path: str | Path,
    int8_path: str | Path,
    images: np.ndarray,
    threads: int = 2,
    runs: int = 30,
    warmup: int = 3,
) -> dict[str, Any]:
    """INT8 vs fp32 in ONNX Runtime CPU: batch-1 median latencies and speed-up, and parity.

    Parity compares the two ORT sessions on ``images`` (int8 against the fp32 reference); the
    latencies come from a separate torch-free process. All values are JSON-ready for the manifest.
    """
    fp32 = OnnxFrontend(fp32_path, providers=[CPU], threads=threads)
    int8 = OnnxFrontend(int8_path, providers=[CPU], threads=threads)
    ref_tokens, ref_masks = fp32.run(images)
    tokens, masks = int8.run(images)
    timed = time_isolated({"fp32": [Path(fp32_path)], "int8": [Path(int8_path)]}, images[:1], threads, runs, warmup)
    fp32_ms, int8_ms = timed["fp32"]["median_ms"], timed["int8"]["median_ms"]
    return {
        "fp32_ms": fp32_ms,
        "int8_ms": int8_ms,
        "speedup": fp32_ms / int8_ms,
        "threads": threads,
        "runs": runs,
        "batch": 1,
        "visual_tokens": diff_stats(tokens, ref_tokens),
        "masks": diff_stats(masks, ref_masks),
        "images": int(images.shape[0]),
    }
