"""Parametric shape model of the left heart in apical 2- and 4-chamber views (numpy only).

Coordinates are physical: ``x`` lateral (mm, 0 on the probe axis, positive to the image right), ``z``
depth (mm, 0 at the probe). The left-ventricle (LV) long axis starts at the endocardial apex and is
tilted by ``tilt`` degrees from the beam axis; along it ``u`` (mm from the apex) and across it ``v``.

- LV cavity: an ellipse of semi-axes ``a`` (along the axis, centred at ``u = a``) and ``b`` (across),
  truncated at the mitral plane ``u = L = a (1 + t)``. Each side's half-width is modulated by two
  gentle sinusoids (``wobble``, a few %) so outlines are not perfect ellipses.
- Myocardium: the ring between the cavity and an outer ellipse (semi-axes ``a + T_apex``, ``b + T``,
  same centre), cut at the same mitral plane: a U open at the mitral valve.
- Left atrium (LA): an ellipse below the mitral plane whose top meets the LV base.

Volumes: the LV is taken as a solid whose cross-section at ``u`` is an ellipse with diameters
``d2(u)`` (2CH view) and ``d4(u)`` (4CH view), i.e. Simpson's biplane method of discs in the
continuum limit: ``V = pi/4 * integral_0^L d2(u) d4(u) du`` (integrated numerically, 4,000 steps,
wobble included). Without wobble this is ``pi b2 b4 [L - ((L - a)^3 + a^3) / (3 a^2)]``.
EF = 100 (EDV - ESV) / EDV. End-systole keeps the apex fixed, shortens the long axis by
``fl = (1 - EF/100) ** long_share`` and the radii by ``fw = sqrt((1 - EF/100) / fl)`` (so the volume
ratio is the sampled EF up to wobble), thickens the wall by ``2 / (fl + fw)`` (myocardial area roughly
conserved) and enlarges the LA (it fills during systole).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage as ndi

VIEWS = ("2CH", "4CH")
PHASES = ("ED", "ES")


@dataclass(frozen=True)
class PatientAnatomy:
    """End-diastolic shape parameters of one synthetic patient (lengths in mm, angles in degrees)."""
    apex_depth: float
    """Depth of the endocardial apex below the probe."""
    lv_length: float
    """Apex to mitral plane, ``L`` at ED."""
    lv_trunc: float
    """``t`` in ``L = a (1 + t)``: where the ellipse is cut (1 = at its widest, 0 = at its centre... 0.6-0.8)."""
    lv_radius: tuple[float, float]
    """Largest cavity half-width ``b`` in the 2CH and 4CH views."""
    wall: float
    """Lateral myocardial thickness ``T`` at ED."""
    apex_wall_ratio: float
    """Apical wall thickness relative to ``T``."""
    ef: float
    """Sampled ejection fraction in % (the reported EF is recomputed from the volumes)."""
    long_share: float
    """Exponent giving the share of the volume change due to long-axis shortening."""
    la_length: tuple[float, float]
    """LA semi-axis along the LV axis (2CH, 4CH) at ED."""
    la_radius: tuple[float, float]
    """LA semi-axis across (2CH, 4CH) at ED."""
    la_growth: float
    """LA size factor at ES relative to ED."""
    la_shift: tuple[float, float]
    """Lateral offset of the LA centre from the LV axis (2CH, 4CH)."""
    tilt: tuple[float, float]
    """LV long-axis tilt from the beam axis (2CH, 4CH); positive turns the base to the image right."""
    offset: tuple[float, float]
    """Lateral position of the apex (2CH, 4CH)."""
    rv_radius: float
    """Right-ventricle half-width (4CH only, image only, no label)."""
    wobble: tuple
    """(view, side, harmonic) -> (relative amplitude, phase): outline irregularity."""
    sex: str
    """"M" or "F" (written to Info cfg)."""
    age: int
    """Years (written to Info cfg)."""
    quality: str
    """"Good", "Medium" or "Poor": scales noise and clutter of the rendering."""

def sample_anatomy(rng: np.random.Generator) -> PatientAnatomy:
    """Draw one patient's anatomy (all randomness comes from ``rng``)."""
    u = rng.uniform
    ef = float(np.clip(rng.normal(55.0, 11.0), 22.0, 75.0))
    wob = tuple(tuple(tuple((float(u(0.0, 0.035)), float(u(0, 2 * np.pi))) for _ in range(2))
                      for _ in range(2)) for _ in range(2))
    b4 = u(23.0, 29.0)
    la_r = u(17.0, 23.0)
    return PatientAnatomy(
        apex_depth=u(20.0, 30.0), lv_length=u(70.0, 85.0), lv_trunc=u(0.62, 0.78),
        lv_radius=(b4 * u(0.88, 1.02), b4), wall=u(7.5, 11.0), apex_wall_ratio=u(0.7, 0.95),
        ef=ef, long_share=u(0.12, 0.25),
        la_length=(u(16.0, 22.0), u(16.0, 22.0)), la_radius=(la_r * u(0.9, 1.1), la_r),
        la_growth=u(1.12, 1.3), la_shift=(u(-3.0, 3.0), u(0.0, 4.0)),
        tilt=(u(-8.0, 8.0), u(-4.0, 10.0)), offset=(u(-5.0, 5.0), u(-2.0, 8.0)),
        rv_radius=u(11.0, 16.0), wobble=wob, sex=str(rng.choice(["M", "F"])), age=int(rng.integers(20, 90)),
        quality=str(rng.choice(["Good", "Medium", "Poor"], p=[0.45, 0.4, 0.15])),
    )


