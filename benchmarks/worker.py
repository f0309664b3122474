"""One engine's measurement in a process of its own: ``python -m radixpert.benchmarks.worker SPEC OUT``.

Every measurement runs in a fresh process: torch and ONNX Runtime never share one (their thread
pools fight), the runtime's process stays torch-free, and cold start (process start to first
token) is real. The child prints ``PROGRESS i n`` lines and writes its result as JSON to OUT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from radixpert.errors import InputError, ModelError, RadixpertError, UsageError

ENGINES = ("runtime", "eager")
_BY_CODE = {2: UsageError, 3: InputError, 4: ModelError}


def run_isolated(spec: dict[str, Any], progress: Callable[[int, int], None] | None = None,
                 timeout: float | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``spec`` (engine, bundle, scans, warmup, repeats, tokens, threads, ...) in a child process,
    with ``env`` added to this process's environment."""
    with tempfile.TemporaryDirectory(prefix="radixpert-bench-") as tmp:
        spec_path, out_path, err_path = Path(tmp) / "spec.json", Path(tmp) / "out.json", Path(tmp) / "stderr.txt"
        spec = {**spec, "spawned_at": time.time()}
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        with open(err_path, "w", encoding="utf-8") as err:
            child = subprocess.Popen([sys.executable, "-m", "radixpert.benchmarks.worker", str(spec_path), str(out_path)],
                                     stdout=subprocess.PIPE, stderr=err, text=True,
                                     env={**os.environ, **env} if env else None)
            assert child.stdout is not None
            for line in child.stdout:
                parts = line.split()
                if len(parts) == 3 and parts[0] == "PROGRESS" and progress is not None:
                    progress(int(parts[1]), int(parts[2]))
            try:
                code = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                raise RadixpertError(f"the {spec['engine']} benchmark process ran past {timeout:.0f} s and was stopped") from None
        result = json.loads(out_path.read_text(encoding="utf-8")) if out_path.is_file() else None
        if code != 0 or result is None or "error" in result:
            message = (result or {}).get("error") or _last_line(err_path) or f"exit code {code}"
            raise _BY_CODE.get(code, RadixpertError)(f"{spec['engine']} benchmark failed: {message}")
        result["pid"] = result.get("pid", child.pid)
        return result


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _child(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    try:
        from radixpert.benchmarks.stages import measure

        if spec["engine"] == "runtime":
            from radixpert.benchmarks.stages import RuntimeEngine

            engine: Any = RuntimeEngine(spec["bundle"], threads=spec.get("threads"), quant=spec.get("quant"),
                                        providers=spec.get("providers"), gpu_layers=spec.get("gpu_layers"),
                                        frontend=spec.get("frontend", "fp32"), speculative=spec.get("speculative", False))
        elif spec["engine"] == "eager":
            from radixpert.benchmarks.eager import EagerEngine

            engine = EagerEngine(spec["bundle"], threads=spec.get("threads"), device=spec.get("device"))
        else:
            raise UsageError(f"unknown engine {spec['engine']!r}; choose one of {', '.join(ENGINES)}")

        def progress(done: int, total: int) -> None:
            print(f"PROGRESS {done} {total}", flush=True)

        result = measure(engine, spec["scans"], spec["warmup"], spec["repeats"], spec["tokens"], spec["spawned_at"], progress)
        # Proof of isolation, checked by the tests: which heavy libraries this process loaded.
        loaded = {m.split(".")[0] for m in sys.modules}
        result.update(pid=os.getpid(), torch_loaded="torch" in loaded, onnxruntime_loaded="onnxruntime" in loaded)
        code = 0
    except RadixpertError as exc:
        result, code = {"error": str(exc)}, exc.exit_code
    except Exception as exc:  # report the bug in one line; the parent shows it
        result, code = {"error": f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}, 1
    Path(out_path).write_text(json.dumps(result), encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2]))
