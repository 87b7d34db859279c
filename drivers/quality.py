"""ISO/IEC 15415-style print-quality *estimates* for a DataMatrix found in a camera image.

These numbers are process-control indicators, not an ISO verification. A
verifier has calibrated optics (reflectance standard, defined illumination
angle, aperture tied to the X-dimension); a line camera has none of that, so
symbol contrast here is "% of the sensor's full scale", not % reflectance, and
every grade must be shown as estimated (``grade_detail["estimated"] is True``).
They are good at the job a line needs: noticing that the print is fading,
smudging or being damaged before codes stop reading.

What is measured, from the grey image and the four symbol corners zxing-cpp
reports (in the symbol's own orientation: the L finder runs down the left
edge and along the bottom edge, whatever the rotation in the image):

- SC (symbol contrast): Rmax − Rmin of aperture-averaged samples at every
  module centre plus the one-module ring of quiet zone around the symbol.
- MOD (modulation): per module 2·|R − GT| / SC with GT = (Rmax + Rmin) / 2.
  ISO grades each codeword by its worst module and lets error correction
  absorb bad codewords; we do the same using the ECC200 module placement
  (ISO/IEC 16022 Annex F), treating a codeword below a grade level as an
  erasure. Simplification: we do not know the symbol's ideal bit pattern, so a
  module smudged across the threshold (a bit error) is not seen here; it is
  seen by the decoder's unused error correction, which enters the overall
  grade, so the overall grade still drops.
- UEC: taken from the decoder (zxing-cpp ``Barcode.extra["UEC"]``), not
  recomputed.
- AN (axial non-uniformity) and GN (grid non-uniformity) from the corner
  geometry only: AN compares mean module pitch along both axes; GN is the
  largest distance (in modules) between the perspective grid through the four
  corners and its best affine fit. A real GN needs every grid intersection;
  this one only sees keystone distortion.
- Fixed pattern damage and print growth are not estimated.

Overall = the lowest of the parameter grades (single image, so an integer
0..4, never an average of scans).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

LETTERS = {4: "A", 3: "B", 2: "C", 1: "D", 0: "F"}

# GUIDE section 5 thresholds for grades A/B/C/D (below D is F)
SC_MIN_PCT = (70.0, 55.0, 40.0, 20.0)
MOD_MIN = (0.50, 0.40, 0.30, 0.20)
UEC_MIN = (0.62, 0.50, 0.37, 0.25)
AN_MAX = (0.06, 0.08, 0.10, 0.12)
GN_MAX = (0.38, 0.50, 0.63, 0.75)


def grade_at_least(value: float, thresholds: Sequence[float]) -> int:
    """Grade for a parameter where bigger is better (SC, MOD, UEC)."""
    for g, t in zip((4, 3, 2, 1), thresholds):
        if value >= t - 1e-9:
            return g
    return 0


def grade_at_most(value: float, thresholds: Sequence[float]) -> int:
    """Grade for a parameter where smaller is better (AN, GN)."""
    for g, t in zip((4, 3, 2, 1), thresholds):
        if value <= t + 1e-9:
            return g
    return 0


# --------------------------------------------------------------------------- ECC200 geometry

#: (rows, cols) -> (data codewords, EC codewords, data regions vertically, horizontally, RS blocks)
ECC200: dict[tuple[int, int], tuple[int, int, int, int, int]] = {
    (10, 10): (3, 5, 1, 1, 1), (12, 12): (5, 7, 1, 1, 1), (14, 14): (8, 10, 1, 1, 1),
    (16, 16): (12, 12, 1, 1, 1), (18, 18): (18, 14, 1, 1, 1), (20, 20): (22, 18, 1, 1, 1),
    (22, 22): (30, 20, 1, 1, 1), (24, 24): (36, 24, 1, 1, 1), (26, 26): (44, 28, 1, 1, 1),
    (32, 32): (62, 36, 2, 2, 1), (36, 36): (86, 42, 2, 2, 1), (40, 40): (114, 48, 2, 2, 1),
    (44, 44): (144, 56, 2, 2, 1), (48, 48): (174, 68, 2, 2, 1), (52, 52): (204, 84, 2, 2, 2),
    (64, 64): (280, 112, 4, 4, 2), (72, 72): (368, 144, 4, 4, 4), (80, 80): (456, 192, 4, 4, 4),
    (88, 88): (576, 224, 4, 4, 4), (96, 96): (696, 272, 4, 4, 4), (104, 104): (816, 336, 4, 4, 6),
    (120, 120): (1050, 408, 6, 6, 6), (132, 132): (1304, 496, 6, 6, 8), (144, 144): (1558, 620, 6, 6, 10),
    (8, 18): (5, 7, 1, 1, 1), (8, 32): (10, 11, 1, 2, 1), (12, 26): (16, 14, 1, 1, 1),
    (12, 36): (22, 18, 1, 2, 1), (16, 36): (32, 24, 1, 2, 1), (16, 48): (49, 28, 1, 2, 1),
}


def parse_version(version: str | None) -> tuple[int, int] | None:
    """zxing-cpp reports DataMatrix size as "ROWSxCOLS" in ``extra["Version"]``."""
    if not version:
        return None
    try:
        r, c = version.lower().split("x")
        return int(r), int(c)
    except ValueError:
        return None


@lru_cache(maxsize=64)
def placement(nrow: int, ncol: int) -> np.ndarray:
    """ECC200 module placement (ISO/IEC 16022 Annex F) of the mapping matrix.

    Returns an int32 array (nrow, ncol): codeword_index * 8 + bit (bit 0 = MSB),
    or -1 for the modules left over in the fixed corner pattern.
    """
    grid = np.full((nrow, ncol), -1, dtype=np.int32)
    filled = np.zeros((nrow, ncol), dtype=bool)

    def module(r: int, c: int, cw: int, bit: int) -> None:
        if r < 0:
            r += nrow
            c += 4 - ((nrow + 4) % 8)
        if c < 0:
            c += ncol
            r += 4 - ((ncol + 4) % 8)
        grid[r, c] = cw * 8 + bit
        filled[r, c] = True

    def utah(r: int, c: int, cw: int) -> None:
        for bit, (dr, dc) in enumerate(((-2, -2), (-2, -1), (-1, -2), (-1, -1), (-1, 0), (0, -2), (0, -1), (0, 0))):
            module(r + dr, c + dc, cw, bit)

    def corner(cw: int, cells: Sequence[tuple[int, int]]) -> None:
        for bit, (r, c) in enumerate(cells):
            module(r, c, cw, bit)

    n, m = nrow, ncol
    cw, r, c = 0, 4, 0
    while True:
        if r == n and c == 0:
            corner(cw, ((n - 1, 0), (n - 1, 1), (n - 1, 2), (0, m - 2), (0, m - 1), (1, m - 1), (2, m - 1), (3, m - 1)))
            cw += 1
        if r == n - 2 and c == 0 and m % 4:
            corner(cw, ((n - 3, 0), (n - 2, 0), (n - 1, 0), (0, m - 4), (0, m - 3), (0, m - 2), (0, m - 1), (1, m - 1)))
            cw += 1
        if r == n - 2 and c == 0 and m % 8 == 4:
            corner(cw, ((n - 3, 0), (n - 2, 0), (n - 1, 0), (0, m - 2), (0, m - 1), (1, m - 1), (2, m - 1), (3, m - 1)))
            cw += 1
        if r == n + 4 and c == 2 and not m % 8:
            corner(cw, ((n - 1, 0), (n - 1, m - 1), (0, m - 3), (0, m - 2), (0, m - 1), (1, m - 3), (1, m - 2), (1, m - 1)))
            cw += 1
        while True:  # sweep up and right
            if 0 <= r < n and 0 <= c < m and not filled[r, c]:
                utah(r, c, cw)
                cw += 1
            r -= 2
            c += 2
            if not (r >= 0 and c < m):
                break
        r += 1
        c += 3
        while True:  # sweep down and left
            if 0 <= r < n and 0 <= c < m and not filled[r, c]:
                utah(r, c, cw)
                cw += 1
            r += 2
            c -= 2
            if not (r < n and c >= 0):
                break
        r += 3
        c += 1
        if not (r < n or c < m):
            break
    grid.setflags(write=False)
    return grid


def data_modules(symbol: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Strip finder and alignment patterns: the symbol's (rows, cols) array -> mapping matrix."""
    _, _, vr, hr, _ = ECC200[(rows, cols)]
    rh, rw = rows // vr - 2, cols // hr - 2
    out = np.empty((vr * rh, hr * rw), dtype=symbol.dtype)
    for i in range(vr):
        for j in range(hr):
            out[i * rh : (i + 1) * rh, j * rw : (j + 1) * rw] = symbol[
                i * (rh + 2) + 1 : i * (rh + 2) + 1 + rh, j * (rw + 2) + 1 : j * (rw + 2) + 1 + rw
            ]
    return out


