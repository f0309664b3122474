"""radixpert-run on a tiny exported bundle: same tokens as PyTorch, prefix cache exact, no torch,
no network, every bad input a one-line refusal while the rest of the batch goes on."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from radixpert.bundle import load_bundle
from radixpert.imageio import read_image
from radixpert.runtime.pipeline import Reporter

BLOCKERS = textwrap.dedent(
    """
    import importlib.abc, socket, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "torchvision", "transformers", "peft", "safetensors"}:
                raise ImportError(f"{name} is blocked in this test")

    def no_network(*args, **kwargs):
        raise RuntimeError("network access attempted")

    class NoSocket(socket.socket):  # a class, so that modules subclassing socket.socket still import
        def __init__(self, *args, **kwargs):
            no_network()

    sys.meta_path.insert(0, NoTorch())
    socket.socket = NoSocket
    socket.create_connection = socket.socketpair = no_network
    """
)


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> list[Path]:
    from radixpert.phantom import write_dataset

    table = write_dataset(tmp_path_factory.mktemp("scans"), n=20, seed=11, size=256, workers=1)
    with open(table, newline="", encoding="utf-8") as handle:
        return [table.parent / row["DicomPath"] for row in csv.DictReader(handle)]


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # The tiny test model's U-Net is untrained: its anatomy gate is noise, so no report is withheld for it.
    return subprocess.run([sys.executable, "-m", "radixpert.runtime.cli", *args, "--on-implausible", "warn"],
                          capture_output=True, text=True, timeout=300, env=env)


def test_runtime_writes_the_pytorch_reference_tokens(bundle, run_dir, scans):
    from radixpert.export.merge import load_run, merge_lora

    out, _ = bundle
    model, _, _ = load_run(run_dir)
    merge_lora(model)
    chosen = scans[:6]
    images = torch.from_numpy(np.stack([read_image(p, 224).model_input for p in chosen]))
    reference = model.generate(images, max_new_tokens=32, ignore_stop=True)
    reporter = Reporter(load_bundle(out), quant="f32", threads=2, speculative=False)
    try:
        produced = [reporter.report(p, ignore_eos=True, max_new_tokens=32).tokens for p in chosen]
    finally:
        reporter.close()
    assert all(len(t) == 32 for t in reference)
    assert produced == reference


def test_prefix_cache_gives_the_same_report_as_a_fresh_process(bundle, scans):
    out, _ = bundle
    warm = Reporter(load_bundle(out), quant="f16", threads=2, max_new_tokens=16)
    results = [warm.report(p) for p in (scans[0], scans[1], scans[0])]
    warm.close()
    assert [r.timings["prefix_cached"] for r in results] == [False, True, True]
    assert results[0].tokens == results[2].tokens
    fresh = Reporter(load_bundle(out), quant="f16", threads=2, max_new_tokens=16)
    assert fresh.report(scans[1]).tokens == results[1].tokens
    fresh.close()


def test_cli_runs_without_torch_and_without_network(bundle, scans, tmp_path):
    out, _ = bundle
    script = tmp_path / "run.py"
    script.write_text(BLOCKERS + textwrap.dedent(
        """
        from radixpert.runtime.cli import main
        sys.argv = ["radixpert-run", *sys.argv[1:]]
        main()
        """))
    done = subprocess.run([sys.executable, str(script), str(scans[0]), "--bundle", str(out), "--format", "json",
                           "--sr", "--overlay", "--out", str(tmp_path / "o"), "--max-new-tokens", "8", "--verify",
                           "--on-implausible", "warn"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[0])
    # A few training steps do not make a writer: check the decode ran, not what it says.
    assert isinstance(record["report"], str) and record["timings"]["new_tokens"] == 8
    assert record["bundle_id"] == load_bundle(out).bundle_id
    assert set(record["timings"]) >= {"read_ms", "preprocess_ms", "frontend_ms", "prefix_ms", "visual_prefill_ms",
                                      "decode_tokens_per_s", "total_ms"}
    assert record["sop_instance_uid"] == pydicom.dcmread(scans[0], stop_before_pixels=True).SOPInstanceUID
    sr = pydicom.dcmread(record["files"]["sr"])
    assert sr.Modality == "SR" and sr.StudyInstanceUID == pydicom.dcmread(scans[0], stop_before_pixels=True).StudyInstanceUID
    assert Path(record["files"]["overlay"]).read_bytes()[:4] == b"\x89PNG"


def test_blockers_really_block(tmp_path):
    """The guard itself works: torch and sockets raise inside the blocked process."""
    script = tmp_path / "probe.py"
    script.write_text(BLOCKERS + textwrap.dedent(
        """
        for probe in ("import torch", "import socket; socket.socket()", "import urllib.request; urllib.request.urlopen('http://example.com')"):
            try:
                exec(probe)
            except Exception as exc:
                print("blocked", type(exc).__name__)
        """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.stdout.count("blocked") == 3, done.stdout + done.stderr


def _bad_inputs(folder: Path, good: Path) -> dict[str, Path]:
    folder.mkdir()
    cases: dict[str, Path] = {}
    (folder / "notes.txt").write_text("not an image")
    cases["not dicom"] = folder / "notes.txt"
    data = good.read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) // 2])
    cases["truncated"] = folder / "truncated.dcm"
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(folder / "nopixels.dcm")
    cases["no pixels"] = folder / "nopixels.dcm"

    def image(name: str, array: np.ndarray, photometric: str, **attrs) -> Path:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.Modality = "DX"
        ds.PatientName = "Secret^Patient"
        ds.set_pixel_data(array, photometric, 8 if array.dtype == np.uint8 else 12)
        for key, value in attrs.items():
            setattr(ds, key, value)
        ds.save_as(folder / name, enforce_file_format=True)
        return folder / name

    cases["multi-frame"] = image("multi.dcm", np.zeros((3, 128, 128), np.uint16), "MONOCHROME2")
    cases["colour"] = image("colour.dcm", np.zeros((128, 128, 3), np.uint8), "RGB")
    cases["tiny"] = image("tiny.dcm", np.zeros((16, 16), np.uint16), "MONOCHROME2")
    huge = image("huge.dcm", np.zeros((128, 128), np.uint16), "MONOCHROME2")
    ds = pydicom.dcmread(huge)
    ds.Rows = 40000  # header claims a huge image: refused before any decode
    ds.save_as(huge)
    cases["huge"] = huge
    cases["missing"] = folder / "absent.dcm"
    return cases


def test_bad_inputs_are_one_line_refusals_and_the_batch_goes_on(bundle, scans, tmp_path):
    out, _ = bundle
    cases = _bad_inputs(tmp_path / "bad", scans[0])
    args = [str(scans[0]), *map(str, cases.values()), *map(str, scans[1:])]
    done = _run(*args, "--bundle", str(out), "--format", "json", "--max-new-tokens", "4")
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Secret" not in done.stderr + done.stdout
    records = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert len(records) == len(args)
    assert all("report" in r for r in records[:1] + records[1 + len(cases):])
    for record, name in zip(records[1:], cases):
        assert record["error"]["code"] == "input" and record["error"]["exit_code"] == 3, (name, record)
        assert "\n" not in record["error"]["message"]
    refusals = [line for line in done.stderr.splitlines() if line.startswith("refused:")]
    assert len(refusals) == len(cases)
    assert f"{len(scans)} of {len(args)} scan(s) reported, {len(cases)} refused" in done.stderr


def test_text_stream_and_folder_input(bundle, scans, tmp_path):
    out, _ = bundle
    folder = tmp_path / "study"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(scans[0], folder / "nested" / "IM0001")  # DICOMs often have no extension
    (folder / "README").write_text("not a scan")
    plain = _run(str(folder), "--bundle", str(out), "--max-new-tokens", "12", "--timings")
    streamed = _run(str(folder), "--bundle", str(out), "--max-new-tokens", "12", "--stream")
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    # A flag marker comes before the report, or after it once streamed: the reports themselves match.
    def reports(out: str) -> list[str]:
        return [line for line in out.splitlines() if not line.startswith("[REVISAR]")]

    assert reports(plain.stdout) == reports(streamed.stdout) and plain.stdout.strip()
    assert "1 non-image file(s) skipped" in plain.stderr
    assert "prefix" in plain.stderr and "tok/s" in plain.stderr


def test_bundle_errors_and_usage_errors_have_their_own_codes(bundle, scans, tmp_path):
    out, _ = bundle
    missing = _run(str(scans[0]), "--bundle", str(tmp_path / "none"))
    assert missing.returncode == 4 and "radixpert-export" in missing.stderr
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    onnx = copy / "frontend.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 3] ^= 0xFF
    onnx.write_bytes(bytes(data))
    damaged = _run(str(scans[0]), "--bundle", str(copy), "--verify")
    assert damaged.returncode == 4 and "sha256" in damaged.stderr and "Traceback" not in damaged.stderr
    usage = _run(str(scans[0]), "--bundle", str(out), "--sr")
    assert usage.returncode == 2 and "--out" in usage.stderr
    providers = _run(str(scans[0]), "--bundle", str(out), "--providers", "warp-drive")
    assert providers.returncode == 2 and "provider" in providers.stderr
    env_default = _run(str(scans[0]), env={**__import__("os").environ, "RADIXPERT_BUNDLE": str(tmp_path / "nowhere")})
    assert env_default.returncode == 4 and "nowhere" in env_default.stderr
    assert _run("--help").returncode == 0


def test_overlay_puts_each_lung_on_its_side(tmp_path):
    """Radiographs are read facing the patient: the right lung is on the image's left."""
    from PIL import Image

    from radixpert.bundle import label_table
    from radixpert.config import MASK_NAMES
    from radixpert.imageio import letterbox_resize
    from radixpert.phantom import read_masks, write_dataset
    from radixpert.runtime.outputs import write_overlay

    table = write_dataset(tmp_path / "p", n=1, seed=4, size=256, workers=1)
    with open(table, newline="", encoding="utf-8") as handle:
        row = next(csv.DictReader(handle))
    scan = read_image(table.parent / row["DicomPath"], 224)
    masks = letterbox_resize(read_masks(table.parent / row["MaskPath"]), 224)
    labels = label_table(MASK_NAMES)
    path = write_overlay(scan.display, masks, labels, tmp_path / "o.png")
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)[:512, :512]
    for name, side in (("right_lung", slice(0, 256)), ("left_lung", slice(256, 512))):
        colour = np.array(next(label["colour"] for label in labels if label["name"] == name))
        chroma, direction = rgb - rgb.mean(-1, keepdims=True), colour - colour.mean()
        tint = chroma @ direction / np.linalg.norm(direction) > 15  # pixels tinted towards this label's colour
        print(name, tint[:, side].sum(), tint.sum() - tint[:, side].sum())
        other = slice(256, 512) if side.start == 0 else slice(0, 256)
        assert tint[:, side].sum() > 20 * max(1, tint[:, other].sum()), name


