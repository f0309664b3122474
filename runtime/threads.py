"""How the runtime shares the CPU with other processes (torch-free).

llama.cpp (built with OpenMP) splits every step of a report across its threads, and each step
waits for the slowest one. Beside another busy process (a second report, a PACS service, a
backup), one of our threads keeps losing its core, and the others wait for it, spinning: on a
2-core machine one CPU-bound neighbour made a report 2.9x slower (`radixpert-bench contention`,
benchmarks/results/contention-demo). Sleeping instead of spinning (OpenMP's passive policy)
costs 1.7x on an idle machine, because each of the thousands of barriers per report then pays a
wake-up. So the default keeps llama.cpp's spinning and instead chooses, before each report, as
many threads as there are idle CPUs (at least one), from the number of runnable tasks the kernel
reports right then; an explicit ``--threads`` fixes the number. ONNX Runtime's frontend does a
few large operations per report, so its workers never spin.

``RADIXPERT_THREAD_POLICY``: ``adaptive`` (the default, above), ``spin`` (fixed threads and
ONNX Runtime spinning: the behaviour before this setting existed) or ``passive`` (fixed threads,
nothing spins). An ``OMP_WAIT_POLICY`` the user set wins.
"""

from __future__ import annotations

import os
import time

from radixpert.errors import UsageError

THREAD_POLICY_ENV = "RADIXPERT_THREAD_POLICY"
POLICIES = ("adaptive", "spin", "passive")
LOADAVG = "/proc/loadavg"


def thread_policy() -> str:
    """``adaptive`` (the default), ``spin`` or ``passive``, from ``$RADIXPERT_THREAD_POLICY``."""
    value = os.environ.get(THREAD_POLICY_ENV, "adaptive").strip().lower() or "adaptive"
    if value not in POLICIES:
        raise UsageError(f"{THREAD_POLICY_ENV} must be one of {', '.join(POLICIES)}, got {value!r}")
    return value


def configure_openmp() -> None:
    """Set OpenMP's wait policy before llama.cpp's OpenMP runtime loads (it reads it once, at load)."""
    if thread_policy() == "passive":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def ort_allow_spinning() -> str:
    """ONNX Runtime's ``session.*.allow_spinning`` value for this policy."""
    return "1" if thread_policy() == "spin" else "0"


def usable_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_neighbours(samples: int = 5, gap_s: float = 0.001, path: str = LOADAVG) -> int | None:
    """Runnable tasks other than this reader, right now; None where the kernel does not say.

    The fourth field of /proc/loadavg counts tasks running or ready to run, the reader included.
    The least of a few samples a millisecond apart ignores short-lived tasks.
    """
    counts = []
    for i in range(samples):
        try:
            with open(path, encoding="ascii") as handle:
                running = handle.read().split()[3].split("/")[0]
            counts.append(int(running) - 1)
        except (OSError, IndexError, ValueError):
            return None
        if i + 1 < samples:
            time.sleep(gap_s)
    return max(0, min(counts))


def threads_for_load(maximum: int, neighbours: int | None = None) -> int:
    """As many threads as idle CPUs, between 1 and ``maximum``."""
    others = busy_neighbours() if neighbours is None else neighbours
    if others is None:
        return maximum
    return max(1, min(maximum, usable_cpus() - others))
