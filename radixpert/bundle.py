"""The edge bundle: a folder of safe files described by ``manifest.json`` (torch-free).

Layout::

    manifest.json          format version, config, prompt template, token ids, files, parity, versions
    frontend.onnx          image -> (visual tokens, anatomy maps), fp32, dynamic batch
    frontend-int8.onnx     optional static INT8 (QDQ) frontend
    frontend.safetensors   the same frontend's PyTorch weights (the eager reference of radixpert-bench)
    frontend-fp16.engine   optional TensorRT engine (built on, and only valid for, its GPU)
    llm-<quant>.gguf       the merged LLM, one file per quantization
    labels.json            anatomy label names and overlay colours
    hf/                    the merged HF folder, kept for inspection (not needed to run)

Export writes it; the runtime and ``radixpert-run --verify`` check it with :func:`load_bundle`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radixpert.config import RadixpertConfig
from radixpert.errors import ModelError
from radixpert.paths import demo_bundle_dir
from radixpert.prompt import PromptTemplate

FORMAT = "radixpert-bundle"
FORMAT_VERSION = 1
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


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, root: Path, role: str) -> dict[str, Any]:
    return {"path": path.relative_to(root).as_posix(), "role": role, "bytes": path.stat().st_size, "sha256": sha256_of(path)}


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
    """Open a bundle, checking format version, file presence and sizes (and sha256 with ``verify``)."""
    folder = Path(root)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ModelError(f"{folder} is not a bundle (no {MANIFEST}); build one with radixpert-export")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelError(f"{manifest_path} is unreadable or not JSON; rebuild the bundle with radixpert-export") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("format_version"), int):
        raise ModelError(f"{manifest_path} is not a {FORMAT} manifest")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ModelError(
            f"bundle format {manifest['format_version']} is not supported (this version reads {FORMAT_VERSION}); "
            "re-export it with this radixpert version"
        )
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if not path.is_file():
            raise ModelError(f"bundle file {entry['path']} is missing; copy the whole bundle folder")
        if path.stat().st_size != entry["bytes"]:
            raise ModelError(f"bundle file {entry['path']} has {path.stat().st_size} bytes, expected {entry['bytes']}; the copy is damaged")
        if verify and sha256_of(path) != entry["sha256"]:
            raise ModelError(f"bundle file {entry['path']} fails its sha256 check; the copy is damaged, copy it again")
    config = RadixpertConfig.from_dict(manifest["config"])
    template = PromptTemplate.from_manifest(manifest["prompt"])
    return Bundle(folder, manifest, config, template)
