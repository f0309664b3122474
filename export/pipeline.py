"""Training run -> edge bundle: merge, ONNX frontend, GGUF LLM, parity, manifest.

The bundle is built under a lock (``<out>.lock``) in ``<out>.partial-<pid>-<random>`` and
renamed to ``<out>`` only when every parity check passes (see :mod:`radixpert.atomic`); a drifted
build is kept as ``<out>.rejected`` for inspection, never as a bundle. A second export of the
same ``<out>`` waits for the first and uses its bundle.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from radixpert.atomic import commit, file_lock, partial_path, remove, remove_stale
from radixpert.bundle import (FORMAT, FORMAT_VERSION, LABELS, MANIFEST, file_entry, label_table, portable_config,
                              seal_manifest, sha256_of)
from radixpert.errors import ModelError, ParityError, UsageError
from radixpert.export import parity
from radixpert.export.gguf import QUANTS, quantize_gguf, write_gguf
from radixpert.export.merge import load_run, merge_lora, save_merged
from radixpert.export.onnx_frontend import export_frontend, frontend_outputs, frontend_parity
from radixpert.imageio import read_image
from radixpert.model import RadixpertModel
from radixpert.runtime.llm import LlamaRunner

FRONTEND_FILE = "frontend.onnx"
FRONTEND_INT8_FILE = "frontend-int8.onnx"
FRONTEND_TORCH_FILE = "frontend.safetensors"  # the same frontend for PyTorch (radixpert-bench compare)
HF_DIR = "hf"


@dataclass
class ExportOptions:
    quants: tuple[str, ...] = ("f16", "q4_k_m")
    int8: bool = False
    tensorrt: bool = False
    samples: int = 2
    calibration: int = 200  # training images that calibrate the guard and the anatomy gate
    e2e_tokens: int = 48
    thresholds: dict[str, float] = field(default_factory=lambda: dict(parity.DEFAULT_THRESHOLDS))
    data: str | None = None  # PadChest-format CSV of the run: calibration and parity images
    images: str | None = None
    keep_hf: bool = True
    threads: int | None = None
    force: bool = False
    split_path: Path | None = None  # taken from the run's checkpoint
    console: Any = None  # where one-line notices go


@dataclass
class StepLog:
    """Per-step wall time, reported in the summary and recorded in the manifest."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    progress: Any = None

    @contextlib.contextmanager
    def step(self, name: str, total: int | None = None) -> Iterator[Any]:
        task = self.progress.add_task(name, total=total) if self.progress is not None else None

        def advance(done: int, of: int | None = None) -> None:
            if task is not None:
                self.progress.update(task, completed=done, total=of if of is not None else total)

        started = time.perf_counter()
        yield advance
        seconds = time.perf_counter() - started
        if task is not None:
            self.progress.update(task, completed=1, total=1)
        self.rows.append({"step": name, "seconds": round(seconds, 3)})


def library_versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "transformers", "peft", "onnx", "onnxruntime", "llama_cpp_python", "gguf", "radixpert-edge"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


def check_disk_space(model: RadixpertModel, out: Path, options: ExportOptions) -> None:
    """Refuse early, with the numbers, when the export cannot fit on the disk."""
    llm_bytes = sum(p.numel() for p in model.llm.parameters()) * 4
    per_quant = {"f32": 1.0, "f16": 0.5, "q8_0": 0.27, "q4_k_m": 0.16}
    needed = llm_bytes * (1.0 * options.keep_hf + 0.5 + sum(per_quant[q] for q in options.quants))
    needed += sum(p.numel() for p in model.frontend.parameters()) * 4 * (2 + options.int8)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if needed > free:
        raise UsageError(f"not enough disk space in {out.parent}: the export needs about {needed / 1e9:.1f} GB, "
                         f"{free / 1e9:.1f} GB are free; free some space or pass --out elsewhere")


@dataclass
class Samples:
    """Images of one split read through the runtime's reader, with their reference reports."""

    images: np.ndarray  # (N, 3, S, S) float32 model inputs
    reports: list[str]
    shapes: list[tuple[int, int]]  # each display image's (height, width), for the letterbox geometry


