"""Render a phantom study: the 12-bit image, its masks, findings and report.

Image convention: column 0 is the patient's RIGHT (radiographs are displayed as if
facing the patient), and pixel values are in MONOCHROME2 sense (dense = bright).
Blurs are done with numpy and Pillow: the base (runtime) install ships no scipy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from radixpert.errors import UsageError
from radixpert.phantom.anatomy import (
    _anatomy,
    _blur,
    _body_img,
    _clavicle_img,
    _collapse,
    _diaphragm_y,
    _Frame,
    _heart_img,
    _lung_av,
    _poly,
    _polyline,
    _smoothstep,
    _vessel_segments,
)
from radixpert.phantom.findings import (
    _SIDES,
    _TAG_FINDINGS,
    _TAG_META,
    _TAG_NOISE,
    _TAG_PARAMS,
    _TAG_REPORT,
    _ZONES,
    Finding,
    _draw_params,
    _labels_and_localizations,
    _patient_of,
    _rng,
    _sample_findings,
)
from radixpert.phantom.report import _caption, _report

MASK_NAMES: tuple[str, ...] = ("right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle")
MIN_SIZE = 256
# Field of view of a typical 43 cm flat panel; pixel spacing follows from the image size.
_FOV_MM = 430.0


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
