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
# A draft stops once the product of its tokens' shares (how often the training reports continued
# that way after that context) falls below this. Verifying a drafted position costs about as much as
# decoding it on a CPU (the 262k-token output layer dominates a 270M model), so uncertain drafts
# lose time: on the demo, 0.7 keeps 96 % of drafts accepted, against 62 % without a cut
# (docs/throughput.md).
MIN_CONFIDENCE = 0.7


def index_payload(sequences: Sequence[Sequence[int]], source: str, suffix_tail: int) -> dict[str, Any]:
    """The JSON stored in a bundle: token sequences and how they were made."""
    return {"format": "radixpert-ngram", "version": 1, "source": source, "suffix_tail": suffix_tail,
            "max_order": MAX_ORDER, "min_order": MIN_ORDER, "sequences": [list(map(int, s)) for s in sequences]}


class NgramDrafter:
    """For a context, the continuation the training reports most often gave after its longest
    matching suffix (MAX_ORDER tokens down to MIN_ORDER), token by token, for as long as the
    product of those continuations' shares stays at or above ``min_confidence``."""

    def __init__(self, sequences: Sequence[Sequence[int]], max_order: int = MAX_ORDER, min_order: int = MIN_ORDER,
                 min_confidence: float = MIN_CONFIDENCE):
        self.max_order, self.min_order = max_order, min_order
        self.min_confidence = float(min_confidence)
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
    def load(cls, path: str | Path, min_confidence: float = MIN_CONFIDENCE) -> "NgramDrafter":
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(payload["sequences"], payload.get("max_order", MAX_ORDER), payload.get("min_order", MIN_ORDER),
                       min_confidence)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"the bundle's n-gram index {Path(path).name} is unreadable ({exc.__class__.__name__}); "
                             "re-export the bundle") from None

    def propose(self, context: Sequence[int], count: int) -> list[int]:
        """Up to ``count`` draft tokens that follow ``context``."""
        window = list(context[-self.max_order:])
        draft: list[int] = []
        confidence = 1.0
        while len(draft) < count:
            found = None
            for order in range(min(self.max_order, len(window)), self.min_order - 1, -1):
                found = self.table.get(tuple(window[-order:]))
                if found is not None:
                    break
            if found is None:
                break
            token, share = found
            confidence *= share
            if confidence < self.min_confidence:
                break
            draft.append(token)
            window = (window + [token])[-self.max_order:]
        return draft
