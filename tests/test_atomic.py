"""Atomic, locked builds: one build for concurrent callers, and a killed build is never used."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from radixpert.atomic import atomic_build, build_once, commit, file_lock, lock_path, partial_path
from radixpert.bundle import load_bundle
from radixpert.errors import ModelError


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != name and p.name.startswith(name))


def test_build_once_builds_into_a_partial_and_then_reuses_the_result(tmp_path):
    calls: list[Path] = []

    def build(partial: Path) -> None:
        calls.append(partial)
        assert not (tmp_path / "x").exists()  # the target appears only when complete
        partial.mkdir()
        (partial / "a.txt").write_text("done")

    assert build_once(tmp_path / "x", build) == tmp_path / "x"
    assert build_once(tmp_path / "x", build) == tmp_path / "x"
    assert len(calls) == 1 and calls[0].name.startswith(f"x.partial-{os.getpid()}-")
    assert (tmp_path / "x" / "a.txt").read_text() == "done"
    assert _leftovers(tmp_path, "x") == []  # no partial, no lock file left


def test_partial_names_are_unique():
    assert len({partial_path(Path("/tmp/out")) for _ in range(50)}) == 50


def test_a_failed_build_leaves_the_old_target_and_no_partial(tmp_path):
    target = tmp_path / "x"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_build(target) as partial:
            partial.mkdir()
            (partial / "new.txt").write_text("half")
            raise RuntimeError("killed halfway")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert _leftovers(tmp_path, "x") == []


def test_a_rebuild_replaces_the_folder_and_removes_the_old_one(tmp_path):
    target = tmp_path / "x"
    for content in ("first", "second"):
        with atomic_build(target) as partial:
            partial.mkdir()
            (partial / "v.txt").write_text(content)
    assert [p.name for p in target.iterdir()] == ["v.txt"] and (target / "v.txt").read_text() == "second"
    assert _leftovers(tmp_path, "x") == []


def test_leftovers_of_dead_builds_are_removed_under_the_lock(tmp_path):
    dead = [tmp_path / "x.partial-999999-abcd", tmp_path / "x.old-999999-abcd"]
    for folder in dead:
        folder.mkdir()
    (tmp_path / "xy.partial-1-ab").mkdir()  # another target's build: not ours to delete
    with atomic_build(tmp_path / "x") as partial:
        partial.write_text("file target")
    assert not any(p.exists() for p in dead) and (tmp_path / "xy.partial-1-ab").exists()
    assert (tmp_path / "x").read_text() == "file target"


def test_commit_replaces_a_file_in_one_rename(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"old")
    partial = partial_path(tmp_path / "m.gguf")
    partial.write_bytes(b"new")
    commit(partial, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"new" and not partial.exists()


def test_the_lock_is_exclusive_across_processes_and_says_once_that_it_waits(tmp_path):
    target = tmp_path / "x"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from radixpert.atomic import file_lock
        from pathlib import Path
        with file_lock({str(target)!r}):
            print("held", flush=True)
            time.sleep(1.5)
            Path({str(tmp_path / "released")!r}).touch()
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        messages: list[str] = []
        with file_lock(target, notify=messages.append, what="X"):
            assert (tmp_path / "released").exists()  # it got the lock only once the holder was done
        assert messages == ["waiting for another process building X"]
    finally:
        holder.wait(timeout=30)
    assert not lock_path(target).exists()


_BUILDER = """
import sys, time
from pathlib import Path
from radixpert.atomic import build_once

target, log = Path(sys.argv[1]), Path(sys.argv[2])

def build(partial):
    with open(log, "a") as handle:
        handle.write("build\\n")
    partial.mkdir()
    time.sleep(1.0)  # long enough for the other process to arrive while this one builds
    (partial / "result.txt").write_text("complete")