def sample_studies(model: RadixpertModel, options: ExportOptions, split: str, count: int, work: Path) -> Samples:
    """``count`` studies of a split: the run's own split when --data is given, else phantoms of a fixed seed."""
    size = model.config.image_size
    if options.data:
        from radixpert.train.data import load_split, read_table, select

        checkpoint_split = options.split_path
        studies = read_table(options.data, images=options.images, projections=None)
        ids = load_split(checkpoint_split)[split] if checkpoint_split else [s.image_id for s in studies]
        chosen = [(s.image_path, s.report) for s in select(studies, ids)[:count]]
    else:
        from radixpert.phantom import write_dataset

        # Phantoms from a seed of their own; read through the runtime's DICOM reader like any scan.
        table = write_dataset(work / f"phantoms-{split}-{count}", n=count, seed=9100 + len(split), size=512, workers=1)
        with open(table, newline="", encoding="utf-8") as handle:
            chosen = [(table.parent / row["DicomPath"], row["Report"]) for row in csv.DictReader(handle)]
    scans = [read_image(path, size) for path, _ in chosen]
    return Samples(np.stack([s.model_input for s in scans]).astype(np.float32), [r for _, r in chosen],
                   [tuple(s.display.shape) for s in scans])


def sample_images(model: RadixpertModel, options: ExportOptions, split: str, count: int, work: Path) -> np.ndarray:
    """(count, 3, S, S) model inputs of a split (see :func:`sample_studies`)."""
    return sample_studies(model, options, split, count, work).images


def template_token_ids(model: RadixpertModel) -> dict[str, Any]:
    tokenizer = model.tokenizer
    return {
        "prefix": list(model.prefix_ids),
        "suffix": list(model.suffix_ids),
        "stop": sorted(model.stop_ids),
        **{name: tokenizer.convert_tokens_to_ids(text) for name, text in
           {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "start_of_image": "<start_of_image>",
            "end_of_image": "<end_of_image>", "start_of_turn": "<start_of_turn>", "end_of_turn": "<end_of_turn>"}.items()},
    }


