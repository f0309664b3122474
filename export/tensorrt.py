"""TensorRT for the frontend, through ONNX Runtime's TensorRT execution provider (no torch).

The runtime (:mod:`radixpert.runtime.frontend`) puts the TensorRT provider first whenever this
onnxruntime build offers it. The provider builds an engine from ``frontend.onnx`` on the GPU that
runs it (engines are valid only for one GPU and TensorRT version, so none is shipped) and caches
it under ``$RADIXPERT_CACHE/tensorrt/<frontend sha256>``. The runtime keeps FP32 there unless
the bundle allows FP16.

``radixpert-export --tensorrt`` asks for FP16. Where the TensorRT provider works at export, it
builds the engine cache for this machine, measures the FP16 outputs against the CPU provider and
the bundle allows FP16 only when that parity passes; elsewhere it records why nothing was checked,
and the runtime keeps FP32.

UNTESTED HERE: TensorRT cannot be installed where this project is developed and CI has no GPU.
The provider options are ONNX Runtime's documented ``trt_*`` options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from radixpert.errors import ModelError
from radixpert.runtime.frontend import CPU, TENSORRT, OnnxFrontend, available_providers, diff_stats


def tensorrt_available() -> tuple[bool, str]:
    """(True, what was found) or (False, why not): does onnxruntime offer its TensorRT provider?"""
    import onnxruntime as ort

    if TENSORRT not in available_providers():
        return False, (f"onnxruntime {ort.__version__} here has no TensorRT execution provider; install onnxruntime-gpu "
                       "and TensorRT 10 on the CUDA machine that runs the bundle")
    return True, f"onnxruntime {ort.__version__} offers the TensorRT execution provider"


def prebuild(onnx_path: str | Path, images: np.ndarray, fp16: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Build the TensorRT engine cache for ``onnx_path`` on this GPU and compare it with the CPU provider.

    Images run one at a time, the batch size the runtime uses, so the cached engine is the one it
    loads. Returns max abs and relative L2 differences of both outputs.
    """
    ok, reason = tensorrt_available()
    if not ok:
        raise ModelError(f"TensorRT is not usable here: {reason}")
    trt = OnnxFrontend(onnx_path, providers=[TENSORRT, CPU], threads=threads, tensorrt_fp16=fp16)
    if trt.providers_used[0] != TENSORRT:
        raise ModelError("onnxruntime could not start its TensorRT provider (TensorRT or CUDA libraries missing); "
                         "check the TensorRT install, or export without --tensorrt")
    cpu = OnnxFrontend(onnx_path, providers=[CPU], threads=threads)
    pairs = [(trt.run(images[i : i + 1]), cpu.run(images[i : i + 1])) for i in range(len(images))]
    tokens, masks = (np.concatenate([got[k] for got, _ in pairs]) for k in (0, 1))
    ref_tokens, ref_masks = (np.concatenate([ref[k] for _, ref in pairs]) for k in (0, 1))
    return {
        "visual_tokens": diff_stats(tokens, ref_tokens),
        "masks": diff_stats(masks, ref_masks),
        "images": int(images.shape[0]),
        "fp16": bool(fp16),
    }
