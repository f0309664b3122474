"""Worker threads wait passively by default: OpenMP (llama.cpp) and ONNX Runtime both."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "RADIXPERT_THREAD_WAIT")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_default_is_passive_before_llama_cpp_loads():
    assert _probe() == {"omp": "PASSIVE", "intra": "0", "inter": "0"}


def test_spin_restores_spinning_and_a_user_policy_wins():
    assert _probe(RADIXPERT_THREAD_WAIT="spin") == {"omp": None, "intra": "1", "inter": "1"}
    assert _probe(OMP_WAIT_POLICY="ACTIVE")["omp"] == "ACTIVE"


def test_unknown_setting_is_a_usage_error(monkeypatch):
    from radixpert.errors import UsageError
    from radixpert.runtime.threads import thread_wait

    monkeypatch.setenv("RADIXPERT_THREAD_WAIT", "sometimes")
    with pytest.raises(UsageError, match="RADIXPERT_THREAD_WAIT"):
        thread_wait()