def context_length(model: RadixpertModel, max_new_tokens: int) -> int:
    needed = len(model.prefix_ids) + model.config.num_visual_tokens + len(model.suffix_ids) + max_new_tokens + 8
    return int(-(-needed // 256) * 256)


@torch.no_grad()
def export_bundle(run_dir: str | Path, out: str | Path, options: ExportOptions, progress: Any = None) -> dict[str, Any]:
    """Build the bundle; returns the manifest. Raises ParityError (after keeping the rejected
    build) when any parity check breaks its threshold."""
    out = Path(out)
    unknown = [q for q in options.quants if q not in QUANTS]
    if unknown or not options.quants:
        raise UsageError(f"--quant must be among {', '.join(QUANTS)}, got {', '.join(options.quants) or 'nothing'}")
    existed = out.exists()
    if existed and not options.force:
        raise UsageError(f"{out} already exists; pass --force to replace it or choose another --out")
    notify = options.console.print if options.console is not None else None
    with file_lock(out, notify=notify, what=str(out)):
        if not existed and (out / MANIFEST).is_file():
            # Another process built it while this one waited: that build is the one asked for.
            if options.console is not None:
                options.console.print(f"using the bundle another process built meanwhile in {out}")
            return json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        remove_stale(out)
        work = partial_path(out)
        work.mkdir(parents=True)
        try:
            manifest = build_bundle(run_dir, out, work, options, progress)
        except BaseException:
            remove(work)  # gone already when a drifted build was kept aside
            raise
        commit(work, out)
    return manifest


def build_bundle(run_dir: str | Path, out: Path, work: Path, options: ExportOptions, progress: Any) -> dict[str, Any]:
    """Build the bundle in ``work`` (the caller holds the lock and renames it in)."""
    steps = StepLog(progress=progress)
    if options.threads:
        torch.set_num_threads(options.threads)

    with steps.step("load run"):
        model, checkpoint, verified = load_run(run_dir)
        options.split_path = checkpoint / "split.json" if (checkpoint / "split.json").exists() else None
    check_disk_space(model, out, options)
    config = model.config
    files: list[tuple[Path, str]] = []
    results: dict[str, Any] = {}
    failures: list[str] = []

    with steps.step("merge LoRA"):
        merge_lora(model)
        if options.keep_hf:
            hf_dir = save_merged(model, work / HF_DIR)
        else:
            hf_dir = save_merged(model, work / "tmp-hf")

    with steps.step("sample images"):
        parity_images = sample_images(model, options, "test", options.samples, work / "tmp-data")
    images_t = torch.from_numpy(parity_images)

    with steps.step("frontend ONNX"):
        onnx_path = export_frontend(model.frontend, config, work / FRONTEND_FILE)
        results["frontend"] = frontend_parity(model.frontend, onnx_path, parity_images)
        for output in ("visual_tokens", "masks"):
            failures += parity.judge("frontend", results["frontend"][output], options.thresholds)
        if "evidence" in results["frontend"]:  # probabilities near 0: an absolute bound, not a relative one
            failures += parity.judge("frontend_evidence", results["frontend"]["evidence"], options.thresholds)
        files.append((onnx_path, "frontend"))
        # The eager reference of radixpert-bench rebuilds Frontend(config) from these exact weights.
        save_file({k: v.detach().contiguous() for k, v in model.frontend.state_dict().items()}, str(work / FRONTEND_TORCH_FILE))
        files.append((work / FRONTEND_TORCH_FILE, "frontend-torch"))

    evidence = model.frontend.evidence
    evidence_outputs = list(evidence.outputs) if evidence is not None else None
    with steps.step("calibrate checks"):
        from radixpert.export.calibrate import calibrate_checks

        check_samples = sample_studies(model, options, "train", options.calibration, work / "tmp-data")
        checks = calibrate_checks(onnx_path, check_samples, config.mask_names, evidence_outputs, options.threads)

    if options.int8:
        from radixpert.export.onnx_frontend import measure_int8, quantize_frontend_int8

        with steps.step("frontend INT8"):
            calibration = sample_images(model, options, "train", 16, work / "tmp-data")
            int8_path = quantize_frontend_int8(onnx_path, work / FRONTEND_INT8_FILE, calibration)
            results["frontend_int8"] = measure_int8(onnx_path, int8_path, parity_images, threads=options.threads or 2)
            failures += parity.judge("frontend_int8", results["frontend_int8"]["visual_tokens"], options.thresholds)
            files.append((int8_path, "frontend-int8"))

    results["tensorrt"] = tensorrt_step(options, steps, onnx_path, work, parity_images, files, failures)

    with steps.step("GGUF convert", total=1) as advance:
        source_dtype = "f32" if "f32" in options.quants else "f16"
        base = write_gguf(hf_dir, work / f"llm-{source_dtype}.gguf", dtype=source_dtype, progress=advance)
    llm_paths = {source_dtype: base}
    for quant in options.quants:
        if quant in llm_paths:
            continue
        with steps.step(f"GGUF {quant}"):
            if quant in ("f32", "f16"):
                llm_paths[quant] = write_gguf(hf_dir, work / f"llm-{quant}.gguf", dtype=quant)
            else:
                llm_paths[quant] = quantize_gguf(base, work / f"llm-{quant}.gguf", quant, threads=options.threads or 0)

    token_ids = template_token_ids(model)
    n_ctx = context_length(model, max(options.e2e_tokens, config.max_new_tokens))
    results["llm"], results["e2e"] = {}, {}
    with steps.step("parity: PyTorch reference"):
        reference = model.generate(images_t, max_new_tokens=options.e2e_tokens)
    from radixpert.runtime.frontend import OnnxFrontend

    exported_visual, _ = OnnxFrontend(onnx_path, providers=["CPUExecutionProvider"], threads=options.threads).run(parity_images)
    for quant in options.quants:
        with steps.step(f"parity: LLM {quant}"):
            with LlamaRunner(llm_paths[quant], n_ctx=n_ctx, threads=options.threads, gpu_layers=0) as runner:
                check_tokenizer(runner, model, quant)
                results["llm"][quant] = parity.llm_parity(model, runner, images_t)
                exported = [runner.generate(token_ids["prefix"], exported_visual[b], token_ids["suffix"],
                                            options.e2e_tokens, token_ids["stop"]).tokens
                            for b in range(exported_visual.shape[0])]
            results["e2e"][quant] = parity.end_to_end_parity(reference, exported)
            failures += parity.judge(f"llm.{quant}", results["llm"][quant], options.thresholds)
            failures += parity.judge(f"e2e.{quant}", results["e2e"][quant], options.thresholds)
    if source_dtype not in options.quants:
        llm_paths.pop(source_dtype).unlink()
    files += [(llm_paths[q], f"llm-{q}") for q in options.quants]

    with steps.step("n-gram index"):
        from radixpert.export.drafts import write_ngram_index

        files.append((write_ngram_index(model, options, work), "ngram"))
    (work / LABELS).write_text(json.dumps(label_table(config.mask_names), indent=1) + "\n", encoding="utf-8")
    files.append((work / LABELS, "labels"))
    shutil.rmtree(work / "tmp-data", ignore_errors=True)
    shutil.rmtree(work / "tmp-hf", ignore_errors=True)
    if options.keep_hf:
        files += [(p, "hf") for p in sorted((work / HF_DIR).rglob("*")) if p.is_file()]

    with steps.step("manifest"):
        entries = [file_entry(path, work, role) for path, role in files]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "bundle_id": "",
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"checkpoint": checkpoint.name, "run": Path(run_dir).name, "checksums_verified": verified,
                       "checksums_sha256": sha256_of(checkpoint / "checksums.json") if verified else None},
            "config": portable_config(config.to_dict()),
            "prompt": model.template.to_manifest(),
            "tokens": token_ids,
            "visual": {"num_tokens": config.num_visual_tokens, "dim": config.llm_dim, "image_size": config.image_size,
                       "masks": config.num_masks, "input": "image", "outputs": frontend_outputs(model.frontend),
                       "evidence": ({"outputs": evidence_outputs, "pool": evidence.pool} if evidence is not None else
                                    None)},
            "checks": {**checks, "calibration_images": len(check_samples.reports),
                       "calibration_source": "the run's train split" if options.data else "phantoms (seed 9105)"},
            "llm": {"quants": list(options.quants), "default_quant": default_quant(options.quants), "n_ctx": n_ctx},
            "labels": LABELS,
            "parity": {**results, "thresholds": options.thresholds, "failures": failures, "passed": not failures},
            "versions": library_versions(),
            "steps": steps.rows,
            "files": entries,
        }
        manifest = seal_manifest(manifest)
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    if failures:
        rejected = out.with_name(out.name + ".rejected")
        shutil.rmtree(rejected, ignore_errors=True)
        work.rename(rejected)
        raise ParityError(f"parity failed ({'; '.join(failures)}); the build is kept in {rejected} for inspection "
                          "and no bundle was written (override with --threshold NAME=VALUE if this is expected)")
    return manifest