@dataclass(frozen=True)
class ViewGeometry:
    """The shapes of one view at one phase (mm, radians); built by :func:`view_geometry`."""
    apex: tuple[float, float]
    """(x, z) of the endocardial apex."""
    theta: float
    """Tilt of the long axis (radians)."""
    a: float
    """Cavity ellipse semi-axis along the long axis."""
    L: float
    """Apex to mitral plane."""
    b: float
    """Cavity ellipse semi-axis across."""
    wall: float
    """Lateral wall thickness."""
    wall_apex: float
    """Apical wall thickness."""
    la_a: float
    """LA semi-axis along."""
    la_b: float
    """LA semi-axis across."""
    la_shift: float
    """LA lateral offset."""
    wobble: tuple
    """(side, harmonic) -> (amplitude, phase)."""
    rv_radius: float
    """RV half-width (4CH), 0 for 2CH."""
    view: str
    """"2CH" or "4CH"."""
    phase: str
    """"ED" or "ES"."""

def _phase_factors(anat: PatientAnatomy) -> tuple[float, float, float]:
    r = 1.0 - anat.ef / 100.0
    fl = r ** anat.long_share
    fw = float(np.sqrt(r / fl))
    return fl, fw, 2.0 / (fl + fw)


def view_geometry(anat: PatientAnatomy, view: str, phase: str) -> ViewGeometry:
    """Shapes of ``view`` ("2CH"/"4CH") at ``phase`` ("ED"/"ES") for one patient."""
    k = VIEWS.index(view)
    fl, fw, fth = _phase_factors(anat) if phase == "ES" else (1.0, 1.0, 1.0)
    L = anat.lv_length * fl
    a = L / (1.0 + anat.lv_trunc)
    la_g = anat.la_growth if phase == "ES" else 1.0
    return ViewGeometry(
        apex=(anat.offset[k], anat.apex_depth), theta=float(np.deg2rad(anat.tilt[k])), a=a, L=L,
        b=anat.lv_radius[k] * fw, wall=anat.wall * fth, wall_apex=anat.wall * anat.apex_wall_ratio * fth,
        la_a=anat.la_length[k] * la_g, la_b=anat.la_radius[k] * la_g, la_shift=anat.la_shift[k],
        wobble=anat.wobble[k], rv_radius=anat.rv_radius if view == "4CH" else 0.0, view=view, phase=phase,
    )


def _modulation(g: ViewGeometry, u: np.ndarray, side: int) -> np.ndarray:
    return 1.0 + sum(amp * np.sin(np.pi * (h + 1) * u / g.L + ph) for h, (amp, ph) in enumerate(g.wobble[side]))


def half_width(g: ViewGeometry, u: np.ndarray, side: int) -> np.ndarray:
    """Cavity half-width (mm) at distance ``u`` from the apex on ``side`` 0 (v < 0) or 1 (v > 0)."""
    base = g.b * np.sqrt(np.clip(1.0 - ((u - g.a) / g.a) ** 2, 0.0, None))
    return base * _modulation(g, u, side)


