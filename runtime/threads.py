"""How the runtime's worker threads wait: passive by default (torch-free).

llama.cpp (built with OpenMP) and ONNX Runtime both let idle worker threads spin. On a machine
that runs nothing else, spinning saves a few microseconds per step; beside any other busy
process (a second report, a PACS service, a backup) a spinning thread burns the core that the
thread it waits for needs, and every step waits for the slowest thread. `radixpert-bench
contention` measures both; the default is the one that holds up under load at no idle cost.

``RADIXPERT_THREAD_WAIT=spin`` restores spinning; an ``OMP_WAIT_POLICY`` the user set wins.
"""

from __future__ import annotations

import os

from radixpert.errors import UsageError

THREAD_WAIT_ENV = "RADIXPERT_THREAD_WAIT"
CHOICES = ("passive", "spin")


def thread_wait() -> str:
    """``passive`` (the default) or ``spin``, from ``$RADIXPERT_THREAD_WAIT``."""
    value = os.environ.get(THREAD_WAIT_ENV, "passive").strip().lower() or "passive"
    if value not in CHOICES:
        raise UsageError(f"{THREAD_WAIT_ENV} must be one of {', '.join(CHOICES)}, got {value!r}")
    return value


def configure_openmp() -> None:
    """Set OpenMP's wait policy before llama.cpp's OpenMP runtime loads (it reads it once, at load)."""
    if thread_wait() == "passive":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def ort_allow_spinning() -> str:
    """ONNX Runtime's ``session.intra_op.allow_spinning`` / ``inter_op`` value for this setting."""
    return "1" if thread_wait() == "spin" else "0"