def default_quant(quants: tuple[str, ...]) -> str:
    """The fastest quantization present (decode is memory-bound: fewer bytes, faster)."""
    order = ["q4_k_m", "q8_0", "f16", "f32"]
    return next(q for q in order if q in quants)


def check_tokenizer(runner: LlamaRunner, model: RadixpertModel, quant: str) -> None:
    """The GGUF's tokenizer must give the HF ids for the template, special tokens included."""
    template = model.template
    for text, expected in ((template.prefix, model.prefix_ids), (template.suffix, model.suffix_ids)):
        if runner.tokenize(text) != list(expected):
            raise ModelError(f"the {quant} GGUF tokenizes the prompt template differently from the HF tokenizer; "
                             "this is an export bug, please report it")


def tensorrt_step(options: ExportOptions, steps: StepLog, onnx_path: Path, work: Path, images: np.ndarray,
                  files: list[tuple[Path, str]], failures: list[str]) -> dict[str, Any]:
    """--tensorrt: where ONNX Runtime's TensorRT provider works, build its engine cache and check FP16
    parity; the bundle allows FP16 in that provider only when the check ran (``fp16``)."""
    if not options.tensorrt:
        return {"built": False, "fp16": False, "reason": "not requested (--tensorrt)"}
    from radixpert.export.tensorrt import prebuild, tensorrt_available

    available, reason = tensorrt_available()
    if not available:
        if options.console is not None:
            options.console.print(f"TensorRT not checked: {reason}; the runtime keeps FP32 in TensorRT")
        return {"built": False, "fp16": False, "reason": reason}
    with steps.step("TensorRT FP16 engine cache"):
        result = {"built": True, **prebuild(onnx_path, images, fp16=True, threads=options.threads)}
        failures += parity.judge("tensorrt", result["visual_tokens"], options.thresholds)
    return result

