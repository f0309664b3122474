"""``radixpert-bench serve``: the DICOM node under load, a crash and a PACS outage, against a real Orthanc.

Three scenarios, each with a fresh Orthanc and a fresh node on loopback (benchmarks/serve_harness.py):

* **load**: N phantom instances over P parallel dcmtk ``storescu`` associations. Instances/s accepted
  while the model works, and the time from each C-STORE (the job's reception) to its SR's arrival in
  Orthanc (seen on Orthanc's ``/changes`` feed, polled every 0.2 s): p50 and p95.
* **crash**: ``kill -9`` while the queue holds Q jobs, restart; every job completes, one SR per source.
* **outage**: Orthanc stopped while SRs are pending and restarted S seconds later; ``/metrics`` shows
  them retrying meanwhile; all delivered, one SR per source.

Benchmarks report; they set no pass mark. The counts they check are recorded with the numbers.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

from radixpert.errors import UsageError, cli_errors


def _phantoms(folder: Path, n: int, size: int) -> list[Path]:
    from radixpert.phantom import write_dataset

    write_dataset(folder, n=n, seed=7, size=size, workers=1, progress=False)
    return sorted((folder / "dicom").glob("*.dcm"))[:n]


def _one_each(pacs: Any, n: int) -> dict[str, int]:
    arrived = pacs.sr_sources()
    return {"sources_with_sr": len(arrived), "expected": n, "duplicates": sum(len(v) - 1 for v in arrived.values())}


class _Arrivals(threading.Thread):
    """Orthanc's change feed, polled: the local time each new instance was first seen."""

    def __init__(self, pacs: Any):
        super().__init__(daemon=True)
        self.pacs, self.seen, self.stop = pacs, {}, threading.Event()

    def run(self) -> None:
        since = 0
        while not self.stop.is_set():
            try:
                feed = self.pacs.get(f"/changes?since={since}&limit=1000")
            except Exception:  # noqa: BLE001 - a missed poll is retried
                time.sleep(0.2)
                continue
            now = time.time()
            for change in feed["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    self.seen.setdefault(change["ID"], now)
            since = feed["Last"]
            if feed["Done"]:
                time.sleep(0.2)


def load(bundle: str, work: Path, files: list[Path], parallel: int, threads: int, max_jobs: int,
         screenshot: Path | None = None) -> dict[str, Any]:
    from radixpert.benchmarks.serve_harness import NodeProcess, Orthanc, running, storescu

    node = NodeProcess(work / "node", bundle, threads=threads)
    pacs = Orthanc(work / "pacs", node.ae_title, node.dicom_port)
    node.config.write_text(node.config.read_text().replace("[queue]", f"[queue]\nmax_jobs = {max_jobs}") +
                           pacs.destination())
    with running(pacs, node):
        pacs.start()
        node.start()
        arrivals = _Arrivals(pacs)
        arrivals.start()
        sent = storescu(files, node.dicom_port, parallel=parallel, received=node.received_uids)
        node.wait_jobs(len(files), timeout=3600)
        node.wait_delivered(len(files), timeout=600)
        time.sleep(1.0)
        arrivals.stop.set()
        if screenshot is not None:
            _screenshot(node.url + "/", screenshot)
        received = {m.group(1): int(float(m.group(2))) for m in
                    re.finditer(r'radixpert_received_total\{outcome="([a-z]+)"\} ([0-9.]+)', node.http("/metrics"))}
        jobs = {j["sop_instance_uid"]: j for j in node.jobs()}
        latency = []
        for source, (sr,) in ((s, v[:1]) for s, v in pacs.sr_sources().items()):
            latency.append(arrivals.seen[sr] - jobs[source]["received_at"])
        first = min(j["received_at"] for j in jobs.values())
        last = max(j["finished_at"] for j in jobs.values())
        report = [j["result"]["timings"]["total_ms"] / 1e3 for j in jobs.values() if j["result"]]
        return {
            "instances": len(files), "parallel_associations": parallel, "max_jobs": max_jobs,
            "storescu_seconds": round(sent["seconds"], 2), "storescu_rounds": sent["rounds"],
            "c_store_outcomes": received, "refused_out_of_resources": received.get("refused", 0),
            "accepted_per_s": round(len(files) / sent["seconds"], 2),
            "reports_per_s": round(len(files) / (last - first), 3),
            "report_s_median": round(statistics.median(report), 3),
            "cstore_to_sr_s": {"p50": round(_pct(latency, 50), 2), "p95": round(_pct(latency, 95), 2),
                               "max": round(max(latency), 2)},
            "states": node.counts()["jobs"], **_one_each(pacs, len(files)),
        }


def crash(bundle: str, work: Path, files: list[Path], queued: int, threads: int) -> dict[str, Any]:
    from radixpert.benchmarks.serve_harness import NodeProcess, Orthanc, running, storescu

    node = NodeProcess(work / "node", bundle, threads=threads)
    pacs = Orthanc(work / "pacs", node.ae_title, node.dicom_port)
    node.config.write_text(node.config.read_text() + pacs.destination())
    with running(pacs, node):
        pacs.start()
        node.start()
        storescu(files, node.dicom_port)
        before = node.counts()["jobs"]
        node.kill9()
        killed = time.time()
        node.start()
        node.wait_jobs(len(files), timeout=3600, states=("done",))
        node.wait_delivered(len(files), timeout=600)
        return {"instances": len(files), "queue_at_kill": before["received"] + before["running"],
                "states_at_kill": before, "asked_queue": queued, "seconds_to_complete_after_kill": round(time.time() - killed, 1),
                "states": node.counts()["jobs"], **_one_each(pacs, len(files))}


def outage(bundle: str, work: Path, files: list[Path], seconds: float, threads: int) -> dict[str, Any]:
    from radixpert.benchmarks.serve_harness import NodeProcess, Orthanc, running, storescu

    node = NodeProcess(work / "node", bundle, threads=threads)
    pacs = Orthanc(work / "pacs", node.ae_title, node.dicom_port)
    node.config.write_text(node.config.read_text() + pacs.destination() +
                           "[delivery]\nbackoff_s = 1\nmax_backoff_s = 8\nmax_attempts = 30\n")
    with running(pacs, node):
        pacs.start()
        node.start()
        pacs.stop()
        stopped = time.time()
        storescu(files, node.dicom_port)
        retrying = []
        while time.time() - stopped < seconds:
            metrics = node.http("/metrics")
            found = re.search(r'radixpert_deliveries\{destination="pacs",state="retrying"\} (\d+)', metrics)
            retrying.append((round(time.time() - stopped, 1), int(found.group(1)) if found else 0))
            time.sleep(2.0)
        pacs.start()
        restarted = time.time()
        node.wait_delivered(len(files), timeout=600)
        attempts = re.search(r'radixpert_delivery_attempts_total\{destination="pacs",outcome="retrying"\} ([0-9.]+)',
                             node.http("/metrics"))
        return {"instances": len(files), "outage_s": round(restarted - stopped, 1),
                "max_retrying_seen": max(n for _, n in retrying), "retrying_samples": retrying,
                "failed_attempts": int(float(attempts.group(1))) if attempts else 0,
                "seconds_to_deliver_after_restart": round(time.time() - restarted, 1),
                "states": node.counts()["jobs"], **_one_each(pacs, len(files))}


def _screenshot(url: str, path: Path) -> None:
    """The review page as headless Chromium renders it (a real browser, on loopback)."""
    import subprocess

    from radixpert.benchmarks.serve_harness import chromium

    browser = chromium()
    if browser is None:
        raise UsageError("--screenshot needs chromium (apt-get install chromium)")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,1400", f"--screenshot={path.resolve()}", url],
                   capture_output=True, timeout=120, check=True)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# radixpert-bench serve: {result['title']}", "", f"`{result['command']}`", "",
             f"Machine: {result['machine']}", ""]
    if "load" in result:
        r = result["load"]
        lines += ["## Load", "",
                  f"{r['instances']} instances over {r['parallel_associations']} parallel dcmtk storescu associations "
                  f"(queue bound {r['max_jobs']}; {r['refused_out_of_resources']} refused as out of resources and "
                  f"resent; {r['storescu_rounds']} round(s)).", "",
                  "| measure | value |", "|---|---|",
                  f"| accepted while the model works | {r['accepted_per_s']} instances/s ({r['storescu_seconds']} s for all) |",
                  f"| reports | {r['reports_per_s']} /s (median {r['report_s_median']} s per report) |",
                  f"| C-STORE to SR in Orthanc, p50 | {r['cstore_to_sr_s']['p50']} s |",
                  f"| C-STORE to SR in Orthanc, p95 | {r['cstore_to_sr_s']['p95']} s |",
                  f"| SRs in Orthanc / duplicates | {r['sources_with_sr']} of {r['expected']} / {r['duplicates']} |", ""]
    if "crash" in result:
        r = result["crash"]
        lines += ["## Crash (kill -9)", "",
                  f"Killed with {r['queue_at_kill']} jobs queued or running ({r['states_at_kill']}); restarted: all "
                  f"{r['instances']} done {r['seconds_to_complete_after_kill']} s after the kill; SRs in Orthanc "
                  f"{r['sources_with_sr']} of {r['expected']}, duplicates {r['duplicates']}.", ""]
    if "outage" in result:
        r = result["outage"]
        lines += ["## PACS outage", "",
                  f"Orthanc stopped {r['outage_s']} s with {r['instances']} SRs to deliver; /metrics showed up to "
                  f"{r['max_retrying_seen']} deliveries retrying ({r['failed_attempts']} failed attempts); all delivered "
                  f"{r['seconds_to_deliver_after_restart']} s after the restart; SRs in Orthanc "
                  f"{r['sources_with_sr']} of {r['expected']}, duplicates {r['duplicates']}.", ""]
    return "\n".join(lines)


