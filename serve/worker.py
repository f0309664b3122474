"""The worker: one loaded Reporter turns queued jobs into checked drafts, SRs and overlays.

Jobs are claimed ``model.batch`` at a time and reported with ``Reporter.report_many`` (batched
decoding when ``batch`` > 1, one scan at a time otherwise). The gate and guard verdicts, the
findings and the timings go into the job; the SR (unless the withhold policy applies) goes to the
spool and one delivery per destination is queued in the same transaction that marks the job done.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pydicom

from radixpert.errors import InputError, RadixpertError
from radixpert.runtime.cli import withheld_because
from radixpert.runtime.outputs import scrub, write_overlay
from radixpert.runtime.sr import write_sr
from radixpert.serve.config import ServeConfig
from radixpert.serve.logs import event
from radixpert.serve.metrics import Metrics
from radixpert.serve.queue import Job, Queue

# Timings of a ScanReport (milliseconds) observed as stages of the latency histogram.
_STAGES = {"read_ms": "read", "preprocess_ms": "preprocess", "frontend_ms": "frontend",
           "visual_prefill_ms": "visual_prefill", "decode_ms": "decode", "checks_ms": "checks", "total_ms": "report"}


class Worker(threading.Thread):
    """Claims jobs until ``stop`` is called; the batch in hand is finished first."""

    def __init__(self, config: ServeConfig, queue: Queue, metrics: Metrics, log: logging.Logger, reporter: Any,
                 on_done: Any = None):
        super().__init__(name="radixpert-worker", daemon=True)
        self.config, self.queue, self.metrics, self.log, self.reporter = config, queue, metrics, log, reporter
        self.on_done = on_done  # called after a job with deliveries is finished (wakes the outbound)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.policy = {"conflict": config.model.on_conflict, "implausible": config.model.on_implausible}
        for folder in ("sr", "overlay"):
            (config.spool / folder).mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            jobs, failed = self.queue.claim(self.config.model.batch, self.config.queue.max_attempts)
            for job in failed:
                self.metrics.jobs.labels("failed").inc()
                event(self.log, "failed: the node stopped while reporting it too often", level=logging.ERROR,
                      job=job.id, uid=job.sop_instance_uid, starts=job.starts)
            if not jobs:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            self.process(jobs)

    def process(self, jobs: list[Job]) -> None:
        """Report a claimed batch; an unexpected error fails the job at hand and requeues the rest."""
        for job in jobs:
            self.metrics.stage.labels("wait").observe(max(0.0, time.time() - job.received_at))
            event(self.log, "running", job=job.id, uid=job.sop_instance_uid)
        results = self.reporter.report_many([job.image for job in jobs])
        finished = 0
        try:
            for job, result in zip(jobs, results):
                self.finish(job, result)
                finished += 1
        except Exception as exc:  # a bug or a broken engine: one job fails, the others are tried again
            job = jobs[finished]
            reason = exc.args[0] if isinstance(exc, RadixpertError) and exc.args else type(exc).__name__
            self._fail(job, f"internal error: {scrub(str(reason), job.image, f'job {job.id}')}")
            self.queue.requeue([j.id for j in jobs[finished + 1:]])

    def finish(self, job: Job, result: Any) -> None:
        """Record one job's outcome: failed (refused scan), withheld, or done with an SR and deliveries."""
        if isinstance(result, InputError):
            self._fail(job, scrub(str(result), job.image, f"job {job.id}"))
            return
        spool = self.config.spool
        checked = result.checked
        withheld = withheld_because(checked, self.policy)
        bundle = self.reporter.bundle
        overlay = sr = None
        if self.config.model.overlay:
            overlay = str(write_overlay(result.display, result.masks, bundle.labels, spool / "overlay" / f"{job.id}.png",
                                        title=job.sop_instance_uid,
                                        notes=checked.flags + ([f"withheld: {withheld}"] if withheld else [])))
        record: dict[str, Any] = {
            "report": None if withheld else result.report, "findings": None if withheld else checked.findings,
            "checks": checked.checks, "gate": checked.gate, "evidence": checked.evidence, "flags": checked.flags,
            "withheld": withheld, "warnings": result.warnings, "stopped": result.stopped,
            "timings": {k: round(v, 2) if isinstance(v, float) else v for k, v in result.timings.items()},
            "model": self.reporter.describe(), "sr_sop_instance_uid": None,
        }
        if not withheld:
            started = time.perf_counter()
            try:
                path = write_sr(Path(job.image), result.report, spool / "sr" / f"{job.id}.dcm",
                                bundle_id=bundle.bundle_id, model_name=bundle.config.name, warnings=result.warnings,
                                findings=checked.findings, checks=checked.checks, gate=checked.gate)
            except InputError as exc:
                self._fail(job, scrub(str(exc), job.image, f"job {job.id}"))
                return
            self.metrics.stage.labels("sr").observe(time.perf_counter() - started)
            sr = str(path)
            record["sr_sop_instance_uid"] = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        for key, stage in _STAGES.items():
            if isinstance(result.timings.get(key), (int, float)):
                self.metrics.stage.labels(stage).observe(result.timings[key] / 1e3)
        state = "withheld" if withheld else "done"
        destinations = [d.name for d in self.config.destinations]
        self.queue.finish(job.id, state, reason=withheld, result=record, sr=sr, overlay=overlay,
                          destinations=destinations)
        self.metrics.jobs.labels(state).inc()
        event(self.log, state, job=job.id, uid=job.sop_instance_uid, gate=checked.gate["verdict"],
              flags=len(checked.flags), report_ms=round(result.timings.get("total_ms", 0.0)))
        if sr and destinations and self.on_done is not None:
            self.on_done()

    def _fail(self, job: Job, reason: str) -> None:
        reason = " ".join(reason.split())[:300]
        self.queue.finish(job.id, "failed", reason=reason)
        self.metrics.jobs.labels("failed").inc()
        event(self.log, "failed", level=logging.WARNING, job=job.id, uid=job.sop_instance_uid, reason=reason)
