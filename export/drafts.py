"""The n-gram index of the training reports, for the runtime's speculative decoding.

The reports are tokenized exactly as training fed them to the model (``encode_reports``: the
report text and the end-of-turn token), each preceded by the tail of the prompt suffix, so the
first words can be drafted too. With ``--data`` they are the run's training split; otherwise the
reports of the phantom dataset the demo trained on (``radixpert-phantom --seed 0``, 2000 studies),
generated without rendering their images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from radixpert.runtime.ngram import MAX_ORDER, NGRAM_FILE, index_payload

PHANTOM_SEED, PHANTOM_STUDIES = 0, 2000


def training_reports(options: Any) -> tuple[list[str], str]:
    """(reports, where they came from)."""
    if options.data:
        from radixpert.train.data import load_split, read_table, select

        studies = read_table(options.data, images=options.images, projections=None)
        if options.split_path:
            studies = select(studies, load_split(options.split_path)["train"])
            return [s.report for s in studies], "the run's train split"
        return [s.report for s in studies], "every study of --data (the run has no split file)"
    from radixpert.phantom import sample_findings, spanish_report

    reports = [spanish_report(sample_findings(PHANTOM_SEED, i), PHANTOM_SEED, i) for i in range(PHANTOM_STUDIES)]
    return reports, f"phantom reports, seed {PHANTOM_SEED}, {PHANTOM_STUDIES} studies"


def write_ngram_index(model: Any, options: Any, work: Path) -> Path:
    """``work/ngram.json`` from the training reports, tokenized as training saw them."""
    reports, source = training_reports(options)
    tail = list(model.suffix_ids[-MAX_ORDER:])
    sequences = [tail + ids for ids in model.encode_reports(reports)]
    path = work / NGRAM_FILE
    path.write_text(json.dumps(index_payload(sequences, source, len(tail))) + "\n", encoding="utf-8")
    return path
