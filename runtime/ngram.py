"""Draft tokens for speculative decoding, from the n-grams of the training reports (torch-free).

Reports are formulaic ("No se observa derrame pleural. ..."), so the words that followed the
last few tokens in the training reports are often the words the model writes next. The drafter
proposes them; the model verifies them all in one step and keeps the ones its own greedy choice
agrees with (``radixpert.runtime.batched``), so the output is the plain greedy output.

The bundle stores the token sequences (``ngram.json``: each training report as the model emits
it, after the tail of the prompt suffix), hashed in the manifest like every other file; the
lookup tables are built from them when a runtime loads the bundle.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from radixpert.errors import ModelError

NGRAM_FILE = "ngram.json"
# Longest context matched, and the shortest: a single shared token says too little to draft on.
MAX_ORDER = 6
MIN_ORDER = 2
# A draft starts only where the product of its tokens' shares (how often the training reports
# continued that way after that context) stays at or above MIN_CONFIDENCE for MIN_CONFIDENT tokens.
# Verifying a drafted position costs about as much as decoding it on a CPU (the 262k-token output
# layer dominates a 270M model), so uncertain drafts lose time: on the demo, 0.7 took accepted
# drafts from 62 % to 96 %, and 93 % with the fill below (docs/throughput.md).
MIN_CONFIDENCE = 0.7
MIN_CONFIDENT = 2
# A draft is then cut or extended (with the next most frequent tokens, past the confidence cut) to 3,
# 5 or 7 tokens: verify steps of 4, 6 or 8 positions. llama.cpp's CPU matrix kernel (llamafile's
# sgemm) multiplies positions in pairs, and a step of an odd count costs more than the even one
# above it. Measured on the demo, × one position (radixpert-bench verify, verify-demo-rows in
# benchmarks/results): 2: 1.86, 3: 2.90, 4: 2.39, 5: 3.45, 6: 2.95, 7: 4.20, 8: 3.11.
DRAFT_LENGTHS = (3, 5, 7)


def index_payload(sequences: Sequence[Sequence[int]], source: str, suffix_tail: int) -> dict[str, Any]:
    """The JSON stored in a bundle: token sequences and how they were made."""
    return {"format": "radixpert-ngram", "version": 1, "source": source, "suffix_tail": suffix_tail,
            "max_order": MAX_ORDER, "min_order": MIN_ORDER, "sequences": [list(map(int, s)) for s in sequences]}


class NgramDrafter:
    """For a context, the continuation the training reports most often gave after its longest
    matching suffix (MAX_ORDER tokens down to MIN_ORDER), token by token.

    A draft is proposed only if its first ``min_confident`` tokens keep the product of their
    shares at or above ``min_confidence``; it then takes the smallest of ``lengths`` that holds
    every confident token (the largest that fits, where the reports run out first). With
    ``lengths=None`` a draft is exactly its confident tokens."""

    def __init__(self, sequences: Sequence[Sequence[int]], max_order: int = MAX_ORDER, min_order: int = MIN_ORDER,
                 min_confidence: float = MIN_CONFIDENCE, min_confident: int = MIN_CONFIDENT,
                 lengths: Sequence[int] | None = DRAFT_LENGTHS):
        self.max_order, self.min_order = max_order, min_order
        self.min_confidence = float(min_confidence)
        self.min_confident = int(min_confident)
        self.lengths = tuple(sorted(lengths)) if lengths is not None else None
        counts: dict[tuple[int, ...], Counter[int]] = {}
        for sequence in sequences:
            tokens = tuple(sequence)
            for end in range(1, len(tokens)):
                for order in range(min_order, max_order + 1):
                    if end - order < 0:
                        break
                    counts.setdefault(tokens[end - order : end], Counter())[tokens[end]] += 1
        # The most frequent next token per context and its share of that context's continuations;
        # ties go to the smaller id, so drafts are deterministic.
        self.table: dict[tuple[int, ...], tuple[int, float]] = {}
        for key, c in counts.items():
            token, count = min(c.items(), key=lambda kv: (-kv[1], kv[0]))
            self.table[key] = (token, count / sum(c.values()))

    @classmethod
    def load(cls, path: str | Path) -> "NgramDrafter":
        """The drafter of a bundle's ``ngram.json``."""
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(payload["sequences"], payload.get("max_order", MAX_ORDER), payload.get("min_order", MIN_ORDER))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"the bundle's n-gram index {Path(path).name} is unreadable ({exc.__class__.__name__}); "
                             "re-export the bundle") from None

    def continuation(self, context: Sequence[int], count: int) -> list[tuple[int, float]]:
        """Up to ``count`` (token, share) pairs: the most frequent continuation of ``context``."""
        window = list(context[-self.max_order:])
        chain: list[tuple[int, float]] = []
        while len(chain) < count:
            found = None
            for order in range(min(self.max_order, len(window)), self.min_order - 1, -1):
                found = self.table.get(tuple(window[-order:]))
                if found is not None:
                    break
            if found is None:
                break
            chain.append(found)
            window = (window + [found[0]])[-self.max_order:]
        return chain

    def propose(self, context: Sequence[int], count: int) -> list[int]:
        """Up to ``count`` draft tokens that follow ``context``."""
        chain = self.continuation(context, count)
        confident, confidence = 0, 1.0
        for _, share in chain:
            confidence *= share
            if confidence < self.min_confidence:
                break
            confident += 1
        if confident < max(self.min_confident, 1):
            return []
        length = confident
        if self.lengths is not None:
            fits = [n for n in self.lengths if n <= len(chain)]
            length = next((n for n in fits if n >= confident), fits[-1] if fits else 0)
        return [token for token, _ in chain[:length]]
