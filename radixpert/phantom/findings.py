"""Random streams and findings of the phantoms: what each study shows, with PadChest labels.

Every draw comes from a stream keyed by ``(seed, index, tag)``, so a study is a pure function
of its seed and index whatever the number of worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

_SIDES = ("right", "left")
_ZONES = ("upper", "middle", "lower")

# Stream tags keep the random streams independent: overriding the findings of a sample
# must not change its anatomy, noise or lesion geometry.
_TAG_PATIENT, _TAG_STUDY, _TAG_FINDINGS, _TAG_PARAMS, _TAG_NOISE, _TAG_REPORT, _TAG_META = range(7)


@dataclass(frozen=True)
class Finding:
    """One radiological finding; ``side`` and ``zone`` are None where they do not apply."""

    label: str  # PadChest label name
    side: str | None = None  # "right" | "left" | "bilateral" | None (patient side)
    zone: str | None = None  # "upper" | "middle" | "lower" | None



def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def _patient_of(index: int) -> tuple[int, int]:
    """(patient number, study number): every fifth sample is a follow-up of the previous patient."""
    block, pos = divmod(index, 5)
    return 4 * block + min(pos, 3), int(pos == 4)


def _sample_findings(rng: np.random.Generator) -> list[Finding]:
    """Draw findings with rough clinical prevalence and co-occurrence (about 35 % normal)."""
    if rng.random() < 0.35:
        return []
    while True:
        cardio = rng.random() < 0.32
        cons = rng.random() < 0.30
        nod = rng.random() < 0.22
        ptx = rng.random() < (0.04 if cardio else 0.13)
        # Effusion follows heart failure (cardiomegaly) and pneumonia (consolidation).
        eff = rng.random() < 0.10 + 0.35 * cardio + 0.30 * cons
        if cardio or cons or nod or ptx or eff:
            break
    out: list[Finding] = []
    cons_side = str(rng.choice(_SIDES, p=[0.55, 0.45]))
    cons_zone = str(rng.choice(_ZONES, p=[0.25, 0.25, 0.5]))
    if cardio:
        out.append(Finding("cardiomegaly"))
    eff_side = None
    if eff:
        if cardio:
            eff_side = str(rng.choice(("bilateral", "right", "left"), p=[0.5, 0.3, 0.2]))
        elif cons:
            other = "left" if cons_side == "right" else "right"
            eff_side = str(rng.choice((cons_side, "bilateral", other), p=[0.75, 0.15, 0.10]))
        else:
            eff_side = str(rng.choice(("right", "left", "bilateral"), p=[0.45, 0.35, 0.2]))
        out.append(Finding("pleural effusion", eff_side))
    ptx_side = str(rng.choice(_SIDES))
    # A pneumothorax beside fluid would be a hydropneumothorax: not modelled.
    if ptx and eff_side in (ptx_side, "bilateral"):
        ptx = False
    if ptx:
        out.append(Finding("pneumothorax", ptx_side))
    # lesions go to the lung that has not collapsed
    if ptx and cons_side == ptx_side:
        cons_side = "left" if ptx_side == "right" else "right"
    nod_side = str(rng.choice(_SIDES))
    nod_zone = str(rng.choice(_ZONES, p=[0.45, 0.3, 0.25]))
    if nod:
        if ptx and nod_side == ptx_side:
            nod_side = "left" if ptx_side == "right" else "right"
        if cons and nod_side == cons_side and nod_zone == cons_zone:
            nod_zone = _ZONES[(_ZONES.index(nod_zone) + 1) % 3]
        out.append(Finding("nodule", nod_side, nod_zone))
    if cons:
        out.append(Finding("consolidation", cons_side, cons_zone))
    return out


def _labels_and_localizations(findings: Sequence[Finding]) -> tuple[list[str], list[str]]:
    """PadChest-style label and localization lists."""
    if not findings:
        return ["normal"], []
    labels: list[str] = []
    locs: list[str] = []
    for f in findings:
        if f.label not in labels:
            labels.append(f.label)
        for loc in (f"loc {f.side}" if f.side else None, f"loc {f.zone} lobe" if f.zone else None):
            if loc and loc not in locs:
                locs.append(loc)
    return labels, locs


@dataclass(frozen=True)
class _Params:
    """Lesion geometry, drawn for every finding type so that it never depends on which exist."""

    ctr_big: float
    eff_h: dict
    eff_rise: float
    ptx_depth: float
    nod_r: float
    nod_u: float
    cons_u: float
    cons_size: float
    cons_blobs: np.ndarray


def _draw_params(rng: np.random.Generator) -> _Params:
    return _Params(
        ctr_big=float(rng.uniform(0.55, 0.61)),
        eff_h={"right": float(rng.uniform(0.28, 0.48)), "left": float(rng.uniform(0.28, 0.48))},
        eff_rise=float(rng.uniform(0.12, 0.22)),
        ptx_depth=float(rng.uniform(0.30, 0.48)),
        nod_r=float(rng.uniform(0.016, 0.027)),
        nod_u=float(rng.random()),
        cons_u=float(rng.random()),
        cons_size=float(rng.uniform(0.035, 0.055)),
        cons_blobs=rng.normal(size=(10, 3)),
    )



def sample_findings(seed: int, index: int) -> list[Finding]:
    """The findings study ``index`` of dataset ``seed`` is drawn with (as ``generate_sample`` draws them)."""
    return _sample_findings(_rng(seed, index, _TAG_FINDINGS))


def labels_and_localizations(findings: Sequence[Finding]) -> tuple[list[str], list[str]]:
    """PadChest ``Labels`` and ``Localizations`` lists of some findings (``["normal"]`` when none)."""
    return _labels_and_localizations(findings)
