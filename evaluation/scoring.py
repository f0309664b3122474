"""Pair predictions with references, score them, and write JSON, Markdown and per-study CSV.

Matching rule: a prediction's key is the file stem of its ``input`` path
(``dicom/phantom_0_000012.dcm`` -> ``phantom_0_000012``); a reference row answers to the stem
of its ``ImageID`` and, where the CSV has one, of its ``DicomPath``. Stems must be unique.

This module imports no torch.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from radixpert.evaluation.clinical import compare, describe, score_findings
from radixpert.checks.labeler import label_report, present
from radixpert.evaluation.metrics import (
    CIDER_N,
    CIDER_SIGMA,
    METEOR_ALPHA,
    METEOR_BETA,
    METEOR_GAMMA,
    METRIC_HELP,
    ROUGE_BETA,
    score_corpus,
)

from radixpert.errors import InputError

MATCH_RULE = "file stem of the prediction's input = stem of the reference's ImageID or DicomPath"
HEADLINE = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "meteor", "cider_d")
CLINICAL_HEADLINE = ("micro_f1", "macro_f1", "laterality_accuracy", "swap_rate", "zone_accuracy")
CLINICAL_HELP = {
    "micro_f1": "finding F1 pooled over all labels (labeler on both texts; uncertain counts as present)",
    "macro_f1": "mean of the per-label F1",
    "laterality_accuracy": "same side as the reference, over findings in both whose reference has a side",
    "swap_rate": "opposite side (right <-> left), over the same findings",
    "zone_accuracy": "same zones as the reference, over findings in both whose reference has a zone",
}


@dataclass(frozen=True)
class Pair:
    """One study to score."""

    study_id: str
    input: str
    prediction: str
    reference: str


def stem(path: str) -> str:
    return Path(str(path).replace("\\", "/")).stem


def read_predictions(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(reported, refused) records of ``radixpert-run --format json`` output (JSON Lines)."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"predictions file {file} not found; write it with radixpert-run --format json > FILE")
    reported, refused = [], []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{file.name} line {number} is not JSON; expected radixpert-run --format json output") from None
        if not isinstance(record, dict) or "input" not in record:
            raise InputError(f"{file.name} line {number} has no \"input\" field; expected radixpert-run --format json output")
        if record.get("error"):
            refused.append(record)
        elif not isinstance(record.get("report"), str):
            raise InputError(f"{file.name} line {number} has neither \"report\" nor \"error\"")
        else:
            reported.append(record)
    if not reported and not refused:
        raise InputError(f"{file.name} holds no predictions")
    return reported, refused


def read_references(path: str | Path, report_column: str = "Report") -> dict[str, tuple[str, str]]:
    """{stem: (ImageID, report)} from a PadChest-format CSV."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"reference CSV {file} not found; pass a PadChest-format CSV")
    with file.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"ImageID", report_column} - set(reader.fieldnames or ())
        if missing:
            raise InputError(f"{file.name} lacks column(s) {', '.join(sorted(missing))}; pass --report-column if the text is elsewhere")
        refs: dict[str, tuple[str, str]] = {}
        for row in reader:
            report = (row[report_column] or "").strip()
            keys = {stem(row["ImageID"])} | ({stem(row["DicomPath"])} if row.get("DicomPath") else set())
            for key in keys:
                if key in refs and refs[key][0] != row["ImageID"]:
                    raise InputError(f"{file.name}: two rows answer to the file stem {key!r}; stems must be unique")
                refs[key] = (row["ImageID"], "" if report.lower() == "nan" else report)
    return refs


def pair_up(predictions: list[dict], refs: dict[str, tuple[str, str]]) -> tuple[list[Pair], int]:
    """(pairs, predictions whose reference text is empty); raises if a prediction has no reference."""
    pairs, seen, empty = [], set(), 0
    unmatched = [r["input"] for r in predictions if stem(r["input"]) not in refs]
    if unmatched:
        raise InputError(f"{len(unmatched)} prediction(s) have no reference row (first: {unmatched[0]}); "
                         f"the rule is: {MATCH_RULE}")
    for record in predictions:
        image_id, reference = refs[stem(record["input"])]
        if image_id in seen:
            raise InputError(f"two predictions for {image_id}; score each scan once")
        seen.add(image_id)
        if not reference:
            empty += 1
            continue
        pairs.append(Pair(image_id, record["input"], record["report"], reference))
    return pairs, empty


