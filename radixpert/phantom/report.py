"""Spanish report text of a phantom study: one sentence per finding, some negations, shuffled."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from radixpert.phantom.findings import _TAG_REPORT, Finding, _rng

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


def spanish_report(findings: Sequence[Finding], seed: int, index: int, *, ctr: float = 0.57,
                   small_effusion: bool = False, nodule_mm: int = 10) -> str:
    """The report of study ``index`` of dataset ``seed`` for ``findings``, without rendering its image.

    ``generate_sample`` passes the measurements of its image (cardiothoracic ratio, effusion
    size, nodule diameter); the defaults stand in for them, so only those numbers and the
    words "pequeña"/"moderada" may differ from the rendered study's report.
    """
    info = {"ctr": ctr, "eff_small": small_effusion, "nod_mm": nodule_mm}
    return _report(findings, _rng(seed, index, _TAG_REPORT), info)
