"""The paper's Table III on data we control: base, +LoRA and +anatomy trained alike, scored alike.

* **base**: frozen LLM + trainable fusion (projector), no LoRA, no anatomy (``use_lora`` and
  ``use_anatomy`` off);
* **+LoRA**: the same plus LoRA on the LLM (``use_anatomy`` off);
* **+anatomy (full)**: the same plus the anatomy branch: the paper's model.

Every variant gets the same studies, split, frozen experts, seed, steps, batch size and learning
rate, and is scored on the same held-out test studies with greedy PyTorch decoding
(``RadixpertModel.generate_text``, the reference the exported engines are tested against).
The stand-in experts are pretrained once, shared by all three, unless paths are given.

The paper's base keeps a *pretrained* LLM frozen. The tiny preset's LLM is random, and a frozen
random LLM cannot write at all, so for it the ablation first pretrains the tiny LLM as a plain
language model on the training reports (text only, no images: a stand-in for MedGemma's
language knowledge, like the stand-in experts) and every variant starts from that same LLM.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from radixpert.evaluation.scoring import (
    CLINICAL_HEADLINE,
    HEADLINE,
    Pair,
    evaluate,
    write_outputs,
)

VARIANTS = (("base", False, False), ("+LoRA", True, False), ("+anatomy (full)", True, True))
TABLE_COLUMNS = ("bleu_4", "rouge_l", "meteor", "cider_d", "micro_f1", "laterality_accuracy", "swap_rate")


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


def _slug(name: str) -> str:
    return {"base": "base", "+LoRA": "lora", "+anatomy (full)": "full"}[name]


def _experts(config, train, val, settings: AblationSettings, out: Path, log: Callable[[str], None],
             progress: Callable[[str, dict, int], None] | None) -> tuple[str, str]:
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


def pretrain_text_llm(config, reports: list[str], settings: AblationSettings, folder: Path,
                      progress: Callable[[str, dict, int], None] | None = None) -> Path:
    """Train the tiny random LLM as a language model on report texts; save it as an HF folder."""
    import random

    import torch

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
    tmp = folder.with_name(folder.name + ".partial")
    llm.eval().save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(folder)
    return folder


def generate(model, studies, image_size: int, max_new_tokens: int | None, batch: int = 8) -> list[str]:
    """Greedy reports for studies, in order."""
    import torch
    from radixpert.train.data import ImageCache

    cache = ImageCache(image_size)
    model.eval()
    device = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, len(studies), batch):
        chunk = studies[start : start + batch]
        images = torch.stack([torch.from_numpy(cache.get(s).astype("float32")) for s in chunk]).to(device)
        texts += model.generate_text(images, max_new_tokens)
    return texts


def run_ablation(csv_path: str | Path, out_dir: str | Path, settings: AblationSettings, split_path: str | Path | None = None,
                 encoder_path: str | None = None, segmenter_path: str | None = None,
                 log: Callable[[str], None] = print, progress: Callable[[str, dict, int], None] | None = None) -> dict:
    """Train and score the three variants; writes ``ablation.json``, ``ablation.md`` and one folder per variant."""
    from radixpert.train.data import (
        load_split,
        patient_split,
        read_table,
        save_split,
        select,
    )
    from radixpert.train.report import TrainSettings, train_report

    from radixpert.config import get_config

    out = Path(out_dir)
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
    base_config = get_config(settings.preset, seed=settings.seed)
    if not (encoder_path and segmenter_path):
        enc, seg = _experts(base_config, train, val, settings, out, log, progress)
        encoder_path, segmenter_path = encoder_path or enc, segmenter_path or seg
    if base_config.llm == "tiny_random" and settings.llm_pretrain_steps:
        log(f"LLM: {settings.llm_pretrain_steps} steps of text pretraining on the training reports")
        llm_dir = pretrain_text_llm(base_config, [s.report for s in train], settings, out / "llm", progress)
        base_config = base_config.replace(llm="hf_dir", llm_path=str(llm_dir))
    log(f"studies: train {len(train)}, val {len(val)}, test {len(test)}")
    results = []
    for name, use_lora, use_anatomy in VARIANTS:
        folder = out / _slug(name)
        config = base_config.replace(encoder_path=encoder_path, segmenter_path=segmenter_path,
                                     use_lora=use_lora, use_anatomy=use_anatomy)
        train_settings = TrainSettings(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                                       warmup_steps=settings.warmup_steps, eval_every=settings.steps,
                                       save_every=settings.steps, num_samples=0)
        log(f"{name}: training {settings.steps} steps")
        model, rows = train_report(config, train, val, train_settings, folder, split_file, seed=settings.seed,
                                   progress=(lambda row, n=name: progress(n, row, settings.steps)) if progress else None)
        texts = generate(model, test, config.image_size, settings.max_new_tokens)
        with (folder / "predictions.jsonl").open("w", encoding="utf-8") as handle:
            for study, text in zip(test, texts):
                handle.write(json.dumps({"input": study.image_path, "report": text}, ensure_ascii=False) + "\n")
        metrics, per_study = evaluate([Pair(s.image_id, s.image_path, t, s.report) for s, t in zip(test, texts)])
        metrics["training"] = {"last_loss": rows[-1]["loss"], "val_loss": rows[-1].get("val_loss"),
                               "use_lora": use_lora, "use_anatomy": use_anatomy}
        write_outputs(folder / "eval", metrics, per_study, title=f"Ablation: {name}")
        results.append({"variant": name, **{k: metrics["language"][k] for k in HEADLINE},
                        **{k: metrics["clinical"][k] for k in CLINICAL_HEADLINE},
                        "laterality_checked": metrics["clinical"]["laterality_checked"],
                        "swaps": metrics["clinical"]["swaps"], **metrics["training"]})
        log(f"{name}: " + ", ".join(f"{k} {_fmt(results[-1][k])}" for k in TABLE_COLUMNS))
        del model
    summary = {"settings": asdict(settings), "data": str(csv_path), "split": str(split_file),
               "test_studies": len(test), "encoder_path": encoder_path, "segmenter_path": segmenter_path,
               "variants": results}
    (out / "ablation.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "ablation.md").write_text(table(summary), encoding="utf-8")
    return summary


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def table(summary: dict) -> str:
    """The Markdown ablation table."""
    head = ("variant", "BLEU-4", "ROUGE-L", "METEOR", "CIDEr-D", "finding F1 (micro)", "laterality acc.", "swap rate",
            "val loss")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["variants"]:
        values = [_fmt(row[k]) for k in TABLE_COLUMNS]
        lateral = f"{values[5]} (n={row['laterality_checked']})"
        lines.append(f"| {row['variant']} | " + " | ".join(values[:5] + [lateral, values[6], _fmt(row.get('val_loss'))]) + " |")
    return "\n".join(lines) + f"\n\n{summary['test_studies']} held-out test studies; settings: {json.dumps(summary['settings'])}\n"
