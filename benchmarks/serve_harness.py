"""Real components around a ``radixpert-serve`` node: Orthanc as the PACS, dcmtk's clients, the node process.

Everything listens on 127.0.0.1 only, on free ports, with generated configurations in a
temporary folder; every wait is bounded. ``radixpert-bench serve`` and the node's tests use it.
Orthanc is Debian's ``orthanc`` (``/usr/sbin/Orthanc``); dcmtk's ``storescu``/``echoscu`` are found
on PATH outside this Python environment (pynetdicom installs its own tools of the same names).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import requests

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def dcmtk(tool: str) -> str | None:
    """The dcmtk binary ``tool`` (storescu, echoscu), skipping this environment's bin folder."""
    skip = Path(sys.prefix, "bin").resolve()
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]:
        candidate = Path(folder, tool)
        if candidate.is_file() and os.access(candidate, os.X_OK) and Path(folder).resolve() != skip:
            return str(candidate)
    return None


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    """Poll ``check`` until it returns something truthy; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(requests.RequestException, OSError):
            value = check()
            if value:
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Orthanc:
    """A throwaway Orthanc on loopback: our node is a known modality; generated credentials."""

    def __init__(self, folder: Path, node_ae: str, node_port: int, aet: str = "ORTHANC", dicomweb: bool = False):
        self.folder = Path(folder)
        self.aet, self.dicom_port, self.http_port = aet, free_port(), free_port()
        self.user, self.password = "radixpert", secrets.token_hex(8)
        self.url = f"http://{LOOPBACK}:{self.http_port}"
        self.proc: subprocess.Popen | None = None
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "test-pacs", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": aet, "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password}, "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True, "DicomCheckCalledAet": True,
            "DicomModalities": {"radixpert": {"AET": node_ae, "Host": LOOPBACK, "Port": node_port,
                                              "AllowEcho": True, "AllowStore": True}},
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [], "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
            "DicomScuTimeout": 30, "HttpTimeout": 60, "StorageCompression": False, "SaveJobs": False,
            "ConcurrentJobs": 2, "LuaScripts": [], "StableAge": 2,
        }
        self.config = self.folder / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=1), encoding="utf-8")

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.folder / "orthanc.log", "ab")
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.folder, start_new_session=True)
        log.close()
        wait_until(lambda: self.proc.poll() is None and self.get("/system"), timeout, "Orthanc to start")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def get(self, path: str, **kw: Any) -> Any:
        r = requests.get(self.url + path, auth=(self.user, self.password), timeout=30, **kw)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: Any = None, data: bytes | None = None) -> Any:
        r = requests.post(self.url + path, auth=(self.user, self.password), timeout=300,
                          **({"data": data} if data is not None else {"json": body}))
        r.raise_for_status()
        return r.json()

    def upload(self, path: str | Path) -> str:
        """Store a DICOM file through the REST API; its Orthanc instance id."""
        return self.post("/instances", data=Path(path).read_bytes())["ID"]

    def send_to_node(self, instance_ids: Sequence[str]) -> Any:
        """C-STORE the instances to our node (Orthanc's SCU), synchronously."""
        return self.post("/modalities/radixpert/store", {"Resources": list(instance_ids), "Synchronous": True})

    def srs(self) -> list[str]:
        return self.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}})

    def sr_sources(self) -> dict[str, list[str]]:
        """Referenced source SOP Instance UID -> the SR instances (Orthanc ids) that reference it."""
        out: dict[str, list[str]] = {}
        for sr in self.srs():
            tags = self.get(f"/instances/{sr}/tags?simplify")
            for study in tags.get("CurrentRequestedProcedureEvidenceSequence", []):
                for series in study.get("ReferencedSeriesSequence", []):
                    for item in series.get("ReferencedSOPSequence", []):
                        out.setdefault(item["ReferencedSOPInstanceUID"], []).append(sr)
        return out

    def file(self, instance_id: str, dest: Path) -> Path:
        r = requests.get(f"{self.url}/instances/{instance_id}/file", auth=(self.user, self.password), timeout=60)
        r.raise_for_status()
        dest.write_bytes(r.content)
        return dest

    def destination(self, name: str = "pacs") -> str:
        """The node's TOML ``[[destinations]]`` entry that sends SRs here by C-STORE."""
        return (f'[[destinations]]\nname = "{name}"\ntype = "dicom"\nae_title = "{self.aet}"\nhost = "{LOOPBACK}"\n'
                f"port = {self.dicom_port}\n")

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class NodeProcess:
    """``radixpert-serve`` in its own process, with a generated TOML file and its log captured."""

    def __init__(self, folder: Path, bundle: str | Path, *, allowed: Sequence[str] = ("ORTHANC", "STORESCU"),
                 extra: str = "", ae_title: str = "RADIXPERT", threads: int = 2, log_format: str = "json",
                 dicom_port: int | None = None, http_port: int | None = None, on_implausible: str = "withhold"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.url = f"http://{LOOPBACK}:{self.http_port}"
        self.log = self.folder / "node.log"
        self.proc: subprocess.Popen | None = None
        self.token: str | None = None
        self.config = self.folder / "serve.toml"
        self.config.write_text("\n".join([
            "[dicom]", f'ae_title = "{ae_title}"', f'host = "{LOOPBACK}"', f"port = {self.dicom_port}",
            f"allowed_calling_aes = {json.dumps(list(allowed))}",
            "[queue]", f'spool = "{self.folder / "spool"}"',
            "[model]", f'bundle = "{bundle}"', f"threads = {threads}", f'on_implausible = "{on_implausible}"',
            "[http]", f'host = "{LOOPBACK}"', f"port = {self.http_port}", "refresh_s = 5",
            "[logging]", f'format = "{log_format}"', extra]), encoding="utf-8")

    def start(self, *args: str, ready: bool = True, timeout: float = 180.0) -> None:
        log = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "radixpert.serve.cli", "--config", str(self.config), *args],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        what = "the node to be ready" if ready else "the node's HTTP port"
        wait_until(lambda: self._alive() and self.http("/readyz" if ready else "/healthz", ok=True), timeout, what)

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the node exited with {self.proc.returncode}: {self.tail()}")
        return True

    def http(self, path: str, ok: bool = False, method: str = "GET") -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        r = requests.request(method, self.url + path, headers=headers, timeout=30)
        if ok:
            return r.status_code == 200
        r.raise_for_status()
        return r.json() if "json" in r.headers.get("content-type", "") else r.text

    def jobs(self) -> list[dict[str, Any]]:
        return self.http("/api/jobs?limit=10000")["jobs"]

    def received_uids(self) -> set[str]:
        """SOP Instance UIDs the node holds a job for (what a resend need not repeat)."""
        return {j["sop_instance_uid"] for j in self.jobs()}

    def counts(self) -> dict[str, Any]:
        return self.http("/api/jobs?limit=1")["counts"]

    def wait_jobs(self, n: int, timeout: float, states: Sequence[str] = ("done", "withheld", "failed")) -> list[dict]:
        """Wait until ``n`` jobs are in ``states``; the jobs."""
        def check() -> list[dict] | None:
            self._alive()
            jobs = self.jobs()
            return jobs if sum(j["state"] in states for j in jobs) >= n else None
        return wait_until(check, timeout, f"{n} finished jobs", every=0.5)

    def wait_delivered(self, n: int, timeout: float) -> None:
        def check() -> bool:
            self._alive()
            return sum(v for k, v in self.counts()["deliveries"].items() if k.endswith("/sent")) >= n
        wait_until(check, timeout, f"{n} delivered SRs", every=0.5)

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self, n: int = 5) -> str:
        lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines() if self.log.exists() else []
        return " | ".join(lines[-n:])

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(Exception):
            self.terminate(60)
        self.kill9()

    def __enter__(self) -> NodeProcess:
        return self