@lru_cache(maxsize=64)
def fixed_pattern(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask, dark) of every finder/clock module of every data region, in symbol orientation."""
    _, _, vr, hr, _ = ECC200.get((rows, cols), (0, 0, 1, 1, 1))
    rh, rw = rows // vr, cols // hr
    mask = np.zeros((rows, cols), dtype=bool)
    dark = np.zeros((rows, cols), dtype=bool)
    for i in range(vr):
        for j in range(hr):
            r0, c0 = i * rh, j * rw
            mask[r0 : r0 + rh, c0] = dark[r0 : r0 + rh, c0] = True  # L: left column
            mask[r0 + rh - 1, c0 : c0 + rw] = dark[r0 + rh - 1, c0 : c0 + rw] = True  # L: bottom row
            mask[r0, c0 : c0 + rw] = True  # clock: top row, dark on even columns
            dark[r0, c0 : c0 + rw : 2] = True
            mask[r0 : r0 + rh, c0 + rw - 1] = True  # clock: right column, dark from the bottom up
            dark[r0 + rh - 1 :: -2, c0 + rw - 1][: (rh + 1) // 2] = True
    mask.setflags(write=False)
    dark.setflags(write=False)
    return mask, dark


# --------------------------------------------------------------------------- report

#: what an uncalibrated camera may reject on: parameters it measures the same whatever its pose
ROBUST_PARAMETERS = ("decode", "sc", "mod", "uec", "fpd")
#: what depends on the camera's geometry (tilt, lens, paper curvature): reported, gated only when `calibrated`
GEOMETRIC_PARAMETERS = ("an", "gn")
#: below this many pixels per module a camera cannot resolve modules (verifier practice: ≥ 5 px per module);
#: modulation then mostly measures the lens and the image compression, not the print, so it is reported, not
#: gated; grid non-uniformity is not measured at all
MIN_MODULE_PX_FOR_MOD = 5.0
APERTURE_SIGMA = 0.2  # Gaussian aperture for SC and for the grid-error fit, in modules
#: how far past the threshold (in modulation units) a fixed-pattern module must be to count as damaged
FPD_MARGIN = 0.2
STANDARD = "ISO/IEC 15415-style estimate from an uncalibrated camera: a process-control indicator, not an ISO verification"


@dataclass(frozen=True)
class QualityReport:
    """Estimated grades of one symbol.

    `overall` is the grade a line gates on: the lowest grade among `gating`
    (the robust parameters, plus AN/GN on a calibrated camera). `overall_all`
    adds every parameter, geometric ones included, as ISO would. None when the
    symbol could not be measured.
    """

    overall: float | None
    grades: dict[str, int] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    gating: tuple[str, ...] = ROBUST_PARAMETERS

    @property
    def overall_all(self) -> float | None:
        return float(min(self.grades.values())) if self.overall is not None and self.grades else None

    @property
    def letter(self) -> str | None:
        return LETTERS[int(self.overall)] if self.overall is not None else None

    def parameters(self) -> list[dict[str, Any]]:
        """One entry per graded parameter: name, value (None for decode), grade, and whether it gates."""
        out = []
        for name, g in self.grades.items():
            value = None if name == "decode" else self.values.get(name)
            out.append({"name": name, "value": value, "grade": g, "letter": LETTERS[g], "gating": name in self.gating})
        return out

    def detail(self) -> dict[str, Any]:
        """Flat dict for Decoded.grade_detail (keys listed in README, Cameras with local decoding)."""
        d: dict[str, Any] = {"estimated": True, "standard": STANDARD}
        d.update(self.values)
        for k, g in self.grades.items():
            d[f"{k}_grade"] = g
        d["gating"] = [p for p in self.gating if p in self.grades]
        d["report_only"] = [p for p in self.grades if p not in self.gating]
        if self.overall is not None:
            d["overall_grade"] = self.overall
            d["letter"] = LETTERS[int(self.overall)]
            all_ = self.overall_all
            assert all_ is not None
            d["overall_all_grade"] = all_
            d["letter_all"] = LETTERS[int(all_)]
        return d


def _homography(corners: Sequence[tuple[float, float]] | np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Module space (x = column, y = row, 0..cols × 0..rows) -> image, through the four symbol corners."""
    src = np.array([[0, 0], [cols, 0], [cols, rows], [0, rows]], dtype=np.float32)
    dst = np.asarray(corners, dtype=np.float32).reshape(4, 2)
    return cv2.getPerspectiveTransform(src, dst)


