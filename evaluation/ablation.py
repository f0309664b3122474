"""Scoring and reporting of the ablation (the paper's Table III): each variant scored alike.

The variants are trained by :mod:`radixpert.train.ablation` (same studies, split, experts, seed
and budget); here their greedy reports on the same held-out test studies are scored with the
metrics of ``radixpert-eval score`` and gathered into ``ablation.json`` and ``ablation.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from radixpert.evaluation.scoring import (
    CLINICAL_HEADLINE,
    HEADLINE,
    Pair,
    evaluate,
    write_outputs,
)
from radixpert.train.ablation import VARIANTS, AblationSettings, prepare_ablation, train_variant, variant_folder

TABLE_COLUMNS = ("bleu_4", "rouge_l", "meteor", "cider_d", "micro_f1", "laterality_accuracy", "swap_rate")


def run_ablation(csv_path: str | Path, out_dir: str | Path, settings: AblationSettings, split_path: str | Path | None = None,
                 encoder_path: str | None = None, segmenter_path: str | None = None,
                 log: Callable[[str], None] = print, progress: Callable[[str, dict, int], None] | None = None) -> dict:
    """Train and score the three variants; writes ``ablation.json``, ``ablation.md`` and one folder per variant."""
    out = Path(out_dir)
    data = prepare_ablation(csv_path, out, settings, split_path, encoder_path, segmenter_path, log, progress)
    results = []
    for name, use_lora, use_anatomy in VARIANTS:
        folder = variant_folder(out, name)
        log(f"{name}: training {settings.steps} steps")
        texts, rows = train_variant(data, name, use_lora, use_anatomy, settings, folder, progress)
        metrics, per_study = evaluate([Pair(s.image_id, s.image_path, t, s.report) for s, t in zip(data.test, texts)])
        metrics["training"] = {"last_loss": rows[-1]["loss"], "val_loss": rows[-1].get("val_loss"),
                               "use_lora": use_lora, "use_anatomy": use_anatomy}
        write_outputs(folder / "eval", metrics, per_study, title=f"Ablation: {name}")
        results.append({"variant": name, **{k: metrics["language"][k] for k in HEADLINE},
                        **{k: metrics["clinical"][k] for k in CLINICAL_HEADLINE},
                        "laterality_checked": metrics["clinical"]["laterality_checked"],
                        "swaps": metrics["clinical"]["swaps"], **metrics["training"]})
        log(f"{name}: " + ", ".join(f"{k} {_fmt(results[-1][k])}" for k in TABLE_COLUMNS))
    summary = {"settings": asdict(settings), "data": str(csv_path), "split": str(data.split_file),
               "test_studies": len(data.test), "encoder_path": data.encoder_path, "segmenter_path": data.segmenter_path,
               "variants": results}
    (out / "ablation.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "ablation.md").write_text(table(summary), encoding="utf-8")
    return summary


def _fmt(value: float | None) -> str:
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