# A storescu profile that proposes each transfer syntax of a radiograph in its own presentation context,
# so that compressed files (RLE, JPEG 2000, JPEG lossless) are sent as they are, without transcoding.
_STORESCU_PROFILE = """[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[RLE]
TransferSyntax1 = RLELossless
[J2KLossless]
TransferSyntax1 = JPEG2000LosslessOnly
[J2K]
TransferSyntax1 = JPEG2000
[JPEGLossless]
TransferSyntax1 = JPEGLossless:Non-hierarchical-1stOrderPrediction
[[PresentationContexts]]
[Radiographs]
{contexts}
[[Profiles]]
[Radiographs]
PresentationContexts = Radiographs
"""


def storescu_profile(folder: Path) -> list[str]:
    """storescu options that load the radiograph profile (written into ``folder``)."""
    contexts = [f"PresentationContext{i + 1} = {sop}\\{ts}" for i, (sop, ts) in enumerate(
        (sop, ts) for sop in ("ComputedRadiographyImageStorage", "DigitalXRayImageStorageForPresentation")
        for ts in ("Uncompressed", "RLE", "J2KLossless", "J2K", "JPEGLossless"))]
    path = Path(folder) / "storescu.cfg"
    path.write_text(_STORESCU_PROFILE.format(contexts="\n".join(contexts)), encoding="utf-8")
    return ["-xf", str(path), "Radiographs"]


