"""Offline means offline: a full radixpert-run writes nothing outside its output and cache folders.

onnxruntime keeps a telemetry store (a device id and queued events naming models and providers)
under ~/.cache/Microsoft unless it is switched off before it is imported; this run proves it is.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    from radixpert.phantom import write_dataset

    table = write_dataset(tmp_path_factory.mktemp("offline-scan"), n=1, seed=2, size=256, workers=1)
    with open(table, newline="", encoding="utf-8") as handle:
        return table.parent / next(csv.DictReader(handle))["DicomPath"]


def _fresh_home_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    # onnxruntime keeps no telemetry store when CI is set (measured with 1.32), which would hide
    # a regression in CI: the children run without it, as on a user's machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "ORT_")) and k != "CI"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_DATA_HOME=str(home / ".local" / "share"), XDG_STATE_HOME=str(home / ".local" / "state"),
               RADIXPERT_CACHE=str(tmp_path / "cache"))
    return env


def test_a_full_run_writes_nothing_under_home(bundle, scan, tmp_path):
    out, _ = bundle
    env = _fresh_home_env(tmp_path)
    for fmt in ("text", "json"):
        done = subprocess.run([sys.executable, "-m", "radixpert.runtime.cli", str(scan), "--bundle", str(out),
                               "--format", fmt, "--sr", "--overlay", "--out", str(tmp_path / f"out-{fmt}"), "--timings",
                               "--max-new-tokens", "4", "--on-implausible", "warn"], capture_output=True, text=True,
                              timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    home = Path(env["HOME"])
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert written == [], f"radixpert-run wrote under HOME: {written}"
    assert any((tmp_path / "out-text").iterdir())


def test_onnxruntime_would_write_there_if_not_told(tmp_path):
    """The check above can fail: onnxruntime alone, imported without radixpert, does write under HOME."""
    env = _fresh_home_env(tmp_path)
    done = subprocess.run([sys.executable, "-c", "import onnxruntime"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    microsoft = Path(env["HOME"]) / ".cache" / "Microsoft"
    if not microsoft.exists():
        pytest.skip("this onnxruntime build keeps no telemetry store")
    assert any(microsoft.rglob("*"))
