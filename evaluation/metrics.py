"""Language metrics for Spanish reports: BLEU-1..4, ROUGE-L, METEOR and CIDEr-D.

Every metric sees the same tokens, from :func:`tokenize`: Unicode NFC, lowercased, runs of
letters (accents and ñ kept: "pléural" and "pleural", "niño" and "nino" are different tokens)
or numbers (decimal commas kept: "0,55"); punctuation is dropped.

* **BLEU-1..4**: corpus BLEU (Papineni et al. 2002) from sacrebleu, fed our tokens
  (``tokenize="none"``): clipped n-gram precisions summed over the corpus, uniform weights,
  brevity penalty from the closest reference length, no smoothing. (nltk's ``corpus_bleu`` is
  not used: it counts 1 in the denominator for a hypothesis too short to hold any n-gram.)
* **ROUGE-L**: the longest common subsequence precision P and recall R of each study from
  ``rouge-score`` (given our tokenizer, never its ASCII default, which deletes á é í ó ú ñ),
  combined as F_beta = (1 + b^2) P R / (R + b^2 P) with b = 1.2, as the COCO caption code and the
  report-generation papers do; mean over studies.
* **METEOR**: nltk's METEOR (Banerjee & Lavie 2005 with Lavie & Agarwal 2007's parameters):
  unigram alignment in two stages, exact then Spanish Snowball stems, greedy; no synonyms and
  no paraphrase table. Fmean = P R / (alpha P + (1 - alpha) R), penalty = gamma (chunks /
  matches)^beta, score = Fmean (1 - penalty); alpha 0.9, beta 3, gamma 0.5; mean over studies.
* **CIDEr-D** (Vedantam et al. 2015), written here: TF-IDF vectors of 1..4-grams with document
  frequencies over the references of the scored corpus, hypothesis counts clipped to the
  reference's, a Gaussian length penalty (sigma 6), mean over n, times 10; mean over studies.

This module imports no torch: ``radixpert-eval bundle`` runs in the torch-free runtime install.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

# Numbers first (so "0,55" stays one token), then runs of letters of any script.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+")

METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA = 0.9, 3.0, 0.5
ROUGE_BETA = 1.2
CIDER_SIGMA = 6.0
CIDER_N = 4

METRIC_HELP = {
    "bleu_1": "BLEU-1: corpus unigram precision (clipped) times the brevity penalty.",
    "bleu_2": "BLEU-2: geometric mean of corpus 1..2-gram precisions times the brevity penalty.",
    "bleu_3": "BLEU-3: geometric mean of corpus 1..3-gram precisions times the brevity penalty.",
    "bleu_4": "BLEU-4: geometric mean of corpus 1..4-gram precisions times the brevity penalty.",
    "rouge_l": "ROUGE-L: longest common subsequence F-measure (beta 1.2), mean over studies.",
    "meteor": "METEOR: exact + Spanish-stem unigram alignment, F(alpha 0.9) with a fragmentation penalty.",
    "cider_d": "CIDEr-D: TF-IDF 1..4-gram cosine, clipped, length-penalized (sigma 6), x10.",
}


def tokenize(text: str) -> list[str]:
    """Unicode-aware Spanish tokens: NFC, lowercase, letter runs and numbers; accents and ñ kept."""
    return _TOKEN.findall(unicodedata.normalize("NFC", text or "").lower())


class SpanishTokenizer:
    """The tokenizer object rouge-score expects (anything with ``tokenize(text)``)."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text)


class _NoSynonyms:
    """Stands in for WordNet in nltk's METEOR: no synonym stage, and no corpus download."""

    @staticmethod
    def synsets(word: str) -> list:
        return []


@dataclass
class NlgScores:
    """Corpus scores and the per-study values that average into them."""

    corpus: dict[str, float]
    per_study: dict[str, list[float]]


