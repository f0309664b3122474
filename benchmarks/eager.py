"""The PyTorch eager reference: what a user gets without the export, with the bundle's own weights.

* frontend: ``radixpert.model.Frontend(config)`` loaded from the bundle's ``frontend.safetensors``;
* LLM: the bundle's merged ``hf/`` folder as ``Gemma3ForCausalLM`` in fp32, driven by HF
  ``generate(inputs_embeds=...)``: greedy, exactly ``tokens`` new tokens (EOS ignored).

Image reading and preprocessing are the runtime's own (numpy), so those stages match by design.
Stage times come from a logits processor that stamps the clock at every generation step: the
first stamp ends the prefill, the last one the decode. Run it only in a process of its own
(torch's and ONNX Runtime's thread pools fight when they share one).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from radixpert.bundle import load_bundle
from radixpert.errors import ModelError
from radixpert.imageio import letterbox_resize, normalize_imagenet, read_display

HF_DIR = "hf"


class EagerEngine:
    """Frontend + HF generate, in PyTorch eager mode."""

    def __init__(self, bundle_dir: str | Path, threads: int | None = None, device: str | None = None):
        started = time.perf_counter()
        import torch
        from safetensors.torch import load_file
        from transformers import Gemma3ForCausalLM
        from transformers.utils import logging as hf_logging

        from radixpert.model import Frontend

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.torch = torch
        if threads:
            torch.set_num_threads(int(threads))
        self.bundle = bundle = load_bundle(bundle_dir)
        weights = bundle.path_of("frontend-torch")
        if weights is None:
            raise ModelError(f"{bundle.root} has no frontend.safetensors (the PyTorch frontend weights); re-export it with "
                             "this radixpert version to compare against PyTorch")
        hf_dir = bundle.root / HF_DIR
        if not (hf_dir / "config.json").is_file():
            raise ModelError(f"{bundle.root} has no hf/ folder (exported with --no-hf); re-export it without --no-hf "
                             "to compare against PyTorch")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.frontend = Frontend.from_state(bundle.config, load_file(str(weights)), bundle.manifest["visual"].get("evidence"))
        self.frontend.eval().to(self.device)
        self.llm = Gemma3ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval().to(self.device)
        self.llm.generation_config.eos_token_id = None  # a fixed token count: never stop early
        tokens = bundle.token_ids
        self.prefix = torch.tensor(tokens["prefix"], dtype=torch.long, device=self.device)
        self.suffix = torch.tensor(tokens["suffix"], dtype=torch.long, device=self.device)
        self.load_ms = (time.perf_counter() - started) * 1e3

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def report(self, path: str, tokens: int) -> tuple[dict[str, float], list[int]]:
        from transformers import LogitsProcessorList

        torch = self.torch
        t0 = time.perf_counter()
        display, _ = read_display(path)
        t1 = time.perf_counter()
        image = normalize_imagenet(letterbox_resize(display, self.bundle.config.image_size))[None]
        t2 = time.perf_counter()
        with torch.inference_mode():
            visual = self.frontend(torch.from_numpy(image).to(self.device))[0]
            self._sync()
            t3 = time.perf_counter()
            table = self.llm.get_input_embeddings()  # Gemma's scaled embedding, as in training
            embeds = torch.cat([table(self.prefix), visual[0], table(self.suffix)])[None]
            stamps = _Stamps(self._sync)
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                                    device=self.device),
                                    max_new_tokens=tokens, do_sample=False, logits_processor=LogitsProcessorList([stamps]))
            self._sync()
            t4 = time.perf_counter()
        ids = out[0, -tokens:].tolist() if out.shape[1] >= tokens else out[0].tolist()
        first, last = stamps.times[0], stamps.times[-1]
        decode_s = last - first
        timings = {
            "read_ms": (t1 - t0) * 1e3,
            "preprocess_ms": (t2 - t1) * 1e3,
            "frontend_ms": (t3 - t2) * 1e3,
            "prefill_ms": (first - t3) * 1e3,
            "ttft_ms": (first - t0) * 1e3,
            "decode_ms": decode_s * 1e3,
            "decode_tokens_per_s": (len(stamps.times) - 1) / decode_s if decode_s > 0 else 0.0,
            "new_tokens": float(len(ids)),
            "total_ms": (t4 - t0) * 1e3,
        }
        return timings, ids

    def describe(self) -> dict[str, Any]:
        torch = self.torch
        return {"engine": "eager", "device": str(self.device), "threads": torch.get_num_threads(), "dtype": "float32",
                "attn_implementation": self.llm.config._attn_implementation, "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name() if self.device.type == "cuda" else None}


class _Stamps:
    """A logits processor that only records when each step's logits are ready."""

    def __init__(self, sync):
        self.sync = sync
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        return scores
