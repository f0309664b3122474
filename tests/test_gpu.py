"""GPU paths: ONNX Runtime's CUDA provider and llama.cpp GPU offload. Skipped without a CUDA GPU.

CI has no GPU, so these run only on a GPU workstation (``python -m pytest tests/test_gpu.py``);
they check the same parity as the CPU tests, on the GPU.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from radixpert.bundle import load_bundle
from radixpert.runtime.frontend import CPU, CUDA, OnnxFrontend, available_providers
from radixpert.runtime.llm import LlamaRunner, gpu_offload_supported


def _cuda_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


needs_gpu = pytest.mark.skipif(not _cuda_gpu(), reason="no CUDA GPU on this machine")


@needs_gpu
@pytest.mark.skipif(CUDA not in available_providers(), reason="this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
def test_frontend_on_cuda_matches_cpu(bundle):
    out, _ = bundle
    path = load_bundle(out).path_of("frontend")
    images = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    gpu = OnnxFrontend(path, providers=[CUDA, CPU])
    assert gpu.providers_used[0] == CUDA
    cpu_tokens, cpu_masks = OnnxFrontend(path, providers=[CPU]).run(images)
    tokens, masks = gpu.run(images)
    np.testing.assert_allclose(tokens, cpu_tokens, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(masks, cpu_masks, atol=1e-4)


@needs_gpu
@pytest.mark.skipif(not gpu_offload_supported(), reason="llama-cpp-python was built without GPU offload")
def test_llm_with_gpu_offload_matches_cpu(bundle):
    out, manifest = bundle
    path = load_bundle(out).llm_path("f32")
    tokens = manifest["tokens"]
    visual = np.random.default_rng(1).normal(size=(196, manifest["visual"]["dim"])).astype(np.float32)
    results = []
    for layers in (0, 999):
        with LlamaRunner(path, n_ctx=512, gpu_layers=layers) as runner:
            runner.eval_tokens(tokens["prefix"])
            runner.eval_embeddings(visual)
            logits = runner.eval_tokens(tokens["suffix"], all_logits=True)
            generated = runner.generate(tokens["prefix"], visual, tokens["suffix"], 16, tokens["stop"]).tokens
            results.append((logits, generated))
    (cpu_logits, cpu_tokens), (gpu_logits, gpu_tokens) = results
    cosine = (cpu_logits * gpu_logits).sum(-1) / np.linalg.norm(cpu_logits, axis=-1) / np.linalg.norm(gpu_logits, axis=-1)
    assert cosine.min() > 0.9999
    assert (cpu_logits.argmax(-1) == gpu_logits.argmax(-1)).all()
    assert gpu_tokens[:8] == cpu_tokens[:8]