def local_coords(g: ViewGeometry, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u, v): distance along the long axis from the apex and signed distance across it (mm)."""
    dx, dz = x - g.apex[0], z - g.apex[1]
    s, c = np.sin(g.theta), np.cos(g.theta)
    return dx * s + dz * c, dx * c - dz * s


def structures(g: ViewGeometry, x: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean maps (same shape as ``x``/``z``) of every structure at the given points.

    Keys: LV, MYO, LA (labelled) and, for the image only, peri (pericardium band), RV, RA, rv_wall,
    la_wall, valve (mitral leaflets: open into the LV at ED, closed across the plane at ES).
    """
    u, v = local_coords(g, x, z)
    side = (v > 0).astype(int)
    w = np.where(side == 1, half_width(g, u, 1), half_width(g, u, 0))
    lv = (u >= 0) & (u <= g.L) & (np.abs(v) <= w)
    ao, bo = g.a + g.wall_apex, g.b + g.wall
    mod = np.where(side == 1, _modulation(g, u, 1), _modulation(g, u, 0))
    outer = ((u - g.a) / ao) ** 2 + (v / (bo * mod)) ** 2 <= 1.0
    myo = outer & ~lv & (u <= g.L)
    k = 0.72
    la_c = g.L + k * g.la_a
    la = (((u - la_c) / g.la_a) ** 2 + ((v - g.la_shift) / g.la_b) ** 2 <= 1.0) & (u > g.L) & ~myo & ~lv
    # The atrium opens onto the LV through the mitral annulus: just below the plane it is no wider than
    # the cavity's base (a funnel widening with depth), so it meets the myocardium only at the annulus
    # corners, as in real apical views (CAMUS' MYO-LA frontier check expects a short contact).
    w_base = 0.5 * float(half_width(g, np.array([g.L * 0.999]), 0)[0] + half_width(g, np.array([g.L * 0.999]), 1)[0])
    la &= np.abs(v) <= 0.85 * w_base + 1.2 * (u - g.L)
    pw = 3.0
    peri = (((u - g.a) / (ao + pw)) ** 2 + (v / (bo + pw)) ** 2 <= 1.0) & ~outer & (u <= g.L + 4)
    la_wall = (((u - la_c) / (g.la_a + 2.5)) ** 2 + ((v - g.la_shift) / (g.la_b + 2.5)) ** 2 <= 1.0) & ~la \
        & (u > g.L - 1)
    out = {"LV": lv, "MYO": myo, "LA": la, "peri": peri & ~la, "la_wall": la_wall & ~myo & ~lv}
    # Mitral leaflets, thin bright lines.
    wl = float(np.mean([half_width(g, np.array([g.L * 0.999]), s)[0] for s in (0, 1)]))
    if g.phase == "ES":
        valve = (u > g.L - 0.8) & (u < g.L + 1.2) & (np.abs(v) < wl)
    else:
        valve = np.zeros_like(lv)
        for sgn in (-1.0, 1.0):
            p0 = np.array([g.L, sgn * wl])
            p1 = np.array([g.L - 0.2 * g.L, sgn * wl * 0.55])
            valve |= _segment_dist(u, v, p0, p1) < 0.9
    out["valve"] = valve
    if g.rv_radius > 0:  # right heart on the image left (negative v) in the 4CH view
        rv_c_u, rv_c_v = 0.58 * g.L, -(bo + g.rv_radius * 0.95)
        rv = ((u - rv_c_u) / (0.42 * g.L)) ** 2 + ((v - rv_c_v) / g.rv_radius) ** 2 <= 1.0
        rv_out = ((u - rv_c_u) / (0.42 * g.L + 3.5)) ** 2 + ((v - rv_c_v) / (g.rv_radius + 3.5)) ** 2 <= 1.0
        ra_c_u, ra_c_v = g.L + 0.75 * g.la_a, rv_c_v - 2.0
        ra = ((u - ra_c_u) / (g.la_a * 0.95)) ** 2 + ((v - ra_c_v) / (g.rv_radius * 1.05)) ** 2 <= 1.0
        taken = lv | myo | la
        out["RV"] = rv & ~taken & ~out["peri"]
        out["RA"] = ra & ~taken & ~rv & ~out["la_wall"]
        out["rv_wall"] = rv_out & ~rv & ~taken
    return out


