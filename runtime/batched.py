"""Continuous batching and exact speculative decoding on one llama.cpp context (torch-free).

Decode is memory-bound: every step reads every weight, whether it advances one sequence or
eight. So one context holds ``n_seq`` sequences (``LlamaRunner(n_seq=B)``), and:

* the instruction prefix is decoded once, into a stream of its own, and copied into each new
  sequence (``llama_memory_seq_cp``), never recomputed;
* the visual embeddings of all scans waiting for a slot are decoded together, then their
  prompt suffixes together;
* each step advances every live sequence in one ``llama_decode``; a finished sequence frees its
  slot and the next scan enters (``fill``);
* with a drafter (``radixpert.runtime.ngram``), each sequence feeds its pending token plus up to
  ``draft_tokens`` drafted ones in the same step, and keeps the drafts the model's own argmax
  agrees with, then the model's next token; the rejected drafts' cache entries are dropped
  (``llama_memory_seq_rm``). Every kept token is the model's greedy choice given the kept
  tokens before it, so the text is plain greedy decoding's. Logits computed for several
  positions in one batch can round differently from one at a time; that is the only source of
  difference, and it is measured (``radixpert-bench throughput``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from radixpert.runtime.llm import GenerationResult, LlamaRunner
from radixpert.runtime.ngram import NgramDrafter


@dataclass
class _Live:
    """One sequence being decoded."""

    key: Hashable
    seq: int
    pos: int  # where the pending token goes
    pending: int  # decided, not yet in the cache
    tokens: list[int]
    visual_s: float
    first_token_s: float
    started: float
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    decode_s: float = 0.0
    stopped: str | None = None
    prefix_cached: bool = True
    prefix_s: float = 0.0


class BatchDecoder:
    """Greedy decoding of many scans, ``runner.n_seq`` at a time."""

    def __init__(self, runner: LlamaRunner, prefix_ids: Sequence[int], suffix_ids: Sequence[int], max_new_tokens: int,
                 stop_ids: Sequence[int] = (), drafter: NgramDrafter | None = None, draft_tokens: int = 8,
                 ignore_eos: bool = False):
        if runner.template_seq is None:
            raise ValueError("BatchDecoder needs a LlamaRunner made with n_seq=B (batched mode)")
        self.runner = runner
        self.prefix, self.suffix = list(prefix_ids), list(suffix_ids)
        self.max_new_tokens = int(max_new_tokens)
        self.stops = set(stop_ids)
        self.ignore_eos = ignore_eos  # decode exactly max_new_tokens (benchmarks compare fixed work)
        self.drafter = drafter
        self.draft_tokens = int(draft_tokens) if drafter is not None else 0
        self.live: dict[int, _Live] = {}
        self.free = list(range(runner.n_seq))
        self.prefix_s = 0.0
        self._prefix_ready = False
        self._suffix_tail = self.suffix[-(drafter.max_order if drafter else 1):]

    # --- the shared prefix ----------------------------------------------------------------
    def _prepare_prefix(self) -> None:
        """Decode the prefix once into the template stream (the first call only)."""
        if self._prefix_ready:
            return
        started = time.perf_counter()
        template = self.runner.template_seq
        self.runner.seq_rm(template, 0, -1)
        for first in range(0, len(self.prefix), self.runner.n_batch):
            chunk = self.prefix[first : first + self.runner.n_batch]
            self.runner.decode_tokens([(template, first + i, t, False) for i, t in enumerate(chunk)])
        self.prefix_s = time.perf_counter() - started
        self._prefix_ready = True

    # --- admission ------------------------------------------------------------------------
    def admit(self, items: Sequence[tuple[Hashable, np.ndarray]]) -> list[tuple[Hashable, GenerationResult]]:
        """Start decoding ``items`` (key, visual tokens (N_p, D)) in free slots; returns any that
        finished at once (a first token that stops, or a one-token limit)."""
        if len(items) > len(self.free):
            raise ValueError(f"{len(items)} scans for {len(self.free)} free slots")
        if not items:
            return []
        fresh = not self._prefix_ready  # these scans wait for the prefix to be decoded
        self._prepare_prefix()
        runner, n_prefix = self.runner, len(self.prefix)
        started = time.perf_counter()
        slots = [self.free.pop(0) for _ in items]
        for slot in slots:
            runner.seq_rm(slot, 0, -1)
            # Across KV streams llama.cpp copies whole streams only; the template holds just the prefix.
            runner.seq_cp(runner.template_seq, slot, 0, -1)
        runner.decode_embeddings([(slot, n_prefix, visual) for slot, (_, visual) in zip(slots, items)])
        visual_s = time.perf_counter() - started
        started = time.perf_counter()
        n_visual = [np.asarray(visual).shape[0] for _, visual in items]
        rows = [(slot, n_prefix + nv + i, t, i == len(self.suffix) - 1)
                for slot, nv in zip(slots, n_visual) for i, t in enumerate(self.suffix)]
        logits = self._decode(rows)
        first_s = time.perf_counter() - started
        done = []
        for slot, (key, _), nv, row in zip(slots, items, n_visual, logits):
            live = _Live(key, slot, n_prefix + nv + len(self.suffix), -1, [], visual_s, first_s, time.perf_counter(),
                         prefix_cached=not fresh, prefix_s=self.prefix_s if fresh else 0.0)
            self.live[slot] = live
            if self._decide(live, int(np.argmax(row))):
                done.append(self._finish(live))
        return done

    # --- one step -------------------------------------------------------------------------
    def step(self) -> list[tuple[Hashable, GenerationResult]]:
        """Advance every live sequence by one verified step; returns the sequences that finished."""
        started = time.perf_counter()
        plans: list[tuple[_Live, list[int]]] = []
        rows: list[tuple[int, int, int, bool]] = []
        for live in self.live.values():
            room = self.max_new_tokens - len(live.tokens) - 1
            draft = self.drafter.propose(self._suffix_tail + live.tokens, min(self.draft_tokens, room)) \
                if self.drafter is not None and room > 0 else []
            plans.append((live, draft))
            rows += [(live.seq, live.pos + i, t, True) for i, t in enumerate([live.pending, *draft])]
        logits = self._decode(rows)
        elapsed = time.perf_counter() - started
        done, cursor = [], 0
        for live, draft in plans:
            block = logits[cursor : cursor + len(draft) + 1]
            cursor += len(draft) + 1
            live.steps += 1
            live.drafted += len(draft)
            live.decode_s += elapsed
            kept = 0  # drafts the model agrees with
            finished = False
            for i, row in enumerate(block):
                choice = int(np.argmax(row))
                finished = self._decide(live, choice)
                if finished or i == len(draft) or choice != draft[i]:
                    break
                kept += 1
            live.accepted += kept
            live.pos += kept + 1
            if finished:
                done.append(self._finish(live))
            elif kept < len(draft):
                self.runner.seq_rm(live.seq, live.pos, -1)  # the rejected drafts' cache entries
        return done

    def _decide(self, live: _Live, token: int) -> bool:
        """Take the model's next token; True when the sequence has finished."""
        if not self.ignore_eos and (token in self.stops or self.runner.is_end_of_generation(token)):
            live.stopped = "eog"
            return True
        live.tokens.append(token)
        if len(live.tokens) >= self.max_new_tokens:
            live.stopped = "max_tokens"
            return True
        live.pending = token
        return False

    def _finish(self, live: _Live) -> tuple[Hashable, GenerationResult]:
        del self.live[live.seq]
        self.runner.seq_rm(live.seq, 0, -1)
        self.free.append(live.seq)
        result = GenerationResult(live.tokens, live.stopped or "max_tokens", live.prefix_cached, live.prefix_s, live.visual_s,
                                  live.first_token_s, live.decode_s, live.steps, drafted=live.drafted,
                                  accepted=live.accepted)
        return live.key, result

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """llama_decode in batch-sized pieces; a piece may split one sequence's rows, which is
        fine: its positions continue and attention is causal."""
        out: list[np.ndarray] = []
        for first in range(0, len(rows), self.runner.n_batch):
            out += self.runner.decode_tokens(rows[first : first + self.runner.n_batch])
        return out

    # --- the whole loop -------------------------------------------------------------------
    def run(self, fill: Callable[[int], list[tuple[Hashable, np.ndarray]]]) -> Iterator[tuple[Hashable, GenerationResult]]:
        """Decode until ``fill`` has nothing more: it is asked for up to N new scans whenever N
        slots are free, and returns them as (key, visual tokens); results come as they finish."""
        exhausted = False
        while True:
            if not exhausted and self.free:
                items = fill(len(self.free))
                exhausted = not items
                yield from self.admit(items)
            if not self.live:
                if exhausted:
                    return
                continue
            yield from self.step()
