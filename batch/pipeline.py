"""The archive run on Ray Data: CPU tasks key the inputs, a pool of actors writes the reports.

Each actor loads the bundle once (its ``bundle_id`` checked on its own node) and reports each
block of inputs with :meth:`radixpert.runtime.pipeline.Reporter.report_many`: ``batch`` scans
decoded together (continuous batching), the same tokens as ``radixpert-run`` one at a time, one
row per input in input order; a refused scan becomes an error row, never a failed job. The blocks of
rows stream back to the driver, which writes them (:mod:`radixpert.batch.output`).

Ray is started locally (no dashboard, no usage statistics, token authentication) unless an address is
given. Actors lost with their node are restarted by Ray and their calls retried; the driver keeps
one row per input whatever is retried.
"""

from __future__ import annotations

import math
import contextlib
import logging
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from radixpert.errors import DEBUG_ENV, EXIT_INTERNAL, InputError, RadixpertError, UsageError, first_line
from radixpert.batch.output import table, to_json

EXIT_CLUSTER = 7


class ClusterError(RadixpertError):
    """Ray could not be reached, or the cluster failed the run (rows written so far are kept)."""

    exit_code = EXIT_CLUSTER
    code = "cluster"


@dataclass
class Settings:
    """What every actor needs to load the bundle and write rows (plain data: it is sent to each node)."""

    bundle: str
    bundle_id: str
    quant: str
    run_id: str
    frontend: str = "fp32"
    threads: int | None = None
    gpu_layers: int | None = None
    providers: list[str] | None = None
    max_new_tokens: int | None = None
    batch: int = 4
    verify: bool = False
    redact: bool = False
    sr_dir: str | None = None  # --sr: write each reported DICOM scan's SR here (on the actor's node)
    archive: dict[str, Any] | None = None  # --dicomweb: where the actors retrieve dicomweb: inputs (Archive fields)
    policy: dict[str, str] = field(default_factory=lambda: {"conflict": "warn", "implausible": "withhold"})


@dataclass
class Pool:
    """The actor pool: how many actors and what each one reserves."""

    actors: int
    cpus: float
    gpus: float
    rows_per_call: int


# --- Ray -------------------------------------------------------------------------------------

def connect(address: str | None, num_cpus: int | None = None) -> dict[str, float]:
    """Join the cluster at ``address`` (``auto``, ``ray://host:port``, ``host:port``), or start a local
    Ray; returns the cluster's resources. Usage statistics and the dashboard stay off."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if address:
        reachable(address)
    import ray

    quiet = {"logging_level": "warning", "log_to_driver": False}  # actors log to their own nodes
    try:
        if address:
            with held_stderr():  # Ray's core logs each failed attempt to connect on stderr
                ray.init(address=address, **quiet)
        else:
            # Ray listens on every interface and replaces a loopback node address with a reachable one
            # whatever is asked; Ray 2.60's token authentication (on for a new local cluster) guards it.
            ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        if token_refused(exc):
            raise ClusterError(f"{where} refused this machine's token: it uses token authentication; set "
                               "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) to its token") from None
        raise ClusterError(f"could not start or reach {where} ({first_line(exc, 200)}); for an existing cluster "
                           "run `ray start --head` there first, or leave out --address") from None
    configure_data()
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def token_refused(exc: BaseException) -> bool:
    """Whether Ray failed to connect because the cluster refused this machine's authentication token."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if type(cause).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