def corpus_bleu(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """[BLEU-1, ..., BLEU-max_n] over the corpus (one reference per hypothesis), in [0, 1]."""
    from sacrebleu.metrics import BLEU

    if not hyps:
        return [0.0] * max_n
    # Our tokens joined by spaces; sacrebleu's "none" tokenizer splits them back on whitespace.
    system = [" ".join(h) for h in hyps]
    references = [[" ".join(r) for r in refs]]
    return [BLEU(tokenize="none", smooth_method="none", max_ngram_order=n).corpus_score(system, references).score / 100
            for n in range(1, max_n + 1)]


def rouge_l(hyps: Sequence[str], refs: Sequence[str], beta: float = ROUGE_BETA) -> list[float]:
    """Per-study ROUGE-L F_beta from rouge-score's LCS precision and recall, with our tokenizer."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], tokenizer=SpanishTokenizer())
    out = []
    for hyp, ref in zip(hyps, refs):
        score = scorer.score(ref, hyp)["rougeL"]
        p, r = score.precision, score.recall
        out.append((1 + beta**2) * p * r / (r + beta**2 * p) if p > 0 and r > 0 else 0.0)
    return out


def meteor(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[str]], language: str = "spanish") -> list[float]:
    """Per-study METEOR (exact + Snowball stem stages, no synonyms, no paraphrases)."""
    from nltk.stem.snowball import SnowballStemmer
    from nltk.translate.meteor_score import single_meteor_score

    stemmer = SnowballStemmer(language)
    return [
        float(single_meteor_score(list(r), list(h), stemmer=stemmer, wordnet=_NoSynonyms(),
                                  alpha=METEOR_ALPHA, beta=METEOR_BETA, gamma=METEOR_GAMMA))
        for h, r in zip(hyps, refs)
    ]


def _ngram_counts(tokens: Sequence[str], max_n: int) -> Counter:
    counts: Counter = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


def cider_d(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]],
            max_n: int = CIDER_N, sigma: float = CIDER_SIGMA) -> list[float]:
    """Per-study CIDEr-D; ``refs[i]`` lists the reference token lists of study i.

    Document frequency df(g) = number of studies whose references contain n-gram g; weight of g
    in a text = count(g) * (log(#studies) - log(max(1, df(g)))). For each n, the hypothesis
    weights are clipped to the reference's (min) before the dot product, which is divided by
    both (unclipped) norms and multiplied by exp(-(len_h - len_r)^2 / (2 sigma^2)).
    """
    ref_counts = [[_ngram_counts(r, max_n) for r in group] for group in refs]
    df: Counter = Counter()
    for group in ref_counts:
        df.update({g for counts in group for g in counts})
    log_docs = math.log(float(len(refs))) if refs else 0.0

    def vector(counts: Counter) -> tuple[list[dict], list[float]]:
        vec: list[dict] = [{} for _ in range(max_n)]
        norms = [0.0] * max_n
        for gram, tf in counts.items():
            weight = tf * (log_docs - math.log(max(1.0, df[gram])))
            vec[len(gram) - 1][gram] = weight
            norms[len(gram) - 1] += weight * weight
        return vec, [math.sqrt(x) for x in norms]

    scores = []
    for hyp, group, counts_group in zip(hyps, refs, ref_counts):
        hyp_vec, hyp_norm = vector(_ngram_counts(hyp, max_n))
        total = 0.0
        for ref, counts in zip(group, counts_group):
            ref_vec, ref_norm = vector(counts)
            penalty = math.exp(-((len(hyp) - len(ref)) ** 2) / (2 * sigma**2))
            per_n = 0.0
            for n in range(max_n):
                dot = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in hyp_vec[n].items())
                if hyp_norm[n] > 0 and ref_norm[n] > 0:
                    per_n += dot / (hyp_norm[n] * ref_norm[n]) * penalty
            total += per_n / max_n
        scores.append(10.0 * total / max(1, len(group)))
    return scores


def score_corpus(predictions: Sequence[str], references: Sequence[str]) -> NlgScores:
    """All language metrics for paired prediction and reference texts."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references must pair up")
    hyps = [tokenize(p) for p in predictions]
    refs = [tokenize(r) for r in references]
    bleus = corpus_bleu(hyps, refs)
    per_study = {
        "rouge_l": rouge_l(predictions, references),
        "meteor": meteor(hyps, refs),
        "cider_d": cider_d(hyps, [[r] for r in refs]),
    }
    corpus = {f"bleu_{n}": b for n, b in enumerate(bleus, start=1)}
    corpus.update({name: (sum(v) / len(v) if v else 0.0) for name, v in per_study.items()})
    return NlgScores(corpus=corpus, per_study=per_study)
