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
from radixpert.export.parity import llm_parity, token_match
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


def test_frontend_onnx_matches_pytorch(bundle):
    _, manifest = bundle
    for output in ("visual_tokens", "masks"):
        assert manifest["parity"]["frontend"][output]["max_abs"] < 1e-4, manifest["parity"]["frontend"]


def test_gguf_logits_match_hf_given_the_same_visual_embeddings(bundle):
    _, manifest = bundle
    llm = manifest["parity"]["llm"]
    print({q: {k: round(v, 6) for k, v in m.items()} for q, m in llm.items()})
    assert llm["f32"]["positions"] >= 16
    assert llm["f32"]["max_abs"] < 1e-2 and llm["f32"]["argmax"] == 1.0
    assert llm["f16"]["min_cosine"] > 0.999 and llm["f16"]["argmax"] >= 0.9
    assert "q8_0" in llm and 0 < llm["q8_0"]["min_cosine"] <= 1.0


def test_exported_chain_writes_the_reference_greedy_tokens(bundle):
    _, manifest = bundle
    e2e = manifest["parity"]["e2e"]
    print(e2e)
    assert e2e["f32"]["token_match"] == 1.0 and e2e["f32"]["reference_tokens"] > 0


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
    assert result["max_abs"] > 1e-2


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
    done = _export_cli(str(run_dir), "--out", str(out), "--quant", "f16", "--samples", "1", "--e2e-tokens", "8",
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
    manifest = export_bundle(run, tmp_path / "bundle", ExportOptions(quants=("f32",), samples=2, e2e_tokens=16, threads=2))
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
