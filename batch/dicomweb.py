"""Inputs from a DICOMweb archive: QIDO-RS lists the instances, each actor retrieves its own by WADO-RS.

The driver searches once (``search``) and turns each instance into an input named
``dicomweb:<study>/<series>/<instance>`` (UIDs only, no patient data), keyed ``uid:<instance>`` so
that a rerun resumes. The actors retrieve their block's instances (``retrieve``) into a private
temporary folder on their own node, report them as files, and delete them: pixel data never
passes through the driver, and nothing retrieved outlives its block. An instance that cannot be
retrieved becomes its input's error row, as a damaged file does.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radixpert.errors import InputError, UsageError

PREFIX = "dicomweb:"
_UID = r"[0-9]+(?:\.[0-9]+)*"
_INPUT = re.compile(rf"^{PREFIX}({_UID})/({_UID})/({_UID})$")


@dataclass
class Archive:
    """Where to search and retrieve (plain data: it is sent to every actor). Secrets stay in files, read on
    each node, so that no password travels with the task."""

    url: str
    username: str | None = None
    password_file: str | None = None
    token_file: str | None = None
    timeout_s: float = 120.0


def _read_secret(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read the DICOMweb {what} file {path}: {exc.strerror}") from None


def client(archive: Archive) -> Any:
    """A dicomweb-client ``DICOMwebClient`` for the archive, with its credentials."""
    from radixpert.dicomweb import dicomweb_client

    if archive.username and not archive.password_file:
        raise UsageError("--dicomweb-user needs --dicomweb-password-file (a file holding the password)")
    return dicomweb_client(
        archive.url, username=archive.username, timeout=archive.timeout_s,
        password=_read_secret(archive.password_file, "password") if archive.username else None,
        token=_read_secret(archive.token_file, "token") if archive.token_file else None)


def parse_filters(pairs: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` QIDO-RS filters (``Modality=CR``, ``StudyDate=20250101-20250131``) as a dict."""
    filters = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"--query takes KEY=VALUE (for example Modality=CR), got {pair!r}")
        filters[key.strip()] = value.strip()
    return filters


def search(archive: Archive, filters: dict[str, str]) -> list[str]:
    """Every instance the archive lists for ``filters`` (all pages), as inputs, in the archive's order."""
    try:
        found = client(archive).search_for_instances(search_filters=filters or None, get_remaining=True)
    except UsageError:
        raise
    except Exception as exc:  # requests and dicomweb-client raise many types
        raise UsageError(f"QIDO-RS search of {archive.url} failed ({why(exc)}); "
                         "check --dicomweb, its credentials and --query") from None
    inputs = []
    for item in found:
        uids = [item.get(tag, {}).get("Value", [None])[0] for tag in ("0020000D", "0020000E", "00080018")]
        if all(isinstance(u, str) and re.fullmatch(_UID, u) for u in uids):
            inputs.append(f"{PREFIX}{uids[0]}/{uids[1]}/{uids[2]}")
    return list(dict.fromkeys(inputs))


def why(exc: BaseException) -> str:
    """The error's class and HTTP status, never its text: a request's URL can carry the query's values
    (a --query on PatientID, say), which must not reach a log."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"{type(exc).__name__}" + (f", HTTP {status}" if status else "")


def is_remote(path: str) -> bool:
    return path.startswith(PREFIX)


def remote_key(path: str) -> str:
    """The resume key of a DICOMweb input: its SOP Instance UID, as for a DICOM file."""
    return f"uid:{path.rsplit('/', 1)[-1]}"


def retrieve(dicomweb: Any, path: str, folder: Path) -> Path:
    """WADO-RS: the instance of ``path`` written to ``folder`` (mode 0600), or an InputError saying why not."""
    found = _INPUT.match(path)
    if found is None:
        raise InputError(f"not a DICOMweb input: {path}")
    study, series, instance = found.groups()
    try:
        dataset = dicomweb.retrieve_instance(study, series, instance)
    except Exception as exc:  # an instance the archive lost or refuses is this input's error, not the run's
        raise InputError(f"WADO-RS retrieval of instance {instance} failed ({why(exc)})") from None
    target = folder / f"{instance}.dcm"
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        dataset.save_as(handle, enforce_file_format=True)
    return target
