"""How the runtime shares the CPU: LLM threads follow the idle CPUs, ONNX Runtime never spins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from radixpert.runtime.threads import busy_neighbours, threads_for_load, usable_cpus

PROBE = """
import json, os
from radixpert.runtime.llm import _import_llama_cpp
from radixpert.runtime.frontend import session_options
_import_llama_cpp()
options = session_options(1)
print(json.dumps({"omp": os.environ.get("OMP_WAIT_POLICY"),
                  "intra": options.get_session_config_entry("session.intra_op.allow_spinning"),
                  "inter": options.get_session_config_entry("session.inter_op.allow_spinning")}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "RADIXPERT_THREAD_POLICY")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_default_keeps_openmp_spinning_and_stops_onnxruntime_spinning():
    assert _probe() == {"omp": None, "intra": "0", "inter": "0"}


def test_policies_spin_and_passive():
    assert _probe(RADIXPERT_THREAD_POLICY="spin") == {"omp": None, "intra": "1", "inter": "1"}
    assert _probe(RADIXPERT_THREAD_POLICY="passive") == {"omp": "PASSIVE", "intra": "0", "inter": "0"}
    assert _probe(RADIXPERT_THREAD_POLICY="passive", OMP_WAIT_POLICY="ACTIVE")["omp"] == "ACTIVE"


def test_unknown_policy_is_a_usage_error(monkeypatch):
    from radixpert.errors import UsageError
    from radixpert.runtime.threads import thread_policy

    monkeypatch.setenv("RADIXPERT_THREAD_POLICY", "sometimes")
    with pytest.raises(UsageError, match="RADIXPERT_THREAD_POLICY"):
        thread_policy()


def test_runnable_count_comes_from_loadavg_without_the_reader(tmp_path):
    fake = tmp_path / "loadavg"
    fake.write_text("0.50 0.40 0.30 3/84 12345\n", encoding="ascii")
    assert busy_neighbours(samples=2, gap_s=0, path=str(fake)) == 2
    fake.write_text("garbage\n", encoding="ascii")
    assert busy_neighbours(samples=1, path=str(fake)) is None
    assert busy_neighbours(samples=1, path=str(tmp_path / "missing")) is None


def test_threads_follow_idle_cpus():
    cpus = usable_cpus()
    assert threads_for_load(8, neighbours=0) == min(8, cpus)
    assert threads_for_load(8, neighbours=1) == max(1, min(8, cpus - 1))
    assert threads_for_load(8, neighbours=cpus + 5) == 1
    assert threads_for_load(2, neighbours=0) == min(2, cpus)


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="needs Linux /proc/loadavg")
def test_a_busy_neighbour_is_seen():
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        seen = 0
        for _ in range(50):  # bounded: about 5 s at most
            seen = busy_neighbours(samples=3)
            if seen and seen >= 1:
                break
            time.sleep(0.1)
        assert seen is not None and seen >= 1
    finally:
        neighbour.kill()
        neighbour.wait(timeout=10)


def test_reporter_takes_fewer_llm_threads_beside_a_busy_process(bundle):
    from radixpert.bundle import load_bundle
    from radixpert.runtime.pipeline import Reporter

    out, _ = bundle
    reporter = Reporter(load_bundle(out), quant="f32", max_new_tokens=2)
    fixed = Reporter(load_bundle(out), quant="f32", max_new_tokens=2, threads=reporter.llm.threads)
    try:
        if usable_cpus() > reporter.llm.threads:
            pytest.skip("more CPUs than LLM threads: one neighbour leaves enough idle CPUs")
        path = _example()
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.2)
            adaptive = reporter.report(path).timings["llm_threads"]
            pinned = fixed.report(path).timings["llm_threads"]
        finally:
            neighbour.kill()
            neighbour.wait(timeout=10)
        assert pinned == reporter.llm.threads and adaptive < pinned
    finally:
        reporter.close()
        fixed.close()


def _example():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "examples" / "pneumothorax-left_mono1-rle.dcm"
