"""The node's configuration: one TOML file plus command-line overrides, validated into dataclasses.

Every mistake is one line naming the key (UsageError, exit code 2). docs/serve.md is the reference.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radixpert.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Storage SOP classes the node negotiates by name; "all-storage" accepts every storage class, so that
# a PACS that routes whole studies is never refused (routing rules and the reader then decide).
SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",      # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",    # Digital X-Ray Image Storage - For Presentation
}
ALL_STORAGE = "all-storage"
POLICIES = ("warn", "withhold")
DESTINATION_TYPES = ("dicom", "dicomweb", "folder")


@dataclass
class DicomConfig:
    ae_title: str = "RADIXPERT"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aes: list[str] = field(default_factory=list)  # ["*"]: any AE
    sop_classes: list[str] = field(default_factory=lambda: ["CR", "DX"])


@dataclass
class RoutingRule:
    """An instance matches when every given attribute is one of the listed values (case-insensitive)."""

    modality: list[str] = field(default_factory=list)
    body_part: list[str] = field(default_factory=list)
    view_position: list[str] = field(default_factory=list)


@dataclass
class QueueConfig:
    spool: str = "/var/spool/radixpert"
    max_jobs: int = 1000
    reprocess: bool = False
    max_attempts: int = 3  # starts of one job (a node that dies while reporting it) before it is failed


@dataclass
class ModelConfig:
    bundle: str = ""
    threads: int | None = None
    batch: int = 1
    quant: str | None = None
    on_conflict: str = "warn"
    on_implausible: str = "withhold"
    overlay: bool = True


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str = ""
    token_file: str = ""
    refresh_s: int = 10
    page_jobs: int = 12


@dataclass
class DeliveryConfig:
    max_attempts: int = 12
    backoff_s: float = 5.0
    max_backoff_s: float = 600.0
    timeout_s: float = 30.0


@dataclass
class Destination:
    name: str
    type: str
    ae_title: str = ""
    host: str = "127.0.0.1"
    port: int = 104
    url: str = ""
    username: str = ""
    password_file: str = ""
    token_file: str = ""
    path: str = ""

    def describe(self) -> str:
        if self.type == "dicom":
            return f"{self.name}: C-STORE to {self.ae_title} at {self.host}:{self.port}"
        if self.type == "dicomweb":
            return f"{self.name}: STOW-RS to {self.url}"
        return f"{self.name}: folder {self.path}"


@dataclass
class LoggingConfig:
    format: str = "text"  # or "json": one JSON object per line
    level: str = "info"


@dataclass
class ServeConfig:
    dicom: DicomConfig = field(default_factory=DicomConfig)
    routing: list[RoutingRule] = field(default_factory=list)
    queue: QueueConfig = field(default_factory=QueueConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    destinations: list[Destination] = field(default_factory=list)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def spool(self) -> Path:
        return Path(self.queue.spool)

    def http_token(self) -> str:
        """The HTTP token from ``http.token`` or ``http.token_file`` ("" when none)."""
        if self.http.token_file:
            try:
                return Path(self.http.token_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise UsageError(f"http.token_file: cannot read {self.http.token_file} ({exc.strerror})") from None
        return self.http.token


_SECTIONS = {"dicom": DicomConfig, "queue": QueueConfig, "model": ModelConfig, "http": HttpConfig,
             "delivery": DeliveryConfig, "logging": LoggingConfig}


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """Read ``path`` (None: defaults only), apply ``overrides`` (``"section.key": value``) and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"cannot read the configuration {path} ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path}: not valid TOML ({exc})") from None
    config = ServeConfig()
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise UsageError(f"[{key}] must be a table")
            setattr(config, key, _build(_SECTIONS[key], value, key))
        elif key == "routing":
            config.routing = [_build(RoutingRule, rule, "routing") for rule in _tables(value, key)]
        elif key == "destinations":
            config.destinations = [_build(Destination, item, "destinations") for item in _tables(value, key)]
        else:
            raise UsageError(f"unknown section or key {key!r} in the configuration (see docs/serve.md)")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = dotted.split(".")
        setattr(getattr(config, section), key, value)
    validate(config)
    return config


