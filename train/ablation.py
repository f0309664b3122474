"""Training side of the ablation (the paper's Table III): the three variants, trained alike.

* **base**: frozen LLM + trainable fusion (projector), no LoRA, no anatomy (``use_lora`` and
  ``use_anatomy`` off);
* **+LoRA**: the same plus LoRA on the LLM (``use_anatomy`` off);
* **+anatomy (full)**: the same plus the anatomy branch: the paper's model.

Every variant gets the same studies, split, frozen experts, seed, steps, batch size and learning
rate, and writes greedy PyTorch reports (``RadixpertModel.generate_text``, the reference the
exported engines are tested against) for the same held-out test studies. The stand-in experts
are pretrained once, shared by all three, unless paths are given.

The paper's base keeps a *pretrained* LLM frozen. The tiny preset's LLM is random, and a frozen
random LLM cannot write at all, so for it the ablation first pretrains the tiny LLM as a plain
language model on the training reports (text only, no images: a stand-in for MedGemma's
language knowledge, like the stand-in experts) and every variant starts from that same LLM.
Scoring and the table are in :mod:`radixpert.evaluation.ablation`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from radixpert.config import RadixpertConfig
    from radixpert.model import RadixpertModel
    from radixpert.train.data import Study

VARIANTS = (("base", False, False), ("+LoRA", True, False), ("+anatomy (full)", True, True))
_SLUGS = {"base": "base", "+LoRA": "lora", "+anatomy (full)": "full"}

Log = Callable[[str], None]
Progress = Callable[[str, dict, int], None] | None  # (task name, metrics row, total steps)


@dataclass
class AblationSettings:
    preset: str = "tiny"
    steps: int = 1500
    batch_size: int = 4
    lr: float = 2e-2
    warmup_steps: int = 20
    seed: int = 0
    segmenter_steps: int = 400
    encoder_steps: int = 300
    llm_pretrain_steps: int = 200  # tiny_random LLMs only; 0 keeps the random LLM
    test_limit: int | None = None
    max_new_tokens: int | None = None


@dataclass
class AblationData:
    """What every variant shares: the studies of each split, the base config and the frozen experts."""

    split_file: Path
    train: list[Study]
    val: list[Study]
    test: list[Study]
    config: RadixpertConfig  # the preset, with the text-pretrained LLM where there is one
    encoder_path: str
    segmenter_path: str


def variant_folder(out: Path, name: str) -> Path:
    """The folder of one variant's run, predictions and scores."""
    return out / _SLUGS[name]


def _experts(config: RadixpertConfig, train: list[Study], val: list[Study], settings: AblationSettings, out: Path, log: Log, progress: Progress) -> tuple[str, str]:
    """Pretrain the stand-in segmenter and encoder once (the experts every variant shares)."""
    from radixpert.train.experts import ExpertSettings, train_encoder, train_segmenter

    folder = out / "experts"
    seg, enc = folder / "segmenter.safetensors", folder / "encoder.safetensors"
    if not seg.exists():
        log(f"segmenter: {settings.segmenter_steps} steps")
        result = train_segmenter(config, train, val, ExpertSettings(steps=settings.segmenter_steps, batch_size=4, lr=1e-2,
                                                                    seed=settings.seed, eval_every=0), folder,
                                 progress=(lambda row: progress("segmenter", row, settings.segmenter_steps)) if progress else None)
        log(f"segmenter: held-out Dice {result['dice']}")
    if not enc.exists():
        log(f"encoder: {settings.encoder_steps} steps")
        result = train_encoder(config, train, val, ExpertSettings(steps=settings.encoder_steps, seed=settings.seed,
                                                                  eval_every=0), folder,
                               progress=(lambda row: progress("encoder", row, settings.encoder_steps)) if progress else None)
        log(f"encoder: held-out macro AUROC {result.get('macro_auroc')}")
    return str(enc), str(seg)


