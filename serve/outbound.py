"""Outbound: each destination's deliveries of SRs, with retries and a dead-letter state.

One thread per destination, so that one unreachable archive never delays another. A failed
attempt waits ``backoff_s * 2**(attempt - 1)`` seconds (at most ``max_backoff_s``); after
``max_attempts`` the delivery is ``dead`` until ``POST /api/jobs/{id}/retry``. Resending is
safe: the SR file and its SOP Instance UID never change once written, so an archive that got it
before a crash stores it once.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from radixpert.atomic import commit, partial_path
from radixpert.errors import first_line
from radixpert.serve.config import Destination, ServeConfig
from radixpert.serve.logs import event
from radixpert.serve.metrics import Metrics
from radixpert.serve.queue import Queue

# C-STORE statuses that mean "stored": success and the warnings (coercion, elements discarded).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class DeliveryError(Exception):
    """One line saying why an attempt failed (no patient data: peers, statuses, library messages)."""


class DicomSender:
    """C-STORE SCU of the SR to a configured AE, one association per SR."""

    def __init__(self, dest: Destination, our_ae: str, timeout: float):
        self.dest = dest
        self.ae = AE(ae_title=our_ae)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout
        self.ae.connection_timeout = timeout
        self.contexts: set[str] = set()

    def send(self, path: Path) -> None:
        ds = pydicom.dcmread(path)
        if ds.SOPClassUID not in self.contexts:  # the SR class written today; added once
            self.ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            self.contexts.add(ds.SOPClassUID)
        d = self.dest
        assoc = self.ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            raise DeliveryError(f"association with {d.ae_title} at {d.host}:{d.port} {why}")
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        if code not in _STORED:
            raise DeliveryError(f"C-STORE to {d.ae_title} answered "
                                f"{'no status' if code is None else f'status 0x{code:04X}'}")


class DicomWebSender:
    """STOW-RS of the SR to a DICOMweb endpoint (dicomweb-client)."""

    def __init__(self, dest: Destination, timeout: float):
        from radixpert.dicomweb import dicomweb_client

        self.client = dicomweb_client(
            dest.url, username=dest.username, timeout=timeout,
            password=_secret(dest.password_file, dest.name) if dest.username else None,
            token=_secret(dest.token_file, dest.name) if dest.token_file else None)

    def send(self, path: Path) -> None:
        try:
            self.client.store_instances([pydicom.dcmread(path)])
        except Exception as exc:  # requests and dicomweb-client raise many types
            raise DeliveryError(f"STOW-RS failed: {type(exc).__name__}: {first_line(exc, 200)}") from None


class FolderSender:
    """A copy of the SR in a folder, named by its SOP Instance UID (a resend replaces it)."""

    def __init__(self, dest: Destination):
        self.folder = Path(dest.path)

    def send(self, path: Path) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            target = self.folder / f"{uid}.dcm"
            partial = partial_path(target)
            shutil.copyfile(path, partial)
            commit(partial, target)
        except OSError as exc:
            raise DeliveryError(f"cannot write to {self.folder}: {exc.strerror or type(exc).__name__}") from None


def _secret(path: str, name: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise DeliveryError(f"destination {name}: cannot read {path} ({exc.strerror})") from None


def make_sender(dest: Destination, config: ServeConfig):
    timeout = config.delivery.timeout_s
    if dest.type == "dicom":
        return DicomSender(dest, config.dicom.ae_title, timeout)
    if dest.type == "dicomweb":
        return DicomWebSender(dest, timeout)
    return FolderSender(dest)


class Outbound(threading.Thread):
    """Delivers one destination's due SRs until ``stop``; the attempt in hand is finished first."""

    def __init__(self, dest: Destination, config: ServeConfig, queue: Queue, metrics: Metrics,
                 log: logging.Logger):
        super().__init__(name=f"radixpert-outbound-{dest.name}", daemon=True)
        self.dest, self.config, self.queue, self.metrics, self.log = dest, config, queue, metrics, log
        self.sender = make_sender(dest, config)
        self.wake = threading.Event()
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            due = self.queue.due(self.dest.name)
            if not due:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            for delivery in due:
                if self.stopping.is_set():
                    break
                self.attempt(delivery)

    def attempt(self, delivery: dict) -> None:
        d, dl = self.dest, self.config.delivery
        started = time.perf_counter()
        try:
            self.sender.send(Path(delivery["sr"]))
        except Exception as exc:  # noqa: BLE001 - every failure is counted and retried
            error = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {first_line(exc, 200)}"
            state = self.queue.delivery_failed(delivery["id"], error, dl.max_attempts, dl.backoff_s, dl.max_backoff_s)
            self.metrics.deliveries.labels(d.name, state).inc()
            event(self.log, f"delivery {state}", level=logging.ERROR if state == "dead" else logging.WARNING,
                  job=delivery["job_id"], uid=delivery["sop_instance_uid"], destination=d.name,
                  attempt=delivery["attempts"] + 1, error=error)
            return
        self.queue.delivered(delivery["id"])
        self.metrics.deliveries.labels(d.name, "sent").inc()
        self.metrics.stage.labels("delivery").observe(time.perf_counter() - started)
        self.metrics.stage.labels("end_to_end").observe(max(0.0, time.time() - delivery["received_at"]))
        event(self.log, "delivered", job=delivery["job_id"], uid=delivery["sop_instance_uid"], destination=d.name)