class _Sampler:
    """Bilinear reflectance samples (0-100 % of full scale) of one symbol's neighbourhood; NaN outside the image.

    The crop is converted to float once per symbol, so a 120-code frame is
    not converted 120 times, and sub-pixel sampling is not quantised to 8 bits.
    """

    def __init__(self, gray: np.ndarray, corners: np.ndarray, margin: float) -> None:
        h, w = gray.shape
        self.x0 = max(int(np.floor(corners[:, 0].min() - margin)), 0)
        self.y0 = max(int(np.floor(corners[:, 1].min() - margin)), 0)
        x1 = min(int(np.ceil(corners[:, 0].max() + margin)) + 1, w)
        y1 = min(int(np.ceil(corners[:, 1].max() + margin)) + 1, h)
        self.crop: np.ndarray = gray[self.y0 : max(y1, self.y0 + 1), self.x0 : max(x1, self.x0 + 1)].astype(np.float32) * np.float32(100.0 / 255.0)

    def smoothed(self, sigma: float) -> _Sampler:
        """The same crop, Gaussian-smoothed: gives the grid fit a peak at module centres even on a sharp print."""
        out = _Sampler.__new__(_Sampler)
        out.x0, out.y0 = self.x0, self.y0
        out.crop = cv2.GaussianBlur(self.crop, (0, 0), sigma) if sigma > 0.3 else self.crop
        return out

    def extremes(self, polygon: np.ndarray) -> tuple[float, float]:
        """(max, min) of the crop inside a convex polygon (image coordinates); (nan, nan) when empty."""
        mask = np.zeros(self.crop.shape, np.uint8)
        cv2.fillConvexPoly(mask, np.round((polygon - (self.x0, self.y0)) * 16).astype(np.int32), 1, lineType=cv2.LINE_8, shift=4)
        vals = self.crop[mask > 0]
        if vals.size == 0:
            return float("nan"), float("nan")
        return float(vals.max()), float(vals.min())

    def at(self, pts: np.ndarray) -> np.ndarray:
        n = len(pts)
        m = (pts - (self.x0, self.y0)).astype(np.float32)
        if n < 32000:  # remap maps are 2-D and below 32767 on each side
            m = m.reshape(n, 1, 2)
        else:
            width = 256
            m = np.concatenate([m, np.full((-n % width, 2), -1e6, dtype=np.float32)]).reshape(-1, width, 2)
        # map2=None is OpenCV's documented form for a two-channel map1; the stubs of OpenCV < 5.1 require an array there
        out = cv2.remap(self.crop, m, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))  # type: ignore[call-overload, unused-ignore]
        return np.asarray(out).reshape(-1)[:n]