@click.command("serve")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False), help="Bundle from radixpert-export.")
@click.option("--scenarios", default="load,crash,outage", show_default=True, help="Which scenarios, comma-separated.")
@click.option("--count", type=click.IntRange(1, 100000), default=200, show_default=True, help="Instances in the load scenario.")
@click.option("--parallel", type=click.IntRange(1, 64), default=4, show_default=True, help="Parallel storescu associations.")
@click.option("--max-jobs", type=click.IntRange(1, 1000000), default=1000, show_default=True,
              help="The node's queue bound in the load scenario (lower it to see out-of-resources refusals).")
@click.option("--crash-queue", type=click.IntRange(1, 10000), default=30, show_default=True,
              help="Instances sent before the kill -9 (the queue then holds about that many).")
@click.option("--outage-s", type=click.FloatRange(1, 3600), default=60, show_default=True, help="Seconds Orthanc stays down.")
@click.option("--size", type=click.IntRange(64, 4096), default=1024, show_default=True, help="Phantom side in pixels.")
@click.option("--threads", type=click.IntRange(1, 256), default=2, show_default=True, help="The node's CPU threads.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for result.json and result.md [default: bench-results/serve-<bundle>].")
@click.option("--screenshot", type=click.Path(dir_okay=False), default=None,
              help="After the load scenario, save headless Chromium's screenshot of the review page here (PNG).")
