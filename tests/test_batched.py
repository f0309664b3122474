"""Batched and speculative decoding give plain greedy decoding's tokens, scan by scan.

The reference is the one-scan-at-a-time path (``LlamaRunner.generate``, itself tested against
PyTorch in test_runtime.py), run on the same bundle at f32.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from radixpert.bundle import load_bundle
from radixpert.errors import UsageError
from radixpert.runtime.batched import BatchDecoder
from radixpert.runtime.llm import LlamaRunner
from radixpert.runtime.ngram import NgramDrafter
from radixpert.runtime.pipeline import Reporter, kv_bytes_per_token


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> list[Path]:
    from radixpert.phantom import write_dataset

    table = write_dataset(tmp_path_factory.mktemp("scans"), n=10, seed=23, size=256, workers=1)
    with open(table, newline="", encoding="utf-8") as handle:
        return [table.parent / row["DicomPath"] for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def plain(bundle, scans):
    """One scan at a time, no drafts: the reference tokens and the visual tokens that made them."""
    reporter = Reporter(load_bundle(bundle[0]), quant="f32", threads=2, speculative=False)
    try:
        results = [reporter.report(p) for p in scans]
    finally:
        reporter.close()
    return results


def test_report_many_batched_and_speculative_equal_plain_greedy(bundle, scans, plain):
    loaded = load_bundle(bundle[0])
    assert loaded.path_of("ngram") is not None
    for batch in (1, 4):
        reporter = Reporter(loaded, quant="f32", threads=2, batch=batch, speculative=True)
        try:
            produced = list(reporter.report_many(scans))
        finally:
            reporter.close()
        assert [r.tokens for r in produced] == [r.tokens for r in plain]
        assert [r.report for r in produced] == [r.report for r in plain]
        assert [r.path for r in produced] == [str(p) for p in scans]  # input order


def test_decoder_with_drafts_that_are_mostly_right_equals_plain_greedy(bundle, scans, plain):
    """Drafts taken from the reference itself (long accepted runs) and from other scans' reports
    (partly wrong): every acceptance path, against the reference tokens."""
    loaded = load_bundle(bundle[0])
    tokens = loaded.token_ids
    tail = tokens["suffix"][-6:]
    references = [r.tokens for r in plain]
    with LlamaRunner(loaded.llm_path("f32"), n_ctx=loaded.manifest["llm"]["n_ctx"], threads=2, gpu_layers=0,
                     n_seq=4, n_batch=512) as runner:
        from radixpert.imageio import letterbox_resize, normalize_imagenet
        from radixpert.runtime.frontend import OnnxFrontend

        frontend = OnnxFrontend(loaded.path_of("frontend"), threads=2)
        visual = frontend.run(np.stack([normalize_imagenet(letterbox_resize(r.display, 224)) for r in plain]))[0]
        # Half the reports, drafting whatever matched (no confidence cut): many drafts are rejected.
        drafters = (NgramDrafter([tail + t for t in references]),
                    NgramDrafter([tail + t for t in references[::2]], min_confidence=0.0, min_confident=1, lengths=None))
        for drafter in drafters:
            decoder = BatchDecoder(runner, tokens["prefix"], tokens["suffix"], 128, tokens["stop"], drafter, 8)
            queue = list(enumerate(visual))

            def fill(free: int):
                taken = queue[:free]
                del queue[:free]
                return taken

            results = dict(decoder.run(fill))
            assert [results[i].tokens for i in range(len(plain))] == references
            assert sum(r.accepted for r in results.values()) > 0
        assert sum(r.drafted - r.accepted for r in results.values()) > 0  # the rejection path ran too


REPORTS = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 5], [9, 2, 3, 7]]


def test_ngram_drafter_proposes_the_most_frequent_continuation():
    drafter = NgramDrafter(REPORTS, min_confidence=0.0, min_confident=1, lengths=None)
    assert drafter.propose([1, 2, 3], 1) == [5]  # (1, 2, 3) -> 5 twice, 4 once
    assert drafter.propose([9, 2, 3], 3) == [7]  # nothing follows 7
    assert drafter.propose([8, 3], 2) == []  # an unseen context: no draft
    assert drafter.propose([0, 1, 2], 4) == [3, 5]


def test_ngram_drafter_stops_where_the_reports_disagree():
    """(1, 2) -> 3 in every report (share 1); (1, 2, 3) -> 5 in two of three (share 2/3)."""
    exact_lengths = {"min_confident": 1, "lengths": None}
    assert NgramDrafter(REPORTS, min_confidence=0.7, **exact_lengths).propose([0, 1, 2], 4) == [3]
    assert NgramDrafter(REPORTS, min_confidence=0.6, **exact_lengths).propose([0, 1, 2], 4) == [3, 5]
    assert NgramDrafter(REPORTS, **exact_lengths).propose([1, 2, 3], 1) == []  # the default cut, 0.7


LONG_REPORTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]] * 3 + [[1, 2, 3, 4, 5, 6, 7, 11, 12, 13]] * 2 + [[20, 21, 22, 23]]


def test_ngram_drafts_fill_verify_steps_of_4_6_or_8_positions():
    """Shares along 1..10 are 1, except 8 after 7 (3 of 5 reports: 0.6). A draft needs 2 confident
    tokens (share product >= 0.7), then takes the smallest of 3, 5 or 7 tokens that holds them,
    past the cut if it must, or the largest that fits."""
    drafter = NgramDrafter(LONG_REPORTS)
    assert drafter.propose([1, 2], 7) == [3, 4, 5, 6, 7]  # 5 confident: a step of 6 positions
    assert drafter.propose([2, 3], 7) == [4, 5, 6, 7, 8]  # 4 confident, filled to 5 with the uncertain 8
    assert drafter.propose([4, 5], 7) == [6, 7, 8]  # 2 confident, filled to 3
    assert drafter.propose([2, 3], 4) == [4, 5, 6]  # 4 confident, but at most 4 asked: 3
    assert drafter.propose([1, 2], 2) == []  # none of 3, 5, 7 fits in 2
    assert drafter.propose([7, 8], 7) == []  # the reports end 2 tokens on: none fits
    assert drafter.propose([5, 6], 7) == []  # 1 confident token (7; then 8 at 0.6): under 2
    assert drafter.propose([21, 22], 7) == []  # 1 token left: under 2


def test_batch_refuses_a_kv_cache_that_does_not_fit(bundle):
    loaded = load_bundle(bundle[0])
    per_stream = kv_bytes_per_token(loaded.config) * loaded.manifest["llm"]["n_ctx"] / 2**20
    with pytest.raises(UsageError, match=r"--batch 8 needs .* MiB of KV cache"):
        Reporter(loaded, quant="f32", threads=1, batch=8, kv_memory_mib=per_stream * 8.5)
    Reporter(loaded, quant="f32", threads=1, batch=8, kv_memory_mib=per_stream * 9.5).close()  # 8 + the prefix stream


def test_speculative_is_on_where_exact_and_needs_the_ngram_index(bundle, monkeypatch):
    """speculative=None decides from the bundle's quantization name before llama.cpp loads the file;
    the loaded runner, from llama.cpp's own file type, must agree."""
    loaded = load_bundle(bundle[0])
    for quant in loaded.quants:
        reporter = Reporter(loaded, quant=quant, threads=1, speculative=None)
        try:
            assert reporter.speculative == reporter.llm.batch_invariant(), quant
        finally:
            reporter.close()
    real = loaded.path_of
    monkeypatch.setattr(loaded, "path_of", lambda role: None if role == "ngram" else real(role))
    with pytest.raises(UsageError, match="no n-gram index"):
        Reporter(loaded, threads=1, speculative=True)
    reporter = Reporter(loaded, threads=1, speculative=None)
    assert not reporter.speculative
    reporter.close()


