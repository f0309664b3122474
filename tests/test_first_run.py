"""Two radixpert-run processes started together on an empty cache: both report, one build runs.

The default bundle is built from RADIXPERT_DEMO_WEIGHTS, here the tiny test run packed like the
shipped demo weights, so the real first-run path (radixpert-run -> radixpert-export --demo in a
child process, under the bundle's lock) runs in seconds instead of minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pneumothorax-left_mono1-rle.dcm"


def test_two_first_runs_at_once_both_report_and_build_once(run_dir, tmp_path):
    from radixpert.export.pack import pack_checkpoint
    from radixpert.train.checkpoint import resolve_checkpoint

    weights = pack_checkpoint(resolve_checkpoint(run_dir), tmp_path / "weights")
    env = {k: v for k, v in os.environ.items() if k != "RADIXPERT_BUNDLE"}
    env.update(RADIXPERT_CACHE=str(tmp_path / "cache"), RADIXPERT_DEMO_WEIGHTS=str(weights), HOME=str(tmp_path / "home"))
    command = [sys.executable, "-m", "radixpert.runtime.cli", str(EXAMPLE), "--threads", "1", "--max-new-tokens", "8",
               "--on-implausible", "warn"]  # the tiny test model's U-Net is untrained: its anatomy gate is noise
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outputs = [run.communicate(timeout=1200) for run in runs]
    finally:
        for run in runs:
            run.kill()
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-800:]
        assert out.strip(), err[-800:]  # a report on stdout
    errs = [err for _, err in outputs]
    started = sum("No demo bundle yet: building it once" in err for err in errs)
    reused = sum("using the bundle another process built meanwhile" in err for err in errs)
    assert started - reused == 1, errs
    assert (tmp_path / "cache" / "bundles" / "demo" / "manifest.json").is_file()
    assert not [p for p in (tmp_path / "cache" / "bundles").iterdir() if ".partial" in p.name]
