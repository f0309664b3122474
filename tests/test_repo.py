"""Project promises that are cheap to check: CI runs the README's commands, safe formats only."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {title}", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no bash block under '{title}'"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_commands():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    marked = ci.split("(keep identical) ---\n", 1)[1].split("# --- end ---", 1)[0]
    assert [line for line in marked.splitlines() if line.strip()] == _readme_block("Install for development and run the tests")


def test_quick_start_is_two_commands_and_the_second_is_ci():
    install_and_report, install_and_test = _readme_block("Quick start")
    assert "radixpert-run examples/" in install_and_report and install_and_report.startswith("python3 -m venv")
    assert [install_and_test] == _readme_block("Install for development and run the tests")
    example = install_and_report.split("radixpert-run ", 1)[1].split()[0]
    assert (ROOT / example).is_file()


def test_no_pickle_files_are_tracked():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"))]



def test_every_parity_threshold_is_documented():
    from radixpert.export.parity import DEFAULT_THRESHOLDS

    doc = (ROOT / "docs" / "export.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in doc for name in DEFAULT_THRESHOLDS)


def test_every_command_also_runs_as_a_module():
    """`python -m <module>` is how a locked-down workstation runs a tool when the scripts are not on PATH."""
    import sys
    from importlib.metadata import distribution

    scripts = [e for e in distribution("radixpert-edge").entry_points if e.group == "console_scripts"]
    assert scripts
    for entry in scripts:
        name, module = entry.name, entry.module
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith("Usage:"), (name, done.stdout[:200], done.stderr[-300:])
