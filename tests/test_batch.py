"""radixpert-batch on a real two-node Ray cluster on loopback (two raylets on this machine) with the
tiny f32 bundle: the same reports and token ids as the runtime one scan at a time, one row per input
when a node dies mid-run, resume after Ctrl-C, bad inputs as error rows, one-line usage errors.

Every Ray process is started here by ``ray start --block`` with its own temporary folder and ports,
token authentication with a token made for the test, no dashboard and no usage statistics; the
teardown stops exactly those processes (and anything else whose command line names that folder).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

RAY = str(Path(sys.executable).parent / "ray")
BATCH = [sys.executable, "-m", "radixpert.batch.cli"]
WAIT_S = 240  # every wait on a Ray process is bounded by this


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback now."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Cluster:
    """A head node and worker nodes started with ``ray start --block`` on 127.0.0.1."""

    def __init__(self) -> None:
        # Short: Ray's socket paths live under it and must fit in 107 characters.
        self.temp = Path(tempfile.mkdtemp(prefix="rxb", dir="/tmp"))
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.nodes: list[tuple[subprocess.Popen, int, Path]] = []  # (ray start, node manager port, its log)
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, args: list[str]) -> int:
        manager, objects, agent, metrics = free_ports(4)
        log = self.temp / f"node-{len(self.nodes)}.log"
        command = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
                   f"--temp-dir={self.temp}", f"--node-manager-port={manager}", f"--object-manager-port={objects}",
                   f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
                   "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats", *args]
        with log.open("w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                       start_new_session=True)
        self.nodes.append((process, manager, log))
        deadline = time.monotonic() + WAIT_S
        while "--block" not in log.read_text(errors="replace").split("Ray runtime started", 1)[-1]:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start failed: " + log.read_text(errors="replace")[-2000:])
            time.sleep(0.5)
        return manager

    def start_head(self) -> None:
        self.port, client, dashboard = free_ports(3)
        self._start(["--head", f"--port={self.port}", "--include-dashboard=false", f"--dashboard-port={dashboard}",
                     f"--ray-client-server-port={client}"])

    def add_worker(self) -> int:
        return self._start([f"--address={self.address}"])

    def raylet(self, manager_port: int) -> psutil.Process:
        """The raylet of the node whose node manager listens on ``manager_port``."""
        for process in self.processes():
            try:
                if process.name() == "raylet" and f"--node_manager_port={manager_port}" in process.cmdline():
                    return process
            except psutil.Error:
                continue
        raise LookupError(f"no raylet on port {manager_port}")

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: ours by its temporary folder on the command line."""
        found = []
        for process in psutil.process_iter():
            try:
                if any(str(self.temp) in arg for arg in process.cmdline()):
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def stop(self) -> None:
        for process, _, _ in reversed(self.nodes):
            if process.poll() is None:
                process.terminate()  # ray start --block stops the processes it started
        for process, _, _ in self.nodes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        left = self.processes()
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(left, timeout=30)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.start_head()
        c.add_worker()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[Path]:
    """100 phantom DICOMs."""
    from radixpert.phantom import write_dataset

    table = write_dataset(tmp_path_factory.mktemp("archive"), n=100, seed=21, size=256, workers=1)
    with open(table, newline="", encoding="utf-8") as handle:
        return [table.parent / row["DicomPath"] for row in csv.DictReader(handle)]


def batch_args(bundle_dir: Path, out: Path, *extra: str) -> list[str]:
    # The tiny model's U-Net is untrained: its anatomy gate is noise, so nothing is withheld for it.
    return [*BATCH, "--out", str(out), "--bundle", str(bundle_dir), "--quant", "f32", "--on-implausible", "warn",
            "--no-progress", *extra]


def run_batch(cluster: Cluster, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=cluster.env)


def rows(out: Path) -> list[dict]:
    from radixpert.batch.output import read_rows

    return read_rows(out).to_pylist()


def one_row_per_input(out: Path, paths: list[Path]) -> list[dict]:
    found = rows(out)
    assert len(found) == len(paths), (len(found), len(paths))
    assert sorted(r["input"] for r in found) == sorted(map(str, paths))
    return found