def pretrain_text_llm(config: RadixpertConfig, reports: list[str], settings: AblationSettings, folder: Path, progress: Progress = None) -> Path:
    """Train the tiny random LLM as a language model on report texts; save it as an HF folder."""
    import random

    import torch

    from radixpert.atomic import atomic_build
    from radixpert.hf_models import load_llm
    from radixpert.prompt import DEFAULT_TEMPLATE

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(settings.seed)
    llm, tokenizer = load_llm(config)
    llm.train()
    bos = tokenizer.convert_tokens_to_ids("<bos>")
    rows = [[bos] + tokenizer(DEFAULT_TEMPLATE.target(r), add_special_tokens=False)["input_ids"] for r in reports]
    optimizer = torch.optim.AdamW(llm.parameters(), lr=3e-3)
    rng = random.Random(settings.seed)
    for step in range(settings.llm_pretrain_steps):
        batch = rng.sample(rows, min(16, len(rows)))
        length = max(len(r) for r in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r)], labels[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(r), 1
        loss = llm(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress:
            progress("LLM text pretraining", {"step": step + 1, "loss": float(loss.detach())}, settings.llm_pretrain_steps)
    with atomic_build(folder) as partial:
        llm.eval().save_pretrained(str(partial))
        tokenizer.save_pretrained(str(partial))
    return folder


def generate(model: RadixpertModel, studies: list[Study], max_new_tokens: int | None, batch: int = 8) -> list[str]:
    """Greedy reports for studies, in order."""
    import torch

    from radixpert.train.data import ImageCache

    cache = ImageCache(model.config.image_size)
    model.eval()
    device = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, len(studies), batch):
        chunk = studies[start : start + batch]
        images = torch.stack([torch.from_numpy(cache.get(s).astype("float32")) for s in chunk]).to(device)
        texts += model.generate_text(images, max_new_tokens)
    return texts


def prepare_ablation(csv_path: str | Path, out: Path, settings: AblationSettings, split_path: str | Path | None = None,
                     encoder_path: str | None = None, segmenter_path: str | None = None,
                     log: Log = print, progress: Progress = None) -> AblationData:
    """The split (reused or made and saved), the shared experts and, for a random LLM, its text pretraining."""
    from radixpert.config import get_config
    from radixpert.train.data import load_split, patient_split, read_table, save_split, select

    out.mkdir(parents=True, exist_ok=True)
    studies = read_table(csv_path)
    split_file = Path(split_path) if split_path else out / "split.json"
    if split_file.exists():
        split = load_split(split_file)
    else:
        split = patient_split(studies, settings.seed)
        save_split(split_file, split, settings.seed, csv_path)
    train, val, test = (select(studies, split[name]) for name in ("train", "val", "test"))
    test = test[: settings.test_limit] if settings.test_limit else test
    config = get_config(settings.preset, seed=settings.seed)
    if not (encoder_path and segmenter_path):
        enc, seg = _experts(config, train, val, settings, out, log, progress)
        encoder_path, segmenter_path = encoder_path or enc, segmenter_path or seg
    if config.llm == "tiny_random" and settings.llm_pretrain_steps:
        log(f"LLM: {settings.llm_pretrain_steps} steps of text pretraining on the training reports")
        llm_dir = pretrain_text_llm(config, [s.report for s in train], settings, out / "llm", progress)
        config = config.replace(llm="hf_dir", llm_path=str(llm_dir))
    log(f"studies: train {len(train)}, val {len(val)}, test {len(test)}")
    return AblationData(split_file, train, val, test, config, encoder_path, segmenter_path)


def train_variant(data: AblationData, name: str, use_lora: bool, use_anatomy: bool, settings: AblationSettings,
                  folder: Path, progress: Progress = None) -> tuple[list[str], list[dict]]:
    """Train one variant into ``folder`` and write its test reports (``predictions.jsonl``).

    Returns the reports, in the order of ``data.test``, and the training metrics rows.
    """
    from radixpert.train.report import TrainSettings, train_report

    config = data.config.replace(encoder_path=data.encoder_path, segmenter_path=data.segmenter_path,
                                 use_lora=use_lora, use_anatomy=use_anatomy)
    train_settings = TrainSettings(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                                   warmup_steps=settings.warmup_steps, eval_every=settings.steps,
                                   save_every=settings.steps, num_samples=0)
    model, rows = train_report(config, data.train, data.val, train_settings, folder, data.split_file, seed=settings.seed,
                               progress=(lambda row: progress(name, row, settings.steps)) if progress else None)
    texts = generate(model, data.test, settings.max_new_tokens)
    with (folder / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for study, text in zip(data.test, texts):
            handle.write(json.dumps({"input": study.image_path, "report": text}, ensure_ascii=False) + "\n")
    return texts, rows
