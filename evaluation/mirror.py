"""The mirror probe: does a bundle read each finding's side from the image? (torch-free)

For every side word of a reference report (derecho/a, izquierdo/a, plural too), the model is
teacher-forced with the image and the reference text up to that word, and we read its preference
for the correct side: logit(correct side's first token) - logit(opposite side's first token).
The same is measured with the image mirrored left-right. A model that reads the side from the
image prefers the correct side with the image and moves that preference when the image is
mirrored; a model that guesses the side from the text alone does not move.

Everything runs through the bundle's own engines (ONNX Runtime + llama.cpp), fed exactly as
``radixpert-run`` feeds them, so the numbers describe what a deployment does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radixpert.bundle import Bundle
from radixpert.imageio import letterbox_resize, normalize_imagenet, read_display
from radixpert.runtime.llm import LlamaRunner
from radixpert.runtime.pipeline import Reporter

# Side words of the reports and their opposites (the labeler's vocabulary; see labeler.py).
OPPOSITE = {
    "derecho": "izquierdo", "derecha": "izquierda", "derechos": "izquierdos", "derechas": "izquierdas",
    "izquierdo": "derecho", "izquierda": "derecha", "izquierdos": "derechos", "izquierdas": "derechas",
}
SIDE_WORD = re.compile(r"\b(" + "|".join(sorted(OPPOSITE, key=len, reverse=True)) + r")\b", re.IGNORECASE)


@dataclass
class SideProbe:
    """One side word of one reference report."""

    study: int
    word: str
    context_ids: list[int]  # report tokens before the side word
    correct: int  # first token of the side word as written
    opposite: int  # first token of the opposite side's word


def side_probes(runner: LlamaRunner, study: int, report: str) -> list[SideProbe]:
    """Every side word of ``report`` as a (context, correct token, opposite token) probe.

    The text before the word is tokenized together with the word and with its opposite; the
    first position where the two token sequences differ is where the model chooses the side.
    """
    text = report.strip()
    probes = []
    for match in SIDE_WORD.finditer(text):
        word = match.group(0)
        opposite = OPPOSITE[word.lower()]
        if word[0].isupper():
            opposite = opposite.capitalize()
        before = text[: match.start()]
        right = runner.tokenize(before + word)
        wrong = runner.tokenize(before + opposite)
        split = next((i for i, (a, b) in enumerate(zip(right, wrong)) if a != b), None)
        if split is None:
            continue  # identical tokens: this vocabulary cannot tell the sides apart here
        probes.append(SideProbe(study, word, right[:split], right[split], wrong[split]))
    return probes


def preference(runner: LlamaRunner, prefix: list[int], visual: np.ndarray, suffix: list[int], probes: list[SideProbe]
               ) -> list[float]:
    """logit(correct) - logit(opposite) for each probe of one study, given these visual tokens."""
    runner.start(prefix)
    runner.eval_embeddings(visual)
    last = runner.eval_tokens(suffix)
    image_end = runner.n_past
    values = []
    for probe in probes:
        runner.trim(image_end)
        logits = runner.eval_tokens(probe.context_ids) if probe.context_ids else last
        values.append(float(logits[probe.correct] - logits[probe.opposite]))
    return values


def image_and_mirror(path: Path, size: int) -> np.ndarray:
    """(2, 3, S, S) model inputs: the scan as the runtime reads it, and the same scan mirrored left-right."""
    display, _ = read_display(path)
    return np.stack([normalize_imagenet(letterbox_resize(d, size)) for d in (display, display[:, ::-1])])


def mirror_probe(bundle: Bundle, studies: Iterable[tuple[str, str]], threads: int | None = None,
                 frontend: str = "fp32", progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Side preference with the image and with its mirror, over ``(image path, reference report)`` pairs.

    The engines are loaded as ``radixpert-run`` loads them, by the runtime's own :class:`Reporter`.
    """
    reporter = Reporter(bundle, threads=threads, frontend_variant=frontend)
    runner = reporter.llm
    rows: list[dict[str, Any]] = []
    try:
        for index, (path, report) in enumerate(studies):
            probes = side_probes(runner, index, report)
            if probes:
                visual, _ = reporter.frontend.run(image_and_mirror(Path(path), reporter.image_size))
                as_is = preference(runner, reporter.prefix_ids, visual[0], reporter.suffix_ids, probes)
                mirrored = preference(runner, reporter.prefix_ids, visual[1], reporter.suffix_ids, probes)
                rows += [{"study": index, "word": p.word, "image": a, "mirrored": m}
                         for p, a, m in zip(probes, as_is, mirrored)]
            if progress is not None:
                progress(index + 1)
    finally:
        reporter.close()
    return summarize(rows, bundle)


def summarize(rows: list[dict[str, Any]], bundle: Bundle) -> dict[str, Any]:
    """Counts and mean logit preferences; the shift is what mirroring the image takes away."""
    image = np.array([r["image"] for r in rows], dtype=np.float64)
    mirrored = np.array([r["mirrored"] for r in rows], dtype=np.float64)
    n = len(rows)
    return {
        "bundle_id": bundle.bundle_id,
        "side_words": n,
        "studies_with_side_words": len({r["study"] for r in rows}),
        "correct_side_preferred": int((image > 0).sum()),
        "correct_side_preferred_mirrored": int((mirrored > 0).sum()),
        "mean_preference_logits": float(image.mean()) if n else None,
        "mean_preference_mirrored_logits": float(mirrored.mean()) if n else None,
        "mean_shift_logits": float((image - mirrored).mean()) if n else None,
        "rows": rows,
    }


def markdown(summary: dict[str, Any], title: str) -> str:
    """A short table of the probe's result."""
    n = summary["side_words"]
    if not n:
        return f"# {title}\n\nNo side words in the reference reports.\n"
    command = f"`{summary['command']}`\n\n" if summary.get("command") else ""
    return (f"# {title}\n\n{command}| measure | value |\n|---|---|\n"
            f"| side words (studies) | {n} ({summary['studies_with_side_words']}) |\n"
            f"| correct side preferred, image | {summary['correct_side_preferred']}/{n} |\n"
            f"| correct side preferred, mirrored image | {summary['correct_side_preferred_mirrored']}/{n} |\n"
            f"| mean preference, image (logits) | {summary['mean_preference_logits']:.2f} |\n"
            f"| mean preference, mirrored (logits) | {summary['mean_preference_mirrored_logits']:.2f} |\n"
            f"| mean shift when mirrored (logits) | {summary['mean_shift_logits']:.2f} |\n")