def test_kv_size_matches_llama_cpp(bundle):
    """Our per-token KV estimate against the growth of llama.cpp's own saved state of a sequence
    (within the sliding window, where every layer keeps every token)."""
    import llama_cpp

    loaded = load_bundle(bundle[0])
    sizes = []
    for count in (20, 50):
        assert count <= loaded.config.llm_sliding_window
        with LlamaRunner(loaded.llm_path("f32"), n_ctx=loaded.manifest["llm"]["n_ctx"], threads=1, gpu_layers=0) as runner:
            runner.eval_tokens(list(range(10, 10 + count)))
            sizes.append(llama_cpp.llama_state_seq_get_size(runner._ctx, 0))
    # The saved state also holds each cell's position and sequence ids (12 bytes per cache: the
    # sliding-window one and the full one), beside the K and V data the estimate counts.
    per_token = (sizes[1] - sizes[0]) / 30
    assert kv_bytes_per_token(loaded.config) <= per_token <= kv_bytes_per_token(loaded.config) + 32, per_token


def test_cli_batch_prints_the_same_reports_in_input_order(bundle, scans):
    import subprocess
    import sys

    out, _ = bundle

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "radixpert.runtime.cli", *map(str, scans[:5]), "--bundle", str(out),
                               "--format", "json", "--quant", "f32", "--on-implausible", "warn", "--threads", "2", *extra],
                              capture_output=True, text=True, timeout=300)

    one, four = run(), run("--batch", "4")
    assert one.returncode == four.returncode == 0, one.stderr[-2000:] + four.stderr[-2000:]
    rows_one = [json.loads(line) for line in one.stdout.splitlines()]
    rows_four = [json.loads(line) for line in four.stdout.splitlines()]
    assert [r["input"] for r in rows_four] == [str(p) for p in scans[:5]]
    assert [r["report"] for r in rows_four] == [r["report"] for r in rows_one]
    assert {r["batch"] for r in rows_four} == {4} and not rows_four[0]["speculative"]
    refused = run("--batch", "8", "--kv-memory", "1")
    assert refused.returncode == 2 and "needs" in refused.stderr and "MiB of KV cache" in refused.stderr
    assert "Traceback" not in refused.stderr
