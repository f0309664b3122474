"""Language metrics: agreement with independent implementations, and Spanish tokenization."""

from __future__ import annotations

import math

import pytest
from radixpert.evaluation import metrics as m

# An English test corpus (hypothesis, reference): radiology-style captions of varied overlap.
ENGLISH = [
    ("the heart is enlarged and there is a small left pleural effusion",
     "the heart size is enlarged with a small left pleural effusion"),
    ("no acute cardiopulmonary process", "no acute cardiopulmonary abnormality"),
    ("the lungs are clear without focal consolidation", "lungs are clear no focal consolidation effusion or pneumothorax"),
    ("there is a right upper lobe nodule measuring 10 mm", "a 10 mm nodule is seen in the left upper lobe"),
    ("moderate cardiomegaly with bilateral effusions", "cardiomegaly and small bilateral pleural effusions"),
    ("no pneumothorax is seen", "there is no pneumothorax"),
    ("right lower lobe consolidation concerning for pneumonia", "consolidation in the right lower lobe consistent with pneumonia"),
    ("the cardiomediastinal silhouette is within normal limits", "the cardiomediastinal silhouette is normal"),
    ("small right apical pneumothorax", "there is a small right apical pneumothorax without tension"),
    ("bibasilar atelectasis", "mild bibasilar atelectasis is present and the lungs are otherwise clear"),
    ("the osseous structures are intact", "no acute osseous abnormality"),
    ("there is a left retrocardiac opacity which may represent atelectasis or pneumonia",
     "left retrocardiac opacity likely atelectasis although pneumonia is not excluded"),
    ("the heart is normal in size and the lungs are clear", "heart size is normal and the lungs are clear"),
    ("large left pleural effusion with compressive atelectasis", "large left effusion with adjacent compressive atelectasis"),
    ("stable 8 mm nodule in the right middle lobe", "an 8 mm right middle lobe nodule is unchanged"),
    ("no focal consolidation pleural effusion or pneumothorax", "no focal consolidation pleural effusion or pneumothorax"),
    ("interval removal of the right chest tube", "the right chest tube has been removed with no residual pneumothorax"),
    ("pulmonary vascular congestion and mild interstitial edema", "mild pulmonary edema with vascular congestion"),
    ("endotracheal tube terminates 4 cm above the carina", "the endotracheal tube tip is 4 cm above the carina"),
    ("hyperinflated lungs consistent with copd", "the lungs are hyperinflated compatible with emphysema"),
]


def _coco_inputs(pairs):
    """pycocoevalcap's scorers take {id: [text]} with tokens joined by single spaces."""
    res = {i: [" ".join(m.tokenize(h))] for i, (h, _) in enumerate(pairs)}
    gts = {i: [" ".join(m.tokenize(r))] for i, (_, r) in enumerate(pairs)}
    return gts, res


def test_bleu_matches_pycocoevalcap():
    """Ours is sacrebleu fed our tokens; pycocoevalcap's scorer is written independently."""
    from pycocoevalcap.bleu.bleu import Bleu

    hyps = [m.tokenize(h) for h, _ in ENGLISH]
    refs = [m.tokenize(r) for _, r in ENGLISH]
    ours = m.corpus_bleu(hyps, refs)
    gts, res = _coco_inputs(ENGLISH)
    coco, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert ours == pytest.approx(coco, abs=1e-6)
    assert 0.05 < ours[3] < ours[0] < 1
    # "bibasilar atelectasis" has no 3-gram: nltk's corpus_bleu would still count one in the
    # denominator (0.3684 instead of 0.3697 here), which is why it is not used
    assert any(len(h) < 3 for h in hyps)


def test_rouge_l_matches_pycocoevalcap():
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _coco_inputs(ENGLISH)
    coco, coco_each = Rouge().compute_score(gts, res)
    ours = m.rouge_l([h for h, _ in ENGLISH], [r for _, r in ENGLISH])
    assert sum(ours) / len(ours) == pytest.approx(coco, abs=1e-6)
    assert ours == pytest.approx(list(coco_each), abs=1e-6)


@pytest.mark.parametrize("multi", [False, True])
def test_cider_d_matches_pycocoevalcap(multi):
    from pycocoevalcap.cider.cider import Cider

    gts, res = _coco_inputs(ENGLISH)
    refs = [[m.tokenize(r)] for _, r in ENGLISH]
    if multi:  # several references per study, as COCO has
        for i in gts:
            extra = ENGLISH[(i + 1) % len(ENGLISH)][1]
            gts[i].append(" ".join(m.tokenize(extra)))
            refs[i].append(m.tokenize(extra))
    coco, coco_each = Cider().compute_score(gts, res)
    ours = m.cider_d([m.tokenize(h) for h, _ in ENGLISH], refs)
    assert sum(ours) / len(ours) == pytest.approx(coco, abs=1e-6)
    assert ours == pytest.approx(list(coco_each), abs=1e-6)


