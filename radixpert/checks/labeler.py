"""A rule-based Spanish chest X-ray labeler: findings with negation, uncertainty, side and zone.

No model and no download: regular expressions over text that is lowercased and stripped of
accents, so one set of rules reads natural Spanish ("Derrame pleural derecho.") and PadChest's
stemmed, accent-stripped ``Report`` style ("derram pleural derech ."). Word patterns are
prefixes of Spanish stems (``derram``, ``izquierd``, ``cardiomegal``), which both styles share.

Per sentence (split at ``.``, ``;``, ``?``, ``!`` and line breaks, not at decimal points):

1. **Mentions.** Specific terms name a PadChest label (``derrame`` -> pleural effusion,
   ``neumotórax`` -> pneumothorax, ...). Descriptive signs (``opacidad``, ``aumento de densidad``,
   ``pinzamiento del seno costofrénico``, ``hiperclaridad``) are *explained* by a specific
   finding linked to them in the same sentence ("opacidad ... compatible con derrame pleural"):
   they then add nothing but their location. Unexplained, opacities count as consolidation and a
   blunted angle as costophrenic angle blunting.
2. **Negation and uncertainty.** A cue applies to the mentions after it in its clause (NegEx
   style): until ``,`` ``;`` ``:`` a parenthesis, ``pero``, ``aunque``, ``salvo``, ``excepto``, an
   affirmative verb (``se observa``) or ``y con``; a list "nódulos, masas ni consolidaciones" stays
   in scope. The nearest cue wins. Negation: ``sin``, ``no``, ``ni``, ``no se observa(n)``,
   ``no hay``, ``ausencia de``, ``se descarta``, ``libre de``, ``resolución de``. Uncertainty:
   ``posible``, ``probable``, ``compatible con``, ``sugestivo de``, ``sospecha``, ``dudoso``,
   ``descartar`` / ``a descartar``, ``no se (puede) descarta(r)``.
3. **Location.** Each side word (``derecho``, ``izquierda``, ``bilateral``, ``ambos``,
   ``LSD`` ...) and zone word (``superior``, ``campo medio``, ``base``, ...; ``lóbulo medio`` and
   ``língula`` also give the side)
   belongs to the nearest mention before it in the sentence, else to the first after it; it is
   kept where the label has a side (lung and pleura findings) or a zone (parenchymal findings).
   Right and left together make bilateral.

Per report, a label is positive if any mention is, else uncertain if any mention is, else
negative; its side comes from the mentions of that status. ``normal`` is positive when no
finding of the vocabulary is positive or uncertain.

This module imports no torch.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

POSITIVE, UNCERTAIN, NEGATIVE = "positive", "uncertain", "negative"
SIDES = ("right", "left", "bilateral")
ZONES = ("upper", "middle", "lower")

# PadChest label names, in report order for tables.
LABELS = (
    "normal", "cardiomegaly", "pleural effusion", "pneumothorax", "nodule", "mass", "consolidation",
    "atelectasis", "pneumonia", "costophrenic angle blunting",
)
SIDED = {"pleural effusion", "pneumothorax", "nodule", "mass", "consolidation", "atelectasis", "pneumonia",
         "costophrenic angle blunting"}
ZONED = {"nodule", "mass", "consolidation", "atelectasis", "pneumonia"}

_W = r"\w*"  # the rest of a stem: "derram" + "e", "es" or nothing (PadChest style)

# (label, pattern) of specific terms.
_SPECIFIC = [
    ("cardiomegaly", rf"\bcardiomegal{_W}"),
    ("cardiomegaly", rf"\b(?:indic{_W}|ict) cardiotorac{_W} (?:(?!no\b)\w+ ){{0,2}}?(?:aument|elevad|increment){_W}"),
    ("cardiomegaly", rf"\bict (?:(?!no\b)\w+ )?(?:aument|elevad){_W}"),
    ("cardiomegaly", rf"\b(?:aument|increment|agrandamient|crecimient){_W} (?:(?:del?|la|el) )*(?:indic{_W} cardiotorac|ict|silueta cardi|tamano cardi){_W}"),
    ("cardiomegaly", rf"\bsilueta cardi{_W} (?:(?:esta|se encuentra|discretamente|levemente|ligeramente) )*(?:aument|agrand){_W}"),
    ("pleural effusion", rf"\bderram{_W}\b(?! pericard)"),
    ("pleural effusion", rf"\bhidrotorax{_W}"),
    ("pleural effusion", rf"\bliquido pleural{_W}"),
    ("pneumothorax", rf"\b(?:hidro)?neumotorax{_W}"),
    ("nodule", rf"\b(?:micro)?nodul{_W}"),
    ("mass", r"\bmasas?\b"),
    ("consolidation", rf"\bconsolid{_W}"),
    ("consolidation", rf"\bcondens{_W}"),
    ("consolidation", rf"\b(?:patron|opacidad{_W}|infiltrad{_W}|ocupacion) alveolar{_W}"),
    ("atelectasis", rf"\batelecta{_W}"),
    ("pneumonia", r"\bneumoni(?:a|as)?\b"),
]
# (label when unexplained or None, labels that explain it, pattern) of descriptive signs.
_SIGNS = [
    ("consolidation", {"pleural effusion", "consolidation", "pneumonia", "atelectasis", "nodule", "mass"},
     rf"\b(?:opacidad{_W}|aument{_W} de (?:la )?densidad{_W}|densidad{_W} aument{_W}|infiltrad{_W})"),
    ("costophrenic angle blunting", {"pleural effusion"},
     rf"\b(?:pinzamient|borramient|obliteracion|ocupacion){_W} (?:(?:de|del|los|las|ambos|ambas|amb|el|la) )*(?:sen|angul){_W} costofren{_W}"),
    (None, {"pneumothorax"}, rf"\b(?:hiperclaridad{_W}|linea pleural{_W})"),
]
# Words between a sign and a finding that say the finding explains the sign.
_LINK = re.compile(r"\b(?:compatibl|relacion|sugestiv|sugier|sugerent|secundari|debid|correspond|atribuibl|por|que|con)\w*")

_UNCERTAIN = [
    r"\bno (?:se )?(?:puede|pued\w*|es posible|podemos) (?:descart|exclu)\w*",
    r"\bno se (?:descart|exclu)\w*",
    r"\b(?:a |para )?descartar\b", r"\ba descart\w*", r"\bdescart\b",
    r"\bposibl\w*", r"\bprobabl\w*", r"\bcompatibl\w*(?: con)?", r"\bsugestiv\w*(?: de)?", r"\bsugier\w*",
    r"\bsugerent\w*(?: de)?", r"\bsospech\w*(?: de)?", r"\bdudos\w*", r"\bimpresion\w* de\b", r"\bpodria\w*",
    r"\bno (?:se )?(?:puede|pued\w*) exclu\w*", r"\bvalorar\b",
]
_NEGATION = [
    r"\bsin\b(?! embargo)", r"\bno\b", r"\bni\b", r"\bausenci\w*(?: de)?", r"\bse descart\w*", r"\bdescartad\w*",
    r"\blibres? de\b", r"\bnegativ\w* para\b", r"\bresolucion\w*(?: de(?:l)?)?", r"\bno se \w+",
]
# Where a cue's scope ends.
_TERMINATOR = re.compile(
    r"[;:()]|\b(?:pero|aunque|salvo|excepto|sin embargo|mientras|y con|y hay|y existe\w*)\b"
    r"|(?<!no )(?<!ni )\bse (?:observ|apreci|identific|visualiz|objetiv|evidenci|ve\b)\w*"
    r"|(?<!no )(?<!ni )\b(?:presenta|muestra|persiste|existe)\w*"
)
_SENTENCE = re.compile(r"\.(?!\d)|[;!?\n]")

# Locations: (side or None, zone or None, pattern).
_LOCATIONS = [
    ("right", None, r"\bderech\w*|\bdch[oa]s?\b|\bdcho?s?\b"),
    ("left", None, r"\bizquierd\w*|\biz(?:q|qd|d)[oa]?s?\b"),
    ("bilateral", None, r"\bbilateral\w*|\bamb(?:os|as)?\b|\bbilat\b"),
    ("bilateral", "lower", r"\bbibasal\w*"),
    ("right", "upper", r"\blsd\b"), ("left", "upper", r"\blsi\b"), ("right", "lower", r"\blid\b"),
    ("left", "lower", r"\blii\b"), ("right", "middle", r"\blm\b"), ("left", "middle", r"\blingul\w*"),
    ("right", "middle", r"\blob\w* medi\w*"),  # only the right lung has a middle lobe
    (None, "upper", r"\bsuperior\w*|\bvertic\w*|\bapic\w*|\bapex\b"),
    (None, "middle", r"\b(?:campo|tercio|region|zona)\w* medi\w*"),
    (None, "lower", r"\binferior\w*|\bbases?\b|\bbas\b|\bbasal\w*"),
]


def normalize(text: str) -> str:
    """Lowercase, accents stripped (ñ -> n), spaces collapsed: the form the rules read."""
    decomposed = unicodedata.normalize("NFKD", (text or "").lower())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", plain)


@dataclass(frozen=True)
class Mention:
    """One finding mentioned in one sentence."""

    label: str
    status: str
    side: str | None
    zones: tuple[str, ...]
    sentence: int
    text: str


@dataclass(frozen=True)
class Finding:
    """A label for a whole report."""

    label: str
    status: str
    side: str | None = None
    zones: tuple[str, ...] = ()

    @property
    def present(self) -> bool:
        return self.status in (POSITIVE, UNCERTAIN)


@dataclass
class _Span:
    start: int
    end: int
    label: str | None
    specific: bool
    explained_by: frozenset = field(default_factory=frozenset)
    sides: set = field(default_factory=set)
    zones: set = field(default_factory=set)
    status: str = POSITIVE
    absorbed: bool = False


def _compile(patterns):
    return [re.compile(p) for p in patterns]


_SPECIFIC_RE = [(label, re.compile(p)) for label, p in _SPECIFIC]
_SIGNS_RE = [(label, frozenset(by), re.compile(p)) for label, by, p in _SIGNS]
_UNCERTAIN_RE = _compile(_UNCERTAIN)
_NEGATION_RE = _compile(_NEGATION)
_LOCATIONS_RE = [(side, zone, re.compile(p)) for side, zone, p in _LOCATIONS]


def _mentions(sentence: str) -> list[_Span]:
    """Non-overlapping mentions, specific terms winning over signs, longer over shorter."""
    found = [_Span(m.start(), m.end(), label, True) for label, rx in _SPECIFIC_RE for m in rx.finditer(sentence)]
    found += [_Span(m.start(), m.end(), label, False, by) for label, by, rx in _SIGNS_RE for m in rx.finditer(sentence)]
    found.sort(key=lambda s: (s.start, not s.specific, -(s.end - s.start)))
    kept: list[_Span] = []
    for span in found:
        if all(span.end <= k.start or span.start >= k.end for k in kept):
            kept.append(span)
    return sorted(kept, key=lambda s: s.start)


def _cues(sentence: str) -> list[tuple[int, int, str]]:
    """(start, end, status) of cues; a negation inside an uncertainty cue ("no se puede descartar") is dropped."""
    found = [(m.start(), m.end(), UNCERTAIN) for rx in _UNCERTAIN_RE for m in rx.finditer(sentence)]
    found += [(m.start(), m.end(), NEGATIVE) for rx in _NEGATION_RE for m in rx.finditer(sentence)]
    # uncertainty first, then the longest: "no se puede descartar" beats "no"
    found.sort(key=lambda c: (c[2] != UNCERTAIN, c[0] - c[1]))
    cues: list[tuple[int, int, str]] = []
    for cue in found:
        if all(cue[1] <= s or cue[0] >= e for s, e, _ in cues):
            cues.append(cue)
    return sorted(cues)


def _in_scope(sentence: str, cue_end: int, start: int, mentions: list[_Span]) -> bool:
    """Whether nothing between a cue and a mention ends the cue's scope."""
    between = sentence[cue_end:start]
    if _TERMINATOR.search(sentence, cue_end, start):  # on the sentence: lookbehinds see the cue
        return False
    if "," not in between:
        return True
    # A comma ends the scope unless it separates list items that close with "ni"/"o"/"y"
    # ("no se observan nódulos, masas ni consolidaciones").
    tail = sentence[start:]
    closes_list = re.search(r"\b(?:ni|o|y)\b", tail) is not None
    pieces = between.split(",")[1:]
    items_only = all(not p.strip() or any(m.start >= cue_end and sentence[m.start:m.end] in p for m in mentions)
                     or len(p.split()) <= 1 for p in pieces)
    return closes_list and items_only