build_once(target, build)
print((target / "result.txt").read_text())
"""


def test_two_processes_started_together_build_once_and_both_use_the_result(tmp_path):
    target, log = tmp_path / "cache" / "thing", tmp_path / "builds.log"
    command = [sys.executable, "-c", _BUILDER, str(target), str(log)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == ["complete", "complete"]
    assert log.read_text().count("build") == 1
    assert _leftovers(target.parent, "thing") == []


# --- the export, through the same locked path --------------------------------------------------

EXPORT_ARGS = ("--quant", "f32", "--no-hf", "--samples", "1", "--calibration", "8", "--e2e-tokens", "8", "--threads", "1")


def _export(run: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "radixpert.export.cli", str(run), "--out", str(out), *EXPORT_ARGS, *extra]


@pytest.fixture(scope="module")
def expert_run(run_dir, tmp_path_factory) -> Path:
    """The tiny run with its experts given as absolute paths of the build machine, as training records them."""
    from safetensors.torch import save_file

    from radixpert.config import RadixpertConfig
    from radixpert.model import build_model
    from radixpert.train.checkpoint import latest_checkpoint, write_checksums

    run = tmp_path_factory.mktemp("expert-run") / "run"
    shutil.copytree(run_dir, run)
    checkpoint = latest_checkpoint(run)
    config = RadixpertConfig.load(checkpoint / "config.json")
    model = build_model(config)
    experts = run.parent / "experts"
    experts.mkdir()
    for name, module in (("encoder", model.frontend.encoder), ("segmenter", model.frontend.segmenter)):
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(experts / f"{name}.safetensors"))
    config = config.replace(encoder_path=str((experts / "encoder.safetensors").resolve()),
                            segmenter_path=str((experts / "segmenter.safetensors").resolve()))
    config.save(checkpoint / "config.json")
    write_checksums(checkpoint)
    return run


@pytest.fixture(scope="module")
def concurrent_exports(expert_run, tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """Two radixpert-export processes of the same run to the same --out, started at the same instant."""
    out = tmp_path_factory.mktemp("concurrent") / "bundle"
    processes = [subprocess.Popen(_export(expert_run, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    done = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=900)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return out, done


def test_two_exports_started_together_both_succeed_with_one_build(concurrent_exports):
    out, done = concurrent_exports
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-2000:] for d in done]
    # The second process waits for the first and uses its bundle instead of building one.
    assert sum("using the bundle another process built meanwhile" in d.stderr for d in done) == 1
    assert sum("waiting for another process building" in d.stderr for d in done) == 1
    bundle = load_bundle(out, verify=True)
    assert all(bundle.bundle_id in d.stderr for d in done)  # both summaries name the one bundle
    assert _leftovers(out.parent, "bundle") == []


def test_the_manifest_records_no_absolute_path(concurrent_exports, expert_run):
    out, _ = concurrent_exports
    text = (out / "manifest.json").read_text(encoding="utf-8")
    manifest = json.loads(text)

    def strings(value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield key
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)
        elif isinstance(value, str):
            yield value

    absolute = [s for s in strings(manifest) if s.startswith(("/", "~")) or (len(s) > 2 and s[1:3] in (":\\", ":/"))]
    assert absolute == []
    assert str(expert_run.parent) not in text and str(Path.home()) not in text
    assert manifest["config"]["encoder_path"] == "encoder.safetensors"
    assert manifest["config"]["segmenter_path"] == "segmenter.safetensors"


def test_an_export_killed_at_any_point_leaves_no_bundle_or_a_complete_one(run_dir, tmp_path):
    out = tmp_path / "bundle"
    rng = random.Random(20240611)
    # Kill points spread over a whole export (about 10 to 40 s here): loading, ONNX, GGUF, parity, rename.
    for delay in sorted(rng.uniform(0.5, 25.0) for _ in range(3)):
        process = subprocess.Popen(_export(run_dir, out, "--force"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        if out.exists():
            load_bundle(out, verify=True)  # complete, or this raises
        else:
            with pytest.raises(ModelError, match="not a bundle"):
                load_bundle(out)
    # The next export cleans up whatever the killed ones left and builds a complete bundle.
    done = subprocess.run(_export(run_dir, out, "--force"), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    load_bundle(out, verify=True)
    assert _leftovers(tmp_path, "bundle") == []


def test_radixpert_run_waits_for_a_demo_build_in_progress_and_uses_it(tmp_path, monkeypatch):
    """A second radixpert-run finds the demo bundle being built: it waits, then runs no build of its own."""
    from radixpert.paths import demo_bundle_dir
    from radixpert.runtime import cli

    monkeypatch.setenv("RADIXPERT_CACHE", str(tmp_path))
    monkeypatch.delenv("RADIXPERT_BUNDLE", raising=False)
    monkeypatch.setattr(cli, "DEMO_BUILD_MODULES", ())
    root = demo_bundle_dir()
    builder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from radixpert.atomic import atomic_build
        with atomic_build(Path({str(root)!r})) as partial:
            partial.mkdir()
            print("building", flush=True)
            time.sleep(1.5)
            (partial / "manifest.json").write_text("{{}}")
        """)], stdout=subprocess.PIPE, text=True)

    def no_second_build(*args, **kwargs):
        raise AssertionError("a second build was started")

    monkeypatch.setattr(subprocess, "run", no_second_build)
    messages: list[str] = []
    try:
        assert builder.stdout.readline().strip() == "building"
        cli.build_default_bundle(root, err=type("Err", (), {"print": staticmethod(messages.append)}))
    finally:
        builder.wait(timeout=30)
    assert messages == ["waiting for another process building the demo bundle"]
    assert (root / "manifest.json").is_file()