@contextlib.contextmanager
def held_stderr() -> Iterator[None]:
    """Hold back what is written to file descriptor 2 (by Python or by native code); show it only on success,
    so that a failure is the one line of its ClusterError (all of it with RADIXPERT_DEBUG=1)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not failed or os.environ.get(DEBUG_ENV):
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))
                sys.stderr.flush()


def reachable(address: str, timeout_s: float = 10.0) -> None:
    """Refuse at once an address nothing listens on (Ray itself would retry for minutes)."""
    if address == "auto":
        return
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address} is not auto, ray://host:port or host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(f"no Ray cluster answers at {address} ({exc.strerror or exc.__class__.__name__}); "
                           "check the address, or run `ray start --head` there first") from None


def configure_data(progress: bool = True) -> None:
    """Ray Data settings of this run: its progress bars on stderr, or none."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.print_on_execution_start = False
    if not progress:  # Ray Data logs each execution at INFO: only warnings then
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def default_pool(resources: dict[str, float], actors: int | None, cpus: float | None, gpus: float | None,
                 rows_per_call: int) -> Pool:
    """One actor per GPU where the cluster has GPUs; otherwise one per ``cpus`` (default 2) CPUs."""
    have_gpus = resources.get("GPU", 0.0)
    if gpus is None:
        gpus = 1.0 if have_gpus >= 1 else 0.0
    if cpus is None:
        cpus = 1.0 if gpus else 2.0
    if actors is None:
        if gpus:
            actors = max(1, int(have_gpus // gpus))
        else:
            actors = max(1, int(resources.get("CPU", 1.0) // max(cpus, 1e-9)))
    return Pool(actors=actors, cpus=cpus, gpus=gpus, rows_per_call=rows_per_call)


def _key_block(block: pa.Table) -> pa.Table:
    """CPU task: each input's resume key (header or bytes only; no pixels are decoded)."""
    from radixpert.batch.inputs import input_key

    keys = [input_key(path) for path in block.column("path").to_pylist()]
    return block.append_column("key", pa.array(keys, pa.string()))


def key_inputs(paths: list[str], block_rows: int = 256) -> list[str]:
    """The key of every path, computed in Ray CPU tasks, in input order."""
    import ray.data

    if not paths:
        return []
    items = [{"index": i, "path": p} for i, p in enumerate(paths)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / block_rows)))
    keys: list[str | None] = [None] * len(paths)
    for block in ds.map_batches(_key_block, batch_format="pyarrow", batch_size=None, num_cpus=0.5).iter_batches(
            batch_size=None, batch_format="pyarrow"):
        for index, key in zip(block.column("index").to_pylist(), block.column("key").to_pylist()):
            keys[index] = key
    return [k or "" for k in keys]


# --- the actors --------------------------------------------------------------------------------

class ReportActor:
    """One loaded bundle; called with blocks of inputs, returns one row per input."""

    def __init__(self, settings: dict[str, Any]):
        from radixpert.bundle import load_bundle
        from radixpert.errors import ModelError
        from radixpert.runtime.pipeline import Reporter

        self.settings = Settings(**settings)
        bundle = load_bundle(self.settings.bundle, verify=self.settings.verify)
        if bundle.bundle_id != self.settings.bundle_id:
            raise ModelError(f"the bundle at {self.settings.bundle} on this node is {bundle.bundle_id}, not "
                             f"{self.settings.bundle_id}; copy the same bundle to every node")
        s = self.settings
        self.reporter = Reporter(bundle, providers=s.providers, threads=s.threads, quant=s.quant,
                                 gpu_layers=s.gpu_layers, max_new_tokens=s.max_new_tokens, frontend_variant=s.frontend,
                                 batch=s.batch, speculative=None)  # on where exact, as radixpert-run
        self.dicomweb = None
        if s.archive:
            from radixpert.batch.dicomweb import Archive, client

            self.dicomweb = client(Archive(**s.archive))

    def __call__(self, block: pa.Table) -> pa.Table:
        columns = [block.column(c).to_pylist() for c in ("index", "path", "key", "input")]
        with tempfile.TemporaryDirectory(prefix="radixpert-wado-") as folder:  # mode 0700, gone after the block
            local = self.local_files(columns[1], Path(folder))
            readable = [p for p in local if isinstance(p, str)]
            reported = iter(report_all(self.reporter, readable))
            results = [next(reported) if isinstance(p, str) else p for p in local]
            return table([report_row(self.reporter, self.settings, index, p if isinstance(p, str) else path, key,
                                     shown, result)
                          for (index, path, key, shown), p, result in zip(zip(*columns), local, results)])

    def local_files(self, paths: list[str], folder: Path) -> list[str | Exception]:
        """Each input as a file on this node: DICOMweb inputs retrieved into ``folder``, or why not."""
        from radixpert.batch.dicomweb import is_remote, retrieve

        local: list[str | Exception] = []
        for path in paths:
            if not is_remote(path):
                local.append(path)
            elif self.dicomweb is None:
                local.append(InputError("a dicomweb: input needs --dicomweb"))
            else:
                try:
                    local.append(str(retrieve(self.dicomweb, path, folder)))
                except InputError as exc:
                    local.append(exc)
        return local


def report_all(reporter: Any, paths: list[str]) -> list[Any]:
    """One result per path, in order: a ScanReport, or the exception that refused or failed the scan.

    The paths are decoded together (``Reporter.report_many``). Should that fail on something other
    than a refused scan, the scans it had not yet returned are reported again one at a time, so the
    error stays with the scan that caused it and the other rows are still written.
    """
    results: list[Any] = []
    try:
        for result in reporter.report_many(paths):
            results.append(result)
    except Exception:  # noqa: BLE001 - retried one by one below, each keeping its own error
        for path in paths[len(results):]:
            try:
                results.append(reporter.report(path))
            except Exception as exc:  # noqa: BLE001 - becomes this input's error row
                results.append(exc)
    return results


def report_row(reporter: Any, settings: Settings, index: int, path: str, key: str, shown: str,
               result: Any) -> dict[str, Any]:
    """The row of one input: its report and checks, or the one-line reason it was refused."""
    from radixpert.runtime.cli import rounded, withheld_because
    from radixpert.runtime.outputs import safe_uid, scrub

    row: dict[str, Any] = {"key": key, "input": shown, "index": index, "bundle_id": settings.bundle_id,
                           "quant": reporter.quant, "frontend": settings.frontend, "run_id": settings.run_id}
    if isinstance(result, InputError):
        return {**row, "status": "refused", "error_code": result.code, "error": scrub(str(result), path, f"input {key}")}
    if isinstance(result, BaseException):  # a bug: the class only (library messages can quote file names or DICOM values)
        return {**row, "status": "failed", "error_code": "internal",
                "error": f"internal error: {result.__class__.__name__} (exit {EXIT_INTERNAL}); please report it"}
    checked = result.checked
    withheld = withheld_because(checked, settings.policy)
    timings = rounded(result.timings)
    uid = safe_uid(result.sop_instance_uid)
    if settings.sr_dir and not withheld and result.source == "dicom":
        row["sr"] = write_sr(reporter, settings, path, key, uid, result).name
    return {**row, "status": "withheld" if withheld else "reported", "sop_instance_uid": uid,
            "report": None if withheld else result.report, "tokens": None if withheld else list(result.tokens),
            "stopped": result.stopped, "findings": None if withheld else to_json(checked.findings),
            "checks": to_json(checked.checks), "gate": to_json(checked.gate), "gate_verdict": checked.gate["verdict"],
            "evidence": to_json(checked.evidence), "flags": list(checked.flags), "withheld": withheld,
            "warnings": [scrub(w, path, f"input {key}") for w in result.warnings],
            "timings": to_json(timings), "total_ms": float(timings.get("total_ms", 0.0))}


def write_sr(reporter: Any, settings: Settings, path: str, key: str, uid: str | None, result: Any) -> Path:
    """The scan's draft as a DICOM Comprehensive SR in ``--sr``, named by the source's SOP Instance UID (or
    its key's hash), so that a rerun or a retried call rewrites the same file; written atomically."""
    from radixpert.runtime.outputs import write_sr as write

    name = f"{uid or key.split(':', 1)[-1]}.sr.dcm"
    checked = result.checked
    return write(Path(path), result.report, Path(settings.sr_dir) / name, bundle_id=settings.bundle_id,
                 model_name=reporter.bundle.config.name, warnings=result.warnings, findings=checked.findings,
                 checks=checked.checks, gate=checked.gate)


def report_blocks(items: list[dict[str, Any]], settings: Settings, pool: Pool) -> Iterator[pa.Table]:
    """Blocks of rows for ``items`` (dicts with index, path, key, input) as the actors finish them."""
    import ray.data

    if not items:
        return
    blocks = max(1, math.ceil(len(items) / pool.rows_per_call))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    remote: dict[str, Any] = {"num_cpus": pool.cpus}
    if pool.gpus:
        remote["num_gpus"] = pool.gpus
    reports = ds.map_batches(ReportActor, fn_constructor_kwargs={"settings": asdict(settings)},
                             batch_size=pool.rows_per_call, batch_format="pyarrow",
                             compute=ray.data.ActorPoolStrategy(size=pool.actors), **remote)
    try:
        yield from reports.iter_batches(batch_size=None, batch_format="pyarrow")
    except RadixpertError:
        raise
    except Exception as exc:
        raise ClusterError(f"the cluster failed the run: {cluster_reason(exc)}; rows written so far are kept, "
                           "run the same command again to resume") from None


def cluster_reason(exc: BaseException) -> str:
    """A one-line reason from a Ray error, preferring a radixpert error raised inside an actor."""
    cause: BaseException | None = exc
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, RadixpertError):
            return first_line(cause, 300)
        # An actor that failed to start carries its error as text: the traceback's last line.
        quoted = re.findall(r"^radixpert\.errors\.\w+: (.+)$", str(cause), re.MULTILINE)
        if quoted:
            return quoted[-1].strip()[:300]
        cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
    return re.sub(r"\x1b\[[0-9;]*m", "", first_line(exc, 300))


@dataclass
class Progress:
    """Counts of this run, for progress lines and the summary."""

    total: int
    skipped: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"reported": 0, "withheld": 0, "refused": 0, "failed": 0})
    started: float = field(default_factory=time.perf_counter)

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def per_hour(self) -> float:
        return self.done / self.elapsed_s * 3600 if self.elapsed_s > 0 else 0.0

    def add(self, statuses: list[str]) -> None:
        for status in statuses:
            self.counts[status] = self.counts.get(status, 0) + 1


def stream_rows(blocks: Iterator[pa.Table], write: Callable[[pa.Table], Any], progress: Progress,
                expected: set[int], notify: Callable[[Progress], None]) -> None:
    """Write each block, keeping only the first row for each input index (retries never duplicate a row)."""
    for block in blocks:
        indices = block.column("index").to_pylist()
        keep = []
        for i, index in enumerate(indices):
            if index in expected:
                expected.discard(index)
                keep.append(i)
        if len(keep) < len(indices):
            block = block.take(pa.array(keep, pa.int64()))
        if block.num_rows:
            write(block)
            progress.add(block.column("status").to_pylist())
            notify(progress)
    if expected:
        raise ClusterError(f"the cluster returned no row for {len(expected)} input(s); run the same command again "
                           "to process them")