def _status(sentence: str, span: _Span, cues, mentions) -> str:
    before = [c for c in cues if c[1] <= span.start]
    for start, end, status in reversed(before):
        if _in_scope(sentence, end, span.start, mentions):
            return status
    return POSITIVE


def _explained(sentence: str, sign: _Span, specifics: list[_Span]) -> bool:
    """Whether a specific finding linked to this sign (by a link word, or next to it) explains it."""
    for other in specifics:
        if other.label not in sign.explained_by:
            continue
        lo, hi = (sign.end, other.start) if other.start >= sign.end else (other.end, sign.start)
        between = sentence[lo:hi]
        if _LINK.search(between) or len(between.split()) <= 1:
            return True
    return False


def label_sentence(sentence: str, index: int = 0) -> list[Mention]:
    """Mentions of one normalized sentence."""
    spans = _mentions(sentence)
    specifics = [s for s in spans if s.specific]
    for span in spans:
        if not span.specific:
            span.absorbed = span.label is None or _explained(sentence, span, specifics)
    anchors = [s for s in spans if not s.absorbed]
    if not anchors:
        return []
    cues = _cues(sentence)
    for span in anchors:
        span.status = _status(sentence, span, cues, anchors)
    for side, zone, rx in _LOCATIONS_RE:
        for m in rx.finditer(sentence):
            before = [a for a in anchors if a.start <= m.start()]  # a mention's own words count too
            owner = before[-1] if before else anchors[0]
            if side and owner.label in SIDED:
                owner.sides.add(side)
            if zone and owner.label in ZONED:
                owner.zones.add(zone)
    return [Mention(a.label, a.status, _side(a.sides), tuple(z for z in ZONES if z in a.zones), index,
                    sentence[a.start:a.end]) for a in anchors]