def _var(v: np.ndarray) -> float:
    """Variance, or -1 when a sample fell outside the image (np.var is ten times slower on small arrays)."""
    n = len(v)
    s = float(v.sum())
    if s != s:  # NaN
        return -1.0
    return float(np.dot(v, v)) / n - (s / n) ** 2


def _project(H: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return cv2.perspectiveTransform(pts.reshape(-1, 1, 2).astype(np.float64), H).reshape(-1, 2)


@lru_cache(maxsize=64)
def _centres(rows: int, cols: int) -> np.ndarray:
    rr, cc = np.mgrid[0:rows, 0:cols]
    out = np.stack([cc.ravel() + 0.5, rr.ravel() + 0.5], axis=1).astype(np.float64)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=64)
def _ring(rows: int, cols: int) -> np.ndarray:
    """Centres of the one-module quiet-zone ring around the symbol."""
    out = np.concatenate(
        [
            np.stack([np.arange(-1, cols + 1) + 0.5, np.full(cols + 2, -0.5)], 1),
            np.stack([np.arange(-1, cols + 1) + 0.5, np.full(cols + 2, rows + 0.5)], 1),
            np.stack([np.full(rows, -0.5), np.arange(rows) + 0.5], 1),
            np.stack([np.full(rows, cols + 0.5), np.arange(rows) + 0.5], 1),
        ]
    ).astype(np.float64)
    out.setflags(write=False)
    return out


#: sub-sample offsets (module units) averaged into one module's reflectance: a 0.4-module square aperture,
#: symmetric about the centre so that it looks the same after any 90° rotation or mirror of the image
APERTURE = np.array([(dx, dy) for dy in (-0.2, 0.0, 0.2) for dx in (-0.2, 0.0, 0.2)], dtype=np.float64)


@lru_cache(maxsize=64)
def perimeter_pattern(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask, dark) of the outer L finder and outer clock tracks: the same for every ECC200 and DMRE size."""
    mask = np.zeros((rows, cols), dtype=bool)
    dark = np.zeros((rows, cols), dtype=bool)
    mask[:, 0] = mask[-1, :] = mask[0, :] = mask[:, -1] = True
    dark[:, 0] = dark[-1, :] = True
    dark[0, 0::2] = True
    dark[rows - 1 :: -2, cols - 1] = True
    dark[0, cols - 1] = False  # clock corner: light for every even size
    mask.setflags(write=False)
    dark.setflags(write=False)
    return mask, dark


def _orientations(corners: np.ndarray, rows: int, cols: int) -> list[tuple[np.ndarray, int, int, str]]:
    """The eight corner orderings (4 rotations × mirror) that keep the symbol's ROWSxCOLS: (corners, rows, cols, name)."""
    out = []
    for mirror in (False, True):
        for s in range(4):
            c = np.roll(corners, -s, axis=0)
            if mirror:
                c = c[[0, 3, 2, 1]]
            out.append((c, rows, cols, f"{'mirror+' if mirror else ''}{90 * s}"))
    return out


