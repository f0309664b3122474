"""Every load checks the bundle: its manifest against its id, and each file against a stamp or its sha256."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from radixpert import bundle as bundle_module
from radixpert.bundle import load_bundle, manifest_bundle_id, stamp_file
from radixpert.errors import ModelError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pneumothorax-left_mono1-rle.dcm"


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("RADIXPERT_CACHE", str(folder))
    # Files just written could still change unseen within the file system's time resolution, so
    # they are not stamped; these tests stamp at once.
    monkeypatch.setattr(bundle_module, "STAMP_MIN_AGE_NS", 0)
    return folder


@pytest.fixture()
def copy(bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle, free to damage."""
    folder = tmp_path / "bundle"
    shutil.copytree(bundle[0], folder)
    return folder


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _run(bundle_dir: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RADIXPERT_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "radixpert.runtime.cli", str(EXAMPLE), "--bundle", str(bundle_dir),
                           "--threads", "1", "--max-new-tokens", "4", "--on-implausible", "warn", *extra],
                          capture_output=True, text=True, timeout=300, env=env)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def test_the_first_load_stamps_every_file_and_later_loads_do_not_hash(copy, cache, monkeypatch):
    load_bundle(copy)
    stamp = json.loads(stamp_file(copy).read_text(encoding="utf-8"))
    manifest = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    assert set(stamp["files"]) == {e["path"] for e in manifest["files"]}

    def no_hashing(path, *args):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(bundle_module, "sha256_of", no_hashing)
    load_bundle(copy)
    with pytest.raises(AssertionError, match="hashed again"):
        load_bundle(copy, verify=True)  # --verify hashes every file whatever the stamp says


@pytest.mark.parametrize("name", ["frontend.onnx", "llm-q8_0.gguf", "labels.json"])
def test_one_flipped_byte_makes_the_next_run_refuse_the_bundle(copy, cache, name):
    load_bundle(copy)  # as a first run does: every file hashed and stamped
    assert stamp_file(copy).is_file()
    path = copy / name
    size = path.stat().st_size
    _flip_one_byte(path)
    assert path.stat().st_size == size
    done = _run(copy, cache)
    assert done.returncode == 4, done.stderr[-2000:]
    line = _one_line(done.stderr)
    assert name in line and "sha256" in line
    assert done.stdout == ""


def test_a_flipped_byte_with_its_modification_time_put_back_is_still_caught(copy, cache):
    load_bundle(copy)
    path = copy / "llm-q8_0.gguf"
    before = path.stat()
    _flip_one_byte(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as stamped; ctime moved
    with pytest.raises(ModelError, match="llm-q8_0.gguf fails its sha256 check"):
        load_bundle(copy)


def test_an_undamaged_copy_runs(copy, cache):
    load_bundle(copy)
    done = _run(copy, cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()


@pytest.mark.parametrize("edit", [
    lambda m: m["tokens"]["prefix"].append(7),
    lambda m: m["prompt"].update(prefix=m["prompt"]["prefix"] + " "),
    lambda m: m["config"].update(llm_dim=m["config"]["llm_dim"] * 2),
    lambda m: m["llm"].update(n_ctx=m["llm"]["n_ctx"] + 256),
    lambda m: m["files"][0].update(sha256="0" * 64),
    lambda m: m.update(bundle_id="0123456789abcdef"),
], ids=["tokens", "prompt", "config", "n_ctx", "file-hash", "bundle_id"])
def test_an_edited_manifest_is_refused(copy, cache, edit):
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    with pytest.raises(ModelError, match="does not match its bundle_id"):
        load_bundle(copy)


def test_an_edited_manifest_makes_the_run_exit_4_with_one_line(copy, cache):
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["tokens"]["stop"] = []
    path.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    done = _run(copy, cache)
    assert done.returncode == 4, done.stderr[-2000:]
    assert "bundle_id" in _one_line(done.stderr)


def test_the_id_ignores_build_records_and_inspection_files_only(bundle):
    manifest = json.loads((bundle[0] / "manifest.json").read_text(encoding="utf-8"))
    assert manifest_bundle_id(manifest) == manifest["bundle_id"]
    records = {**manifest, "created": "2000-01-01T00:00:00+00:00", "steps": [],
               "files": [e for e in manifest["files"] if e["role"] != "hf"]}
    assert manifest_bundle_id(records) == manifest["bundle_id"]
    assert manifest_bundle_id({**manifest, "parity": {}}) != manifest["bundle_id"]
    assert manifest_bundle_id({**manifest, "visual": {}}) != manifest["bundle_id"]


def test_an_unwritable_cache_only_costs_hashing(copy, tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("RADIXPERT_CACHE", str(blocked))
    load_bundle(copy)
    load_bundle(copy)
