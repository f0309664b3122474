"""radixpert-export on a tiny trained run: the bundle verifies, and every joint matches PyTorch.

The run is real (a few training steps on phantoms), the LLM is a tiny random Gemma 3 whose
RMSNorm weights are randomized, so conversion mistakes show up as logit differences.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from radixpert.bundle import load_bundle
from radixpert.config import get_config
from radixpert.errors import ModelError
from radixpert.export.merge import load_run, merge_lora
from radixpert.export.parity import DEFAULT_THRESHOLDS, judge, llm_parity, logit_metrics, token_match
from radixpert.runtime.llm import LlamaRunner


def test_bundle_manifest_hashes_verify_and_record_everything(bundle):
    out, manifest = bundle
    loaded = load_bundle(out, verify=True)
    config = get_config("tiny")
    assert loaded.manifest["visual"]["num_tokens"] == config.num_patches == 196
    assert loaded.manifest["visual"]["dim"] == config.llm_dim
    assert loaded.config.llm_dim == config.llm_dim and loaded.template.prefix.startswith("<bos>")
    roles = {e["role"] for e in manifest["files"]}
    assert {"frontend", "labels", "llm-f32", "llm-f16", "llm-q8_0", "hf"} <= roles
    assert manifest["llm"]["default_quant"] == "q8_0"
    assert set(manifest["versions"]) >= {"torch", "onnxruntime", "gguf", "llama_cpp_python"}
    assert manifest["parity"]["passed"] and not manifest["parity"]["failures"]
    assert [label["name"] for label in loaded.labels] == list(config.mask_names)
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))


# The export's own parity numbers are checked twice: the engines are compared here, in the test,
# against PyTorch (so a wrong export fails), and the manifest must record what the test measured
# (so a wrong parity.py fails).
CONTINUATION = 16  # the greedy continuation the export's LLM parity runs over
E2E_TOKENS = 24  # ExportOptions.e2e_tokens of the bundle fixture


@pytest.fixture(scope="module")
def reference(run_dir, tmp_path_factory):
    """The merged PyTorch model of the run and the export's parity images (same phantom seed)."""
    from radixpert.export.pipeline import ExportOptions, sample_images

    model, _, _ = load_run(run_dir)
    merge_lora(model)
    model.eval()
    images = sample_images(model, ExportOptions(samples=2), "test", 2, tmp_path_factory.mktemp("parity-images"))
    with torch.no_grad():
        visual, masks = model.frontend(torch.from_numpy(images))[:2]
    return model, images, visual.numpy(), masks.numpy()


def _hf_logits(model, visual: np.ndarray, continuation: list[int]) -> np.ndarray:
    """PyTorch logits from the last visual position on: prefix, image, suffix, continuation."""
    embeds = torch.cat([model.embed_text(list(model.prefix_ids)), torch.from_numpy(visual),
                        model.embed_text(list(model.suffix_ids) + continuation)])
    with torch.no_grad():
        logits = model.llm(inputs_embeds=embeds[None]).logits[0].double().numpy()
    return logits[len(model.prefix_ids) + visual.shape[0] - 1 :]


def _gguf_logits(runner: LlamaRunner, manifest: dict, visual: np.ndarray, continuation: list[int]) -> np.ndarray:
    runner.reset()
    runner.eval_tokens(manifest["tokens"]["prefix"])
    last_visual = runner.eval_embeddings(visual)
    text = runner.eval_tokens(manifest["tokens"]["suffix"] + continuation, all_logits=True)
    return np.concatenate([last_visual[None], text]).astype(np.float64)


@pytest.fixture(scope="module")
def llm_logits(reference, bundle):
    """Per quant: (PyTorch, llama.cpp) logits over the suffix and a fixed greedy continuation."""
    model, images, visual, _ = reference
    out, manifest = bundle
    continuations = model.generate(torch.from_numpy(images), max_new_tokens=CONTINUATION, ignore_stop=True)
    hf = np.concatenate([_hf_logits(model, visual[b], continuations[b]) for b in range(len(images))])
    result = {}
    # The runtime's CPU attention for each file, and f32 without flash attention (an F16 V cache
    # instead of BF16), the closest llama.cpp gets to PyTorch: the tight check of the conversion.
    for name, quant, attention in (("f32", "f32", None), ("f16", "f16", None), ("q8_0", "q8_0", None),
                                   ("f32 matmul", "f32", "matmul")):
        with LlamaRunner(out / f"llm-{quant}.gguf", n_ctx=manifest["llm"]["n_ctx"], threads=2,
                         attention=attention) as runner:
            gguf = np.concatenate([_gguf_logits(runner, manifest, visual[b], continuations[b]) for b in range(len(images))])
        result[name] = (hf, gguf)
    return result