def storescu(files: Sequence[str | Path], port: int, called: str = "RADIXPERT", calling: str = "STORESCU",
             parallel: int = 1, timeout: float = 1800.0, received: Callable[[], set[str]] | None = None,
             pause: float = 2.0) -> dict[str, Any]:
    """Send ``files`` over ``parallel`` dcmtk storescu associations, resending any refused until all are stored.

    Each round gives every process its share of the files still unsent. storescu runs with
    ``--no-halt``, so a refusal (0xA700, the node's queue is full) does not stop the rest of its
    share, and its exit status may then still be 0: with ``received()`` (the SOP Instance UIDs the
    node holds) the next round resends exactly the files the node does not hold; without it, the
    shares of the processes that failed. The node acknowledges an instance it already has, so a
    resend never makes a second job. Rounds go on, ``pause`` seconds
    apart, until every file is stored or ``timeout`` seconds have passed.
    Returns the rounds and the seconds it took (the node's /metrics counts the refusals).
    """
    tool = dcmtk("storescu")
    if tool is None:
        raise FileNotFoundError("dcmtk's storescu is not installed (apt-get install dcmtk)")
    uid = {str(f): str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files} if received else {}
    pending = [str(f) for f in files]
    profile = storescu_profile(Path(tempfile.mkdtemp(prefix="radixpert-storescu-")))
    started = time.monotonic()
    deadline = started + timeout
    round_ = 0
    while time.monotonic() < deadline:
        round_ += 1
        shares = [pending[i::parallel] for i in range(parallel) if pending[i::parallel]]
        procs = [(share, subprocess.Popen([tool, *profile, "-nh", "-to", "30", "-ta", "30", "-td", "60", "-aec", called,
                                           "-aet", calling, LOOPBACK, str(port), *share], stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT)) for share in shares]
        sent, pending = pending, []
        for share, proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                pending.extend(share)
        if received is not None:  # with --no-halt storescu can exit 0 after a refusal: ask the node
            have = received()
            pending = [f for f in sent if uid[f] not in have]
        if not pending:
            return {"rounds": round_, "seconds": time.monotonic() - started}
        time.sleep(pause)
    raise RuntimeError(f"{len(pending)} instances still unsent after {round_} rounds ({timeout:.0f} s)")


def echoscu(port: int, called: str = "RADIXPERT", calling: str = "STORESCU") -> subprocess.CompletedProcess:
    tool = dcmtk("echoscu")
    if tool is None:
        raise FileNotFoundError("dcmtk's echoscu is not installed (apt-get install dcmtk)")
    return subprocess.run([tool, "-to", "10", "-aec", called, "-aet", calling, LOOPBACK, str(port)],
                          capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def running(*things: Any) -> Iterator[None]:
    """Stop every started thing (Orthanc, nodes) on the way out, whatever happens."""
    try:
        yield
    finally:
        for thing in reversed(things):
            with contextlib.suppress(Exception):
                thing.__exit__(None, None, None)


def components_missing() -> list[str]:
    """Which real components this machine lacks (tests skip with this list)."""
    missing = [name for name, ok in (("orthanc", Path(ORTHANC).exists()), ("dcmtk", dcmtk("storescu") is not None))
               if not ok]
    return missing


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")
