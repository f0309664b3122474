"""radixpert-bench: the commands run on the tiny bundle and write well-formed output.

Correctness only: nothing here asserts a time (benchmarks report; they set no pass mark).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from radixpert.benchmarks import bound
from radixpert.benchmarks.bandwidth import at_threads, cpu_read_bandwidth
from radixpert.benchmarks.cli import main
from radixpert.benchmarks.stages import RUNTIME_STAGES, stats, within_spread
from radixpert.export.gguf_read import GgufInfo, GgufTensor, check_complete, read_gguf
from radixpert.errors import ModelError

FAST = ["--warmup", "1", "--repeats", "2", "--tokens", "6", "--threads", "2", "--bandwidth-mib", "16"]


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> str:
    from radixpert.phantom import write_dataset

    table = write_dataset(tmp_path_factory.mktemp("scans"), n=1, seed=5, size=256, workers=1, progress=False)
    return str(next((table.parent / "dicom").glob("*.dcm")))


def _invoke(args: list[str]) -> dict:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = Path(args[args.index("--out") + 1])
    data = json.loads((out / "result.json").read_text(encoding="utf-8"))
    markdown = (out / "result.md").read_text(encoding="utf-8")
    assert (out / "stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["command"].startswith(f"radixpert-bench {args[0]} --bundle ") and "--warmup 1 --repeats 2" in data["command"]
    assert data["machine"]["cpu"] and data["machine"]["threads"] == 2 and data["machine"]["versions"]
    return {"data": data, "markdown": markdown}


def test_run_times_every_stage_and_writes_json_markdown_png(bundle, scan, tmp_path):
    bundle_dir, _ = bundle
    out = _invoke(["run", "--bundle", str(bundle_dir), "--scans", scan, "--quant", "q8_0", "--out", str(tmp_path), *FAST])
    data, markdown = out["data"], out["markdown"]
    summary = data["runtime"]["summary"]
    # Two processes (the default --rounds) x 2 timed reports, pooled.
    for stage in (*RUNTIME_STAGES, "prefill_ms", "ttft_ms", "total_ms", "decode_tokens_per_s"):
        assert summary[stage]["n"] == 4 and summary[stage]["min"] <= summary[stage]["median"] <= summary[stage]["max"]
    assert summary["new_tokens"]["median"] == 6 and len(data["runtime"]["samples"]) == 4
    assert summary["prefix_cached"]["min"] == 1.0  # the warm-up filled the prefix cache
    # Cold start runs from process start to the first token, so it includes loading the bundle.
    assert data["runtime"]["cold"]["n"] == 2
    assert all(p["cold_start_ms"] > p["load_ms"] for p in data["runtime"]["processes"]), data["runtime"]["processes"]
    assert len({p["pid"] for p in data["runtime"]["processes"]}) == 2 and data["params"]["rounds"] == 2
    assert data["runtime"]["engine"]["providers"] == ["CPUExecutionProvider"]
    b = data["bound"]
    assert b["gguf"] == "llm-q8_0.gguf"
    # The bound is this GGUF's bytes per token at the 2-thread bandwidth; the share is decode over it.
    per_token = b["bytes_per_token"]
    tensors = sum(t.nbytes for t in bound.read_gguf(bundle_dir / "llm-q8_0.gguf").tensors)
    assert per_token["weights"] > tensors and per_token["total"] == per_token["weights"] + per_token["kv"] > per_token["kv"] > 0
    assert b["bandwidth_gb_s"] == b["cpu_bandwidth"][1]["median_gb_s"]
    assert b["bound_tok_s"] == pytest.approx(b["bandwidth_gb_s"] * 1e9 / b["bytes_per_token"]["total"])
    assert b["achieved_tok_s"] == summary["decode_tokens_per_s"]["median"]
    assert b["share"] == pytest.approx(b["achieved_tok_s"] / b["bound_tok_s"])
    assert [r["threads"] for r in b["cpu_bandwidth"]] == [1, 2]
    for label in ("read", "visual prefill", "time to first token", "decode tokens/s", "cold start", "bandwidth bound"):
        assert label in markdown


def test_compare_runs_each_engine_in_its_own_process_with_the_same_token_count(bundle, scan, tmp_path):
    bundle_dir, _ = bundle
    out = _invoke(["compare", "--bundle", str(bundle_dir), "--scans", scan, "--quant", "f32", "--rounds", "1",
                   "--out", str(tmp_path), *FAST])
    data, markdown = out["data"], out["markdown"]
    runtime, eager = data["runtime"], data["eager"]
    pids = {p["pid"] for p in runtime["processes"] + eager["processes"]}
    assert len(pids) == 2 and os.getpid() not in pids
    assert not any(p["torch_loaded"] for p in runtime["processes"])  # the runtime's process stays torch-free
    assert not any(p["onnxruntime_loaded"] for p in eager["processes"])  # and ORT never shares torch's
    assert runtime["summary"]["new_tokens"]["median"] == eager["summary"]["new_tokens"]["median"] == 6
    assert all(len(s) and s["new_tokens"] == 6 for s in runtime["samples"] + eager["samples"])
    # Same weights: the f32 GGUF decodes the eager model's greedy tokens.
    assert data["token_agreement"] == {"common_prefix": 6, "tokens": 6}
    # Speed-up is eager over runtime for times, runtime over eager for the decode rate.
    for key in ("read_ms", "frontend_ms", "prefill_ms", "decode_ms", "total_ms"):
        assert data["ratios"][key] == pytest.approx(eager["summary"][key]["median"] / runtime["summary"][key]["median"])
    assert data["ratios"]["decode_tokens_per_s"] == pytest.approx(
        runtime["summary"]["decode_tokens_per_s"]["median"] / eager["summary"]["decode_tokens_per_s"]["median"])
    assert data["ratios"]["cold_start_ms"] == pytest.approx(eager["cold"]["median"] / runtime["cold"]["median"])
    assert "End to end" in markdown and "speed-up" in markdown and "cold start" in markdown
    assert data["eager"]["engine"]["dtype"] == "float32"


def test_the_bundle_carries_the_pytorch_frontend_that_matches_its_onnx(bundle):
    import torch
    from safetensors.torch import load_file

    from radixpert.bundle import load_bundle
    from radixpert.model import Frontend
    from radixpert.runtime.frontend import OnnxFrontend

    loaded = load_bundle(bundle[0], verify=True)
    frontend = Frontend.from_state(loaded.config, load_file(str(loaded.path_of("frontend-torch"))),
                                   loaded.manifest["visual"]["evidence"])
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        reference = frontend.eval()(torch.from_numpy(image))[0]
    exported, _ = OnnxFrontend(loaded.path_of("frontend"), providers=["CPUExecutionProvider"], threads=1).run(image)
    assert np.abs(reference.numpy() - exported).max() < 1e-4


def test_too_many_tokens_is_a_usage_error(bundle, scan, tmp_path):
    result = CliRunner().invoke(main, ["run", "--bundle", str(bundle[0]), "--scans", scan, "--tokens", "4000",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 2 and "does not fit" in result.output


def test_compare_needs_the_pytorch_frontend_in_the_bundle(bundle, scan, tmp_path):
    import shutil

    copy = tmp_path / "old-bundle"
    shutil.copytree(bundle[0], copy)
    manifest = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    manifest["files"] = [f for f in manifest["files"] if f["role"] != "frontend-torch"]
    (copy / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    result = CliRunner().invoke(main, ["compare", "--bundle", str(copy), "--scans", scan, "--out", str(tmp_path / "o")])
    assert result.exit_code == 4 and "re-export" in result.output


def test_default_output_folder_names():
    from radixpert.benchmarks.cli import _default_name

    assert _default_name("run", "demo", "q4_k_m") == "run-demo-q4_k_m"
    assert _default_name("synthetic", "synthetic-medgemma-4b-q8_0", "q8_0") == "synthetic-medgemma-4b-q8_0"


def test_a_failing_child_is_a_one_line_error(tmp_path):
    from radixpert.benchmarks.worker import run_isolated

    spec = {"engine": "runtime", "bundle": str(tmp_path / "missing"), "scans": [], "warmup": 0, "repeats": 1, "tokens": 2}
    with pytest.raises(ModelError, match="no manifest.json"):
        run_isolated(spec)


# --------------------------------------------------------------------------- the bound


def test_decode_bound_math_on_known_numbers():
    # 28 GB/s over 250 MB per token: 112 tokens/s at most.
    assert bound.decode_bound(28.0, 250e6) == pytest.approx(112.0)
    # Prompt of 100, 5 new tokens: steps 1..4 attend 101..104 positions.
    assert bound.mean_decode_positions(100, 5) == pytest.approx(102.5)
    meta = {"general.architecture": "gemma3", "gemma3.block_count": 2, "gemma3.attention.head_count": 4,
            "gemma3.attention.head_count_kv": 1, "gemma3.embedding_length": 64, "gemma3.attention.key_length": 32,
            "gemma3.attention.value_length": 32}
    embed = GgufTensor("token_embd.weight", 8, (64, 1000), 1000 * 2 * 34)  # q8_0: 2 blocks of 34 bytes a row
    layer = GgufTensor("blk.0.ffn_up.weight", 1, (64, 128), 64 * 128 * 2)
    tied = bound.bytes_per_token(GgufInfo(Path("x"), meta, [embed, layer]), positions=10)
    # Tied: the whole table as the output head, plus one looked-up row; KV = 2 layers x 1 head x (32+32) x 2 bytes.
    assert tied["weights"] == 68_000 + 16_384 + 68
    assert tied["kv_per_position"] == 256 and tied["kv"] == 2560 and tied["total"] == 68_000 + 16_384 + 68 + 2560
    head = GgufTensor("output.weight", 1, (64, 1000), 64 * 1000 * 2)
    untied = bound.bytes_per_token(GgufInfo(Path("x"), meta, [embed, layer, head]), positions=10)
    assert untied["weights"] == 16_384 + 128_000 + 68 and untied["output_head"] == 128_000


def test_gguf_reader_agrees_with_the_gguf_package(bundle):
    gguf = pytest.importorskip("gguf")
    for quant in ("f32", "f16", "q8_0"):
        path = bundle[0] / f"llm-{quant}.gguf"
        mine = read_gguf(path)
        check_complete(mine)
        theirs = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
        assert {t.name: t.nbytes for t in mine.tensors} == theirs
        assert mine.data_end == path.stat().st_size
        assert mine.meta("block_count") == 2


def test_a_truncated_gguf_is_refused(bundle, tmp_path):
    data = (bundle[0] / "llm-q8_0.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelError, match="truncated"):
        check_complete(read_gguf(cut))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8)
    with pytest.raises(ModelError):
        read_gguf(tmp_path / "junk.gguf")


def test_cpu_bandwidth_is_measured_per_thread_count():
    rows = cpu_read_bandwidth(2, nbytes=8 << 20, passes=2)
    assert [r["threads"] for r in rows] == [1, 2] and all(r["bytes"] == 8 << 20 for r in rows)
    assert at_threads(rows, 2) == rows[1]["median_gb_s"] and at_threads(rows, 8) == rows[1]["median_gb_s"]
    assert at_threads(rows, 1) == rows[0]["median_gb_s"]


def test_statistics_and_the_reproducibility_check(tmp_path):
    s = stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["max"] == 100.0 and s["p95"] == pytest.approx(80.8)
    assert within_spread(stats([1.0, 2.0, 3.0]), stats([1.5, 2.5, 3.5]))
    assert not within_spread(stats([1.0, 2.0, 3.0]), stats([10.0, 11.0, 12.0]))
    result = {"runtime": {"summary": {"total_ms": stats([1.0, 2.0, 3.0])}}}
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(result))
    out = CliRunner().invoke(main, ["diff", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert out.exit_code == 0 and "all within spread" in out.output


def test_a_synthetic_bundle_assembles_and_runs(bundle, tmp_path):
    """The synthetic path's bundle assembly, on the tiny model's parts instead of MedGemma-4b's."""
    from radixpert.benchmarks.stages import RuntimeEngine
    from radixpert.benchmarks.synthetic import _assemble
    from radixpert.bundle import load_bundle

    tiny = load_bundle(bundle[0])
    out = tmp_path / "bundles" / "synthetic-tiny-q8_0"
    _assemble(out, tiny.config, tiny.root / "hf", tiny.llm_path("q8_0"), tiny.path_of("frontend"), "q8_0", tokens=8)
    made = load_bundle(out, verify=True)
    assert made.manifest["synthetic"] and made.token_ids["prefix"] == tiny.token_ids["prefix"]
    assert made.token_ids["stop"] == tiny.token_ids["stop"]
    engine = RuntimeEngine(out, threads=1)
    image = tmp_path / "scan.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(1).random((128, 128)) * 65535).astype(np.uint16)).save(image)
    timings, ids = engine.report(str(image), 5)
    # Same frontend and GGUF as the tiny bundle: the same five tokens, whatever the template's assembly.
    _, expected = RuntimeEngine(bundle[0], threads=1, quant="q8_0").report(str(image), 5)
    assert ids == expected and len(ids) == 5
    assert timings["ttft_ms"] <= timings["total_ms"]