def _bundle_with_int8(source: Path, dest: Path, scans: list[Path]) -> Path:
    """A copy of ``source`` with an INT8 frontend added, as radixpert-export --int8 would ship it."""
    from radixpert.bundle import MANIFEST, file_entry, seal_manifest
    from radixpert.export.onnx_frontend import quantize_frontend_int8

    shutil.copytree(source, dest)
    calibration = np.stack([read_image(p, 224).model_input for p in scans[:4]])
    quantize_frontend_int8(dest / "frontend.onnx", dest / "frontend-int8.onnx", calibration)
    manifest = json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
    manifest["files"].append(file_entry(dest / "frontend-int8.onnx", dest, "frontend-int8"))
    (dest / MANIFEST).write_text(json.dumps(seal_manifest(manifest), indent=1), encoding="utf-8")
    return dest


def test_frontend_int8_runs_the_int8_file_and_is_a_usage_error_without_it(bundle, scans, tmp_path):
    out, _ = bundle
    missing = _run(str(scans[0]), "--bundle", str(out), "--frontend", "int8")
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert len(missing.stderr.strip().splitlines()) == 1 and "--int8" in missing.stderr
    with_int8 = _bundle_with_int8(out, tmp_path / "int8", scans)
    records = {}
    for variant in ("int8", "fp32"):
        done = _run(str(scans[0]), "--bundle", str(with_int8), "--frontend", variant, "--format", "json",
                    "--max-new-tokens", "4")
        assert done.returncode == 0, done.stderr[-3000:]
        records[variant] = json.loads(done.stdout)
        assert records[variant]["frontend"] == variant
    reporter = Reporter(load_bundle(with_int8), quant="f32", threads=1, frontend_variant="int8")
    try:
        assert reporter.frontend.path.name == "frontend-int8.onnx" and reporter.describe()["frontend"] == "int8"
    finally:
        reporter.close()
