"""Optional TensorRT engine for the frontend, built from ``frontend.onnx`` on the target GPU.

UNTESTED HERE: TensorRT cannot be installed where this project is developed and CI has no GPU
(BRIEF section 6). The code follows NVIDIA's documented TensorRT 10 Python API (Builder,
OnnxParser, IBuilderConfig with an optimization profile, build_serialized_network; Runtime,
ICudaEngine and IExecutionContext with named I/O tensors and execute_async_v3). Everything is
imported lazily and guarded: without TensorRT or a CUDA GPU, ``tensorrt_available`` says why
and the other functions raise a one-line ModelError.

Engines are specific to one GPU architecture and TensorRT version: build them on the machine
that runs them. ONNX Runtime's TensorRT execution provider (``radixpert.runtime.frontend``) is
the other way to use TensorRT, with no plan file to manage.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from radixpert.errors import InputError, ModelError, UsageError
from radixpert.runtime.frontend import CPU, INPUT_NAME, OUTPUT_NAMES, OnnxFrontend, diff_stats

WORKSPACE_BYTES = 4 << 30


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else exc.__class__.__name__)[:300]


def tensorrt_available() -> tuple[bool, str]:
    """(True, what was found) or (False, why not): the ``tensorrt`` module and a CUDA GPU."""
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as exc:  # ImportError, or a stub package that fails on import
        return False, f"the tensorrt Python module is not importable ({exc.__class__.__name__}); install TensorRT 10 from NVIDIA's index on a CUDA machine"
    try:
        import torch
    except Exception:
        return False, "torch is not importable; the TensorRT path uses torch CUDA tensors for its buffers"
    try:
        has_gpu = bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except Exception as exc:
        return False, f"CUDA could not be queried ({_first_line(exc)})"
    if not has_gpu:
        return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    version = getattr(trt, "__version__", "unknown")
    return True, f"TensorRT {version} on {torch.cuda.get_device_name(0)}"


def _require_tensorrt() -> Any:
    ok, reason = tensorrt_available()
    if not ok:
        raise ModelError(f"TensorRT is not usable here: {reason}")
    return importlib.import_module("tensorrt")


def _keep_fp32(network: Any, trt: Any) -> int:
    """Pin normalization and reduction layers to FP32 under the FP16 flag.

    LayerNorm (and its decomposed ReduceMean/Pow form) overflows or loses precision in FP16.
    The current frontend has none (batch norms fold into convolutions), so this guards future
    encoders; it returns how many layers it pinned.
    """
    kinds = {getattr(trt.LayerType, name) for name in ("NORMALIZATION", "REDUCE") if hasattr(trt.LayerType, name)}
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type in kinds:
            layer.precision = trt.float32
            for out in range(layer.num_outputs):
                layer.set_output_type(out, trt.float32)
            pinned += 1
    return pinned


def build_engine(onnx_path: str | Path, engine_path: str | Path, max_batch: int, fp16: bool = True) -> Path:
    """Build and write a serialized TensorRT plan for batches 1..max_batch (optimized for 1)."""
    if int(max_batch) < 1:
        raise UsageError(f"max_batch must be at least 1, got {max_batch}")
    src, dst = Path(onnx_path), Path(engine_path)
    if not src.is_file():
        raise ModelError(f"ONNX model {src} not found; export the frontend first")
    trt = _require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10: every network is explicit-batch, so no creation flag is needed.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so weights stored as external data are found.
    if not parser.parse_from_file(str(src)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(f"TensorRT could not parse {src}: {(errors or ['unknown error'])[0].splitlines()[0][:300]}")
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if INPUT_NAME not in inputs:
        raise ModelError(f"{src} has no input named {INPUT_NAME!r}; export it with radixpert.export.onnx_frontend")
    _, channels, height, width = tuple(inputs[INPUT_NAME].shape)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            # TensorRT 11 removed weak typing: FP16 then needs an FP16-typed ONNX.
            raise ModelError(f"TensorRT {trt.__version__} has no FP16 builder flag; build with fp16=False")
        config.set_flag(trt.BuilderFlag.FP16)
        if _keep_fp32(network, trt):
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    elif hasattr(trt.BuilderFlag, "TF32"):
        # TF32 is on by default for FP32 layers; an fp32 engine should match ORT fp32 closely.
        config.clear_flag(trt.BuilderFlag.TF32)

    profile = builder.create_optimization_profile()
    one = (1, channels, height, width)
    profile.set_shape(INPUT_NAME, one, one, (int(max_batch), channels, height, width))
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"TensorRT failed to build an engine from {src}; rerun with a TensorRT VERBOSE logger for details")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(bytes(serialized))
    except OSError as exc:
        raise ModelError(f"cannot write {dst}: {exc.strerror or exc}") from None
    return dst


class TensorRTFrontend:
    """Runs a frontend plan: numpy images in, numpy (visual_tokens, masks) out (torch CUDA buffers)."""

    def __init__(self, engine_path: str | Path):
        path = Path(engine_path)
        if not path.is_file():
            raise ModelError(f"TensorRT engine {path} not found; build it with build_engine on this GPU")
        trt = _require_tensorrt()
        import torch

        self._trt, self._torch = trt, torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ModelError(f"TensorRT could not load {path}; engines only run on the GPU and TensorRT version that built them: rebuild it here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if self.inputs != [INPUT_NAME] or any(n not in self.outputs for n in OUTPUT_NAMES):
            raise ModelError(f"{path} is not a radixpert frontend engine (inputs {self.inputs}, outputs {self.outputs})")
        _, opt, largest = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.max_batch = int(largest[0])
        self.image_size = int(opt[2])

    def _dtype(self, name: str) -> Any:
        trt, torch = self._trt, self._torch
        pairs = [("float32", "float32"), ("float16", "float16"), ("int32", "int32"), ("int64", "int64")]
        table = {getattr(trt, a): getattr(torch, b) for a, b in pairs if hasattr(trt, a)}
        kind = self.engine.get_tensor_dtype(name)
        if kind not in table:
            raise ModelError(f"engine tensor {name} has unsupported dtype {kind}")
        return table[kind]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Batches larger than the engine's profile run in chunks of ``max_batch``."""
        torch = self._torch
        size = self.image_size
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1:] != (3, size, size) or images.dtype != np.float32 or len(images) < 1:
            raise InputError(f"engine expects float32 images (batch, 3, {size}, {size}), got {getattr(images, 'shape', type(images))}")
        stream = torch.cuda.Stream()
        parts: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
        for start in range(0, len(images), self.max_batch):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + self.max_batch])).cuda()
            self.context.set_input_shape(INPUT_NAME, tuple(chunk.shape))
            self.context.set_tensor_address(INPUT_NAME, chunk.data_ptr())
            buffers = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                buffers[name] = torch.empty(shape, dtype=self._dtype(name), device="cuda")
                self.context.set_tensor_address(name, buffers[name].data_ptr())
            # The host-to-device copy ran on torch's current stream; order the engine after it.
            stream.wait_stream(torch.cuda.current_stream())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise ModelError("TensorRT execution failed; see the TensorRT log above")
            stream.synchronize()
            for name in OUTPUT_NAMES:
                parts[name].append(buffers[name].float().cpu().numpy())
        tokens, masks = (np.concatenate(parts[name]) for name in OUTPUT_NAMES)
        return tokens, masks


def engine_parity(engine_path: str | Path, onnx_path: str | Path, images: np.ndarray) -> dict[str, Any]:
    """TensorRT engine vs ONNX Runtime (CPU, fp32) on the same images: max abs and relative L2."""
    engine = TensorRTFrontend(engine_path)
    tokens, masks = engine.run(images)
    ref_tokens, ref_masks = OnnxFrontend(onnx_path, providers=[CPU]).run(images)
    return {
        "visual_tokens": diff_stats(tokens, ref_tokens),
        "masks": diff_stats(masks, ref_masks),
        "images": int(images.shape[0]),
        "max_batch": engine.max_batch,
    }