def test_frontend_onnx_matches_pytorch(reference, bundle):
    from radixpert.runtime.frontend import OnnxFrontend

    _, images, visual, masks = reference
    out, manifest = bundle
    exported_visual, exported_masks = OnnxFrontend(out / "frontend.onnx", providers=["CPUExecutionProvider"],
                                                   threads=2).run(images)
    recorded = manifest["parity"]["frontend"]
    for name, ours, torch_out in (("visual_tokens", exported_visual, visual), ("masks", exported_masks, masks)):
        delta = np.abs(ours.astype(np.float64) - torch_out)
        rel_l2 = np.linalg.norm(delta) / np.linalg.norm(torch_out.astype(np.float64))
        assert delta.max() < 1e-4 and rel_l2 < 1e-5, (name, delta.max(), rel_l2)
        assert recorded[name]["max_abs"] == pytest.approx(delta.max(), rel=0.05, abs=1e-8), (name, recorded[name])
        assert recorded[name]["rel_l2"] == pytest.approx(rel_l2, rel=0.05, abs=1e-10), (name, recorded[name])


def _independent_metrics(hf: np.ndarray, gguf: np.ndarray) -> dict[str, float]:
    delta = np.abs(hf - gguf).max(-1)
    cosine = (hf * gguf).sum(-1) / np.sqrt((hf * hf).sum(-1) * (gguf * gguf).sum(-1))
    return {"positions": hf.shape[0], "max_abs": delta.max(), "max_rel": (delta / np.abs(hf).max(-1)).max(),
            "min_cosine": cosine.min(), "mean_cosine": cosine.mean(), "argmax": (hf.argmax(-1) == gguf.argmax(-1)).mean()}


def test_gguf_logits_match_hf_given_the_same_visual_embeddings(llm_logits, bundle):
    measured = {quant: _independent_metrics(*pair) for quant, pair in llm_logits.items()}
    print({q: {k: float(f"{v:.6g}") for k, v in m.items()} for q, m in measured.items()})
    f32, f16, q8 = measured["f32"], measured["f16"], measured["q8_0"]
    assert f32["positions"] == 2 * (1 + len(bundle[1]["tokens"]["suffix"]) + CONTINUATION)
    # Measured: max_rel 2.7e-4 for f32 without flash attention; with the runtime's CPU attention
    # (BF16 V cache) 1.5e-3 (f32), 1.3e-3 (f16), 1.5e-2 (q8_0); q8_0 cosine 0.9997.
    assert measured["f32 matmul"]["max_rel"] < 1e-3 and measured["f32 matmul"]["argmax"] == 1.0, measured["f32 matmul"]
    assert f32["max_rel"] < 2.5e-3 and f32["min_cosine"] > 0.99999 and f32["argmax"] == 1.0, f32
    assert f16["max_rel"] < 2.5e-3 and f16["min_cosine"] > 0.99999 and f16["argmax"] == 1.0, f16
    assert q8["max_rel"] < 5e-2 and q8["min_cosine"] > 0.999 and q8["argmax"] >= 0.9, q8
    # 8-bit weights are further from PyTorch than either float format.
    assert max(f32["max_rel"], f16["max_rel"]) < q8["max_rel"] / 5, measured


def test_manifest_records_the_llm_parity_the_test_measured(llm_logits, bundle):
    _, manifest = bundle
    recorded = manifest["parity"]["llm"]
    for quant, pair in llm_logits.items():
        if quant not in recorded:  # "f32 matmul": not an attention the runtime uses on CPU
            continue
        ours = _independent_metrics(*pair)
        assert recorded[quant]["positions"] == ours["positions"]
        assert recorded[quant]["argmax"] == ours["argmax"], quant
        for key in ("max_abs", "max_rel"):
            assert recorded[quant][key] == pytest.approx(ours[key], rel=0.05, abs=1e-7), (quant, key, recorded[quant])
        for key in ("min_cosine", "mean_cosine"):
            assert 1 - recorded[quant][key] == pytest.approx(1 - ours[key], rel=0.05, abs=1e-9), (quant, key)


