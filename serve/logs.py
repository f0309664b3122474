"""The node's log lines: text or JSON lines, carrying a job id and a SOP Instance UID at most.

Nothing here takes a dataset: callers pass the event, the job id, the UID and plain counts,
states, AE titles or one-line reasons. Names, IDs, birth dates and accession numbers never
reach a log line (tests/test_serve_phi.py checks a full run's logs against every PHI field).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

LOGGER = "radixpert.serve"
_FIELDS = "fields"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": round(record.created, 3), "level": record.levelname.lower(), "event": record.getMessage()}
        line.update(getattr(record, _FIELDS, {}))
        return json.dumps(line, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, _FIELDS, {}).items())
        return f"{stamp} {record.levelname.lower()} {record.getMessage()}" + (f" {fields}" if fields else "")


def setup(fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> logging.Logger:
    """Configure the node's logger (stderr by default); libraries' own loggers are silenced."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    log = logging.getLogger(LOGGER)
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    # pynetdicom, uvicorn and dicomweb-client log datasets, peers and URLs at their own levels: only their errors pass,
    # as one line through our handler, without their arguments.
    for name in ("pynetdicom", "uvicorn", "uvicorn.error", "uvicorn.access", "fastapi", "dicomweb_client"):
        other = logging.getLogger(name)
        other.handlers[:] = [_LibraryHandler(log)]
        # pynetdicom logs every refused connection as an error: our own events say it once per attempt.
        other.setLevel(logging.CRITICAL if name == "pynetdicom" else logging.ERROR)
        other.propagate = False
    return log


class _LibraryHandler(logging.Handler):
    """A library's error as our event, its class and logger only (messages can quote dataset values)."""

    def __init__(self, log: logging.Logger):
        super().__init__()
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        kind = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        event(self.log, "library error", level=logging.WARNING, library=record.name, **({"exception": kind} if kind else {}))


def event(log: logging.Logger, message: str, *, level: int = logging.INFO, job: int | None = None,
          uid: str | None = None, **fields: Any) -> None:
    """Log ``message`` with ``job`` and ``uid`` and plain fields (numbers, states, AE titles, reasons)."""
    extra: dict[str, Any] = {}
    if job is not None:
        extra["job"] = job
    if uid is not None:
        extra["uid"] = uid
    extra.update(fields)
    log.log(level, message, extra={_FIELDS: extra})
