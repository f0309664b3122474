"""radixpert-serve against real components: Orthanc as the PACS, dcmtk's echoscu/storescu, headless Chromium.

Every server runs on 127.0.0.1 on free ports with a generated configuration and is stopped in a
``finally``; every wait is bounded. Sizes are cut for CI (a 2-core machine); the full-size numbers
of the acceptance criteria come from ``radixpert-bench serve`` (docs/serve.md).
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from radixpert.benchmarks.serve_harness import (NodeProcess, Orthanc, chromium, components_missing, dcmtk, echoscu,
                                                running, storescu, wait_until)
from radixpert.runtime.sr import read_sr_findings

sys.path.insert(0, str(Path(__file__).parent))
from serve_inputs import bad_inputs, phi_values, with_phi  # noqa: E402

pytestmark = pytest.mark.skipif(bool(components_missing()), reason=f"needs {components_missing()} (apt-get install)")
EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.dcm"))
CODED = ("positive", "uncertain")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[Path]:
    """30 phantom DICOMs (256², seed 21), each carrying the test PHI."""
    from radixpert.phantom import write_dataset

    folder = tmp_path_factory.mktemp("serve-phantoms")
    write_dataset(folder / "raw", n=30, seed=21, size=256, workers=1)
    out = folder / "phi"
    out.mkdir()
    return [with_phi(p, out / p.name) for p in sorted((folder / "raw" / "dicom").glob("*.dcm"))]


@pytest.fixture(scope="module")
def round_trip(bundle, phantoms, tmp_path_factory):
    """Orthanc sends the 4 examples and 20 phantoms to the node; SRs go back by C-STORE, STOW-RS and to a folder."""
    base = tmp_path_factory.mktemp("serve-round-trip")
    examples = [with_phi(p, base / f"phi-{p.name}") for p in EXAMPLES]
    inputs = examples + phantoms[:20]
    node = NodeProcess(base / "node", bundle[0], on_implausible="warn")
    pacs = Orthanc(base / "pacs", node.ae_title, node.dicom_port)
    web = Orthanc(base / "web", node.ae_title, node.dicom_port, aet="WEBPACS", dicomweb=True)
    secret = base / "web-password"
    secret.write_text(web.password)
    node.config.write_text(node.config.read_text() + pacs.destination() + (
        f'[[destinations]]\nname = "web"\ntype = "dicomweb"\nurl = "{web.url}/dicom-web"\nusername = "{web.user}"\n'
        f'password_file = "{secret}"\n[[destinations]]\nname = "folder"\ntype = "folder"\npath = "{base / "out"}"\n'))
    with running(pacs, web, node):
        pacs.start()
        web.start()
        node.start()
        ids = [pacs.upload(p) for p in inputs]
        pacs.send_to_node(ids)
        node.wait_jobs(len(inputs), timeout=240)
        node.wait_delivered(3 * len(inputs), timeout=120)
        yield {"node": node, "pacs": pacs, "web": web, "inputs": inputs, "out": base / "out", "base": base}


def test_round_trip_srs_reference_their_sources_pass_dciodvfy_and_match_the_api(round_trip):
    node, pacs, inputs = round_trip["node"], round_trip["pacs"], round_trip["inputs"]
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in inputs}
    jobs = {j["sop_instance_uid"]: j for j in node.jobs()}
    assert set(jobs) == sources and all(j["state"] == "done" for j in jobs.values())
    arrived = pacs.sr_sources()
    assert set(arrived) == sources and all(len(v) == 1 for v in arrived.values())  # one SR each, referencing it
    folder = round_trip["base"] / "arrived"
    folder.mkdir()
    for uid, (sr_id,) in arrived.items():
        path = pacs.file(sr_id, folder / f"{uid}.dcm")
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        assert not [ln for ln in check.stderr.splitlines() if ln.startswith("Error")], check.stderr
        job = node.http(f"/api/jobs/{jobs[uid]['id']}")
        want = [{"label": f["label"], "side": f["side"], "presence": f["presence"]}
                for f in job["result"]["findings"] if f["presence"] in CODED]
        assert read_sr_findings(path) == want
        assert str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) == job["result"]["sr_sop_instance_uid"]
        assert job["result"]["gate"]["verdict"] and job["result"]["checks"] is not None and job["result"]["timings"]


def test_stow_rs_and_folder_destinations_received_every_sr(round_trip):
    assert len(round_trip["web"].srs()) == len(round_trip["inputs"])
    assert len(list(round_trip["out"].glob("*.dcm"))) == len(round_trip["inputs"])
    metrics = round_trip["node"].http("/metrics")
    for line in ('radixpert_jobs{state="done"} 24.0', 'radixpert_deliveries{destination="web",state="sent"} 24.0',
                 'radixpert_queue_depth 0.0', 'radixpert_stage_seconds_count{stage="decode"} 24.0'):
        assert line in metrics


def test_logs_carry_no_phi_and_every_event_is_json(round_trip):
    text = round_trip["node"].log.read_text(encoding="utf-8")
    for value in phi_values():
        assert value.lower() not in text.lower(), "a PHI value reached the log"
    events = [json.loads(line) for line in text.splitlines()]
    assert {"received", "running", "done", "delivered"} <= {e["event"] for e in events}
    assert all(set(e) <= {"time", "level", "event", "job", "uid", "calling_ae", "destination", "gate", "flags",
                          "report_ms", "host", "port", "ae_title", "resumed", "received", "running", "done",
                          "withheld", "failed", "bundle_id", "frontend", "quant", "providers", "llm_gpu_layers",
                          "threads", "batch", "speculative", "speculative_exact", "signal", "requeued"} for e in events)


def test_spool_files_are_private(round_trip):
    spool = round_trip["node"].folder / "spool"
    files = [p for p in spool.rglob("*") if p.is_file()]
    assert len(files) >= 3 * 24
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), [oct(p.stat().st_mode) for p in files][:3]


def test_echo_and_unknown_calling_ae(round_trip):
    node = round_trip["node"]
    assert echoscu(node.dicom_port).returncode == 0
    refused = echoscu(node.dicom_port, calling="INTRUDER")
    assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    wait_until(lambda: '"association rejected"' in node.log.read_text(), 10, "the rejection log line")


@pytest.mark.skipif(chromium() is None, reason="needs chromium (apt-get install chromium)")
def test_review_page_shows_reports_in_chromium(round_trip):
    node = round_trip["node"]
    latest = node.jobs()[0]
    done = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", node.url + "/"],
                          capture_output=True, text=True, timeout=120)
    assert f'id="job-{latest["id"]}"' in done.stdout
    assert f'<blockquote class="report">{latest["result"]["report"]}' in done.stdout.replace("&nbsp;", " ")
    assert f'src="/api/jobs/{latest["id"]}/overlay.png"' in done.stdout and "BORRADORES" in done.stdout


def test_bad_input_becomes_failed_jobs_and_non_matching_is_ignored(bundle, phantoms, tmp_path):
    node = NodeProcess(tmp_path / "node", bundle[0], on_implausible="warn")
    node.config.write_text(node.config.read_text().replace(
        "[queue]", 'sop_classes = ["all-storage"]\n[queue]') + '[[routing]]\nview_position = ["PA", "AP", ""]\n')
    lateral = pydicom.dcmread(phantoms[25])
    lateral.ViewPosition = "LATERAL"
    lateral.SOPInstanceUID = lateral.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    lateral.save_as(tmp_path / "lateral.dcm")
    with running(node):
        node.start()
        bad = bad_inputs(tmp_path / "bad")
        for name, (path, options) in bad.items():
            sent = subprocess.run([dcmtk("storescu"), *options, "-aec", "RADIXPERT", "-aet", "STORESCU", "127.0.0.1",
                                   str(node.dicom_port), str(path)], capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, (name, sent.stderr)
        assert storescu([tmp_path / "lateral.dcm"], node.dicom_port)["rounds"] == 1  # acknowledged
        jobs = node.wait_jobs(len(bad), timeout=60)
        assert len(jobs) == len(bad) and all(j["state"] == "failed" for j in jobs)
        reasons = [j["reason"] for j in sorted(jobs, key=lambda j: j["id"])]
        assert all(r and "\n" not in r and "bad" not in r for r in reasons)
        for words, reason in zip(("not an image", "CT", "cannot be decoded", "less than expected", "16384"), reasons):
            assert words in reason
        assert node.http("/healthz") == {"status": "ok"} and echoscu(node.dicom_port).returncode == 0
        assert '"ignored by routing"' in node.log.read_text()


def test_kill9_then_sigterm_loses_and_duplicates_nothing(bundle, phantoms, tmp_path):
    node = NodeProcess(tmp_path / "node", bundle[0], on_implausible="warn", threads=1)
    pacs = Orthanc(tmp_path / "pacs", node.ae_title, node.dicom_port)
    node.config.write_text(node.config.read_text() + pacs.destination())
    inputs = phantoms[:12]
    with running(pacs, node):
        pacs.start()
        node.start()
        storescu(inputs, node.dicom_port)
        queued = node.counts()["jobs"]
        node.kill9()
        assert queued["received"] + queued["running"] >= 6, queued  # the queue held jobs when it died
        node.start()
        assert '"resumed"' in node.log.read_text()
        time.sleep(1.0)
        assert node.terminate() == 0  # SIGTERM mid-queue: finish the job in hand, flush, exit 0
        with sqlite3.connect(node.folder / "spool" / "queue.sqlite3") as db:
            assert db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone()[0] == 0
        node.start()
        node.wait_jobs(len(inputs), timeout=120, states=("done",))
        node.wait_delivered(len(inputs), timeout=60)
        arrived = pacs.sr_sources()
        assert len(arrived) == len(inputs) and all(len(v) == 1 for v in arrived.values())


def test_outage_retries_then_delivers_and_manual_retry_revives_dead(bundle, phantoms, tmp_path):
    node = NodeProcess(tmp_path / "node", bundle[0], on_implausible="warn")
    pacs = Orthanc(tmp_path / "pacs", node.ae_title, node.dicom_port)
    late = Orthanc(tmp_path / "late", node.ae_title, node.dicom_port, aet="LATE")
    node.config.write_text(node.config.read_text() + pacs.destination() + late.destination("late").replace(
        'name = "late"', 'name = "late"') + "[delivery]\nbackoff_s = 0.5\nmax_backoff_s = 2\nmax_attempts = 40\n")
    # "late" never answers until the end: 40 attempts at <= 2 s apart are about 75 s, so it is still retrying
    inputs = phantoms[20:26]
    with running(pacs, late, node):
        node.start()  # the PACS is down from the start
        storescu(inputs, node.dicom_port)
        node.wait_jobs(len(inputs), timeout=60)
        metrics = wait_until(lambda: (m := node.http("/metrics")) and
                             f'radixpert_deliveries{{destination="pacs",state="retrying"}} {len(inputs)}.0' in m and m,
                             30, "the deliveries to be retrying")
        assert 'radixpert_delivery_attempts_total{destination="pacs",outcome="retrying"}' in metrics
        pacs.start()
        node.wait_delivered(len(inputs), timeout=60)
        arrived = pacs.sr_sources()
        assert len(arrived) == len(inputs) and all(len(v) == 1 for v in arrived.values())
        job = node.jobs()[0]["id"]
        with sqlite3.connect(node.folder / "spool" / "queue.sqlite3") as db:  # as if its attempts ran out
            db.execute("UPDATE deliveries SET state = 'dead' WHERE destination = 'late'")
        late.start()
        assert node.http(f"/api/jobs/{job}/retry", method="POST")["requeued"]["deliveries"] == 1
        wait_until(lambda: len(late.srs()) == 1, 30, "the manual retry to deliver")
        assert node.http(f"/api/jobs/{job}")["deliveries"][1]["state"] == "sent"


def test_load_parallel_associations_past_the_queue_bound(bundle, phantoms, tmp_path):
    node = NodeProcess(tmp_path / "node", bundle[0], on_implausible="warn")
    pacs = Orthanc(tmp_path / "pacs", node.ae_title, node.dicom_port)
    node.config.write_text(node.config.read_text().replace("[queue]", "[queue]\nmax_jobs = 6") + pacs.destination())
    inputs = phantoms  # 30 instances over 4 associations (200 in radixpert-bench serve)
    with running(pacs, node):
        pacs.start()
        node.start()
        sent = storescu(inputs, node.dicom_port, parallel=4, received=node.received_uids)
        node.wait_jobs(len(inputs), timeout=180, states=("done",))
        node.wait_delivered(len(inputs), timeout=60)
        arrived = pacs.sr_sources()
        assert len(arrived) == len(inputs) and all(len(v) == 1 for v in arrived.values())
        assert sent["rounds"] > 1 and '"out of resources: queue full"' in node.log.read_text()


def test_token_guards_every_route_but_healthz(bundle, tmp_path):
    token = tmp_path / "token"
    token.write_text("t0k3n-for-tests\n")
    os.chmod(token, 0o600)
    node = NodeProcess(tmp_path / "node", bundle[0])
    node.config.write_text(node.config.read_text().replace("[http]", f'[http]\ntoken_file = "{token}"'))
    with running(node):
        node.start(ready=False)
        import requests

        assert requests.get(node.url + "/healthz", timeout=10).status_code == 200
        for path in ("/", "/readyz", "/metrics", "/api/jobs", "/api/jobs/1", "/api/jobs/1/overlay.png"):
            assert requests.get(node.url + path, timeout=10).status_code == 401, path
            assert requests.get(node.url + path, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
        assert requests.post(node.url + "/api/jobs/1/retry", timeout=10).status_code == 401
        good = {"Authorization": "Bearer t0k3n-for-tests"}
        wait_until(lambda: requests.get(node.url + "/readyz", headers=good, timeout=10).status_code == 200, 120, "ready")
        assert requests.get(node.url + "/api/jobs", headers=good, timeout=10).status_code == 200
        assert requests.get(node.url + "/?token=t0k3n-for-tests", timeout=10).status_code == 200