def test_exported_chain_writes_the_reference_greedy_tokens(reference, bundle):
    """ONNX Runtime + llama.cpp, run here, against PyTorch's greedy report tokens."""
    from radixpert.runtime.frontend import OnnxFrontend

    model, images, _, _ = reference
    out, manifest = bundle
    expected = model.generate(torch.from_numpy(images), max_new_tokens=E2E_TOKENS)
    visual, _ = OnnxFrontend(out / "frontend.onnx", providers=["CPUExecutionProvider"], threads=2).run(images)
    tokens = manifest["tokens"]
    produced = {}
    for quant in ("f32", "f16", "q8_0"):
        with LlamaRunner(out / f"llm-{quant}.gguf", n_ctx=manifest["llm"]["n_ctx"], threads=2) as runner:
            produced[quant] = [runner.generate(tokens["prefix"], visual[b], tokens["suffix"], E2E_TOKENS, tokens["stop"]).tokens
                               for b in range(len(images))]
    print({q: [token_match(r, c) for r, c in zip(expected, p)] for q, p in produced.items()})
    assert sum(map(len, expected)) > 0 and produced["f32"] == expected
    recorded = manifest["parity"]["e2e"]
    for quant, sequences in produced.items():
        rates = [token_match(r, c) for r, c in zip(expected, sequences)]
        assert recorded[quant]["token_match"] == pytest.approx(np.mean(rates)), quant
        assert recorded[quant]["identical"] == sum(r == c for r, c in zip(expected, sequences)), quant
        assert recorded[quant]["reference_tokens"] == sum(map(len, expected))


def test_gguf_tokenizes_the_full_template_like_hf(bundle):
    out, manifest = bundle
    from radixpert.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(out / "hf")
    template = load_bundle(out).template
    texts = [template.prefix, template.suffix, template.prefix + "Derrame pleural derecho." + template.suffix
             + template.target("Índice cardiotorácico aumentado; neumotórax izquierdo, sin derrame.")]
    with LlamaRunner(out / "llm-f16.gguf", n_ctx=256, threads=2) as runner:
        for text in texts:
            assert runner.tokenize(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert manifest["tokens"]["prefix"] == tokenizer(template.prefix, add_special_tokens=False)["input_ids"]


def test_parity_check_fails_on_a_gguf_of_another_model(run_dir, bundle, tmp_path):
    """Negative control: the LLM parity measure does catch a wrong LLM."""
    out, _ = bundle
    model, _, _ = load_run(run_dir)
    merge_lora(model)
    with torch.no_grad():  # a different LLM: perturb one layer's weights
        model.llm.model.layers[0].mlp.down_proj.weight.mul_(-1.0)
    images = torch.randn(1, 3, 224, 224)
    with LlamaRunner(out / "llm-f32.gguf", n_ctx=512, threads=2) as runner:
        result = llm_parity(model, runner, images)
    failures = judge("llm.f32", result, DEFAULT_THRESHOLDS)
    assert any(f.startswith("llm.f32.max_rel") for f in failures), (result, failures)


def test_relative_logit_error_is_taken_per_position():
    """A drift of 0.1 on a position whose logits are about 1 is 10%, even when another position's
    logits are 10 times larger (a global scale would call it 1%)."""
    reference = np.array([[10.0, 0.0, -10.0], [1.0, 0.0, 0.0]])
    candidate = np.array([[10.5, 0.0, -10.0], [1.0, 0.1, 0.0]])
    metrics = logit_metrics(reference, candidate)
    assert metrics["max_abs"] == pytest.approx(0.5) and metrics["max_rel"] == pytest.approx(0.1)
    assert metrics["argmax"] == 1.0 and metrics["positions"] == 2
    assert metrics["min_cosine"] == pytest.approx(1 / np.sqrt(1.01))
    assert metrics["mean_cosine"] == pytest.approx((1 / np.sqrt(1.01) + 205 / np.sqrt(200 * 210.25)) / 2)
    assert judge("llm.f32", metrics, {"llm.f32.max_rel": 0.09}) == ["llm.f32.max_rel = 0.1 > 0.09"]
    assert judge("llm.f32", metrics, {"llm.f32.max_rel": 0.11}) == []


def test_token_match_counts_positions_over_the_longer_sequence():
    assert token_match([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_match([1, 2, 3, 4], [1, 2]) == 0.5
    assert token_match([], []) == 1.0


def _export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "radixpert.export.cli", *args], capture_output=True, text=True, timeout=600)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-2000:]
    return lines[-1]


@pytest.mark.parametrize("target", ["adapter/adapter_model.safetensors", "fusion.safetensors", "config.json"])
def test_one_corrupted_byte_in_a_run_file_is_refused(run_dir, tmp_path, target):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    checkpoint = next((copy / "checkpoints").glob("step-*"))
    path = checkpoint / target
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    done = _export_cli(str(copy), "--out", str(tmp_path / "b"), "--quant", "f16")
    assert done.returncode == 4, done.stderr[-2000:]
    line = _one_line(done.stderr)
    assert "sha256" in line and target in line
    assert not (tmp_path / "b").exists()


