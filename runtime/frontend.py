"""The exported frontend in ONNX Runtime: image (B, 3, S, S) -> (visual tokens, anatomy maps).

This module runs on the offline workstation, so it imports no torch (tests prove it): only
numpy and onnxruntime. Execution providers are tried in the order TensorRT -> CUDA -> CPU among
those this onnxruntime build offers; ``providers_used`` says what the session really got,
because onnxruntime-gpu falls back to CPU (with a logged error) when CUDA libraries are missing.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from radixpert.errors import InputError, ModelError, UsageError, first_line

INPUT_NAME = "image"
OUTPUT_NAMES = ("visual_tokens", "masks")
# Optional third output: the encoder head's presence/side probabilities (the checks' image evidence).
EVIDENCE_NAME = "evidence"

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PREFERENCE = (TENSORRT, CUDA, CPU)
ALIASES = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "gpu": CUDA, "cpu": CPU}
# --frontend names -> bundle file roles.
FRONTEND_ROLES = {"fp32": "frontend", "int8": "frontend-int8"}

# No telemetry from this process: onnxruntime would otherwise keep a device id and queued events
# naming models and providers under ~/.cache/Microsoft on an offline workstation.
ort.disable_telemetry_events()


def frontend_path(bundle: Any, variant: str = "fp32") -> Path:
    """The bundle's frontend file for ``variant`` (fp32 or int8); UsageError when it has none."""
    role = FRONTEND_ROLES.get(variant, variant)
    path = bundle.path_of(role)
    if path is not None:
        return path
    if role == "frontend-int8":
        raise UsageError("this bundle has no INT8 frontend; re-export it with radixpert-export --int8, "
                         "or use --frontend fp32")
    if role not in FRONTEND_ROLES.values():
        raise UsageError(f"unknown frontend {variant!r}; choose fp32 or int8")
    raise ModelError("the bundle lists no frontend.onnx; re-export the bundle")


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers (ORT names, ORT's order)."""
    return list(ort.get_available_providers())


def default_providers(available: Sequence[str] | None = None) -> list[str]:
    """TensorRT -> CUDA -> CPU, keeping those that are available (CPU always is)."""
    offered = set(available if available is not None else available_providers())
    chosen = [p for p in PREFERENCE if p in offered]
    return chosen if chosen and chosen[-1] == CPU else chosen + [CPU]


def parse_providers(text: str) -> list[str]:
    """``"cuda,cpu"`` -> ORT provider names; UsageError for names we do not know."""
    known = {p.lower(): p for p in ort.get_all_providers()}
    names: list[str] = []
    for raw in str(text).split(","):
        item = raw.strip().lower()
        if not item:
            continue
        name = ALIASES.get(item) or known.get(item) or known.get(item + "executionprovider")
        if name is None:
            raise UsageError(f"unknown execution provider {raw.strip()!r} in --providers; use a comma list of tensorrt, cuda, cpu")
        if name not in names:
            names.append(name)
    if not names:
        raise UsageError("--providers is empty; use a comma list of tensorrt, cuda, cpu")
    return names


def diff_stats(actual: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Max absolute difference and L2 error relative to the reference's norm."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {r.shape}")
    diff = a - r
    norm = float(np.linalg.norm(r))
    return {
        "max_abs": float(np.abs(diff).max()) if diff.size else 0.0,
        "rel_l2": float(np.linalg.norm(diff) / max(norm, 1e-30)),
    }


def _short(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider").lower()


def tensorrt_cache_dir(model_path: str | os.PathLike[str]) -> Path:
    """Where the TensorRT provider keeps engines for one frontend file.

    Engines take minutes to build and are valid only for the GPU and TensorRT version that built
    them, so they are cached on the machine, not shipped; the bundle folder may be read-only.
    The key is the model file's content (part of the bundle id), so export can prebuild the cache
    before the bundle id exists and every bundle variant gets its own engines.
    """
    from radixpert.bundle import sha256_of
    from radixpert.paths import cache_dir

    return cache_dir() / "tensorrt" / sha256_of(model_path)[:16]


def tensorrt_options(model_path: str | os.PathLike[str], fp16: bool = False) -> dict[str, str]:
    """ONNX Runtime TensorRT provider options: engine and timing caches, and FP16 when allowed.

    FP16 is off unless the bundle allows it (``radixpert-export --tensorrt``): otherwise the
    frontend is held to its fp32 parity with PyTorch.
    """
    root = tensorrt_cache_dir(model_path)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return {"trt_fp16_enable": str(bool(fp16))}
    return {
        "trt_fp16_enable": str(bool(fp16)),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(root),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(root),
    }


def create_session(path: str | os.PathLike[str], providers: Sequence[Any], threads: int | None = None) -> ort.InferenceSession:
    """Every ONNX Runtime session of Radixpert is made here, so that none reports telemetry.

    onnxruntime's telemetry is off in every process that imports this module; it is switched off
    again here in case a library turned it back on.
    """
    ort.disable_telemetry_events()
    return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=list(providers))


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options with ``threads`` intra-op threads (None: ORT's default, all cores)."""
    from radixpert.runtime.threads import ort_allow_spinning

    options = ort.SessionOptions()
    # Idle workers sleep instead of spinning unless RADIXPERT_THREAD_POLICY=spin (runtime/threads.py).
    options.add_session_config_entry("session.intra_op.allow_spinning", ort_allow_spinning())
    options.add_session_config_entry("session.inter_op.allow_spinning", ort_allow_spinning())
    if threads is not None:
        if int(threads) < 1:
            raise UsageError(f"--threads must be at least 1, got {threads}")
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return options


class OnnxFrontend:
    """One ONNX Runtime session over ``frontend.onnx`` (or its INT8 twin)."""

    def __init__(self, path: str | os.PathLike[str], providers: list[str] | None = None, threads: int | None = None,
                 tensorrt_fp16: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"frontend model {self.path} not found; export it or check the bundle folder")
        offered = available_providers()
        requested = list(providers) if providers else default_providers(offered)
        missing = [p for p in requested if p not in offered]
        if missing:
            raise UsageError(
                f"execution provider {', '.join(_short(p) for p in missing)} is not available in this onnxruntime build "
                f"(available: {', '.join(_short(p) for p in offered)}); install onnxruntime-gpu or choose another --providers"
            )
        self.providers_requested = requested
        with_options: list[Any] = [(p, tensorrt_options(self.path, tensorrt_fp16)) if p == TENSORRT else p
                                   for p in requested]
        try:
            self._session = create_session(self.path, with_options, threads)
        except UsageError:
            raise
        except Exception as exc:  # ORT raises its own pybind types (InvalidProtobuf, Fail, ...)
            raise ModelError(f"cannot load frontend model {self.path}: {first_line(exc)}; re-export the bundle") from None
        inputs = self._session.get_inputs()
        outputs = [o.name for o in self._session.get_outputs()]
        shape = inputs[0].shape if len(inputs) == 1 else None
        if (
            shape is None
            or inputs[0].name != INPUT_NAME
            or len(shape) != 4
            or shape[1] != 3
            or not isinstance(shape[2], int)
            or shape[2] != shape[3]
            or any(name not in outputs for name in OUTPUT_NAMES)
        ):
            got = [(i.name, i.shape) for i in inputs]
            raise ModelError(f"{self.path} is not a radixpert frontend (inputs {got}, outputs {outputs}); re-export it")
        self.image_size: int = int(shape[2])
        out_shapes = {o.name: o.shape for o in self._session.get_outputs()}
        self.num_tokens: int | None = _static(out_shapes["visual_tokens"], 1)
        self.token_dim: int | None = _static(out_shapes["visual_tokens"], 2)
        self.num_masks: int | None = _static(out_shapes["masks"], 1)
        self.has_evidence = EVIDENCE_NAME in out_shapes

    @property
    def providers_used(self) -> list[str]:
        """The providers the session actually runs on, best first."""
        return list(self._session.get_providers())

    @property
    def metadata(self) -> dict[str, str]:
        """Custom metadata written at export (config name, sizes)."""
        return dict(self._session.get_modelmeta().custom_metadata_map)

    def check_images(self, images: Any) -> np.ndarray:
        """The batch as a contiguous float32 array, or a one-line InputError."""
        size = self.image_size
        if not isinstance(images, np.ndarray):
            raise InputError(f"frontend expects a numpy array of shape (batch, 3, {size}, {size}), got {type(images).__name__}")
        if images.ndim != 4 or images.shape[0] < 1 or images.shape[1:] != (3, size, size):
            raise InputError(f"frontend expects images of shape (batch, 3, {size}, {size}), got {tuple(images.shape)}")
        if images.dtype != np.float32:
            raise InputError(f"frontend expects float32 images (ImageNet-normalized), got {images.dtype}")
        if not np.isfinite(images).all():
            raise InputError("frontend input holds NaN or infinite values; check the image reader")
        return np.ascontiguousarray(images)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(visual_tokens (B, N_p, D_llm), masks (B, K, S, S)), both float32."""
        outputs = self.run_outputs(images, evidence=False)
        return outputs["visual_tokens"], outputs["masks"]

    def run_outputs(self, images: np.ndarray, evidence: bool = True) -> dict[str, np.ndarray]:
        """Every output by name: visual_tokens, masks and, where the graph has it, evidence (B, E)."""
        names = list(OUTPUT_NAMES) + ([EVIDENCE_NAME] if evidence and self.has_evidence else [])
        feed = {INPUT_NAME: self.check_images(images)}
        try:
            values = self._session.run(names, feed)
        except Exception as exc:  # e.g. out of GPU memory for a large batch
            raise ModelError(f"frontend inference failed on {', '.join(map(_short, self.providers_used))}: {first_line(exc)}") from None
        return dict(zip(names, values))


def _static(shape: Sequence[Any], axis: int) -> int | None:
    value = shape[axis] if len(shape) > axis else None
    return value if isinstance(value, int) else None


# --------------------------------------------------------------------------- timing
# Timing lives here, torch-free, and export runs it in a fresh process: torch's and ORT's
# thread pools fight when both live in one process (3-20x slowdowns measured on 2-core machines).


def time_pipelines(
    pipelines: Mapping[str, Sequence[str | os.PathLike[str]]],
    image: np.ndarray,
    threads: int = 2,
    runs: int = 30,
    warmup: int = 3,
) -> dict[str, dict[str, Any]]:
    """Median CPU latency (ms) of each pipeline: ONNX graphs run in order on shared named tensors.

    A pipeline's graphs read the tensors named by their inputs ("image" or an earlier graph's
    outputs). Pipelines run interleaved, one after the other in every round, so that the noise
    of a shared machine lands on all of them alike.
    """
    sessions = {
        name: [create_session(p, [CPU], threads) for p in paths]
        for name, paths in pipelines.items()
    }
    times: dict[str, list[list[float]]] = {name: [] for name in sessions}
    for round_index in range(warmup + runs):
        for name, chain in sessions.items():
            tensors: dict[str, np.ndarray] = {INPUT_NAME: image}
            stages = []
            for session in chain:
                feed = {i.name: tensors[i.name] for i in session.get_inputs()}
                start = time.perf_counter()
                outputs = session.run(None, feed)
                stages.append((time.perf_counter() - start) * 1000.0)
                tensors.update({o.name: v for o, v in zip(session.get_outputs(), outputs)})
            if round_index >= warmup:
                times[name].append(stages)
    result = {}
    for name, rows in times.items():
        totals = [sum(r) for r in rows]
        result[name] = {
            "median_ms": statistics.median(totals),
            "min_ms": min(totals),
            "stages_ms": [statistics.median(col) for col in zip(*rows)],
        }
    return result


def _time_main() -> None:
    """Entry point of the isolated timing process: JSON spec on stdin, JSON result on stdout."""
    spec = json.loads(sys.stdin.read())
    image = np.load(spec["image"])
    result = time_pipelines(spec["pipelines"], image, spec["threads"], spec["runs"], spec["warmup"])
    result["_torch_loaded"] = any(m.split(".")[0] == "torch" for m in sys.modules)  # type: ignore[assignment]
    print(json.dumps(result))
