"""Memory read bandwidth: the CPU's with numpy in 1..T threads, a CUDA GPU's with torch.

CPU: each thread sums its own slice of one large int64 array (far larger than the caches).
numpy releases the GIL inside reductions, and an integer add is far cheaper than a load, so
the threads run in parallel and wait on memory only. The bound uses the median of the passes
(the bandwidth a decode lasting seconds can count on); the best pass is reported too. On a shared
virtual machine the best pass is an outlier now and then (a neighbour went quiet for a moment),
which made bounds, and shares, swing by 1.6x between two runs of the same command.

GPU: ``torch.sum`` over 1 GiB with CUDA events, in a child process (``python -m
radixpert.benchmarks.bandwidth --gpu``) so the benchmark process itself never imports torch.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

DEFAULT_BYTES = 1 << 30


def cpu_read_bandwidth(max_threads: int, nbytes: int = DEFAULT_BYTES, passes: int = 10) -> list[dict[str, Any]]:
    """Read bandwidth (GB/s, 1e9 bytes) with 1..max_threads threads: best and median of ``passes``."""
    buffer = np.ones(max(1, nbytes // 8), dtype=np.int64)  # written once, so every page is mapped
    rows = []
    for threads in range(1, max(1, max_threads) + 1):
        chunks = np.array_split(buffer, threads)
        with ThreadPoolExecutor(threads) as pool:
            seconds = []
            for _ in range(passes + 1):
                started = time.perf_counter()
                list(pool.map(np.add.reduce, chunks))
                seconds.append(time.perf_counter() - started)
        seconds = seconds[1:]  # the first pass warms the pool and the TLB
        rows.append({"threads": threads, "best_gb_s": buffer.nbytes / min(seconds) / 1e9,
                     "median_gb_s": buffer.nbytes / statistics.median(seconds) / 1e9, "bytes": int(buffer.nbytes)})
    return rows


def at_threads(rows: list[dict[str, Any]], threads: int) -> float:
    """The median bandwidth measured with ``threads`` threads (or the most threads measured)."""
    usable = [r for r in rows if r["threads"] <= threads] or rows
    return max(usable, key=lambda r: r["threads"])["median_gb_s"]


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name from nvidia-smi, without importing torch."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if out.returncode == 0 and names else None


def gpu_read_bandwidth_isolated(timeout: float = 300) -> dict[str, Any]:
    """The GPU's read bandwidth from a child process, or {"skipped": why}."""
    if gpu_name() is None:
        return {"skipped": "no NVIDIA GPU found (nvidia-smi)"}
    if importlib.util.find_spec("torch") is None:
        return {"skipped": "torch is not installed here; it measures the GPU's bandwidth"}
    try:
        out = subprocess.run([sys.executable, "-m", "radixpert.benchmarks.bandwidth", "--gpu"], capture_output=True,
                             text=True, timeout=timeout)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"skipped": "the GPU bandwidth measurement failed"}


def _gpu_read_bandwidth(nbytes: int = DEFAULT_BYTES, passes: int = 20) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    x = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    x.sum()
    torch.cuda.synchronize()
    times = []
    for _ in range(passes):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return {"name": torch.cuda.get_device_name(), "best_gb_s": x.nbytes / min(times) / 1e9,
            "median_gb_s": x.nbytes / statistics.median(times) / 1e9, "bytes": int(x.nbytes)}


if __name__ == "__main__":
    if "--gpu" in sys.argv:
        print(json.dumps(_gpu_read_bandwidth()))
    else:
        print(json.dumps(cpu_read_bandwidth(int(sys.argv[1]) if len(sys.argv) > 1 else 2)))
