"""Inbound DICOM: C-ECHO, and C-STORE of radiographs into the spool and the queue (pynetdicom).

An instance is written to the spool (a temporary sibling, fsync, rename; mode 0600) and recorded
in the queue **before** C-STORE answers success. Routing rules decide which instances become
jobs; the others are acknowledged and ignored with a log line. Past the queue bound, and when the
spool cannot be written, C-STORE answers 0xA700 "out of resources" and the sender keeps the image.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from pydicom.filewriter import write_file_meta_info
from pydicom.pixels import get_decoder
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit,
                         JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless, UID)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from radixpert.atomic import commit, partial_path, remove
from radixpert.runtime.outputs import safe_uid
from radixpert.serve.config import ALL_STORAGE, SOP_CLASSES, RoutingRule, ServeConfig
from radixpert.serve.logs import event
from radixpert.serve.metrics import Metrics
from radixpert.serve.queue import Queue

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
_CANDIDATE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                       ExplicitVRBigEndian, RLELossless, JPEG2000Lossless, JPEG2000, JPEGLossless, JPEGLosslessSV1,
                       JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSLossless, JPEGLSNearLossless)


def decodable_syntaxes() -> list[UID]:
    """The transfer syntaxes the image reader decodes in this installation (uncompressed always)."""
    out = []
    for ts in _CANDIDATE_SYNTAXES:
        if not ts.is_compressed:
            out.append(ts)
            continue
        try:
            if get_decoder(ts).is_available:
                out.append(ts)
        except NotImplementedError:
            continue
    return out


def routed(rules: list[RoutingRule], header: dict[str, str]) -> bool:
    """True when there are no rules or one rule matches every attribute it lists."""
    if not rules:
        return True
    for rule in rules:
        wanted = {"modality": rule.modality, "body_part": rule.body_part, "view_position": rule.view_position}
        if all(not values or header.get(key, "") in {v.upper() for v in values} for key, values in wanted.items()):
            return True
    return False


class Receiver:
    """The storage SCP of the node; ``start`` binds it, ``stop`` refuses new associations."""

    def __init__(self, config: ServeConfig, queue: Queue, metrics: Metrics, log: logging.Logger):
        self.config, self.queue, self.metrics, self.log = config, queue, metrics, log
        self.incoming = config.spool / "incoming"
        self.server: Any = None
        self.ae = AE(ae_title=config.dicom.ae_title)
        allowed = [a for a in config.dicom.allowed_calling_aes if a != "*"]
        if "*" not in config.dicom.allowed_calling_aes:
            self.ae.require_calling_aet = allowed  # others are rejected at association
        self.ae.require_called_aet = True  # the sender must call us by our AE title
        self.ae.add_supported_context(Verification)
        syntaxes = decodable_syntaxes()
        if ALL_STORAGE in config.dicom.sop_classes:
            for context in AllStoragePresentationContexts:
                self.ae.add_supported_context(context.abstract_syntax, syntaxes)
        else:
            for name in config.dicom.sop_classes:
                self.ae.add_supported_context(SOP_CLASSES[name.upper()], syntaxes)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self.incoming.mkdir(parents=True, exist_ok=True)
        for stale in self.incoming.glob("*.partial-*"):  # writes a dead node never finished (never answered)
            remove(stale)
        handlers = [(evt.EVT_C_ECHO, self.on_echo), (evt.EVT_C_STORE, self.on_store),
                    (evt.EVT_REJECTED, self.on_rejected)]
        self.server = self.ae.start_server((self.config.dicom.host, self.config.dicom.port), block=False,
                                           evt_handlers=handlers)
        event(self.log, "dicom listening", ae_title=self.config.dicom.ae_title, host=self.config.dicom.host,
              port=self.port)

    def stop(self) -> None:
        """Stop accepting associations (open ones are aborted; nothing unanswered was acknowledged)."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def on_echo(self, event_: Any) -> int:
        return SUCCESS

    def on_rejected(self, event_: Any) -> None:
        event(self.log, "association rejected", level=logging.WARNING,
              calling_ae=_ae(event_.assoc.requestor.ae_title))

    def on_store(self, event_: Any) -> int:
        """Spool, route and queue one instance; the status is the C-STORE answer."""
        started = time.perf_counter()
        request = event_.request
        uid = safe_uid(request.AffectedSOPInstanceUID)
        calling = _ae(event_.assoc.requestor.ae_title)
        if uid is None:
            self.metrics.received.labels("refused").inc()
            event(self.log, "refused: no valid SOP Instance UID", level=logging.WARNING, calling_ae=calling)
            return CANNOT_UNDERSTAND
        q = self.config.queue
        if self.queue.active() >= q.max_jobs:
            return self._full(uid, calling)
        header = _header(event_)
        if header is not None and not routed(self.config.routing, header):
            self.metrics.received.labels("ignored").inc()
            event(self.log, "ignored by routing", uid=uid, modality=header.get("modality") or None,
                  view_position=header.get("view_position") or None)
            return SUCCESS
        if not q.reprocess and (known := self.queue.known(uid)) is not None:
            self.metrics.received.labels("duplicate").inc()
            event(self.log, "duplicate ignored", job=known, uid=uid)
            return SUCCESS
        try:
            path = self._spool(event_)
        except OSError as exc:
            self.metrics.received.labels("refused").inc()
            event(self.log, "out of resources: cannot write the spool", level=logging.ERROR, uid=uid,
                  error=exc.strerror or type(exc).__name__)
            return OUT_OF_RESOURCES
        outcome, job = self.queue.admit(uid, safe_uid(request.AffectedSOPClassUID), calling, str(path), q.max_jobs,
                                        q.reprocess)
        if outcome != "accepted":
            path.unlink(missing_ok=True)
            if outcome == "full":
                return self._full(uid, calling)
            self.metrics.received.labels("duplicate").inc()
            event(self.log, "duplicate ignored", job=job, uid=uid)
            return SUCCESS
        self.metrics.received.labels("accepted").inc()
        self.metrics.stage.labels("spool").observe(time.perf_counter() - started)
        event(self.log, "received", job=job, uid=uid, calling_ae=calling)
        if self.on_job is not None:
            self.on_job()
        return SUCCESS

    on_job: Any = None  # called after each accepted job (wakes the worker)

    def _full(self, uid: str, calling: str) -> int:
        self.metrics.received.labels("refused").inc()
        event(self.log, "out of resources: queue full", level=logging.WARNING, uid=uid, calling_ae=calling,
              max_jobs=self.config.queue.max_jobs)
        return OUT_OF_RESOURCES

    def _spool(self, event_: Any) -> Path:
        """Write the instance as received (no re-encoding) to incoming/<random>.dcm, atomically, mode 0600."""
        target = self.incoming / f"{secrets.token_hex(12)}.dcm"
        partial = partial_path(target)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(b"\x00" * 128 + b"DICM")
                write_file_meta_info(handle, event_.file_meta, enforce_standard=True)
                handle.write(event_.request.DataSet.getvalue())
            commit(partial, target)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise
        return target


def _header(event_: Any) -> dict[str, str] | None:
    """Modality, body part and view position (upper case), or None when the header cannot be read."""
    try:
        ds = event_.dataset
        return {"modality": str(ds.get("Modality", "") or "").strip().upper(),
                "body_part": str(ds.get("BodyPartExamined", "") or "").strip().upper(),
                "view_position": str(ds.get("ViewPosition", "") or "").strip().upper()}
    except Exception:  # a corrupt header becomes a job that fails with the reader's reason
        return None


def _ae(title: object) -> str:
    text = title.decode("ascii", "replace") if isinstance(title, bytes) else str(title)
    return "".join(c for c in text.strip() if c.isprintable())[:16]