def _segment_dist(u: np.ndarray, v: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    d = p1 - p0
    t = np.clip(((u - p0[0]) * d[0] + (v - p0[1]) * d[1]) / float(d @ d), 0.0, 1.0)
    return np.hypot(u - (p0[0] + t * d[0]), v - (p0[1] + t * d[1]))


def label_map(g: ViewGeometry, x: np.ndarray, z: np.ndarray, inside: np.ndarray | None = None) -> np.ndarray:
    """uint8 label map (0 bg, 1 LV, 2 MYO, 3 LA) at the points ``x``/``z`` (mm); 0 where not ``inside``."""
    s = structures(g, x, z)
    lab = np.zeros(x.shape, np.uint8)
    lab[s["LA"]] = 3
    lab[s["MYO"]] = 2
    lab[s["LV"]] = 1
    if inside is not None:
        lab[~inside] = 0
    return merge_fragments(lab)


def merge_fragments(lab: np.ndarray) -> np.ndarray:
    """Give every pixel of a structure's smaller 4-connected pieces (rasterisation crumbs at the
    mitral plane, a few pixels) the most common label around it, so each structure is one piece and
    the background has no holes."""

    lab = lab.copy()
    for k in (1, 2, 3, 0):  # 0 last: enclosed background specks (holes) join their surroundings
        comp, n = ndi.label(lab == k)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        for c in np.flatnonzero(sizes != sizes.max())[:] + 1:
            piece = comp == c
            ring = ndi.binary_dilation(piece) & ~piece
            vals = lab[ring]
            vals = vals[vals != k]
            lab[piece] = np.bincount(vals, minlength=4).argmax() if vals.size else 0
    return lab


def lv_volume_ml(anat: PatientAnatomy, phase: str, steps: int = 4000) -> float:
    """Biplane (2CH x 4CH) method-of-discs LV volume in ml, integrated on ``steps`` slices."""
    g2, g4 = view_geometry(anat, "2CH", phase), view_geometry(anat, "4CH", phase)
    L = 0.5 * (g2.L + g4.L)
    u = (np.arange(steps) + 0.5) / steps
    d2 = half_width(g2, u * g2.L, 0) + half_width(g2, u * g2.L, 1)
    d4 = half_width(g4, u * g4.L, 0) + half_width(g4, u * g4.L, 1)
    return float(np.pi / 4.0 * np.sum(d2 * d4) * (L / steps) / 1000.0)


def clinical_truth(anat: PatientAnatomy) -> dict[str, float]:
    """Ground truth EDV, ESV (ml) and EF (%) from the shape model (see the module docstring)."""
    edv, esv = lv_volume_ml(anat, "ED"), lv_volume_ml(anat, "ES")
    return {"EDV": round(edv, 2), "ESV": round(esv, 2), "EF": round(100.0 * (edv - esv) / edv, 2)}


def with_ef(anat: PatientAnatomy, ef: float) -> PatientAnatomy:
    """A copy of ``anat`` with another sampled EF (for tests and what-if studies)."""
    return replace(anat, ef=float(ef))


def epicardium_points(g: ViewGeometry, n: int = 200) -> np.ndarray:
    """(n, 2) points (x, z) in mm on the outer myocardial border (ellipse part above the mitral plane)."""
    ao, bo = g.a + g.wall_apex, g.b + g.wall * 1.08
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    u, v = g.a + ao * np.cos(t), bo * np.sin(t)
    keep = u <= g.L + 2.0
    u, v = u[keep], v[keep]
    s, c = np.sin(g.theta), np.cos(g.theta)
    return np.stack([g.apex[0] + u * s + v * c, g.apex[1] + u * c - v * s], 1)


def fit_in_sector(anat: PatientAnatomy, half_angle_deg: float, margin_deg: float = 2.5) -> PatientAnatomy:
    """Move the heart (towards the beam axis, then deeper) until the LV and myocardium of every view and
    phase lie inside a sector of ``half_angle_deg`` with ``margin_deg`` to spare, so the fan never cuts
    the myocardium into pieces. Only the apex position (offset, depth) and tilt change."""
    limit = np.deg2rad(half_angle_deg - margin_deg)
    for _ in range(60):
        worst = max(float(np.max(np.abs(np.arctan2(p[:, 0], p[:, 1]))))
                    for view in VIEWS for phase in PHASES
                    for p in [epicardium_points(view_geometry(anat, view, phase))])
        if worst <= limit:
            return anat
        anat = replace(anat, offset=tuple(o * 0.85 for o in anat.offset), tilt=tuple(t * 0.9 for t in anat.tilt),
                       apex_depth=anat.apex_depth + 1.5)
    return anat
