"""The durable queue: SQLite in WAL mode, in the spool folder.

Jobs go ``received -> running -> done | withheld | failed``; each done job gets one delivery per
destination, ``pending -> sent``, or ``retrying`` (with a next attempt time) and finally ``dead``.
An instance is admitted (spooled and recorded, in that order) before its C-STORE is answered;
a restart puts every ``running`` job back to ``received``. One connection is shared by the
node's threads behind a lock; ``synchronous=FULL`` makes every commit durable.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOB_STATES = ("received", "running", "done", "withheld", "failed")
DELIVERY_STATES = ("pending", "sent", "retrying", "dead")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT,
    calling_ae TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    image TEXT NOT NULL,
    received_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    starts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    sr TEXT,
    overlay TEXT
);
CREATE INDEX IF NOT EXISTS jobs_uid ON jobs (sop_instance_uid);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT,
    sent_at REAL,
    UNIQUE (job_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_at);
"""


@dataclass
class Job:
    id: int
    sop_instance_uid: str
    state: str
    image: str
    received_at: float
    starts: int


class Queue:
    """The jobs and deliveries of one spool folder."""

    def __init__(self, spool: Path):
        self.path = Path(spool) / "queue.sqlite3"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE), under the thread lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- receiving ----------------------------------------------------------------------
    def active(self) -> int:
        """Jobs waiting or running: what the queue bound counts."""
        return self._read("SELECT COUNT(*) FROM jobs WHERE state IN ('received', 'running')")[0][0]

    def known(self, uid: str) -> int | None:
        """The id of the newest job for this SOP Instance UID, or None."""
        rows = self._read("SELECT MAX(id) FROM jobs WHERE sop_instance_uid = ?", (uid,))
        return rows[0][0]

    def admit(self, uid: str, sop_class: str | None, calling_ae: str, image: str, max_jobs: int,
              reprocess: bool) -> tuple[str, int | None]:
        """Record a spooled instance: ("accepted", id), ("duplicate", existing id) or ("full", None)."""
        with self._tx() as db:
            if not reprocess:
                row = db.execute("SELECT MAX(id) FROM jobs WHERE sop_instance_uid = ?", (uid,)).fetchone()
                if row[0] is not None:
                    return "duplicate", row[0]
            waiting = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('received', 'running')").fetchone()[0]
            if waiting >= max_jobs:
                return "full", None
            cursor = db.execute(
                "INSERT INTO jobs (sop_instance_uid, sop_class_uid, calling_ae, state, image, received_at) "
                "VALUES (?, ?, ?, 'received', ?, ?)", (uid, sop_class, calling_ae, image, time.time()))
            return "accepted", cursor.lastrowid

    # --- working ------------------------------------------------------------------------
    def recover(self) -> int:
        """Put every job a stopped node left running back in the queue; returns how many."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET state = 'received' WHERE state = 'running'").rowcount

    def claim(self, n: int, max_starts: int) -> tuple[list[Job], list[Job]]:
        """Mark up to ``n`` waiting jobs running, oldest first: (claimed, failed for too many starts)."""
        with self._tx() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state = 'received' ORDER BY id LIMIT ?", (n,)).fetchall()
            claimed, failed = [], []
            now = time.time()
            for row in rows:
                if row["starts"] >= max_starts:
                    db.execute("UPDATE jobs SET state = 'failed', finished_at = ?, reason = ? WHERE id = ?",
                               (now, f"the node stopped {row['starts']} times while reporting this scan", row["id"]))
                    failed.append(_job(row))
                    continue
                db.execute("UPDATE jobs SET state = 'running', started_at = ?, starts = starts + 1 WHERE id = ?",
                           (now, row["id"]))
                claimed.append(_job(row))
            return claimed, failed

    def requeue(self, ids: Sequence[int]) -> None:
        """Jobs claimed but not started (a clean stop): back to received, the start not counted."""
        with self._tx() as db:
            for job_id in ids:
                db.execute("UPDATE jobs SET state = 'received', starts = MAX(starts - 1, 0) "
                           "WHERE id = ? AND state = 'running'", (job_id,))

    def finish(self, job_id: int, state: str, *, reason: str | None = None, result: dict | None = None,
               sr: str | None = None, overlay: str | None = None, destinations: Sequence[str] = ()) -> None:
        """Record a job's outcome and, with an SR, one pending delivery per destination, in one transaction."""
        assert state in ("done", "withheld", "failed")
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, reason = ?, result = ?, sr = ?, overlay = ?, finished_at = ? "
                       "WHERE id = ?", (state, reason, json.dumps(result) if result is not None else None, sr,
                                        overlay, now, job_id))
            if sr:
                for name in destinations:
                    db.execute("INSERT OR IGNORE INTO deliveries (job_id, destination, state, next_at) "
                               "VALUES (?, ?, 'pending', ?)", (job_id, name, now))

    # --- delivering ---------------------------------------------------------------------
    def due(self, destination: str, limit: int = 16) -> list[dict[str, Any]]:
        """A destination's deliveries whose next attempt is due, oldest first, with their job's SR, UID and time."""
        rows = self._read(
            "SELECT d.*, j.sr, j.sop_instance_uid, j.received_at FROM deliveries d JOIN jobs j ON j.id = d.job_id "
            "WHERE d.destination = ? AND d.state IN ('pending', 'retrying') AND d.next_at <= ? "
            "ORDER BY d.next_at, d.id LIMIT ?", (destination, time.time(), limit))
        return [dict(r) for r in rows]

    def delivered(self, delivery_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE deliveries SET state = 'sent', attempts = attempts + 1, sent_at = ?, last_error = NULL "
                       "WHERE id = ?", (time.time(), delivery_id))

    def delivery_failed(self, delivery_id: int, error: str, max_attempts: int, backoff_s: float,
                        max_backoff_s: float) -> str:
        """Count a failed attempt: "retrying" after an exponential backoff, or "dead" after the last."""
        with self._tx() as db:
            attempts = db.execute("SELECT attempts FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()[0] + 1
            state = "dead" if attempts >= max_attempts else "retrying"
            wait = min(backoff_s * 2 ** (attempts - 1), max_backoff_s)
            db.execute("UPDATE deliveries SET state = ?, attempts = ?, last_error = ?, next_at = ? WHERE id = ?",
                       (state, attempts, error, time.time() + wait, delivery_id))
            return state

    def retry(self, job_id: int) -> dict[str, int]:
        """Manual retry: dead or retrying deliveries are due now; a failed job goes back to the queue."""
        with self._tx() as db:
            sends = db.execute("UPDATE deliveries SET state = 'pending', attempts = 0, next_at = ? "
                               "WHERE job_id = ? AND state IN ('dead', 'retrying')", (time.time(), job_id)).rowcount
            jobs = db.execute("UPDATE jobs SET state = 'received', starts = 0, reason = NULL "
                              "WHERE id = ? AND state = 'failed'", (job_id,)).rowcount
            return {"deliveries": sends, "jobs": jobs}

    # --- reading ------------------------------------------------------------------------
    def job(self, job_id: int) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        job = _public(rows[0])
        job["deliveries"] = [dict(r) for r in self._read(
            "SELECT destination, state, attempts, last_error, next_at, sent_at FROM deliveries WHERE job_id = ? "
            "ORDER BY destination", (job_id,))]
        return job

    def jobs(self, limit: int = 100, state: str | None = None, after: int = 0) -> list[dict[str, Any]]:
        """The newest jobs first (``after``: only ids above it), without deliveries."""
        where, args = "WHERE id > ?", [after]
        if state:
            where += " AND state = ?"
            args.append(state)
        rows = self._read(f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?", (*args, limit))
        return [_public(r) for r in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """Jobs per state and deliveries per (destination, state)."""
        jobs = dict.fromkeys(JOB_STATES, 0)
        for row in self._read("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            jobs[row[0]] = row[1]
        deliveries: dict[str, int] = {}
        for row in self._read("SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state"):
            deliveries[f"{row[0]}/{row[1]}"] = row[2]
        return {"jobs": jobs, "deliveries": deliveries}


def _job(row: sqlite3.Row) -> Job:
    return Job(row["id"], row["sop_instance_uid"], row["state"], row["image"], row["received_at"], row["starts"])


def _public(row: sqlite3.Row) -> dict[str, Any]:
    """A job as the API shows it: its result JSON parsed, spool paths left out."""
    job = {k: row[k] for k in ("id", "sop_instance_uid", "sop_class_uid", "calling_ae", "state", "reason",
                               "received_at", "started_at", "finished_at", "starts")}
    job["result"] = json.loads(row["result"]) if row["result"] else None
    job["has_sr"] = bool(row["sr"])
    job["has_overlay"] = bool(row["overlay"])
    return job