@cli_errors()
def serve(bundle_dir: str, scenarios: str, count: int, parallel: int, max_jobs: int, crash_queue: int, outage_s: float,
          size: int, threads: int, out_dir: str | None, screenshot: str | None) -> None:
    """The DICOM node against a real Orthanc and dcmtk: load, kill -9 and PACS outage (needs orthanc and dcmtk)."""
    from radixpert.benchmarks.cli import save_result
    from radixpert.benchmarks.report import command_line, cpu_model
    from radixpert.benchmarks.serve_harness import components_missing

    missing = components_missing()
    if missing:
        raise UsageError(f"radixpert-bench serve needs {', '.join(missing)}: apt-get install orthanc dcmtk")
    chosen = [s.strip() for s in scenarios.split(",") if s.strip()]
    if not chosen or set(chosen) - {"load", "crash", "outage"}:
        raise UsageError("--scenarios takes load, crash and outage, comma-separated")
    bundle = str(Path(bundle_dir).resolve())
    result: dict[str, Any] = {"command": command_line(), "title": Path(bundle_dir).name,
                              "machine": f"{cpu_model()}, node threads {threads}"}
    with tempfile.TemporaryDirectory(prefix="radixpert-bench-serve-") as tmp:
        work = Path(tmp)
        files = _phantoms(work / "phantoms", max(count, crash_queue, 20), size)
        if "load" in chosen:
            result["load"] = load(bundle, work / "load", files[:count], parallel, threads, max_jobs,
                                  Path(screenshot) if screenshot else None)
        if "crash" in chosen:
            result["crash"] = crash(bundle, work / "crash", files[:crash_queue], crash_queue, threads)
        if "outage" in chosen:
            result["outage"] = outage(bundle, work / "outage", files[:20], outage_s, threads)
    out = Path(out_dir) if out_dir else Path("bench-results") / f"serve-{Path(bundle_dir).name}"
    out.mkdir(parents=True, exist_ok=True)
    save_result(out, result, markdown(result))
