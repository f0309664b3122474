"""The edge bundle: a folder of safe files described by ``manifest.json`` (torch-free).

Layout::

    manifest.json          format version, config, prompt template, token ids, files, parity, versions
    frontend.onnx          image -> (visual tokens, anatomy maps), fp32, dynamic batch
    frontend-int8.onnx     optional static INT8 (QDQ) frontend
    frontend.safetensors   the same frontend's PyTorch weights (the eager reference of radixpert-bench)
    llm-<quant>.gguf       the merged LLM, one file per quantization
    labels.json            anatomy label names and overlay colours
    hf/                    the merged HF folder, kept for inspection (not needed to run)

Export writes it; the runtime checks it with :func:`load_bundle` on every load:

* ``bundle_id`` is a hash of the manifest itself (see :func:`manifest_bundle_id`), whose file
  list holds every file's sha256, so an edited manifest is refused;
* each file's sha256 is checked on the first load, and again whenever the file's size, times or
  inode differ from a stamp recorded in the cache (``stamps/``); ``--verify`` re-hashes all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radixpert.config import WEIGHT_PATHS, RadixpertConfig
from radixpert.errors import ModelError
from radixpert.paths import cache_dir, demo_bundle_dir
from radixpert.prompt import PromptTemplate

FORMAT = "radixpert-bundle"
# 2: bundle_id covers the whole manifest (1: the config and file hashes only).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
LABELS = "labels.json"

# Overlay colours (RGB) per anatomy structure, colour-blind friendly (Okabe-Ito).
LABEL_COLOURS: dict[str, tuple[int, int, int]] = {
    "right_lung": (0, 114, 178),
    "left_lung": (230, 159, 0),
    "heart": (204, 121, 167),
    "right_clavicle": (0, 158, 115),
    "left_clavicle": (213, 94, 0),
}
FALLBACK_COLOURS = [(86, 180, 233), (240, 228, 66), (0, 0, 0)]


def bundle_env_default() -> Path:
    """Where ``radixpert-run`` looks without ``--bundle``: $RADIXPERT_BUNDLE, else the demo bundle."""
    configured = os.environ.get("RADIXPERT_BUNDLE")
    return Path(configured).expanduser() if configured else demo_bundle_dir()


# Manifest fields that are pure records of one build (when, how long), left out of bundle_id so
# that the id names the content: rebuilding the same model gives the same id.
ID_EXCLUDED_FIELDS = ("bundle_id", "created", "steps")
# Files only kept for inspection (the merged HF folder): a copy may drop them with their entries.
INSPECTION_ROLES = ("hf",)
# A file changed this recently may still change within the file system's time resolution, which
# the stamp could not see: it is hashed again next time instead of stamped.
STAMP_MIN_AGE_NS = 2_000_000_000


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, root: Path, role: str) -> dict[str, Any]:
    return {"path": path.relative_to(root).as_posix(), "role": role, "bytes": path.stat().st_size, "sha256": sha256_of(path)}


def manifest_bundle_id(manifest: dict[str, Any]) -> str:
    """The id of a manifest: a hash of every field but the build records and inspection-only files.

    It covers format, config, prompt, tokens, visual, llm, labels, parity, source, versions and
    the (path, role, bytes, sha256) of every file the runtime can use, so editing any of them,
    or any file, shows.
    """
    body = {k: v for k, v in manifest.items() if k not in ID_EXCLUDED_FIELDS}
    body["files"] = [e for e in manifest.get("files", []) if e.get("role") not in INSPECTION_ROLES]
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def seal_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as it will read back from JSON, with its ``bundle_id`` set."""
    sealed = json.loads(json.dumps(manifest, ensure_ascii=False))
    sealed["bundle_id"] = manifest_bundle_id(sealed)
    return sealed


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config for a manifest: weight paths of the build machine become bare file names.

    The runtime never reads them (the bundle carries its weights); they only say what was used.
    """
    out = dict(config)
    for key in WEIGHT_PATHS:
        if out.get(key):
            out[key] = Path(str(out[key])).name
    return out


def label_table(names: tuple[str, ...]) -> list[dict[str, Any]]:
    """Names and colours of the anatomy maps, in output channel order."""
    table = []
    for i, name in enumerate(names):
        colour = LABEL_COLOURS.get(name, FALLBACK_COLOURS[i % len(FALLBACK_COLOURS)])
        table.append({"index": i, "name": name, "colour": list(colour)})
    return table


@dataclass
class Bundle:
    """A checked bundle: its folder, manifest and the objects the runtime needs."""

    root: Path
    manifest: dict[str, Any]
    config: RadixpertConfig
    template: PromptTemplate

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def quants(self) -> list[str]:
        return list(self.manifest["llm"]["quants"])

    def path_of(self, role: str) -> Path | None:
        for entry in self.manifest["files"]:
            if entry["role"] == role:
                return self.root / entry["path"]
        return None

    def llm_path(self, quant: str | None = None) -> Path:
        quant = quant or self.manifest["llm"]["default_quant"]
        path = self.path_of(f"llm-{quant}")
        if path is None:
            raise ModelError(f"the bundle has no {quant} LLM; it has {', '.join(self.quants)}")
        return path

    @property
    def token_ids(self) -> dict[str, Any]:
        return self.manifest["tokens"]

    @property
    def labels(self) -> list[dict[str, Any]]:
        return json.loads((self.root / LABELS).read_text(encoding="utf-8"))


def load_bundle(root: str | Path, verify: bool = False) -> Bundle:
    """Open a bundle, checking its manifest's id and every file's size and sha256.

    A file is hashed on its first load and whenever it changed since (its stamp in the cache
    differs); ``verify`` hashes every file again regardless.
    """
    folder = Path(root)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ModelError(f"{folder} is not a bundle (no {MANIFEST}); build one with radixpert-export")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelError(f"{manifest_path} is unreadable or not JSON; rebuild the bundle with radixpert-export") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("format_version"), int):
        raise ModelError(f"{manifest_path} is not a {FORMAT} manifest")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ModelError(
            f"bundle format {manifest['format_version']} is not supported (this version reads {FORMAT_VERSION}); "
            "re-export it with this radixpert version"
        )
    if manifest.get("bundle_id") != manifest_bundle_id(manifest):
        raise ModelError(f"{manifest_path} does not match its bundle_id (it was edited or damaged); "
                         "re-export the bundle with radixpert-export or copy it again")
    check_files(folder, manifest["files"], verify)
    config = RadixpertConfig.from_dict(manifest["config"])
    template = PromptTemplate.from_manifest(manifest["prompt"])
    return Bundle(folder, manifest, config, template)


def check_files(folder: Path, entries: list[dict[str, Any]], verify: bool) -> None:
    """Presence, size and sha256 of every listed file; unchanged files are trusted by their stamp."""
    stamp_path = stamp_file(folder)
    stamped = {} if verify else read_stamp(stamp_path)
    fresh: dict[str, dict[str, Any]] = {}
    now = time.time_ns()
    for entry in entries:
        name = entry["path"]
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelError(f"bundle file {name} lies outside the bundle; re-export the bundle with radixpert-export")
        path = folder / name
        if not path.is_file():
            raise ModelError(f"bundle file {name} is missing; copy the whole bundle folder")
        status = path.stat()
        if status.st_size != entry["bytes"]:
            raise ModelError(f"bundle file {name} has {status.st_size} bytes, expected {entry['bytes']}; the copy is damaged")
        key = file_key(status)
        known = stamped.get(name)
        if known is not None and known.get("stat") == key and known.get("sha256") == entry["sha256"]:
            fresh[name] = known
            continue
        # The stat is taken before hashing: a write during or after the hash changes it.
        if sha256_of(path) != entry["sha256"]:
            raise ModelError(f"bundle file {name} fails its sha256 check; the copy is damaged, copy it again")
        if now - max(status.st_mtime_ns, status.st_ctime_ns) > STAMP_MIN_AGE_NS:
            fresh[name] = {"stat": key, "sha256": entry["sha256"]}
    if fresh != stamped:
        write_stamp(stamp_path, folder, fresh)


def file_key(status: os.stat_result) -> list[int]:
    """What changes when a file's content may have: size, times and identity.

    The change time is in: unlike the modification time, no tool can set it back.
    """
    return [status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino, status.st_dev]


def stamp_file(folder: Path) -> Path:
    """The stamp of one bundle folder, named by its resolved path."""
    key = hashlib.sha256(str(folder.resolve()).encode("utf-8")).hexdigest()[:32]
    return cache_dir() / "stamps" / f"bundle-{key}.json"


def read_stamp(path: Path) -> dict[str, dict[str, Any]]:
    """The recorded files of a stamp; empty when absent or unreadable (everything is hashed)."""
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return files if isinstance(files, dict) else {}


def write_stamp(path: Path, folder: Path, files: dict[str, dict[str, Any]]) -> None:
    """Replace the stamp atomically; a cache that cannot be written only costs a hash next time."""
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"bundle": str(folder.resolve()), "files": files}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    with contextlib.suppress(OSError):
        tmp.unlink()
