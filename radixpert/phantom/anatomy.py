"""Patient anatomy of the phantoms: body, lungs, heart, clavicles and vessels as outlines.

Anatomical coordinates are ``a`` (lateral distance from the midline in units of the thorax
half-width) and ``v`` (depth below the lung apex in units of the lung height); ``_Frame``
maps them to normalized image coordinates. Column 0 is the patient's right.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from radixpert.phantom.findings import _TAG_PATIENT, _TAG_STUDY, _patient_of, _rng

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