def test_an_adapter_for_another_base_is_refused(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    checkpoint = next((copy / "checkpoints").glob("step-*"))
    (checkpoint / "checksums.json").unlink()  # as if written by hand, without checksums
    config = json.loads((checkpoint / "config.json").read_text())
    config["llm_ffn"] = 256  # the LoRA on the MLP no longer fits
    (checkpoint / "config.json").write_text(json.dumps(config))
    done = _export_cli(str(copy), "--out", str(tmp_path / "b"), "--quant", "f16")
    assert done.returncode == 4, done.stderr[-2000:]
    assert "does not" in _one_line(done.stderr)


def test_missing_run_and_bad_options_are_one_line_errors(tmp_path, run_dir):
    done = _export_cli(str(tmp_path / "nope"), "--out", str(tmp_path / "b"))
    assert done.returncode == 4 and "not found" in _one_line(done.stderr)
    done = _export_cli(str(run_dir), "--out", str(tmp_path / "b"), "--quant", "q3_k")
    assert done.returncode == 2 and "--quant" in _one_line(done.stderr)
    done = _export_cli(str(run_dir), "--out", str(tmp_path / "b"), "--threshold", "nonsense=1")
    assert done.returncode == 2 and "--threshold" in _one_line(done.stderr)
    assert _export_cli("--help").returncode == 0


def test_a_drifted_export_is_refused_and_kept_aside(run_dir, tmp_path):
    out = tmp_path / "b"
    done = _export_cli(str(run_dir), "--out", str(out), "--quant", "f16", "--samples", "1", "--calibration", "8", "--e2e-tokens", "8",
                       "--threshold", "llm.f16.min_cosine=1.000001", "--no-hf", "--threads", "2")
    assert done.returncode == 5, done.stderr[-2000:]
    assert "llm.f16.min_cosine" in _one_line(done.stderr)
    assert not out.exists()
    rejected = json.loads((tmp_path / "b.rejected" / "manifest.json").read_text())
    assert rejected["parity"]["passed"] is False


def test_manifest_size_check_catches_a_truncated_copy(bundle, tmp_path):
    out, _ = bundle
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("hf"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"] = [e for e in manifest["files"] if e["role"] != "hf"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    load_bundle(copy, verify=True)
    gguf = copy / "llm-f16.gguf"
    gguf.write_bytes(gguf.read_bytes()[:-10])
    with pytest.raises(ModelError, match="bytes"):
        load_bundle(copy)


def test_visual_tokens_change_the_report(bundle):
    """Sanity: the LLM in the bundle reads the image (different embeddings, different logits)."""
    out, manifest = bundle
    with LlamaRunner(out / "llm-f32.gguf", n_ctx=512, threads=2) as runner:
        prefix, suffix = manifest["tokens"]["prefix"], manifest["tokens"]["suffix"]
        rng = np.random.default_rng(0)
        logits = []
        for _ in range(2):
            runner.reset()
            runner.eval_tokens(prefix)
            runner.eval_embeddings(rng.normal(size=(196, manifest["visual"]["dim"])).astype(np.float32))
            logits.append(runner.eval_tokens(suffix))
    assert np.abs(logits[0] - logits[1]).max() > 1e-3


def test_region_token_run_exports_and_the_runtime_writes_the_reference_tokens(run_dir, tmp_path):
    """The same trained weights with region tokens on (they add no weights): the bundle records
    N_p + 2K visual tokens and the torch-free runtime writes PyTorch's greedy tokens."""
    from radixpert.config import RadixpertConfig
    from radixpert.export.pipeline import ExportOptions, export_bundle
    from radixpert.imageio import read_image
    from radixpert.phantom import write_dataset
    from radixpert.runtime.pipeline import Reporter
    from radixpert.train.checkpoint import latest_checkpoint, write_checksums

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    checkpoint = latest_checkpoint(run)
    config = RadixpertConfig.load(checkpoint / "config.json").replace(region_tokens=True)
    config.save(checkpoint / "config.json")
    write_checksums(checkpoint)
    manifest = export_bundle(run, tmp_path / "bundle", ExportOptions(quants=("f32",), samples=2, e2e_tokens=16, threads=2, calibration=8))
    assert manifest["visual"]["num_tokens"] == config.num_visual_tokens == 196 + 10
    assert manifest["parity"]["passed"] and manifest["parity"]["e2e"]["f32"]["token_match"] == 1.0

    model, _, _ = load_run(run)
    merge_lora(model)
    table = write_dataset(tmp_path / "scans", n=3, seed=5, size=256, workers=1, progress=False)
    scans = sorted(table.parent.rglob("*.dcm"))
    images = torch.from_numpy(np.stack([read_image(p, 224).model_input for p in scans]))
    reference = model.generate(images, max_new_tokens=24, ignore_stop=True)
    reporter = Reporter(load_bundle(tmp_path / "bundle"), quant="f32", threads=2)
    try:
        produced = [reporter.report(p, ignore_eos=True, max_new_tokens=24).tokens for p in scans]
    finally:
        reporter.close()
    assert produced == reference