def _orient(sampler: _Sampler, corners: np.ndarray, rows: int, cols: int, search: bool = True) -> tuple[np.ndarray, bool, float, str]:
    """Put the symbol in its canonical orientation from its own finder pattern: (corners, inverted, match, name).

    Whatever order the decoder reports corners in, and however the camera
    holds the code (rotated, mirrored, inverted), the grid is then sampled in
    the same order, so every parameter is invariant to 90° rotations.
    `search=False` only measures the given ordering.
    """
    mask, ideal = perimeter_pattern(rows, cols)
    options = _orientations(corners, rows, cols) if search else [(corners, rows, cols, "0")]
    Hs = np.stack([_homography(c, r2, c2) for c, r2, c2, _ in options])
    v = sampler.at(_project_many(Hs, _centres(rows, cols)).reshape(-1, 2)).reshape(len(options), rows, cols)
    best: tuple[np.ndarray, bool, float, str] = (corners, False, -1.0, "0")
    for (c, _, _, name), vi in zip(options, v):
        if np.isnan(vi).any():
            continue
        dark = vi < (vi.max() + vi.min()) / 2
        for inverted in (False, True):
            obs = ~dark if inverted else dark
            match = float(np.mean(obs[mask] == ideal[mask]))
            if match > best[2] + 1e-9:
                best = (c, inverted, match, name)
    return best