def _tables(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UsageError(f"{key} must be an array of tables ([[{key}]])")
    return value


def _build(kind: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(kind)}
    for key, value in values.items():
        if key not in known:
            raise UsageError(f"unknown key {where}.{key} in the configuration (see docs/serve.md)")
        _check_type(f"{where}.{key}", value, known[key].type)
    try:
        return kind(**values)
    except TypeError as exc:
        missing = str(exc).split("argument")[-1].strip(": '")
        raise UsageError(f"{where}: missing key {missing}") from None


def _check_type(name: str, value: Any, annotation: str) -> None:
    wanted = {"str": str, "int": int, "bool": bool, "float": (int, float), "list[str]": list,
              "int | None": int, "str | None": str}.get(annotation)
    if wanted is None:
        return
    ok = isinstance(value, wanted) and not (annotation in ("int", "float", "int | None") and isinstance(value, bool))
    if annotation == "list[str]":
        ok = ok and all(isinstance(v, str) for v in value)
    if not ok:
        raise UsageError(f"{name} must be {annotation.replace(' | None', '').replace('list[str]', 'a list of strings')}, "
                         f"got {type(value).__name__}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(config: ServeConfig) -> None:
    """One UsageError for the first mistake found."""
    d = config.dicom
    if not d.ae_title or len(d.ae_title) > 16 or not d.ae_title.isascii() or "\\" in d.ae_title:
        raise UsageError(f"dicom.ae_title must be 1-16 ASCII characters, got {d.ae_title!r}")
    for name, port in (("dicom.port", d.port), ("http.port", config.http.port)):
        if not 0 <= port <= 65535:
            raise UsageError(f"{name} must be 0-65535, got {port}")
    if not d.allowed_calling_aes:
        raise UsageError('dicom.allowed_calling_aes is empty: list the AE titles that may send (["*"] accepts any)')
    for name in d.sop_classes:
        if name != ALL_STORAGE and name.upper() not in SOP_CLASSES:
            raise UsageError(f"dicom.sop_classes: unknown {name!r}; use CR, DX or {ALL_STORAGE}")
    q = config.queue
    if q.max_jobs < 1 or q.max_attempts < 1:
        raise UsageError("queue.max_jobs and queue.max_attempts must be at least 1")
    m = config.model
    if not m.bundle:
        raise UsageError("model.bundle is not set: give the bundle folder (radixpert-export) in the file or --bundle")
    if m.on_conflict not in POLICIES or m.on_implausible not in POLICIES:
        raise UsageError(f"model.on_conflict and model.on_implausible must be one of {', '.join(POLICIES)}")
    if m.batch < 1 or (m.threads is not None and m.threads < 1):
        raise UsageError("model.batch and model.threads must be at least 1")
    if config.logging.format not in ("text", "json"):
        raise UsageError(f"logging.format must be text or json, got {config.logging.format!r}")
    if config.logging.level.lower() not in ("debug", "info", "warning", "error"):
        raise UsageError(f"logging.level must be debug, info, warning or error, got {config.logging.level!r}")
    dl = config.delivery
    if dl.max_attempts < 1 or dl.backoff_s <= 0 or dl.max_backoff_s < dl.backoff_s or dl.timeout_s <= 0:
        raise UsageError("delivery: max_attempts >= 1, backoff_s > 0, max_backoff_s >= backoff_s and timeout_s > 0")
    names = set()
    for dest in config.destinations:
        if dest.name in names or not dest.name.replace("-", "").replace("_", "").isalnum():
            raise UsageError(f"destinations: names must be unique, letters, digits, - or _; got {dest.name!r}")
        names.add(dest.name)
        if dest.type not in DESTINATION_TYPES:
            raise UsageError(f"destinations.{dest.name}: type must be one of {', '.join(DESTINATION_TYPES)}")
        if dest.type == "dicom" and not (dest.ae_title and 0 < dest.port <= 65535):
            raise UsageError(f"destinations.{dest.name}: a dicom destination needs ae_title, host and port")
        if dest.type == "dicomweb" and not dest.url.startswith(("http://", "https://")):
            raise UsageError(f"destinations.{dest.name}: a dicomweb destination needs an http(s) url")
        if dest.type == "folder" and not dest.path:
            raise UsageError(f"destinations.{dest.name}: a folder destination needs path")
    if not is_loopback(config.http.host) and not config.http_token():
        raise UsageError(f"http.host {config.http.host} is not a loopback address: set http.token_file (or "
                         "--http-token) so that every route but /healthz needs the token")