def test_tokenizer_keeps_accents_and_enye():
    assert m.tokenize("Derrame PLÉURAL, niño.") == ["derrame", "pléural", "niño"]
    assert m.tokenize("derrame pleural") != m.tokenize("derrame pléural")
    assert m.tokenize("niño") != m.tokenize("nino")
    # decomposed (NFD) accents are the same token as composed ones
    assert m.tokenize("ple\u0301ural") == m.tokenize("pléural")
    assert m.tokenize("índice cardiotorácico de 0,55") == ["índice", "cardiotorácico", "de", "0,55"]


@pytest.mark.parametrize("pred,ref", [("derrame pléural", "derrame pleural"), ("el niño", "el nino")])
def test_accents_change_every_token_metric(pred, ref):
    hyp, gold = m.tokenize(pred), m.tokenize(ref)
    assert m.corpus_bleu([hyp], [gold], max_n=1)[0] == pytest.approx(0.5)  # one of two tokens matches
    assert m.rouge_l([pred], [ref])[0] == pytest.approx(0.5)
    assert m.rouge_l([ref], [ref])[0] == pytest.approx(1.0)
    # CIDEr-D needs document frequencies: score inside a small corpus
    corpus_h, corpus_r = [hyp, ["sin", "hallazgos"]], [[gold], [["sin", "hallazgos"]]]
    same = m.cider_d([gold, ["sin", "hallazgos"]], corpus_r)
    assert m.cider_d(corpus_h, corpus_r)[0] < same[0]


def test_rouge_score_default_tokenizer_is_not_used(monkeypatch):
    """rouge-score's default tokenizer maps 'está' and 'est' to the same token: ours must not be it."""
    from rouge_score import rouge_scorer, tokenizers

    default = rouge_scorer.RougeScorer(["rougeL"])
    assert default.score("está", "est")["rougeL"].fmeasure == pytest.approx(1.0)  # the bug we avoid
    assert default.score("niño", "nino")["rougeL"].fmeasure == pytest.approx(0.0)  # 'ni o' vs 'nino'
    assert m.rouge_l(["est"], ["está"]) == [0.0]

    def refuse(self, text):
        raise AssertionError("rouge-score's default tokenizer was used")

    monkeypatch.setattr(tokenizers.DefaultTokenizer, "tokenize", refuse)
    assert m.rouge_l(["derrame pleural derecho"], ["derrame pleural derecho"]) == [pytest.approx(1.0)]


def test_meteor_known_values_and_spanish_stems():
    # 3 of 4 hypothesis tokens match in one chunk: P 3/4, R 1, Fmean = PR / (0.9 P + 0.1 R)
    p, r = 0.75, 1.0
    fmean = p * r / (0.9 * p + 0.1 * r)
    expected = fmean * (1 - 0.5 * (1 / 3) ** 3)
    got = m.meteor([m.tokenize("el derrame pleural derecho")], [m.tokenize("derrame pleural derecho")])[0]
    assert got == pytest.approx(expected, abs=1e-12)
    # stem stage: plural and singular share Snowball stems (derram, pleural); 2 matches, 1 chunk
    stems = m.meteor([m.tokenize("derrames pleurales")], [m.tokenize("derrame pleural")])[0]
    assert stems == pytest.approx(1 - 0.5 * (1 / 2) ** 3)
    # no synonym stage and no paraphrases: unrelated words never match
    assert m.meteor([m.tokenize("efusión")], [m.tokenize("derrame")]) == [0.0]
    assert m.meteor([m.tokenize("niño")], [m.tokenize("nino")]) == [0.0]  # Snowball keeps ñ: niñ vs nin


def test_meteor_needs_no_wordnet(monkeypatch):
    import nltk.corpus

    class Missing:
        def __getattr__(self, name):
            raise AssertionError("WordNet was touched")

    monkeypatch.setattr(nltk.corpus, "wordnet", Missing())
    assert m.meteor([["a", "b"]], [["a", "b"]])[0] > 0.9


def test_score_corpus_on_spanish():
    preds = ["Derrame pleural derecho.", "Sin hallazgos patológicos significativos.", "Cardiomegalia."]
    refs = ["Derrame pleural izquierdo.", "Sin hallazgos patológicos significativos.", "Cardiomegalia."]
    scores = m.score_corpus(preds, refs)
    assert set(scores.corpus) == set(m.METRIC_HELP)
    assert scores.per_study["rouge_l"][1] == pytest.approx(1.0)
    assert 0 < scores.corpus["bleu_1"] < 1
    assert all(math.isfinite(v) for v in scores.corpus.values())
    empty = m.score_corpus([""], ["Derrame pleural."])
    assert empty.corpus["bleu_4"] == 0.0 and empty.corpus["cider_d"] == 0.0


def test_metrics_and_labeler_import_no_torch():
    import subprocess
    import sys

    code = ("import sys; import radixpert.evaluation.metrics, radixpert.checks.labeler, "
            "radixpert.evaluation.clinical, radixpert.evaluation.scoring, radixpert.evaluation.cli; "
            "m = radixpert.evaluation.metrics; m.score_corpus(['derrame pleural'], ['derrame pleural']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