def evaluate(pairs: Sequence[Pair], uncertain_as_positive: bool = True) -> tuple[dict, list[dict]]:
    """(metrics, per-study rows) for paired texts."""
    if not pairs:
        raise InputError("nothing to score: no prediction has a reference report")
    nlg = score_corpus([p.prediction for p in pairs], [p.reference for p in pairs])
    preds = [present(label_report(p.prediction), uncertain_as_positive) for p in pairs]
    refs = [present(label_report(p.reference), uncertain_as_positive) for p in pairs]
    clinical = score_findings(preds, refs)
    rows = []
    for i, (pair, pred, ref) in enumerate(zip(pairs, preds, refs)):
        result = compare(pred, ref)
        rows.append({
            "study_id": pair.study_id, "input": pair.input,
            **{name: round(values[i], 6) for name, values in nlg.per_study.items()},
            "missed": "; ".join(result.missed), "extra": "; ".join(result.extra),
            "wrong_side": "; ".join(result.wrong_side), "swapped": "; ".join(result.swapped),
            "reference_findings": describe(ref), "predicted_findings": describe(pred),
            "prediction": pair.prediction, "reference": pair.reference,
        })
    metrics = {
        "studies": len(pairs),
        "language": nlg.corpus,
        "clinical": clinical,
        "settings": {
            "tokenizer": "Unicode NFC, lowercase, letter runs and numbers; accents and ñ kept; punctuation dropped",
            "bleu": "corpus BLEU (sacrebleu on our tokens), uniform weights, closest-reference brevity penalty, no smoothing",
            "rouge_l": {"beta": ROUGE_BETA, "implementation": "rouge-score LCS with our tokenizer", "average": "mean over studies"},
            "meteor": {"alpha": METEOR_ALPHA, "beta": METEOR_BETA, "gamma": METEOR_GAMMA,
                       "stages": ["exact", "snowball-spanish stem"], "synonyms": None, "paraphrases": None,
                       "implementation": "nltk single_meteor_score", "average": "mean over studies"},
            "cider_d": {"n": CIDER_N, "sigma": CIDER_SIGMA, "scale": 10, "clipping": True,
                        "document_frequency": "references of the scored studies", "average": "mean over studies"},
            "uncertain_findings": "present" if uncertain_as_positive else "absent",
            "match": MATCH_RULE,
        },
    }
    return metrics, rows


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def markdown(metrics: dict, title: str = "Evaluation") -> str:
    """The headline table and the per-finding table."""
    lang, clin = metrics["language"], metrics["clinical"]
    lines = [f"## {title}", "", f"{metrics['studies']} studies"
             + (f", {metrics['refused']} refused scan(s) not scored" if metrics.get("refused") else ""), "",
             "| metric | value | what it is |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(lang[name])} | {METRIC_HELP[name]} |" for name in HEADLINE]
    lines += [f"| {name} | {_fmt(clin[name])} | {CLINICAL_HELP[name]} |" for name in CLINICAL_HEADLINE]
    lines += ["", f"Laterality checked on {clin['laterality_checked']} findings, {clin['swaps']} swapped.", "",
              "| finding | precision | recall | F1 | support | predicted |", "|---|---|---|---|---|---|"]
    for label, v in clin["per_label"].items():
        lines.append(f"| {label} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} | {v['predicted']} |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str | Path, metrics: dict, rows: list[dict], title: str = "Evaluation") -> dict[str, Path]:
    """metrics.json, metrics.md and per_study.csv under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "metrics.json", "markdown": out / "metrics.md", "csv": out / "per_study.csv"}
    paths["json"].write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown(metrics, title), encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return paths
