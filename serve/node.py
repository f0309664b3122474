"""The node: spool, queue, DICOM receiver, HTTP, one worker with the loaded model, and the outbound threads.

``start`` binds the receiver and the HTTP port before the model loads (``/readyz`` answers 503
until it is loaded; received images wait in the queue), resumes the jobs a stopped node left,
and starts the worker. ``stop`` is the SIGTERM path: refuse new associations, let the worker
finish the batch in hand, let each outbound finish its attempt, flush and close the queue.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from typing import Any

from radixpert.errors import UsageError
from radixpert.serve.config import ServeConfig
from radixpert.serve.http import HttpServer, build_app
from radixpert.serve.logs import event
from radixpert.serve.metrics import Metrics
from radixpert.serve.outbound import Outbound
from radixpert.serve.queue import Queue
from radixpert.serve.scp import Receiver
from radixpert.serve.worker import Worker


class Node:
    """Everything one ``radixpert-serve`` process runs, over one spool folder."""

    def __init__(self, config: ServeConfig, log: logging.Logger):
        self.config, self.log = config, log
        os.umask(0o077)  # spool, queue, SRs and overlays: readable by the node's user only
        config.spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = os.open(config.spool / "node.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise UsageError(f"another radixpert-serve is using the spool {config.spool}; give each node its own") from None
        self.queue = Queue(config.spool)
        self.metrics = Metrics(self.queue)
        self.ready = threading.Event()
        self.token = config.http_token()
        self.receiver = Receiver(config, self.queue, self.metrics, log)
        self.receiver.on_job = self.wake
        self.http = HttpServer(build_app(self), config.http.host, config.http.port)
        self.outbound = [Outbound(d, config, self.queue, self.metrics, log) for d in config.destinations]
        self.worker: Worker | None = None
        self.reporter: Any = None

    def start(self, load_model: Any = None) -> None:
        """Resume, listen, load the model (``load_model()`` or the configured bundle), start working."""
        resumed = self.queue.recover()
        event(self.log, "queue opened", resumed=resumed, **self.queue.counts()["jobs"])
        try:
            self.http.start()
        except OSError:
            raise UsageError(f"cannot listen for HTTP on {self.config.http.host}:{self.config.http.port} "
                             "(in use, or not an address of this machine)") from None
        event(self.log, "http listening", host=self.config.http.host, port=self.http.port)
        try:
            self.receiver.start()
        except OSError:
            raise UsageError(f"cannot listen for DICOM on {self.config.dicom.host}:{self.config.dicom.port} "
                             "(in use, or not an address of this machine)") from None
        for thread in self.outbound:
            thread.start()
        self.reporter = load_model() if load_model is not None else self._load()
        self.worker = Worker(self.config, self.queue, self.metrics, self.log, self.reporter, on_done=self.wake)
        self.worker.start()
        self.ready.set()
        event(self.log, "ready", **self.reporter.describe())

    def _load(self) -> Any:
        from radixpert.bundle import load_bundle
        from radixpert.runtime.pipeline import Reporter

        m = self.config.model
        event(self.log, "loading model")
        # Speculative decoding where it gives plain decoding's reports (radixpert-run's default).
        return Reporter(load_bundle(m.bundle), threads=m.threads, quant=m.quant, batch=m.batch, speculative=None)

    def wake(self) -> None:
        """New work: a job in the queue or a delivery due."""
        if self.worker is not None:
            self.worker.wake.set()
        for thread in self.outbound:
            thread.wake.set()

    def stop(self, timeout: float = 120.0) -> None:
        """Refuse associations, finish the batch and attempts in hand, flush and close (idempotent)."""
        event(self.log, "stopping")
        self.receiver.stop()
        if self.worker is not None:
            self.worker.stop()
            self.worker.join(timeout)
        for thread in self.outbound:
            thread.stop()
        for thread in self.outbound:
            if thread.is_alive():
                thread.join(timeout)
        self.http.stop()
        if self.reporter is not None:
            self.reporter.close()
            self.reporter = None
        still = self.queue.recover() if self.worker is not None and self.worker.is_alive() else 0
        self.queue.close()
        os.close(self._lock_fd)
        event(self.log, "stopped", requeued=still)
