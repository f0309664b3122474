"""The Parquet dataset an archive run writes: one row per input, in part files that are never half written.

Rows are plain columns (strings, numbers, lists of strings or ints); nested results (findings,
guard checks, the gate verdict, the encoder's evidence, timings) are JSON text, as in
``radixpert-run --format json``. No column holds patient data except ``input``, the input's path,
which ``--redact`` replaces with a hash of the file.

Each part file is written under a hidden temporary name, flushed, and renamed in
(:func:`radixpert.atomic.commit`), so an interrupted run leaves only whole files, and a rerun
skips every input whose key is already in one (:func:`read_done`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from radixpert.atomic import commit, remove
from radixpert.errors import UsageError

PART_GLOB = "part-*.parquet"

SCHEMA = pa.schema([
    ("key", pa.string()),              # uid:<SOP Instance UID> or sha256:<16 hex> (resume key)
    ("input", pa.string()),            # the path, or with --redact the file's sha256 pseudonym
    ("index", pa.int64()),             # place in this run's input list
    ("status", pa.string()),           # reported | withheld | refused | failed (internal error)
    ("sop_instance_uid", pa.string()),
    ("report", pa.string()),           # null when withheld or refused
    ("tokens", pa.list_(pa.int32())),  # the LLM's token ids (the report before detokenizing)
    ("stopped", pa.string()),
    ("findings", pa.string()),         # JSON list; null when withheld or refused
    ("checks", pa.string()),           # JSON list of guard verdicts
    ("gate", pa.string()),             # JSON object (verdict, reasons, measures)
    ("gate_verdict", pa.string()),     # ok | mirrored | implausible | not checked
    ("evidence", pa.string()),         # JSON object, or null
    ("flags", pa.list_(pa.string())),
    ("withheld", pa.string()),         # why, or null
    ("warnings", pa.list_(pa.string())),
    ("timings", pa.string()),          # JSON object, milliseconds
    ("total_ms", pa.float64()),
    ("error_code", pa.string()),       # null, or input | internal
    ("error", pa.string()),            # the one-line reason a scan was refused
    ("bundle_id", pa.string()),
    ("quant", pa.string()),
    ("frontend", pa.string()),
    ("run_id", pa.string()),           # which invocation wrote the row
    ("sr", pa.string()),               # with --sr: the SR's file name in that folder, or null
])


def to_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True)


def table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts keyed by column name; missing columns are null) as a table of :data:`SCHEMA`."""
    return pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names} for row in rows], schema=SCHEMA)


def parts(out: Path) -> list[Path]:
    return sorted(out.glob(PART_GLOB))


def read_rows(out: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Every row written to ``out`` so far (an empty table when there is none)."""
    files = parts(Path(out))
    if not files:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    try:
        return pa.concat_tables([pq.read_table(f, columns=columns, schema=SCHEMA) for f in files])
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{out} holds a Parquet part that cannot be read ({exc.__class__.__name__}); "
                         "move it away or write to a new --out") from None


def read_done(out: str | Path, bundle_id: str, quant: str) -> set[str]:
    """Keys of the inputs already in ``out``; refuses an output written with another bundle or LLM file."""
    done = read_rows(out, ["key", "bundle_id", "quant"])
    if done.num_rows == 0:
        return set()
    other = {(b, q) for b, q in zip(done.column("bundle_id").to_pylist(), done.column("quant").to_pylist())
             if (b, q) != (bundle_id, quant)}
    if other:
        b, q = sorted(other)[0]
        raise UsageError(f"{out} already holds results of bundle {b} ({q}), not {bundle_id} ({quant}); "
                         "write to a new --out")
    return set(done.column("key").to_pylist())


class PartWriter:
    """Writes blocks of rows to ``out/part-<run>-<n>.parquet``, each file complete or absent."""

    def __init__(self, out: str | Path, run_id: str):
        self.out = Path(out)
        self.run_id = run_id
        self.count = 0
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the output folder {self.out}: {exc.strerror}") from None
        for stale in self.out.glob(".part-*"):  # temporaries of a run that was killed while writing
            remove(stale)

    def write(self, block: pa.Table) -> Path:
        target = self.out / f"part-{self.run_id}-{self.count:06d}.parquet"
        partial = self.out / f".{target.name}.{secrets.token_hex(4)}"
        pq.write_table(block.cast(SCHEMA), partial)
        self.count += 1
        return commit(partial, target)


def counts(statuses: Iterable[str]) -> dict[str, int]:
    found = {"reported": 0, "withheld": 0, "refused": 0}
    for status in statuses:
        found[status] = found.get(status, 0) + 1
    return found