def _project_many(Hs: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Points (N, 2) through K homographies (K, 3, 3) -> (K, N, 2)."""
    P = np.vstack([pts.T, np.ones((1, len(pts)))])
    Q = np.matmul(Hs, P)  # (K, 3, N)
    out: np.ndarray = (Q[:, :2, :] / Q[:, 2:3, :]).transpose(0, 2, 1)
    return out


def _module_corners(rows: int, cols: int) -> np.ndarray:
    return np.array([[0, 0], [cols, 0], [cols, rows], [0, rows]], dtype=np.float64)


def _homographies(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Homographies (K, 3, 3) taking the 4 points `src` (4, 2) to each of `dst` (K, 4, 2): one batched solve
    instead of K calls to cv2.getPerspectiveTransform."""
    k = len(dst)
    x, y = src[:, 0], src[:, 1]
    u, v = dst[..., 0], dst[..., 1]
    A = np.zeros((k, 8, 8))
    A[:, 0::2, 0] = x
    A[:, 0::2, 1] = y
    A[:, 0::2, 2] = 1
    A[:, 1::2, 3] = x
    A[:, 1::2, 4] = y
    A[:, 1::2, 5] = 1
    A[:, 0::2, 6] = -u * x
    A[:, 0::2, 7] = -u * y
    A[:, 1::2, 6] = -v * x
    A[:, 1::2, 7] = -v * y
    b = np.empty((k, 8))
    b[:, 0::2] = u
    b[:, 1::2] = v
    h = np.linalg.solve(A, b[..., None])[..., 0]
    return np.concatenate([h, np.ones((k, 1))], axis=1).reshape(k, 3, 3)


def _moves(n: int, step: float) -> np.ndarray:
    """The 2n single-coordinate moves of +-step, shape (2n, n)."""
    eye = np.eye(n) * step
    return np.concatenate([eye, -eye])


def _refine_corners(sampler: _Sampler, corners: np.ndarray, rows: int, cols: int, steps: Sequence[float] = (0.25, 0.125, 0.0625)) -> np.ndarray:
    """Move the corners (best-improvement descent along the symbol's own axes, down to 1/16 module) to where
    the module centres are sharpest (largest variance of the centre samples).

    The decoder's corners are good enough to decode, not to measure: a
    one-pixel error moves the sampling points towards module edges and the
    modulation drops. Fitting the grid to the symbol's own modules makes the
    measurement independent of where the decoder put the corners; stepping in
    module units along the symbol's axes (not the image's) makes the search
    itself the same whatever the rotation of the image. All 16 moves of a
    step are sampled in one batch.
    """
    pts = _centres(rows, cols)
    if len(pts) > 900:  # large symbols: every other module is plenty to place the corners
        pts = pts.reshape(rows, cols, 2)[::2, ::2].reshape(-1, 2)
    H0 = _homography(corners, rows, cols)
    base = _module_corners(rows, cols)
    d = np.zeros(8)

    def spreads(cands: np.ndarray) -> np.ndarray:
        img_corners = _project_many(H0[None], (base + cands.reshape(-1, 4, 2)).reshape(-1, 2)).reshape(-1, 4, 2)
        Hs = _homographies(base, img_corners)
        v = sampler.at(_project_many(Hs, pts).reshape(-1, 2)).reshape(len(cands), len(pts)).astype(np.float64)
        var: np.ndarray = v.var(axis=1)
        var[np.isnan(var)] = -1.0
        return var

    f_best = float(spreads(d[None])[0])
    for step in steps:
        for _ in range(4):
            # the 16 single moves and, from the same samples, a parabola per coordinate: all 8 coordinates go
            # to their vertex at once (one Newton-like step), else the best single move is taken
            cands = d + _moves(8, step)
            f = spreads(cands)
            fp, fm = f[:8], f[8:]
            curv = fp + fm - 2 * f_best
            with np.errstate(divide="ignore", invalid="ignore"):
                vertex = np.where(curv < 0, 0.5 * step * (fm - fp) / curv, np.sign(fp - fm) * step)
            vertex = np.clip(np.nan_to_num(vertex), -step, step)
            joint = d + vertex
            f_joint = float(spreads(joint[None])[0])
            k = int(np.argmax(f))
            if f_joint > max(f[k], f_best) + 1e-6:
                d, f_best = joint, f_joint
            elif f[k] > f_best + 1e-6:
                d, f_best = cands[k], float(f[k])
            else:
                break
    return _project(H0, base + d.reshape(4, 2))


def _tiles(rows: int, cols: int, size: int = 8) -> np.ndarray:
    """Tile index (rows*cols,) of each module: tiles of about size×size modules."""
    nr, nc = max(1, round(rows / size)), max(1, round(cols / size))
    ri = np.minimum((np.arange(rows) * nr) // rows, nr - 1)
    ci = np.minimum((np.arange(cols) * nc) // cols, nc - 1)
    return (ri[:, None] * nc + ci[None, :]).ravel()


def _grid_nonuniformity(sampler: _Sampler, H: np.ndarray, rows: int, cols: int) -> float:
    """Largest shift (in modules) of the real grid from the fitted homography, per tile of ~8×8 modules.

    The homography already absorbs perspective, so what is left is the
    print's own grid error, or the paper's curvature: our grid non-uniformity.
    ISO measures every grid intersection on a square-on image; this sees
    local shifts of whole tiles, to 0.05 module.
    """
    centres = _centres(rows, cols)
    tile = _tiles(rows, cols)
    n_tiles = int(tile.max()) + 1
    counts = np.bincount(tile, minlength=n_tiles).astype(np.float64)
    d = np.zeros((n_tiles, 2))
    moves = np.concatenate([np.zeros((1, 2)), _moves(2, 1.0)])  # stay, +x, +y, -x, -y

    n = len(centres)

    def tile_vars(shifts: np.ndarray) -> np.ndarray:
        """Variance per tile of the centre samples for M candidate shift sets (M, n_tiles, 2) -> (M, n_tiles)."""
        pts = (centres[None] + shifts[:, tile]).reshape(-1, 2)
        v = sampler.at(_project(H, pts)).astype(np.float64).reshape(len(shifts), n)
        idx = (tile[None] + n_tiles * np.arange(len(shifts))[:, None]).ravel()
        s1 = np.bincount(idx, v.ravel(), n_tiles * len(shifts)).reshape(len(shifts), n_tiles)
        s2 = np.bincount(idx, (v * v).ravel(), n_tiles * len(shifts)).reshape(len(shifts), n_tiles)
        var = s2 / counts - (s1 / counts) ** 2
        var[np.isnan(var)] = -1.0
        return var

    for step in (0.15, 0.05):
        for _ in range(3):
            shifts = np.clip(d[None] + moves[:, None] * step, -0.5, 0.5)  # (5, n_tiles, 2)
            scores = tile_vars(shifts)
            best = np.argmax(scores - np.r_[0.0, [1e-6] * 4][:, None], axis=0)
            if not best.any():
                break
            d = shifts[best, np.arange(n_tiles)]
    small = counts < 16  # a sliver of a tile has too few modules to place
    d[small] = 0.0
    return float(np.hypot(d[:, 0], d[:, 1]).max())


def _fixed_pattern_damage(dark: np.ndarray, mod: np.ndarray, rows: int, cols: int, values: dict[str, Any]) -> int:
    """Share of wrong modules in the worst L-finder leg or clock track of any region, graded 0/9/13/17 %.

    Thresholds after the L-finder / clock-track damage grading of ISO/IEC
    15415 Annex for Data Matrix (simplified: colour errors only). A module
    counts as damaged when it is clearly the wrong colour (modulation ≥
    FPD_MARGIN on the wrong side of the threshold); one sitting on the
    threshold is a modulation problem, graded there. Sizes
    without a table entry (DMRE) are checked on the outer perimeter only.
    """
    if (rows, cols) in ECC200:
        _, ideal = fixed_pattern(rows, cols)
        values["fpd_scope"] = "all_regions"
    else:
        _, ideal = perimeter_pattern(rows, cols)
        values["fpd_scope"] = "perimeter"
    _, _, vr, hr, _ = ECC200.get((rows, cols), (0, 0, 1, 1, 1))
    if values["fpd_scope"] == "perimeter":
        vr = hr = 1
    wrong = (dark != ideal) & (mod >= FPD_MARGIN)
    rh, rw = rows // vr, cols // hr
    frac = 0.0
    for i in range(vr):
        for j in range(hr):
            r0, r1, c0, c1 = i * rh, (i + 1) * rh, j * rw, (j + 1) * rw
            # each leg of the L and each clock track of each region is graded on its own, as ISO does
            for seg in (wrong[r0:r1, c0], wrong[r1 - 1, c0:c1], wrong[r0, c0:c1], wrong[r0:r1, c1 - 1]):
                frac = max(frac, float(np.mean(seg)))
    values["fpd"] = round(frac, 3)
    return grade_at_most(frac, (0.0, 0.09, 0.13, 0.17))


def measure(
    gray: np.ndarray,
    corners: Sequence[tuple[float, float]],
    version: str | None,
    uec: float | None = None,
    decode_grade: int = 4,
    *,
    calibrated: bool = False,
) -> QualityReport:
    """Estimate ISO 15415-style grades for one decoded DataMatrix.

    `corners` are the decoder's four symbol corners in image coordinates of
    `gray` (uint8, one channel), in any order around the symbol; `version` is
    "ROWSxCOLS". `uec` is the decoder's unused error correction 0..1.
    `calibrated`: the camera looks square-on at the code with a known scale,
    so axial and grid non-uniformity are the print's and may gate.
    """
    gating: tuple[str, ...] = ROBUST_PARAMETERS + (GEOMETRIC_PARAMETERS if calibrated else ())
    size = parse_version(version)
    if size is None or gray.ndim != 2:
        return QualityReport(None, values={"reason": f"unknown symbol size {version!r}"}, gating=gating)
    rows, cols = size
    c = np.asarray(corners, dtype=np.float64).reshape(4, 2)
    side = [np.linalg.norm(c[(i + 1) % 4] - c[i]) for i in range(4)]
    module_px = float((side[0] + side[2]) / 2 / cols + (side[1] + side[3]) / 2 / rows) / 2
    if min(rows, cols) < 2 or module_px < 1.5:
        return QualityReport(None, values={"reason": f"module {module_px:.1f} px too small to sample", "module_px": round(module_px, 2)}, gating=gating)
    sampler = _Sampler(gray, c, margin=3 * module_px)

    c, _, _, name = _orient(sampler, c, rows, cols)
    c = _refine_corners(sampler, c, rows, cols)
    c, inverted, match, _ = _orient(sampler, c, rows, cols, search=False)  # polarity and match on the fitted grid
    H = _homography(c, rows, cols)
    centres = _centres(rows, cols)  # on the fitted grid: per-tile shifts would pick noise maxima and bias MOD up
    sub = (centres[:, None, :] + APERTURE[None, :, :]).reshape(-1, 2)
    samples = sampler.at(_project(H, sub)).reshape(rows * cols, len(APERTURE))
    if np.isnan(samples).any():
        return QualityReport(None, values={"reason": "symbol extends outside the image"}, gating=gating)
    symbol = samples.mean(axis=1).reshape(rows, cols)
    ring = sampler.at(_project(H, _ring(rows, cols)))
    allv = np.concatenate([symbol.ravel(), ring[~np.isnan(ring)]])
    # Rmax / Rmin over the whole symbol and its one-module quiet-zone ring, through a Gaussian aperture: the
    # extremes of a symmetric filter over a region are the same for every 90° rotation of the image, where the
    # extremes of the module-centre samples would move with each hair's breadth of the grid fit
    smooth = sampler.smoothed(APERTURE_SIGMA * module_px)
    # the grid error is measured against a fit on a smoothed copy: on a sharp print the raw fit is flat-topped
    # (anywhere inside the module is "centre"), which is fine for sampling but not as a reference for shifts
    gn: float | None = None
    if module_px >= MIN_MODULE_PX_FOR_MOD:  # below, a tile's best shift is noise, and the search costs the most
        gn = _grid_nonuniformity(smooth, _homography(_refine_corners(smooth, c, rows, cols, steps=(0.0625,)), rows, cols), rows, cols)
    rmax, rmin = smooth.extremes(_project(H, np.array([[-1, -1], [cols + 1, -1], [cols + 1, rows + 1], [-1, rows + 1]], dtype=np.float64)))
    if not rmax > rmin:
        rmax, rmin = float(np.nanmax(allv)), float(np.nanmin(allv))
    sc = rmax - rmin
    values: dict[str, Any] = {
        "version": f"{rows}x{cols}",
        "module_px": round(module_px, 2),
        "rmax": round(rmax, 1),
        "rmin": round(rmin, 1),
        "sc": round(sc, 1),
        "orientation": name,
        "inverted": inverted,
        "finder_match": round(match, 3),
        "calibrated": calibrated,
    }
    grades: dict[str, int] = {"decode": decode_grade, "sc": grade_at_least(sc, SC_MIN_PCT)}

    gt = (rmax + rmin) / 2
    mod = 2.0 * np.abs(symbol - gt) / sc if sc > 0 else np.zeros_like(symbol)
    mod_grades = np.select([mod >= t for t in MOD_MIN], [4, 3, 2, 1], 0)
    values["mod_min"] = round(float(mod.min()), 3)
    values["mod_p05"] = round(float(np.partition(mod.ravel(), mod.size // 20)[mod.size // 20]), 3)
    grades["mod"] = _modulation_grade(mod_grades, rows, cols, values)
    values["mod"] = values["mod_p05"]

    if uec is not None:
        values["uec"] = round(float(uec), 3)
        grades["uec"] = grade_at_least(float(uec), UEC_MIN)

    dark = symbol > gt if inverted else symbol < gt
    grades["fpd"] = _fixed_pattern_damage(dark, mod, rows, cols, values)

    # axial non-uniformity: module pitch along both axes at the symbol centre, perspective removed
    mid = np.array([[cols / 2, rows / 2], [cols / 2 + 0.5, rows / 2], [cols / 2 - 0.5, rows / 2], [cols / 2, rows / 2 + 0.5], [cols / 2, rows / 2 - 0.5]])
    p = _project(H, mid)
    xdim, ydim = float(np.linalg.norm(p[1] - p[2])), float(np.linalg.norm(p[3] - p[4]))
    an = abs(xdim - ydim) / ((xdim + ydim) / 2)
    values["an"] = round(an, 4)
    grades["an"] = grade_at_most(an, AN_MAX)
    if gn is not None:
        values["gn"] = round(gn, 3)
        grades["gn"] = grade_at_most(gn, GN_MAX)
    else:
        values["gn"] = None
        values["gn_not_measured"] = f"{module_px:.1f} px/module < {MIN_MODULE_PX_FOR_MOD:g}: too coarse to place the grid per tile"

    if module_px < MIN_MODULE_PX_FOR_MOD and "mod" in gating:
        gating = tuple(p for p in gating if p != "mod")
        values["mod_report_only"] = f"{module_px:.1f} px/module < {MIN_MODULE_PX_FOR_MOD:g}: too coarse to measure modulation"
    overall = float(min(g for k, g in grades.items() if k in gating))
    return QualityReport(overall, grades, values, gating)


def _modulation_grade(mod_grades: np.ndarray, rows: int, cols: int, values: dict[str, Any]) -> int:
    """ISO 15415 §7.8.3-style: grade codewords by their worst module, let EC absorb the bad ones.

    For each level L = 4..1 the codewords graded below L count as erasures;
    UEC_L = 1 − erasures / EC codewords (worst RS block); the level scores
    min(L, UEC grade of UEC_L); modulation = the best level score.
    Sizes without a table entry (DMRE) fall back to the 5th-percentile module.
    """
    spec = ECC200.get((rows, cols))
    if spec is None:
        values["mod_method"] = "module_p05"
        return int(np.percentile(mod_grades, 5))
    data_cw, ec_cw, _, _, blocks = spec
    total = data_cw + ec_cw
    place = placement(*data_modules(np.zeros((rows, cols)), rows, cols).shape)
    mapped = data_modules(mod_grades, rows, cols)
    sel = place >= 0
    cw_idx = place[sel] // 8
    cw_grade = np.full(total, 4, dtype=np.int64)
    np.minimum.at(cw_grade, cw_idx, mapped[sel])
    block = np.arange(total) % blocks
    ec_per_block = ec_cw / blocks
    best = 0
    for level in (4, 3, 2, 1):
        erasures = np.bincount(block[cw_grade < level], minlength=blocks)
        uec_l = 1.0 - erasures.max() / ec_per_block
        best = max(best, min(level, grade_at_least(uec_l, UEC_MIN)))
    values["mod_method"] = "codeword_ec"
    values["codewords_below_c"] = int(np.sum(cw_grade < 2))
    return best


