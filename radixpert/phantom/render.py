"""Synthetic PA chest radiograph phantoms with masks, findings and Spanish reports.

Everything is a pure function of ``(seed, index, size)`` so datasets are reproducible
whatever the number of worker processes. This module must stay free of torch: the
runtime and its tests build phantoms in torch-free processes. It also avoids scipy,
which the base (runtime) install does not ship; blurs are done with numpy and Pillow.

Image convention: column 0 is the patient's RIGHT (radiographs are displayed as if
facing the patient), and pixel values are in MONOCHROME2 sense (dense = bright).

``radixpert-phantom --n N --seed S --out DIR`` writes into DIR:

* ``dicom/<stem>.dcm``: DX For Presentation, 12 bits stored, MONOCHROME1/2, varied rescale
  and window, Explicit VR Little Endian / RLE Lossless / JPEG 2000 Lossless;
* ``images/<ImageDir>/<stem>.png``: 16-bit display twin, i.e. the DICOM after rescale ->
  linear VOI window -> MONOCHROME1 inversion, scaled to 0..65535 (bright = dense);
* ``masks/<stem>.png``: uint8, bit k set where mask ``MASK_NAMES[k]`` holds (see ``read_masks``);
* ``phantoms.csv``: PadChest columns (ImageID, ImageDir, PatientID, StudyID, Report, Labels,
  Localizations, ...) plus DicomPath, MaskPath, PhotometricInterpretation, TransferSyntax,
  WindowCenter, WindowWidth, Seed, Index;
* ``preview.png`` with ``--preview``: captioned contact sheet of the first 16 studies.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import math
import os
import sys
import unicodedata
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import click
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from radixpert.errors import EXIT_INTERNAL, EXIT_USAGE, RadixpertError, UsageError

MASK_NAMES: tuple[str, ...] = ("right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle")
MIN_SIZE = 256
PREVIEW_MAX = 16
# Field of view of a typical 43 cm flat panel; pixel spacing follows from the image size.
_FOV_MM = 430.0
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


@dataclass
class PhantomSample:
    """A generated study: 12-bit MONOCHROME2-sense image, masks, findings and report.

    Lung masks are the anatomical lung fields minus the heart: pleural fluid lies inside
    them, while a pneumothorax shrinks them to the collapsed lung.
    """

    image: np.ndarray  # uint16 (H, W), values 0..4095
    masks: np.ndarray  # bool (5, H, W) in MASK_NAMES order
    findings: list[Finding]
    report: str
    labels: list[str]
    localizations: list[str]
    meta: dict = field(default_factory=dict, repr=False)  # acquisition details for the writers


# --------------------------------------------------------------------------- randomness


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def _patient_of(index: int) -> tuple[int, int]:
    """(patient number, study number): every fifth sample is a follow-up of the previous patient."""
    block, pos = divmod(index, 5)
    return 4 * block + min(pos, 3), int(pos == 4)


# --------------------------------------------------------------------------- acquisition variants

_EVR = "1.2.840.10008.1.2.1"  # Explicit VR Little Endian
_RLE = "1.2.840.10008.1.2.5"  # RLE Lossless
_J2K = "1.2.840.10008.1.2.4.90"  # JPEG 2000 Image Compression (Lossless Only)
# The first 8 entries hold every {MONOCHROME1, MONOCHROME2} x {EVR, RLE, J2K} pair so any
# n >= 8 covers them. Overall RLE is 1 in 6 and J2K (slow to encode) 1 in 12; the rest
# are uncompressed, and about 40 % are MONOCHROME1.
_VARIANT_CYCLE = (
    ("MONOCHROME2", _EVR), ("MONOCHROME1", _RLE), ("MONOCHROME2", _J2K), ("MONOCHROME1", _EVR),
    ("MONOCHROME2", _RLE), ("MONOCHROME1", _J2K), ("MONOCHROME2", _EVR), ("MONOCHROME1", _EVR),
    ("MONOCHROME2", _EVR), ("MONOCHROME1", _EVR), ("MONOCHROME2", _EVR), ("MONOCHROME2", _EVR),
    ("MONOCHROME1", _EVR), ("MONOCHROME2", _RLE), ("MONOCHROME2", _EVR), ("MONOCHROME1", _EVR),
    ("MONOCHROME2", _EVR), ("MONOCHROME2", _EVR), ("MONOCHROME1", _RLE), ("MONOCHROME2", _EVR),
    ("MONOCHROME2", _EVR), ("MONOCHROME1", _EVR), ("MONOCHROME2", _EVR), ("MONOCHROME2", _EVR),
)
# (slope, intercept, top of the phantom's value range): stored values must fit in 12 bits,
# so the offset/halved encodings use a detector with a narrower range.
_RESCALES = ((1.0, 0.0, 4095), (1.0, -1024.0, 3071), (0.5, 0.0, 2047))


@dataclass(frozen=True)
class _Variant:
    photometric: str
    transfer_syntax: str
    slope: float
    intercept: float
    top: int


def _variant(seed: int, index: int) -> _Variant:
    photometric, ts = _VARIANT_CYCLE[index % len(_VARIANT_CYCLE)]
    k = int(_rng(seed, index, _TAG_META).choice(3, p=[0.5, 0.25, 0.25]))
    slope, intercept, top = _RESCALES[k]
    return _Variant(photometric, ts, slope, intercept, top)


# --------------------------------------------------------------------------- findings


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


# --------------------------------------------------------------------------- Spanish report

_M = {"right": "derecho", "left": "izquierdo"}
_F = {"right": "derecha", "left": "izquierda"}


def _zone_phrase(side: str, zone: str, rng: np.random.Generator) -> str:
    m, f = _M[side], _F[side]
    options = {
        "upper": [f"el lóbulo superior {m}", f"el campo pulmonar superior {m}", f"el tercio superior del pulmón {m}"],
        "middle": [f"el campo medio {m}", f"el tercio medio del pulmón {m}",
                   "el lóbulo medio (campo medio derecho)" if side == "right" else "la língula (campo medio izquierdo)"],
        "lower": [f"el lóbulo inferior {m}", f"el campo pulmonar inferior {m}", f"la base pulmonar {f}"],
    }[zone]
    return str(rng.choice(options))


def _num(x: float) -> str:
    return f"{x:.2f}".replace(".", ",")


def _positive_sentence(f: Finding, rng: np.random.Generator, info: dict) -> str:
    if f.label == "cardiomegaly":
        return str(rng.choice([
            "Índice cardiotorácico aumentado.",
            "Cardiomegalia.",
            "Silueta cardíaca aumentada de tamaño, compatible con cardiomegalia.",
            "Aumento del índice cardiotorácico en relación con cardiomegalia.",
            f"Cardiomegalia, con índice cardiotorácico de {_num(info['ctr'])}.",
            "Se aprecia cardiomegalia.",
        ]))
    if f.label == "pleural effusion":
        small = info["eff_small"]
        if f.side == "bilateral":
            return str(rng.choice([
                "Derrame pleural bilateral.",
                "Derrames pleurales bilaterales.",
                "Pinzamiento de ambos senos costofrénicos por derrame pleural bilateral.",
                "Se observa derrame pleural bilateral con menisco en ambas bases.",
                f"Derrame pleural bilateral de {'pequeña' if small else 'moderada'} cuantía.",
            ]))
        m, fe = _M[f.side], _F[f.side]
        return str(rng.choice([
            f"Derrame pleural {m}.",
            f"Derrame pleural {m} de {'pequeña' if small else 'moderada'} cuantía.",
            f"Pinzamiento del seno costofrénico {m} en relación con derrame pleural.",
            f"Se observa derrame pleural {m} con menisco en la base.",
            f"Borramiento del seno costofrénico {m} por derrame pleural.",
            f"Opacidad en la base {fe} con morfología de menisco, compatible con derrame pleural.",
        ]))
    if f.label == "pneumothorax":
        m = _M[f.side]
        return str(rng.choice([
            f"Neumotórax {m}.",
            f"Neumotórax {m} de predominio apical.",
            f"Se identifica la línea pleural visceral separada de la pared costal en el hemitórax {m}, "
            "compatible con neumotórax.",
            f"Neumotórax {m}, con ausencia de trama vascular periférica.",
            f"Se observa neumotórax {m} con colapso pulmonar parcial.",
            f"Hiperclaridad periférica en el hemitórax {m}, con ausencia de trama vascular, en relación con neumotórax.",
        ]))
    if f.label == "nodule":
        z, mm = _zone_phrase(f.side, f.zone, rng), info["nod_mm"]
        return str(rng.choice([
            f"Nódulo pulmonar en {z}.",
            f"Se observa un nódulo de bordes bien definidos en {z}, de unos {mm} mm.",
            f"Imagen nodular de {mm} mm en {z}.",
            f"Nódulo en {z}, a valorar con TC.",
            f"Nódulo de {mm} mm en {z}; se recomienda control evolutivo.",
        ]))
    if f.label == "consolidation":
        z = _zone_phrase(f.side, f.zone, rng)
        return str(rng.choice([
            f"Consolidación en {z}.",
            f"Opacidad alveolar en {z}, compatible con consolidación.",
            f"Condensación parenquimatosa en {z}, con broncograma aéreo.",
            f"Aumento de densidad de aspecto alveolar en {z}, sugestivo de consolidación neumónica.",
            f"Se observa una consolidación en {z}.",
        ]))
    raise ValueError(f"unknown finding label {f.label!r}")


_NEGATIONS = {
    "cardiomegaly": ["Índice cardiotorácico dentro de límites normales.", "Silueta cardíaca de tamaño normal.",
                     "Tamaño cardíaco normal.", "No se observa cardiomegalia.",
                     "Silueta cardiomediastínica dentro de límites normales."],
    "pleural effusion": ["No se observa derrame pleural.", "Sin derrame pleural.", "Senos costofrénicos libres.",
                         "No hay derrame pleural.", "Ángulos costofrénicos libres."],
    "pneumothorax": ["Sin signos de neumotórax.", "Sin evidencia de neumotórax.", "No se observa neumotórax.",
                     "No hay neumotórax."],
    "nodule": ["No se identifican nódulos pulmonares.", "Sin nódulos ni masas pulmonares."],
    "consolidation": ["No hay consolidaciones.", "Sin consolidaciones parenquimatosas.",
                      "No se observan condensaciones.", "Sin condensaciones pulmonares."],
}
_GLOBAL_NORMAL = ["Sin hallazgos patológicos significativos.", "Estudio radiológico de tórax dentro de la normalidad.",
                  "No se observan alteraciones pleuroparenquimatosas agudas.",
                  "Radiografía de tórax sin alteraciones relevantes."]
_NEUTRAL = ["Estructuras óseas sin alteraciones.", "Hilios pulmonares de morfología y tamaño normales.",
            "Mediastino centrado.", "Tráquea centrada."]


def _report(findings: Sequence[Finding], rng: np.random.Generator, info: dict) -> str:
    """Natural Spanish report: one sentence per finding, some negations, shuffled."""
    present = {f.label for f in findings}
    absent = [k for k in _NEGATIONS if k not in present]
    sentences = [_positive_sentence(f, rng, info) for f in findings]
    if not findings:
        sentences.append(str(rng.choice(_GLOBAL_NORMAL)))
        p_neg = 0.55
    else:
        p_neg = 0.45
    negated = [k for k in absent if rng.random() < p_neg]
    if "consolidation" in negated and "pleural effusion" in negated and rng.random() < 0.4:
        negated = [k for k in negated if k not in ("consolidation", "pleural effusion")]
        sentences.append(str(rng.choice(["Sin consolidaciones ni derrame pleural.",
                                         "No se observan condensaciones ni derrame pleural."])))
    sentences += [str(rng.choice(_NEGATIONS[k])) for k in negated]
    if not present & {"consolidation", "pleural effusion", "pneumothorax"} and rng.random() < 0.3:
        sentences.append("Campos pulmonares bien ventilados.")
    if rng.random() < 0.35:
        sentences.append(str(rng.choice(_NEUTRAL)))
    order = rng.permutation(len(sentences))
    return " ".join(sentences[i] for i in order)


def _caption(findings: Sequence[Finding]) -> str:
    if not findings:
        return "normal"
    side = {"right": "D", "left": "I", "bilateral": "bilat"}
    zone = {"upper": "sup", "middle": "med", "lower": "inf"}
    parts = []
    for f in findings:
        name = {"cardiomegaly": "cardiomegalia", "pleural effusion": "derrame", "pneumothorax": "NTX",
                "nodule": "nódulo", "consolidation": "consolid."}[f.label]
        parts.append(" ".join([name] + ([side[f.side]] if f.side else []) + ([zone[f.zone]] if f.zone else [])))
    return ", ".join(parts)


# --------------------------------------------------------------------------- raster helpers


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (sigma in pixels); large sigmas run on a reduced copy, as only shading needs them."""
    a = np.asarray(a, dtype=np.float32)
    if sigma < 0.3:
        return a
    h, w = a.shape
    if sigma > 3.0:
        f = int(sigma // 1.5)
        small = np.asarray(Image.fromarray(a, "F").resize((max(1, w // f), max(1, h // f)), Image.BOX))
        small = _blur(small, sigma / f)
        return np.array(Image.fromarray(small, "F").resize((w, h), Image.BILINEAR))
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    p = np.pad(a, ((r, r), (0, 0)), mode="edge")
    a = sum(k[i] * p[i:i + h] for i in range(2 * r + 1))
    p = np.pad(a, ((0, 0), (r, r)), mode="edge")
    return sum(k[i] * p[:, i:i + w] for i in range(2 * r + 1)).astype(np.float32)


def _poly(points: np.ndarray, n: int) -> np.ndarray:
    """Rasterize a polygon given in normalized image coordinates onto an n x n bool grid."""
    im = Image.new("L", (n, n), 0)
    ImageDraw.Draw(im).polygon([(float(x), float(y)) for x, y in points * n], fill=1)
    return np.asarray(im, dtype=bool)


def _polyline(points: np.ndarray, n: int, width: float) -> np.ndarray:
    """Rasterize a thick polyline (width in normalized units) onto an n x n bool grid."""
    im = Image.new("L", (n, n), 0)
    ImageDraw.Draw(im).line([(float(x), float(y)) for x, y in points * n], fill=1,
                            width=max(1, int(round(width * n))), joint="curve")
    return np.asarray(im, dtype=bool)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _chaikin(points: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Corner cutting for closed polygons: rounds a template into a smooth outline."""
    for _ in range(iterations):
        nxt = np.roll(points, -1, axis=0)
        points = np.stack([0.75 * points + 0.25 * nxt, 0.25 * points + 0.75 * nxt], axis=1).reshape(-1, 2)
    return points


# --------------------------------------------------------------------------- anatomy


@dataclass
class _Anatomy:
    cx: float  # thorax midline (image x)
    W: float  # half-width of the thorax at the costophrenic level
    y_apex: float  # lung apex (image y)
    Hl: float  # apex-to-costophrenic height
    theta: float  # in-plane rotation (radians)
    lat: dict  # lateral lung extent per side, in units of W
    dome: dict  # diaphragm dome top per side, in units of Hl below the apex
    dome_a: dict
    apex_a: float
    med_upper: float
    med_lower: dict
    knob: float
    ctr: float  # normal cardiothoracic ratio of this patient
    heart_right: float  # share of the heart on the patient's right
    heart_drop: float
    neck_w: float
    wall: float
    rib0: float
    rib_sp: float
    clav_dv: float
    clav_w: float
    female: bool
    breast: float
    bubble: bool
    hilum_dv: float
    vessel_seed: int
    sex: str
    birth: _dt.date
    study_date: _dt.date
    # exposure / processing
    lo: float
    hi: float
    gamma: float
    usm: float
    noise: float


def _anatomy(seed: int, index: int) -> _Anatomy:
    patient, study = _patient_of(index)
    p = _rng(seed, patient, _TAG_PATIENT)
    s = _rng(seed, index, _TAG_STUDY)
    female = bool(p.random() < 0.5)
    W = float(p.uniform(0.315, 0.355)) * (0.96 if female else 1.0)
    birth = _dt.date(1930, 1, 1) + _dt.timedelta(days=int(p.integers(0, 365 * 75)))
    first = _dt.date(2014, 1, 1) + _dt.timedelta(days=int(p.integers(0, 365 * 9)))
    study_date = first + _dt.timedelta(days=int(p.integers(20, 400)) * study)
    dome_r = float(p.uniform(0.76, 0.84))
    return _Anatomy(
        cx=0.5 + float(p.normal(0, 0.01)) + float(s.normal(0, 0.008)),
        W=W * float(s.uniform(0.98, 1.02)),
        y_apex=float(p.uniform(0.12, 0.16)) + float(s.normal(0, 0.008)),
        Hl=float(p.uniform(0.60, 0.66)) * float(s.uniform(0.96, 1.03)),  # inspiration depth
        theta=float(np.clip(s.normal(0, 0.018), -0.045, 0.045)),
        lat={"right": float(p.uniform(0.97, 1.02)), "left": float(p.uniform(0.96, 1.01))},
        dome={"right": dome_r, "left": dome_r + float(p.uniform(0.015, 0.05))},
        dome_a={"right": float(p.uniform(0.45, 0.55)), "left": float(p.uniform(0.48, 0.58))},
        apex_a=float(p.uniform(0.38, 0.46)),
        med_upper=float(p.uniform(0.13, 0.16)),
        med_lower={"right": float(p.uniform(0.09, 0.12)), "left": 0.07},
        knob=float(p.uniform(0.05, 0.09)),
        ctr=float(p.uniform(0.39, 0.46)),
        heart_right=float(p.uniform(0.27, 0.33)),
        heart_drop=float(p.uniform(-0.03, 0.03)),
        neck_w=float(p.uniform(0.075, 0.095)),
        wall=float(p.uniform(0.045, 0.075)) * (1.1 if female else 1.0),
        rib0=float(p.uniform(-0.10, -0.06)),
        rib_sp=float(p.uniform(0.088, 0.098)),
        clav_dv=float(p.uniform(-0.03, 0.03)) + float(s.normal(0, 0.01)),
        clav_w=float(p.uniform(0.020, 0.026)),
        female=female,
        breast=float(p.uniform(0.015, 0.035)) if female else 0.0,
        bubble=bool(s.random() < 0.7),
        hilum_dv=float(p.uniform(-0.03, 0.03)),
        vessel_seed=int(p.integers(0, 2**31)),
        sex="F" if female else "M",
        birth=birth,
        study_date=study_date,
        lo=float(s.uniform(0.02, 0.07)),
        hi=float(s.uniform(0.86, 0.97)),
        gamma=float(s.uniform(0.85, 1.15)),
        usm=float(s.uniform(0.3, 0.8)),
        noise=float(s.uniform(0.006, 0.012)),
    )


class _Frame:
    """Maps anatomical coordinates (a: lateral distance from the midline in units of W,
    v: depth below the apex in units of Hl) to normalized image coordinates, rotated."""

    def __init__(self, an: _Anatomy):
        self.an = an
        # python floats keep float32 grids float32 (numpy scalars would promote them)
        self.c, self.s = float(np.cos(an.theta)), float(np.sin(an.theta))

    def pf(self, a: np.ndarray, v: np.ndarray, sgn: float) -> np.ndarray:
        """Patient-frame (unrotated) image coordinates; sgn = -1 is the patient's right (image left)."""
        x = self.an.cx + sgn * np.asarray(a) * self.an.W
        y = self.an.y_apex + np.asarray(v) * self.an.Hl
        return np.stack([x, y], axis=-1)

    def img(self, a: np.ndarray, v: np.ndarray, sgn: float) -> np.ndarray:
        return self.rot(self.pf(a, v, sgn))

    def rot(self, pts: np.ndarray) -> np.ndarray:
        d = pts - (self.an.cx, 0.5)
        return np.stack([self.c * d[..., 0] - self.s * d[..., 1], self.s * d[..., 0] + self.c * d[..., 1]],
                        axis=-1) + (self.an.cx, 0.5)

    def grid(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Unrotated (patient frame) x, y of every pixel centre of an n x n image."""
        t = (np.arange(n, dtype=np.float32) + 0.5) / n
        x, y = np.meshgrid(t - self.an.cx, t - 0.5)
        return self.c * x + self.s * y + self.an.cx, -self.s * x + self.c * y + 0.5


def _lung_av(an: _Anatomy, side: str, flat: bool = False, n: int = 28) -> np.ndarray:
    """Lung outline in (a, v); ``flat`` replaces the dome by the costophrenic level (hemithorax)."""
    L, a0, mu, ml = an.lat[side], an.apex_a, an.med_upper, an.med_lower[side]
    vd = 1.0 if flat else an.dome[side]
    phi = np.linspace(0, np.pi / 2, n)
    seg1 = np.stack([a0 + (L - a0) * np.sin(phi), 0.62 * (1 - np.cos(phi))], 1)  # apex to lateral wall
    v2 = np.linspace(0.62, 1.0, n // 2)[1:]
    seg2 = np.stack([L - 0.03 * ((v2 - 0.62) / 0.38) ** 2, v2], 1)  # lateral wall to costophrenic angle
    a3 = np.linspace(L - 0.03, ml, n)[1:]
    v3 = _dome_v(an, side, a3, vd)  # diaphragm, lateral to medial
    seg3 = np.stack([a3, v3], 1)
    v4 = np.linspace(vd + 0.05, 0.25, n)[1:]
    t = (v4 - 0.25) / (vd + 0.05 - 0.25)
    a4 = mu + (ml - mu) * t + 0.02 * np.sin(np.pi * t)
    if side == "left":
        a4 = a4 + an.knob * np.exp(-(((v4 - 0.31) / 0.07) ** 2))  # aortic knob
    seg4 = np.stack([a4, v4], 1)  # medial border, upwards
    phi = np.linspace(np.pi / 2, 0, n)[1:-1]
    seg5 = np.stack([a0 - (a0 - mu) * np.sin(phi), 0.25 * (1 - np.cos(phi))], 1)  # medial apex cap
    return np.concatenate([seg1, seg2, seg3, seg4, seg5])


def _collapse(av: np.ndarray, depth: float) -> np.ndarray:
    """Pneumothorax: pull the lung edge toward the hilum, most at the apex, none at the base."""
    a, v = av[:, 0], av[:, 1]
    wt = np.clip(1 - v / 0.9, 0, 1)
    wl = np.clip((a - 0.25) / 0.75, 0, 1)
    g = (0.15 + 0.85 * wt) * np.clip(0.3 + 0.7 * wl + 0.5 * wt, 0, 1)
    g *= _smoothstep((a - 0.12) / 0.25) * np.clip((1.0 - v) / 0.3, 0, 1)
    f = (depth * g)[:, None]
    return av + f * (np.array([0.2, 0.45]) - av)


_HEART_TEMPLATE = np.array([  # (s, v): s > 0 is the patient's left; widest span is 0.78
    (-0.05, 0.46), (0.08, 0.45), (0.18, 0.48), (0.26, 0.53), (0.36, 0.60), (0.46, 0.68), (0.52, 0.76),
    (0.54, 0.83), (0.50, 0.89), (0.40, 0.93), (0.20, 0.95), (0.00, 0.94), (-0.12, 0.92), (-0.20, 0.86),
    (-0.24, 0.78), (-0.24, 0.68), (-0.20, 0.58), (-0.12, 0.50),
])


def _heart_img(an: _Anatomy, frame: _Frame, ctr: float, enlarged: bool) -> np.ndarray:
    """Heart outline in image coordinates, scaled so its widest span is ``ctr`` x thorax width."""
    t = _chaikin(_HEART_TEMPLATE, 3)
    thorax = an.lat["right"] + an.lat["left"]
    # an enlarged heart grows to both sides, but mostly toward the patient's left
    right_share = an.heart_right + (0.04 if enlarged else 0.0)
    s = np.where(t[:, 0] < 0, t[:, 0] / -t[:, 0].min() * right_share, t[:, 0] / t[:, 0].max() * (1 - right_share))
    s = s * ctr * thorax
    vt = 0.45 + an.heart_drop - (0.03 if enlarged else 0.0)
    vb = an.dome["left"] + (0.10 if enlarged else 0.07)
    v = vt + (t[:, 1] - 0.45) / 0.5 * (vb - vt)
    x = an.cx + s * an.W
    y = an.y_apex + v * an.Hl
    return frame.rot(np.stack([x, y], 1))


def _clavicle_img(an: _Anatomy, frame: _Frame, side: str) -> np.ndarray:
    av = np.array([(0.06, 0.16), (0.2, 0.135), (0.4, 0.12), (0.6, 0.10), (0.8, 0.07), (0.98, 0.035), (1.12, 0.025)])
    av = av + (0, an.clav_dv)
    return frame.img(av[:, 0], av[:, 1], -1 if side == "right" else 1)


def _body_img(an: _Anatomy, frame: _Frame) -> np.ndarray:
    """Neck, shoulders running off the image edge, axillae, chest wall and upper abdomen."""
    ys = an.y_apex - 0.05
    wall = an.W * 1.02 + an.wall
    half = [(an.neck_w, -0.05), (an.neck_w * 1.05, ys - 0.06), (an.neck_w + 0.04, ys - 0.015), (0.22, ys),
            (0.34, ys + 0.015), (0.45, ys + 0.04), (0.58, ys + 0.08), (0.58, ys + 0.24), (0.53, 0.42),
            (wall + 0.03, 0.52), (wall, 0.62), (wall + 0.01, 0.80), (wall + 0.025, 1.05)]
    right = [(an.cx - dx, y) for dx, y in half]
    left = [(an.cx + dx, y) for dx, y in reversed(half)]
    return frame.rot(_chaikin(np.array(right + left), 2))


def _dome_v(an: _Anatomy, side: str, a: np.ndarray, vd: float | None = None) -> np.ndarray:
    """Diaphragm depth (v) at lateral position a: a dome falling steeply into the costophrenic angle."""
    L, ad, ml = an.lat[side] - 0.03, an.dome_a[side], an.med_lower[side]
    vd = an.dome[side] if vd is None else vd
    return np.where(a > ad, vd + (1 - vd) * ((a - ad) / (L - ad)) ** 2, vd + 0.05 * ((ad - a) / (ad - ml)) ** 2)


def _diaphragm_y(an: _Anatomy, x: np.ndarray) -> np.ndarray:
    """Image y of the diaphragm at patient-frame x (flat lateral to the lungs, bridged under the heart)."""
    xs, ys = [], []
    for side, sgn in (("right", -1), ("left", 1)):
        a = np.linspace(an.lat[side] - 0.03, an.med_lower[side], 24)
        xs.append(an.cx + sgn * a * an.W)
        ys.append(an.y_apex + _dome_v(an, side, a) * an.Hl)
    return np.interp(x, np.concatenate([xs[0], xs[1][::-1]]), np.concatenate([ys[0], ys[1][::-1]]))


def _vessel_segments(an: _Anatomy, frame: _Frame, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Branching pulmonary vessels from the hilum: segments (N, 2, 2) in image coords and widths (N,)."""
    rng = _rng(an.vessel_seed, 0 if side == "right" else 1)
    sgn = -1.0 if side == "right" else 1.0
    hx = an.cx + sgn * (0.24 if side == "right" else 0.26) * an.W
    hy = an.y_apex + (0.42 + an.hilum_dv - (0.03 if side == "left" else 0.0)) * an.Hl
    segs: list[tuple[float, float, float, float]] = []
    widths: list[float] = []

    def grow(x: float, y: float, ang: float, length: float, width: float, depth: int) -> None:
        step = length / 5
        for i, turn in enumerate(rng.normal(0, 0.18, 5)):
            ang += float(turn)
            nx, ny = x + step * sgn * math.cos(ang), y + step * math.sin(ang)
            segs.append((x, y, nx, ny))
            widths.append(width)
            if depth < 3 and i in (1, 3) and rng.random() < 0.8:
                fork = (1.0 if rng.random() < 0.5 else -1.0) * float(rng.uniform(0.35, 0.7))
                grow(nx, ny, ang + fork, length * 0.55, width * 0.65, depth + 1)
            x, y, width = nx, ny, width * 0.9

    for ang in np.linspace(-1.25, 1.35, 7) + rng.normal(0, 0.08, 7):
        grow(hx, hy, float(ang), float(rng.uniform(0.13, 0.21)), float(rng.uniform(0.008, 0.011)), 0)
    return frame.rot(np.array(segs).reshape(-1, 2, 2)), np.array(widths)


# --------------------------------------------------------------------------- rendering


def _render(seed: int, index: int, size: int, findings: Sequence[Finding] | None) -> PhantomSample:
    an = _anatomy(seed, index)
    frame = _Frame(an)
    if findings is None:
        findings = _sample_findings(_rng(seed, index, _TAG_FINDINGS))
    findings = list(findings)
    prm = _draw_params(_rng(seed, index, _TAG_PARAMS))
    by_label = {f.label: f for f in findings}
    enlarged = "cardiomegaly" in by_label
    ctr = prm.ctr_big if enlarged else an.ctr
    eff = by_label.get("pleural effusion")
    eff_sides = [] if eff is None else (list(_SIDES) if eff.side == "bilateral" else [eff.side])
    ptx = by_label.get("pneumothorax")

    m = size // 2 if size >= 512 else size  # working resolution for the smooth anatomy
    X, Y = frame.grid(m)

    # ---- geometry (normalized image coordinates)
    lung_av = {s: _lung_av(an, s) for s in _SIDES}
    lung_full = {s: frame.img(lung_av[s][:, 0], lung_av[s][:, 1], -1 if s == "right" else 1) for s in _SIDES}
    lung_pts = dict(lung_full)
    if ptx is not None:
        col = _collapse(lung_av[ptx.side], prm.ptx_depth)
        lung_pts[ptx.side] = frame.img(col[:, 0], col[:, 1], -1 if ptx.side == "right" else 1)
    heart_pts = _heart_img(an, frame, ctr, enlarged)
    clav_pts = {s: _clavicle_img(an, frame, s) for s in _SIDES}

    # ---- full-resolution masks
    heart_m = _poly(heart_pts, size)
    masks = np.stack([
        _poly(lung_pts["right"], size) & ~heart_m,
        _poly(lung_pts["left"], size) & ~heart_m,
        heart_m,
        _polyline(clav_pts["right"], size, an.clav_w),
        _polyline(clav_pts["left"], size, an.clav_w),
    ])

    # ---- density map at working resolution (higher = denser)
    dx = np.abs(X - an.cx)
    body = _poly(_body_img(an, frame), m).astype(np.float32)
    tissue = _blur(body, 0.03 * m)  # thickness: thin at the skin line, full centrally
    d = 0.03 + _blur(body, 0.8) * (0.14 + 0.30 * tissue)
    # neck and shoulder-girdle muscles above the apices
    d += 0.06 * tissue * _smoothstep((an.y_apex + 0.06 - Y) / 0.10)
    heart = _blur(_poly(heart_pts, m).astype(np.float32), 1.2)
    # liver and spleen under the domes, great vessels in the upper mediastinum
    abdomen = _smoothstep((Y - _diaphragm_y(an, X)) / 0.012) * tissue * _smoothstep((an.W * 1.1 - dx) / 0.12)
    mediastinum = _smoothstep((an.med_upper * an.W * 1.3 - dx) / 0.02) * _smoothstep((Y - an.y_apex + 0.06) / 0.06)
    d += 0.17 * np.maximum(np.maximum(heart, 0.9 * abdomen), 0.6 * mediastinum)

    air = np.zeros((m, m), np.float32)
    vis_lung = {}
    for s in _SIDES:
        lm = _poly(lung_pts[s], m).astype(np.float32)
        soft = _blur(lm, 0.9)
        a_s = soft * (0.55 + 0.45 * _blur(lm, 0.05 * m))  # thinner lung toward its edges
        if ptx is not None and ptx.side == s:
            full = _blur(_poly(lung_full[s], m).astype(np.float32), 0.8)
            rim = np.clip(full - soft, 0, 1)
            a_s = 0.75 * a_s + 1.05 * rim  # the collapsed lung is denser, the pleural space pure air
        vis_lung[s] = soft * (1 - heart)
        air += a_s
    air *= 1 - 0.8 * heart  # retrocardiac lung still holds some air
    lung_any = np.clip(vis_lung["right"] + vis_lung["left"], 0, 1)

    # pleural fluid: fills the hemithorax base up to a meniscus that climbs the lateral wall
    fluid = np.zeros((m, m), np.float32)
    for s in eff_sides:
        sgn = -1 if s == "right" else 1
        hemi_av = _lung_av(an, s, flat=True)
        # slightly wider than the lung so no sliver of air survives along the chest wall
        hemi = np.clip(1.8 * _blur(_poly(frame.img(hemi_av[:, 0], hemi_av[:, 1], sgn), m).astype(np.float32), 1.2), 0, 1)
        lateral = np.clip((sgn * (X - an.cx) / an.W - 0.15) / (an.lat[s] - 0.15), 0, 1) ** 2.5
        y_men = an.y_apex + an.Hl * (1.0 - prm.eff_h[s] - prm.eff_rise * lateral)
        below = (Y - y_men) / an.Hl
        fluid = np.maximum(fluid, hemi * _smoothstep(below / 0.07) * (0.85 + 0.15 * _smoothstep(below / 0.3)))
    air *= 1 - fluid
    d -= 0.31 * air
    d += 0.03 * fluid * (1 - abdomen)

    # ---- focal findings (computed first: they hide the vessels they cover)
    lesion = np.zeros((m, m), np.float32)
    zone_y = {}
    for s in _SIDES:
        ys = Y[vis_lung[s] > 0.5]
        zone_y[s] = (float(ys.min()), float(ys.max())) if ys.size else (0.3, 0.7)

    def pick(side: str, zone: str, u: float, margin: float) -> tuple[float, float]:
        """Patient-frame centre of a lesion lying deep enough inside the aerated lung of one zone."""
        top, bottom = zone_y[side]
        z = _ZONES.index(zone)
        in_band = (Y >= top + (bottom - top) * z / 3) & (Y < top + (bottom - top) * (z + 1) / 3)
        aerated_side = (vis_lung[side] > 0.5) & (fluid < 0.2)
        inner = _blur(aerated_side.astype(np.float32), margin * m) > 0.93
        for cand_mask in (inner & in_band, aerated_side & in_band, vis_lung[side] > 0.5):
            cand = np.argwhere(cand_mask)
            if cand.size:
                break
        r, c = cand[min(int(u * len(cand)), len(cand) - 1)]
        return float(X[r, c]), float(Y[r, c])

    nod = by_label.get("nodule")
    if nod is not None:
        ncx, ncy = pick(nod.side, nod.zone, prm.nod_u, prm.nod_r * 0.8)
        ang = np.arctan2(Y - ncy, X - ncx)
        rr = prm.nod_r * (1 + 0.08 * np.sin(3 * ang + prm.nod_u * 6))  # slightly lobulated
        r = np.sqrt((X - ncx) ** 2 + (Y - ncy) ** 2) / rr
        nod_map = np.sqrt(np.clip(1 - r**2, 0, 1)) ** 0.6 * _smoothstep((1 - r) / 0.15 + 0.5)
        d += 0.30 * nod_map
        lesion = np.maximum(lesion, nod_map)
    cons = by_label.get("consolidation")
    if cons is not None:
        sz = prm.cons_size
        ccx, ccy = pick(cons.side, cons.zone, prm.cons_u, sz * 0.6)
        blob = np.zeros((m, m), np.float32)
        for ox, oy, osz in prm.cons_blobs:
            sg = sz * (0.55 + 0.12 * osz)
            blob += np.exp(-((X - ccx - 1.4 * sz * ox) ** 2 + (Y - ccy - sz * oy) ** 2) / (2 * sg**2))
        mottle = _blur(_rng(seed, index, _TAG_PARAMS, 1).standard_normal((m, m)).astype(np.float32), 0.015 * m)
        mottle = mottle / (mottle.std() + 1e-6)
        # ill-defined margins: a soft threshold, blurred, with a patchy (acinar) texture
        opac = _blur(_smoothstep((blob - 0.12) / 1.1), 0.008 * m) * np.clip(0.88 + 0.12 * mottle, 0.6, 1.1)
        opac *= np.clip(vis_lung[cons.side] * 1.2, 0, 1) * (1 - fluid)
        # air bronchograms: dark tubes running from the hilum into the opacity
        br = Image.new("F", (m, m), 0.0)
        dbr = ImageDraw.Draw(br)
        hil = frame.img(0.26, 0.43, -1 if cons.side == "right" else 1)
        cen = frame.rot(np.array([ccx, ccy]))
        for ox, oy, _ in prm.cons_blobs[:4]:
            tip = cen + sz * np.array([ox, oy]) * 1.2
            mid = 0.5 * (hil + tip) + 0.01 * np.array([oy, -ox])
            dbr.line([tuple(hil * m), tuple(mid * m), tuple(tip * m)], fill=1.0, width=max(1, int(0.004 * m)))
        d += 0.30 * opac - 0.05 * opac * _blur(np.asarray(br), 1.2)
        lesion = np.maximum(lesion, np.clip(opac, 0, 1))

    # ---- lung texture: fine mottle, branching vessels and hila where the lung is aerated
    tex = _blur(_rng(an.vessel_seed, 2).standard_normal((m, m)).astype(np.float32), 0.004 * m)
    ves = Image.new("F", (m, m), 0.0)
    dv = ImageDraw.Draw(ves)
    for s in _SIDES:
        segs, widths = _vessel_segments(an, frame, s)
        for (x0, y0), (x1, y1), w in zip(*(segs * m).transpose(1, 0, 2).tolist(), widths.tolist()):
            dv.line([(x0, y0), (x1, y1)], fill=min(1.0, w / 0.005), width=max(1, int(round(w * m))))
    aerated = lung_any * (1 - fluid) * (1 - lesion)
    d += (0.13 * _blur(np.asarray(ves), 0.004 * m) + 0.025 * tex) * aerated
    for sgn, dvh in ((-1, 0.0), (1, -0.03)):
        h = frame.pf(0.27, 0.43 + an.hilum_dv + dvh, sgn)
        d += 0.06 * np.exp(-(((X - h[0]) ** 2 + ((Y - h[1]) / 1.6) ** 2) / (2 * 0.022**2)))

    # trachea and main bronchi
    tr = Image.new("F", (m, m), 0.0)
    dr = ImageDraw.Draw(tr)
    carina = frame.img(0.02, 0.30, 1)
    top = frame.img(0.02, -0.35, 1)
    dr.line([tuple(top * m), tuple(carina * m)], fill=1.0, width=max(1, int(0.026 * m)))
    for sgn in (-1, 1):
        hil = frame.img(0.22, 0.40, sgn)
        dr.line([tuple(carina * m), tuple(hil * m)], fill=0.7, width=max(1, int(0.013 * m)))
    d -= 0.08 * _blur(np.asarray(tr), 0.005 * m)

    # spine: vertebral bodies with darker discs and pedicles, faint through the mediastinum
    period = an.rib_sp * an.Hl
    phase = ((Y - an.y_apex - an.rib0 * an.Hl) / period) % 1.0
    band = _smoothstep((0.034 - dx) / 0.014) * tissue
    disc = np.exp(-(((phase - 0.5) / 0.07) ** 2))
    ped = np.exp(-(((dx - 0.026) / 0.006) ** 2) - (((phase - 0.2) / 0.14) ** 2))
    d += (0.04 * band * (1 - 0.35 * disc) + 0.03 * ped * band) * (1 - 0.4 * abdomen)

    # ribs (posterior sharper than anterior), clavicles, humeral heads
    post = Image.new("F", (m, m), 0.0)
    ant = Image.new("F", (m, m), 0.0)
    dp, da = ImageDraw.Draw(post), ImageDraw.Draw(ant)
    for sgn in (-1, 1):
        for k in range(11):
            vk = an.rib0 + k * an.rib_sp
            w = max(1, int((0.019 + 0.0008 * k) * m))
            a = np.linspace(0.05, 1.05, 18)
            v = vk + 0.30 * np.clip(a - 0.15, 0, None) ** 1.7
            a = np.append(a, [1.08, 1.08])  # turn down along the lateral wall
            v = np.append(v, [v[-1] + 0.05, v[-1] + 0.10])
            dp.line([tuple(p) for p in frame.img(a, v, sgn) * m], fill=1.0, width=w, joint="curve")
            if k <= 6:
                a2 = np.linspace(1.06, 0.32, 10)
                v2 = v[-1] + 0.02 + 0.30 * (1.06 - a2)
                da.line([tuple(p) for p in frame.img(a2, v2, sgn) * m], fill=1.0, width=int(w * 1.2), joint="curve")
        cl = _clavicle_img(an, frame, "right" if sgn < 0 else "left") * m
        dp.line([tuple(p) for p in cl], fill=1.6, width=max(1, int(an.clav_w * m)), joint="curve")
        # humeral heads: only the top rows can hold them, so skip the rest of the image
        top_rows = min(m, int((an.y_apex + 0.15) * m))
        hx, hy = an.cx + sgn * 0.52, an.y_apex + 0.01
        r = np.sqrt(((X[:top_rows] - hx) / 0.075) ** 2 + ((Y[:top_rows] - hy) / 0.09) ** 2)
        d[:top_rows] += 0.07 * _smoothstep((1 - r) / 0.3) * tissue[:top_rows]
    # ribs show mostly against the lungs: elsewhere thick soft tissue swamps them
    cage = _smoothstep((an.W * 1.15 - dx) / 0.02) * (0.35 + 0.65 * _blur(lung_any, 0.02 * m))
    d += (0.045 * _blur(np.asarray(post), 0.002 * m) + 0.02 * _blur(np.asarray(ant), 0.004 * m)) * cage

    # pleural line of a pneumothorax: a thin bright edge where the lung has come away from the wall
    if ptx is not None:
        ln = Image.new("F", (m, m), 0.0)
        col = _collapse(lung_av[ptx.side], prm.ptx_depth)
        moved = np.linalg.norm(col - lung_av[ptx.side], axis=1) > 0.02
        pts = lung_pts[ptx.side] * m
        dl = ImageDraw.Draw(ln)
        for i in range(len(pts) - 1):
            if moved[i] and moved[i + 1]:
                dl.line([tuple(pts[i]), tuple(pts[i + 1])], fill=1.0, width=max(1, int(0.003 * m)))
        d += 0.10 * _blur(np.asarray(ln), 0.6)

    # breasts and gastric bubble
    if an.female:
        for sgn in (-1, 1):
            # a sharp lower-lateral margin that fades toward the axilla
            bx, by = an.cx + sgn * 0.62 * an.W, an.y_apex + 0.80 * an.Hl
            r = ((X - bx) / (0.6 * an.W)) ** 2 + ((Y - by) / 0.15) ** 2
            d += an.breast * _smoothstep((1 - r) / 0.15) * _smoothstep((Y - by + 0.10) / 0.16)
    if an.bubble:
        g = frame.pf(0.45, an.dome["left"] + 0.09, 1)
        r = ((X - g[0]) / 0.04) ** 2 + ((Y - g[1]) / 0.025) ** 2
        d -= 0.12 * _smoothstep((1 - r) / 0.3) * (Y < g[1] + 0.012)

    # ---- film-like processing: unsharp masking, exposure curve, then full-resolution noise
    d = d + an.usm * (d - _blur(d, 0.015 * m))
    d = np.clip(d, 0.0, 1.0) ** an.gamma
    if m != size:
        d = np.asarray(Image.fromarray(d.astype(np.float32), "F").resize((size, size), Image.BICUBIC))
    noise_rng = _rng(seed, index, _TAG_NOISE)
    noise = noise_rng.standard_normal((size, size), dtype=np.float32) * an.noise
    var = _variant(seed, index)
    val = (an.lo + (an.hi - an.lo) * np.clip(d, 0, 1) + noise) * var.top
    image = np.clip(np.rint(val), 0, var.top).astype(np.uint16)

    # ---- text
    labels, locs = _labels_and_localizations(findings)
    lungs = masks[0] | masks[1]
    cols = np.nonzero(lungs.any(axis=0))[0]
    hcols = np.nonzero(masks[2].any(axis=0))[0]
    ctr_meas = (np.ptp(hcols) + 1) / (np.ptp(cols) + 1) if cols.size and hcols.size else ctr
    eff_heights = [prm.eff_h[s] for s in eff_sides]
    info = {"ctr": ctr_meas, "eff_small": bool(eff_heights) and max(eff_heights) < 0.36,
            "nod_mm": int(round(2 * prm.nod_r * _FOV_MM / 5.0) * 5)}  # reported to the nearest 5 mm
    report = _report(findings, _rng(seed, index, _TAG_REPORT), info)
    patient, study = _patient_of(index)
    meta = {"patient": patient, "study": study, "variant": var, "sex": an.sex, "birth": an.birth,
            "study_date": an.study_date, "ctr": float(ctr_meas), "caption": _caption(findings)}
    return PhantomSample(image=image, masks=masks, findings=findings, report=report, labels=labels,
                         localizations=locs, meta=meta)


def generate_sample(seed: int, index: int, size: int = 1024, *, findings: Sequence[Finding] | None = None
                    ) -> PhantomSample:
    """Generate one phantom, deterministic in (seed, index, size).

    ``findings`` overrides the drawn findings while keeping the same anatomy, noise and
    lesion geometry, which lets callers compare a study with and without a finding.
    """
    if int(seed) < 0:
        raise UsageError(f"seed must be >= 0, got {seed}")
    if int(index) < 0:
        raise UsageError(f"index must be >= 0, got {index}")
    if int(size) < MIN_SIZE:
        raise UsageError(f"size must be >= {MIN_SIZE} pixels, got {size}")
    if findings is not None:
        _check_findings(findings)
    return _render(int(seed), int(index), int(size), findings)


def _check_findings(findings: Sequence[Finding]) -> None:
    """Refuse findings the renderer cannot draw (one per label; sides and zones as documented)."""
    sides = {"cardiomegaly": {None}, "pleural effusion": {"right", "left", "bilateral"},
             "pneumothorax": {"right", "left"}, "nodule": {"right", "left"}, "consolidation": {"right", "left"}}
    labels = [f.label for f in findings]
    if len(set(labels)) != len(labels):
        raise UsageError(f"at most one finding per label, got {labels}")
    for f in findings:
        if f.label not in sides:
            raise UsageError(f"unknown finding {f.label!r}; expected one of {sorted(sides)}")
        if f.side not in sides[f.label]:
            raise UsageError(f"{f.label}: side must be one of {sorted(map(str, sides[f.label]))}, got {f.side!r}")
        zones = set(_ZONES) if f.label in ("nodule", "consolidation") else {None}
        if f.zone not in zones:
            raise UsageError(f"{f.label}: zone must be one of {sorted(map(str, zones))}, got {f.zone!r}")


# --------------------------------------------------------------------------- DICOM and PNG twins


def _uid(seed: int, index: int, kind: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["radixpert-phantom", str(seed), str(index), kind])


def _stored_values(sample: PhantomSample, var: _Variant) -> np.ndarray:
    """Stored pixel values whose modality LUT gives the phantom (MONOCHROME1: its inverse)."""
    img = sample.image.astype(np.int32)
    rescaled = var.top - img if var.photometric == "MONOCHROME1" else img
    # slopes are 1 or 1/2, so integer arithmetic is exact (and faster than floats)
    stored = (rescaled - int(var.intercept)) * int(round(1 / var.slope))
    if stored.min() < 0 or stored.max() > 4095:
        raise AssertionError("stored values outside 12 bits")  # a bug in _RESCALES, not bad input
    return stored.astype(np.uint16)


def _window(sample: PhantomSample, var: _Variant, rng: np.random.Generator) -> tuple[float, float]:
    """Window centre/width in rescaled units covering the data, with mild clipping at most."""
    img = sample.image[::4, ::4]
    lo, hi = (float(v) for v in np.percentile(img, [0.2, 99.9]))
    if var.photometric == "MONOCHROME1":
        lo, hi = var.top - hi, var.top - lo
    width = max(16.0, (hi - lo) * float(rng.uniform(0.95, 1.15)))
    centre = (lo + hi) / 2 + (hi - lo) * float(rng.uniform(-0.03, 0.03))
    return float(round(centre)), float(round(width))


def display_lut(slope: float, intercept: float, centre: float, width: float, monochrome1: bool) -> np.ndarray:
    """uint16 display value for every 12-bit stored value: rescale -> linear VOI window -> MONOCHROME1 inversion.

    The window is DICOM PS3.3 C.11.2.1.2.1 'LINEAR' mapped onto [0, 1].
    """
    x = np.arange(4096, dtype=np.float64) * slope + intercept
    y = np.clip((x - (centre - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    if monochrome1:
        y = 1.0 - y
    return np.rint(y * 65535.0).astype(np.uint16)


def _dicom(sample: PhantomSample, seed: int, index: int, stored: np.ndarray, var: _Variant,
           centre: float, width: float, spacing: float):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, JPEG2000Lossless, RLELossless

    meta = sample.meta
    rows, cols = stored.shape
    sop_class = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
    study_uid = _uid(seed, index, "study")
    sop_uid = _uid(seed, index, "sop")
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = UID(_EVR)
    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    date = meta["study_date"].strftime("%Y%m%d")
    time = f"{8 + index % 10:02d}{(index * 7) % 60:02d}{(index * 13) % 60:02d}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time
    ds.AccessionNumber = f"A{seed % 1000:03d}{index:07d}"[:16]
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "Radixpert"
    ds.ManufacturerModelName = "Phantom"
    ds.InstitutionName = "Radixpert Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "RX TORAX PA"
    ds.SeriesDescription = "TORAX PA"
    ds.PatientName = f"PHANTOM^{meta['patient']:04d}"
    ds.PatientID = _patient_id(seed, meta["patient"])
    ds.PatientBirthDate = meta["birth"].strftime("%Y%m%d")
    ds.PatientSex = meta["sex"]
    age = meta["study_date"].year - meta["birth"].year
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]  # rows run toward the patient's left, columns toward the feet
    ds.KVP = 110 + index % 3 * 5
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = _uid(seed, index, "series")
    ds.StudyID = f"{index % 10**8}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = var.photometric
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    ds.ImagerPixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = f"{var.intercept:g}"
    ds.RescaleSlope = f"{var.slope:g}"
    ds.RescaleType = "US"
    ds.WindowCenter = f"{centre:g}"
    ds.WindowWidth = f"{width:g}"
    ds.VOILUTFunction = "LINEAR"
    ds.PresentationLUTShape = "INVERSE" if var.photometric == "MONOCHROME1" else "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PixelData = stored.tobytes()
    if var.transfer_syntax == _RLE:
        ds.compress(RLELossless, stored, generate_instance_uid=False)
    elif var.transfer_syntax == _J2K:
        ds.compress(JPEG2000Lossless, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    return ds


def _patient_id(seed: int, patient: int) -> str:
    return f"PH{seed}-{patient:05d}"


def _study_id(seed: int, index: int) -> str:
    # PadChest StudyIDs are opaque hashes; keep ours opaque but reproducible.
    return hashlib.sha1(f"radixpert-phantom/{seed}/{index}".encode()).hexdigest()[:32]


def _stem(seed: int, index: int) -> str:
    return f"phantom_{seed}_{index:06d}"


def _image_dir(index: int) -> int:
    return index // 250


CSV_COLUMNS = ("ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
               "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Report",
               "MethodLabel", "Labels", "Localizations", "DicomPath", "MaskPath", "PhotometricInterpretation",
               "TransferSyntax", "WindowCenter", "WindowWidth", "Seed", "Index")


def _write_one(task: tuple[str, int, int, int, bool]) -> tuple[int, dict, tuple[np.ndarray, str] | None]:
    """Generate one study and write its DICOM, display PNG and mask PNG; return its CSV row."""
    out_s, seed, index, size, want_thumb = task
    out = Path(out_s)
    sample = generate_sample(seed, index, size)
    var: _Variant = sample.meta["variant"]
    stem = _stem(seed, index)
    centre, width = _window(sample, var, _rng(seed, index, _TAG_META, 1))
    stored = _stored_values(sample, var)
    spacing = _FOV_MM / size
    ds = _dicom(sample, seed, index, stored, var, centre, width, spacing)
    dicom_rel = f"dicom/{stem}.dcm"
    ds.save_as(out / dicom_rel, enforce_file_format=True)

    display = display_lut(var.slope, var.intercept, centre, width, var.photometric == "MONOCHROME1")[stored]
    image_rel = f"images/{_image_dir(index)}/{stem}.png"
    _write_png16(out / image_rel, display)
    mask_rel = f"masks/{stem}.png"
    bits = np.zeros(sample.masks.shape[1:], np.uint8)
    for k in range(len(MASK_NAMES)):
        bits |= sample.masks[k].astype(np.uint8) << k
    Image.fromarray(bits).save(out / mask_rel, compress_level=6)

    meta = sample.meta
    row = {
        "ImageID": f"{stem}.png",
        "ImageDir": _image_dir(index),
        "StudyDate_DICOM": meta["study_date"].strftime("%Y%m%d"),
        "StudyID": _study_id(seed, index),
        "PatientID": _patient_id(seed, meta["patient"]),
        "PatientBirth": meta["birth"].year,
        "PatientSex_DICOM": meta["sex"],
        "ViewPosition_DICOM": "POSTEROANTERIOR",
        "Projection": "PA",
        "MethodProjection": "Manual review of DICOM fields",
        "Report": sample.report,
        "MethodLabel": "Physician",
        "Labels": repr(sample.labels),
        "Localizations": repr(sample.localizations),
        "DicomPath": dicom_rel,
        "MaskPath": mask_rel,
        "PhotometricInterpretation": var.photometric,
        "TransferSyntax": var.transfer_syntax,
        "WindowCenter": f"{centre:g}",
        "WindowWidth": f"{width:g}",
        "Seed": seed,
        "Index": index,
    }
    thumb = None
    if want_thumb:
        small = Image.fromarray((display >> 8).astype(np.uint8)).resize((256, 256), Image.BOX)
        thumb = (np.asarray(small), meta["caption"])
    return index, row, thumb


def _write_png16(path: Path, a: np.ndarray) -> None:
    """Write a 16-bit grayscale PNG (fast zlib level: these are regenerated, not archived)."""
    Image.fromarray(a.astype(np.uint16)).save(path, format="PNG", compress_level=1)


def read_masks(path: str | Path) -> np.ndarray:
    """Decode a mask PNG written by ``write_dataset`` into bool (5, H, W) in MASK_NAMES order."""
    bits = np.asarray(Image.open(path))
    if bits.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel mask PNG")
    return np.stack([(bits >> k) & 1 for k in range(len(MASK_NAMES))]).astype(bool)


def _contact_sheet(thumbs: list[tuple[int, np.ndarray, str]], path: Path) -> None:
    """Grid of thumbnails with the findings written under each (D = patient's right)."""
    cols = min(4, len(thumbs))
    rows = (len(thumbs) + cols - 1) // cols
    cell_w, cell_h, cap_h = 256, 256, 36
    sheet = Image.new("RGB", (cols * cell_w, rows * (cell_h + cap_h)), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=13)
        big = ImageFont.load_default(size=20)
    except TypeError:  # Pillow without FreeType
        font = big = ImageFont.load_default()
    for k, (index, thumb, caption) in enumerate(thumbs):
        x, y = (k % cols) * cell_w, (k // cols) * (cell_h + cap_h)
        sheet.paste(Image.fromarray(thumb).convert("RGB"), (x, y))
        draw.text((x + 8, y + 6), "R", fill=(255, 80, 80), font=big)  # patient's right on the image's left
        words, lines = caption.split(", "), [f"#{index}:"]
        for w in words:
            if len(lines[-1]) + len(w) + 2 > 34:
                lines.append(w)
            else:
                lines[-1] = f"{lines[-1]} {w}" if lines[-1].endswith(":") else f"{lines[-1]}, {w}"
        # Pillow's bundled font lacks accented glyphs: write captions in plain ASCII
        text = unicodedata.normalize("NFKD", "\n".join(lines[:2])).encode("ascii", "ignore").decode()
        draw.multiline_text((x + 4, y + cell_h + 2), text, fill=(235, 235, 235), font=font, spacing=2)
    sheet.save(path)


def write_dataset(out: str | Path, n: int, seed: int, size: int = 1024, preview: bool = False,
                  workers: int | None = None, progress: bool = True) -> Path:
    """Write n phantoms (DICOM, display PNGs, masks, PadChest-style CSV) under ``out``; return the CSV path.

    Output is identical for any worker count: each study depends only on (seed, index, size).
    """
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    if size < MIN_SIZE:
        raise UsageError(f"--size must be at least {MIN_SIZE}, got {size}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} exists and is not a folder")
    workers = max(1, min(workers or os.cpu_count() or 1, n))
    try:
        for sub in ["dicom", "masks"] + [f"images/{d}" for d in range(_image_dir(n - 1) + 1)]:
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out}: {exc.strerror}") from exc

    tasks = [(str(out), seed, i, size, preview and i < PREVIEW_MAX) for i in range(n)]
    rows: dict[int, dict] = {}
    thumbs: list[tuple[int, np.ndarray, str]] = []

    def collect(result: tuple[int, dict, tuple | None]) -> None:
        index, row, thumb = result
        rows[index] = row
        if thumb is not None:
            thumbs.append((index, thumb[0], thumb[1]))

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("phantoms"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), disable=not progress, transient=False)
    with bar:
        job = bar.add_task("phantoms", total=n)
        if workers == 1:
            for t in tasks:
                collect(_write_one(t))
                bar.advance(job)
        else:
            # spawn, not fork: callers (tests, the runtime) may hold threads that fork would copy
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                for fut in as_completed([pool.submit(_write_one, t) for t in tasks]):
                    collect(fut.result())
                    bar.advance(job)

    csv_path = out / "phantoms.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for i in range(n):
            writer.writerow(rows[i])
    if preview:
        _contact_sheet(sorted(thumbs, key=lambda t: t[0]), out / "preview.png")
    return csv_path


# --------------------------------------------------------------------------- CLI


class _OneLineErrors(click.Command):
    """Report bad options and refused inputs as one line on stderr, without a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        prog = "radixpert-phantom"  # not prog_name: test runners pass the function name
        try:
            rv = super().main(args=args, prog_name=prog, complete_var=complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo(f"{prog}: error: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"{prog}: error: {exc.format_message()}", err=True)
            sys.exit(EXIT_USAGE)
        except RadixpertError as exc:
            click.echo(f"{prog}: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            click.echo(f"{prog}: error: {exc.strerror or exc} ({exc.filename})", err=True)
            sys.exit(EXIT_USAGE)
        except Exception as exc:  # a bug: still one line, with the exit code saying so
            click.echo(f"{prog}: internal error: {type(exc).__name__}: {exc}", err=True)
            sys.exit(EXIT_INTERNAL)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.command(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="Number of studies to generate.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Dataset seed.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--size", type=click.IntRange(min=MIN_SIZE), default=1024, show_default=True,
              help="Image side in pixels.")
@click.option("--preview", is_flag=True, help="Also write preview.png, a captioned contact sheet.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes (default: all CPUs).")
def main(n: int, seed: int, out: Path, size: int, preview: bool, workers: int | None) -> int:
    """Write synthetic PA chest radiographs with masks, findings and Spanish reports."""
    csv_path = write_dataset(out, n, seed, size=size, preview=preview, workers=workers)
    click.echo(f"wrote {n} studies to {out} ({csv_path.name})", err=True)
    return 0


if __name__ == "__main__":
    main()
