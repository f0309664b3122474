"""No patient identifier leaves radixpert-run by default: not in stdout, stderr, JSON (with --redact),
output file names or overlay pixels, even when the input file is named after the patient; and every
CLI's internal-error line names only the exception class."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

NAME = "Zyxwava^Quorblint"
PATIENT_ID = "PID90817263"
ACCESSION = "ACC5550123"
SECRETS = (NAME, "Zyxwava", "Quorblint", PATIENT_ID, ACCESSION)


@pytest.fixture(scope="module")
def patient_scan(tmp_path_factory) -> Path:
    """A phantom DICOM with distinctive identifiers, named after the patient, in a folder named after the accession."""
    from radixpert.phantom import write_dataset

    root = tmp_path_factory.mktemp("phi")
    table = write_dataset(root / "src", n=1, seed=21, size=256, workers=1)
    with open(table, newline="", encoding="utf-8") as handle:
        source = table.parent / next(csv.DictReader(handle))["DicomPath"]
    ds = pydicom.dcmread(source)
    ds.PatientName, ds.PatientID, ds.AccessionNumber = NAME, PATIENT_ID, ACCESSION
    folder = root / f"{ACCESSION}-{PATIENT_ID}"
    folder.mkdir()
    ds.save_as(folder / f"{NAME}.dcm")
    return folder / f"{NAME}.dcm"


def _run(*args: str) -> subprocess.CompletedProcess:
    # The tiny test model's U-Net is untrained: its anatomy gate is noise, so no report is withheld for it.
    return subprocess.run([sys.executable, "-m", "radixpert.runtime.cli", *args, "--on-implausible", "warn"],
                          capture_output=True, text=True, timeout=300)


def _leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret.lower() in text.lower()]


def _names_under(folder: Path) -> str:
    return "\n".join(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_the_scan_really_carries_the_identifiers(patient_scan):
    ds = pydicom.dcmread(patient_scan, stop_before_pixels=True)
    assert (str(ds.PatientName), ds.PatientID, ds.AccessionNumber) == (NAME, PATIENT_ID, ACCESSION)
    assert _leaks(str(patient_scan)) == list(SECRETS)


def test_json_text_and_files_carry_no_identifier(bundle, patient_scan, tmp_path):
    out, _ = bundle
    redacted = _run(str(patient_scan), "--bundle", str(out), "--format", "json", "--redact", "--sr", "--overlay",
                    "--out", str(tmp_path / "json"), "--timings", "--max-new-tokens", "6")
    assert redacted.returncode == 0, redacted.stderr[-3000:]
    assert _leaks(redacted.stdout) == [] and _leaks(redacted.stderr) == []
    record = json.loads(redacted.stdout)
    digest = __import__("hashlib").sha256(patient_scan.read_bytes()).hexdigest()[:16]
    assert record["input"] == f"sha256:{digest}"
    uid = pydicom.dcmread(patient_scan, stop_before_pixels=True).SOPInstanceUID
    assert {Path(f).name for f in record["files"].values()} == {f"0000-{uid}.sr.dcm", f"0000-{uid}.overlay.png"}
    assert _leaks(_names_under(tmp_path / "json")) == []

    text = _run(str(patient_scan), "--bundle", str(out), "--sr", "--overlay", "--out", str(tmp_path / "text"),
                "--timings", "--max-new-tokens", "6")
    assert text.returncode == 0, text.stderr[-3000:]
    assert _leaks(text.stdout) == [] and _leaks(text.stderr) == []
    assert f"scan 1 ({uid})" in text.stderr  # the timings line names the scan by place and UID
    written = [line for line in text.stderr.splitlines() if line.startswith("wrote ")]
    assert written == [f"wrote SR: {tmp_path / 'text' / f'0000-{uid}.sr.dcm'}",
                       f"wrote overlay: {tmp_path / 'text' / f'0000-{uid}.overlay.png'}"]
    assert _leaks(_names_under(tmp_path / "text")) == []

    # Without --redact, JSON keeps the path in "input" (to map results back), and only there.
    plain = _run(str(patient_scan), "--bundle", str(out), "--format", "json", "--max-new-tokens", "6")
    record = json.loads(plain.stdout)
    assert record.pop("input") == str(patient_scan)
    assert _leaks(json.dumps(record, ensure_ascii=False)) == [] and _leaks(plain.stderr) == []


def test_overlay_pixels_do_not_depend_on_the_file_name(bundle, patient_scan, tmp_path):
    from PIL import Image

    out, _ = bundle
    other = tmp_path / "other.dcm"
    shutil.copy(patient_scan, other)
    pictures = []
    for scan, folder in ((patient_scan, tmp_path / "a"), (other, tmp_path / "b")):
        done = _run(str(scan), "--bundle", str(out), "--overlay", "--out", str(folder), "--max-new-tokens", "2")
        assert done.returncode == 0, done.stderr[-3000:]
        (png,) = folder.glob("*.overlay.png")
        pictures.append(np.asarray(Image.open(png)))
    assert pictures[0].shape == pictures[1].shape and np.array_equal(pictures[0], pictures[1])


def test_refusals_do_not_echo_the_file_name(bundle, patient_scan, tmp_path):
    out, _ = bundle
    folder = tmp_path / ACCESSION
    folder.mkdir()
    corrupt = folder / f"{NAME}.dcm"
    corrupt.write_bytes(patient_scan.read_bytes()[:700])  # a truncated header: refused by the reader
    png = folder / f"{PATIENT_ID}.png"
    from PIL import Image

    Image.fromarray(np.full((128, 128), 90, np.uint8)).save(png)
    for fmt in ("text", "json"):
        done = _run(str(corrupt), str(png), "--bundle", str(out), "--format", fmt, "--sr", "--out",
                    str(tmp_path / fmt), "--max-new-tokens", "2")
        assert done.returncode == 3, done.stderr[-3000:]
        refusals = [line for line in done.stderr.splitlines() if line.startswith("refused:")]
        assert len(refusals) == 2 and "scan 1 (" in refusals[0] and "scan 2 (" in refusals[1], done.stderr
        assert "--sr needs a DICOM" in refusals[1]
        stdout = done.stdout
        if fmt == "json":
            records = [json.loads(line) for line in stdout.splitlines()]
            stdout = json.dumps([{k: v for k, v in r.items() if k != "input"} for r in records], ensure_ascii=False)
        assert _leaks(stdout) == [] and _leaks(done.stderr) == [], (stdout, done.stderr)
        assert not done.stdout.startswith("\n")  # no separator before the first report printed


def test_a_refused_first_scan_leaves_no_blank_line(bundle, patient_scan, tmp_path):
    out, _ = bundle
    corrupt = tmp_path / "bad.dcm"
    corrupt.write_bytes(patient_scan.read_bytes()[:700])
    alone = _run(str(patient_scan), "--bundle", str(out), "--max-new-tokens", "8")
    after = _run(str(corrupt), str(patient_scan), "--bundle", str(out), "--max-new-tokens", "8")
    twice = _run(str(patient_scan), str(corrupt), str(patient_scan), "--bundle", str(out), "--max-new-tokens", "8")
    assert alone.returncode == 0 and after.returncode == 3 and twice.returncode == 3, after.stderr
    assert after.stdout == alone.stdout
    assert twice.stdout == alone.stdout + "\n" + alone.stdout  # one blank line between reports


def test_first_line_helper():
    from radixpert.errors import first_line

    assert first_line(ValueError("  one\ntwo")) == "one"
    assert first_line(KeyError()) == "KeyError"
    assert len(first_line(ValueError("x" * 999))) == 300


def _fail(*args, **kwargs):
    raise ValueError(f"cannot open /data/{NAME}.dcm for {PATIENT_ID}")


def _entry_points(monkeypatch) -> dict:
    """Each CLI's entry point with its innermost work replaced by ``_fail``, and the arguments to call it with."""
    import radixpert.benchmarks.cli as bench
    import radixpert.bundle
    import radixpert.evaluation.cli as evaluation
    import radixpert.export.cli as export
    import radixpert.phantom.cli as phantom
    import radixpert.runtime.cli as runtime
    import radixpert.train.cli as train

    monkeypatch.setattr(runtime, "run", _fail)
    monkeypatch.setattr(export, "_resolve_source", _fail)
    monkeypatch.setattr(radixpert.bundle, "load_bundle", _fail)
    monkeypatch.setattr(train.cli, "main", _fail)
    monkeypatch.setattr(evaluation.cli, "main", _fail)
    monkeypatch.setattr(phantom, "write_dataset", _fail)
    return {
        "run": (lambda: runtime.main(["x.dcm"], standalone_mode=True)),
        "export": (lambda: export.main(["--demo"], standalone_mode=True)),
        "train": train.main,
        "eval": (lambda: evaluation.main([])),
        "bench": (lambda: bench.main(["compare", "--bundle", "b"], standalone_mode=True)),
        "phantom": (lambda: phantom.main(["--n", "1", "--out", "o"])),
    }


def test_every_cli_reports_a_bug_by_its_class_only(monkeypatch, capsys):
    for name, entry in _entry_points(monkeypatch).items():
        with pytest.raises(SystemExit) as stop:
            entry()
        err = capsys.readouterr().err
        assert stop.value.code == 1, (name, err)
        prefix = "radixpert-phantom: " if name == "phantom" else ""
        assert err.strip().splitlines() == [f"{prefix}internal error: ValueError; please report it (RADIXPERT_DEBUG=1 "
                                            "shows the traceback)"], (name, err)


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("RADIXPERT_DEBUG", "1")
    for name, entry in _entry_points(monkeypatch).items():
        with pytest.raises(ValueError):
            entry()