def test_same_answers_as_the_runtime_on_two_nodes(cluster, bundle, phantoms, tmp_path):
    """100 phantoms, 2 actors on 2 nodes, 4 scans decoded together in each: every report and its token ids
    are those of the runtime reporting one scan at a time (about 1 min for both on 2 cores)."""
    from radixpert.batch.output import to_json
    from radixpert.bundle import load_bundle
    from radixpert.runtime.pipeline import Reporter

    bundle_dir, _ = bundle
    out = tmp_path / "out"
    done = run_batch(cluster, batch_args(bundle_dir, out, "--address", cluster.address, "--actors", "2",
                                         "--batch", "4", "--rows-per-file", "8", *map(str, phantoms)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Ray with 4 CPU(s)" in done.stderr and "2 actor(s)" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    found = {r["input"]: r for r in one_row_per_input(out, phantoms)}
    assert len({r["key"] for r in found.values()}) == len(phantoms)
    # Each actor decoded several scans together: the frontend ran on batches of them.
    assert max(json.loads(r["timings"])["frontend_batch"] for r in found.values()) > 1

    reporter = Reporter(load_bundle(bundle_dir), quant="f32", threads=2)
    try:
        same = 0
        for path in phantoms:
            expected, row = reporter.report(path), found[str(path)]
            assert row["status"] == "reported" and row["error"] is None, row
            assert row["report"] == expected.report, path.name
            assert row["tokens"] == list(expected.tokens), path.name
            # The tiny model writes much the same text for every scan: the image's own results tell rows apart.
            assert row["sop_instance_uid"] == expected.sop_instance_uid, path.name
            for column in ("evidence", "gate", "checks", "findings"):
                assert row[column] == to_json(getattr(expected.checked, column)), (path.name, column)
            same += 1
    finally:
        reporter.close()
    assert same == 100
    assert len({r["evidence"] for r in found.values()}) > 10  # they do differ from scan to scan


def test_resume_after_ctrl_c_processes_only_the_missing_inputs(cluster, bundle, phantoms, tmp_path):
    bundle_dir, _ = bundle
    paths = phantoms[:48]
    out = tmp_path / "out"
    args = batch_args(bundle_dir, out, "--address", cluster.address, "--actors", "2", "--rows-per-file", "2",
                      "--batch", "2", *map(str, paths))
    log = tmp_path / "first.log"
    with log.open("w") as err:
        first = subprocess.Popen(args, stdout=err, stderr=subprocess.STDOUT, env=cluster.env)
    try:
        deadline = time.monotonic() + WAIT_S
        while len(list(out.glob("part-*.parquet"))) * 2 < len(paths) // 2:
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no rows written in time"
            time.sleep(0.2)
        first.send_signal(signal.SIGINT)
        code = first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "run the same command again to resume" in text and "Traceback" not in text, text[-3000:]
    before = len(rows(out))
    assert 0 < before < len(paths), before

    second = run_batch(cluster, args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming: {before} input(s) already in {out}, {len(paths) - before} to do" in second.stderr
    assert re.search(rf"done: {len(paths) - before} input\(s\) in .*; {before} already done", second.stderr), \
        second.stderr[-2000:]
    found = one_row_per_input(out, paths)
    runs = {}
    for row in found:
        runs[row["run_id"]] = runs.get(row["run_id"], 0) + 1
    assert len(runs) == 2 and sorted(runs.values()) == sorted([before, len(paths) - before]), runs


def test_bad_inputs_are_error_rows_and_exit_3(cluster, bundle, phantoms, tmp_path):
    from serve_inputs import bad_inputs, phi_values
    from test_runtime import _bad_inputs

    bundle_dir, _ = bundle
    folder = tmp_path / "mixed"
    (folder / "good").mkdir(parents=True)
    good = [Path(shutil.copy(p, folder / "good" / p.name)) for p in phantoms[:4]]
    runtime_cases = _bad_inputs(folder / "runtime", phantoms[0])
    serve_cases = {name: path for name, (path, _) in bad_inputs(folder / "serve").items()}
    missing = runtime_cases.pop("missing")  # not in the folder: named on the command line
    runtime_cases.pop("not dicom")  # a text file in a folder is skipped, as radixpert-run does
    bad = [*runtime_cases.values(), *serve_cases.values(), missing]

    out, srs = tmp_path / "out", tmp_path / "srs"
    done = run_batch(cluster, batch_args(bundle_dir, out, "--address", cluster.address, "--actors", "2",
                                         "--sr", str(srs), str(folder), str(missing)))
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    assert "1 non-image file(s) skipped" in done.stderr
    assert f"{len(bad)} refused" in done.stderr and f"{len(good)} reported" in done.stderr, done.stderr[-2000:]
    for secret in [*phi_values(), "Secret", "absent.dcm", "truncated", "corrupt", "huge"]:
        assert secret not in done.stderr + done.stdout, secret
    found = {r["input"]: r for r in one_row_per_input(out, [*good, *bad])}
    for path in bad:
        row = found[str(path)]
        assert row["status"] == "refused" and row["error_code"] == "input", (path.name, row)
        assert row["error"] and "\n" not in row["error"] and path.name not in row["error"], (path.name, row["error"])
        assert row["report"] is None and row["tokens"] is None and row["sr"] is None
    assert all(found[str(p)]["status"] == "reported" for p in good)
    # --sr: one SR per reported scan, read back with pydicom: it references its source, carries the row's
    # report and coded findings, and passes dciodvfy where dicom3tools is installed.
    import pydicom

    from radixpert.runtime.sr import read_sr_findings

    assert sorted(p.name for p in srs.iterdir()) == sorted(found[str(p)]["sr"] for p in good)
    for path in good:
        row, source = found[str(path)], pydicom.dcmread(path, stop_before_pixels=True)
        sr = pydicom.dcmread(srs / row["sr"])
        assert sr.Modality == "SR" and sr.StudyInstanceUID == source.StudyInstanceUID
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert evidence.ReferencedSOPInstanceUID == source.SOPInstanceUID == row["sop_instance_uid"]
        texts = [item.TextValue for item in sr.ContentSequence if "ContentSequence" in item
                 for item in item.ContentSequence if getattr(item, "ValueType", "") == "TEXT"]
        lines = [line for line in row["report"].splitlines() if line.strip()]
        assert texts[:len(lines)] == lines  # the report's lines first; labels without a code follow
        want = [{"label": f["label"], "side": f["side"], "presence": f["presence"]}
                for f in json.loads(row["findings"]) if f["presence"] in ("positive", "uncertain")]
        assert read_sr_findings(srs / row["sr"]) == want
        if shutil.which("dciodvfy"):
            check = subprocess.run(["dciodvfy", str(srs / row["sr"])], capture_output=True, text=True, timeout=60)
            assert not [ln for ln in check.stderr.splitlines() if ln.startswith("Error")], check.stderr


def test_retried_calls_never_duplicate_a_row(tmp_path):
    """A block that comes back twice (a retried call) is written once; an input with no row fails the run."""
    from radixpert.batch.output import PartWriter, table
    from radixpert.batch.pipeline import ClusterError, Progress, stream_rows

    def block(*indices: int):
        return table([{"index": i, "key": f"k{i}", "status": "reported"} for i in indices])

    writer = PartWriter(tmp_path / "out", "run")
    progress = Progress(total=4)
    stream_rows(iter([block(0, 1), block(1, 2), block(2, 3, 3)]), writer.write, progress, {0, 1, 2, 3},
                lambda p: None)
    assert sorted(r["index"] for r in rows(tmp_path / "out")) == [0, 1, 2, 3] and progress.done == 4
    with pytest.raises(ClusterError, match="no row for 1 input"):
        stream_rows(iter([block(0)]), writer.write, Progress(total=2), {0, 1}, lambda p: None)


def test_usage_errors_are_one_line(tmp_path, bundle):
    bundle_dir, _ = bundle
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_ports(1)[0]  # nothing listens there
    cases = [
        ([str(tmp_path / "empty")], 2, "no DICOM or PNG files"),
        ([str(tmp_path / "empty"), "--actors", "0"], 2, "--actors"),
        (["--bundle", str(tmp_path / "nobundle"), str(Path(__file__))], 4, "no bundle"),
        (["--address", f"127.0.0.1:{port}", str(Path(__file__))], 7, "no Ray cluster answers"),
        (["--address", "nowhere", str(Path(__file__))], 2, "--address"),
    ]
    for extra, code, words in cases:
        args = [*BATCH, "--out", str(tmp_path / "out"), *(["--bundle", str(bundle_dir)] if "--bundle" not in extra
                                                          else []), *extra]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == code, (extra, done.returncode, done.stderr[-2000:])
        assert len(lines) <= 3 and words in lines[-1] and "Traceback" not in done.stderr, (extra, done.stderr)
        assert done.stdout == ""


def test_a_wrong_cluster_token_is_one_line_exit_7(cluster, bundle, tmp_path):
    bundle_dir, _ = bundle
    env = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    done = subprocess.run([*BATCH, "--out", str(tmp_path / "out"), "--bundle", str(bundle_dir), "--address",
                           cluster.address, str(Path(__file__))], capture_output=True, text=True, timeout=180, env=env)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 7, done.stderr[-2000:]
    assert "token authentication" in lines[-1] and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert cluster.env["RAY_AUTH_TOKEN"] not in done.stderr + done.stdout


def test_a_node_lost_mid_run_still_gives_one_row_per_input(cluster, bundle, phantoms, tmp_path):
    """The worker node's raylet is killed once rows are coming in: Ray Data retries the lost calls on
    the head node, and the dataset has exactly one row per input. Runs last: it replaces the lost node."""
    bundle_dir, _ = bundle
    paths = phantoms[:48]
    out = tmp_path / "out"
    args = batch_args(bundle_dir, out, "--address", cluster.address, "--actors", "2", "--cpus-per-actor", "1",
                      "--rows-per-file", "2", "--batch", "2", *map(str, paths))
    worker_port = cluster.nodes[-1][1]
    log = tmp_path / "run.log"
    with log.open("w") as err:
        run = subprocess.Popen(args, stdout=err, stderr=subprocess.STDOUT, env=cluster.env)
    try:
        deadline = time.monotonic() + WAIT_S
        while len(list(out.glob("part-*.parquet"))) < 3:
            assert run.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no rows written in time"
            time.sleep(0.2)
        raylet = cluster.raylet(worker_port)
        actors = [c for c in raylet.children() if "ReportActor" in " ".join(c.cmdline())]
        raylet.kill()
        killed_at = len(rows(out))
        code = run.wait(timeout=WAIT_S)
    finally:
        if run.poll() is None:
            run.kill()
        cluster.nodes[-1][0].wait(timeout=60)  # its ray start --block notices and stops the node's other processes
        cluster.add_worker()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert actors, "no report actor ran on the node that was killed"
    assert killed_at < len(paths), killed_at
    found = one_row_per_input(out, paths)
    assert len({r["index"] for r in found}) == len(paths)
    assert all(r["status"] == "reported" for r in found)


def test_a_dicomweb_archive_is_searched_retrieved_and_resumed(cluster, bundle, phantoms, tmp_path):
    """A real Orthanc with its DICOMweb plugin: QIDO-RS lists the instances, the actors retrieve them by
    WADO-RS; the rows equal the runtime on the same files, and a rerun finds everything done."""
    from radixpert.batch.output import to_json
    from radixpert.benchmarks.serve_harness import Orthanc, components_missing, running
    from radixpert.bundle import load_bundle
    from radixpert.runtime.pipeline import Reporter

    if "orthanc" in components_missing():
        pytest.skip("needs orthanc and orthanc-dicomweb (apt-get install orthanc orthanc-dicomweb)")
    import pydicom

    bundle_dir, _ = bundle
    sent = phantoms[:6]
    ct = pydicom.dcmread(phantoms[6])
    ct.Modality = "CT"  # listed by the archive, then filtered out by the query
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ct.save_as(tmp_path / "ct.dcm")
    web = Orthanc(tmp_path / "pacs", "RADIXPERT", 104, aet="WEBPACS", dicomweb=True)
    secret = tmp_path / "password"
    secret.write_text(web.password)
    with running(web):
        web.start()
        for path in [*sent, tmp_path / "ct.dcm"]:
            web.upload(path)
        archive = ["--dicomweb", f"{web.url}/dicom-web", "--dicomweb-user", web.user, "--dicomweb-password-file",
                   str(secret), "--query", "Modality=DX"]
        out = tmp_path / "out"
        done = run_batch(cluster, batch_args(bundle_dir, out, "--address", cluster.address, "--actors", "2",
                                             "--rows-per-file", "2", *archive))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "DICOMweb: 6 instance(s) listed" in done.stderr and web.password not in done.stderr + done.stdout
        again = run_batch(cluster, batch_args(bundle_dir, out, "--address", cluster.address, *archive))
        assert again.returncode == 0 and "resuming: 6 input(s) already in" in again.stderr, again.stderr[-2000:]
        wrong = tmp_path / "wrong"
        wrong.write_text("not the password")
        refused = run_batch(cluster, batch_args(bundle_dir, tmp_path / "out2", "--address", cluster.address,
                                                *archive[:5], str(wrong), *archive[6:]))
    assert refused.returncode == 2 and "QIDO-RS search of" in refused.stderr and "HTTP 401" in refused.stderr
    assert "Traceback" not in refused.stderr and "Modality=DX" not in refused.stderr  # the query's values stay out
    found = {r["key"]: r for r in rows(out)}
    headers = {f"uid:{pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID}": p for p in sent}
    assert set(found) == set(headers) and len(rows(out)) == len(sent)
    reporter = Reporter(load_bundle(bundle_dir), quant="f32", threads=2)
    try:
        for key, path in headers.items():
            expected, row = reporter.report(str(path)), found[key]
            assert row["status"] == "reported" and row["input"].startswith("dicomweb:"), row
            assert row["report"] == expected.report and row["tokens"] == list(expected.tokens), path.name
            assert row["evidence"] == to_json(expected.checked.evidence), path.name  # tells the scans apart
    finally:
        reporter.close()