def _side(sides: set) -> str | None:
    if "bilateral" in sides or {"right", "left"} <= sides:
        return "bilateral"
    return next(iter(sides)) if sides else None


def sentences(text: str) -> list[str]:
    """The report's sentences as written (split before normalizing, so line breaks count)."""
    return [s.strip() for s in _SENTENCE.split(text or "") if s.strip()]


def mentions(text: str) -> list[Mention]:
    """Every finding mention of a report, sentence by sentence (``Mention.sentence`` indexes :func:`sentences`)."""
    out: list[Mention] = []
    for index, sentence in enumerate(sentences(text)):
        normalized = normalize(sentence).strip()
        if normalized:
            out += label_sentence(normalized, index)
    return out


def label_report(text: str) -> dict[str, Finding]:
    """Findings of a report by label: status, side and zones; ``normal`` when nothing is found."""
    by_label: dict[str, list[Mention]] = {}
    for mention in mentions(text):
        by_label.setdefault(mention.label, []).append(mention)
    out: dict[str, Finding] = {}
    for label, group in by_label.items():
        status = next(s for s in (POSITIVE, UNCERTAIN, NEGATIVE) if any(m.status == s for m in group))
        chosen = [m for m in group if m.status == status]
        sides = {m.side for m in chosen if m.side}
        zones = {z for m in chosen for z in m.zones}
        out[label] = Finding(label, status, _side(sides), tuple(z for z in ZONES if z in zones))
    if not any(f.present for f in out.values()):
        out["normal"] = Finding("normal", POSITIVE)
    return out


def present(findings: dict[str, Finding], uncertain_as_positive: bool = True) -> dict[str, Finding]:
    """The findings a report asserts (uncertain ones too, unless told otherwise)."""
    keep = (POSITIVE, UNCERTAIN) if uncertain_as_positive else (POSITIVE,)
    return {label: f for label, f in findings.items() if f.status in keep}


def padchest_lists(text: str) -> tuple[list[str], list[str]]:
    """PadChest-style ``Labels`` and ``Localizations`` lists for a report."""
    found = present(label_report(text))
    labels = [label for label in LABELS if label in found]
    locations: list[str] = []
    for label in labels:
        f = found[label]
        for loc in ([f"loc {f.side}"] if f.side else []) + [f"loc {z} lobe" for z in f.zones]:
            if loc not in locations:
                locations.append(loc)
    return labels, locations
