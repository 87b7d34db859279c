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

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

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


@dataclass(frozen=True)
class QualityReport:
    """Estimated grades of one symbol. `overall` is None when the symbol could not be measured."""

    overall: float | None
    grades: dict[str, int] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)

    def detail(self) -> dict[str, Any]:
        """Flat dict for Decoded.grade_detail; keys documented in docs_devices_camera.md."""
        d: dict[str, Any] = {"estimated": True, "standard": "ISO/IEC 15415-style estimate, not a verification"}
        d.update(self.values)
        for k, g in self.grades.items():
            d[f"{k}_grade"] = g
        if self.overall is not None:
            d["overall_grade"] = self.overall
            d["letter"] = LETTERS[int(self.overall)]
        return d


def _homography(corners: Sequence[tuple[float, float]], rows: int, cols: int) -> np.ndarray:
    src = np.array([[0, 0], [cols, 0], [cols, rows], [0, rows]], dtype=np.float32)
    dst = np.array(corners, dtype=np.float32)
    return cv2.getPerspectiveTransform(src, dst)


def _sample(gray: np.ndarray, pts: np.ndarray, aperture: int) -> np.ndarray:
    """Aperture-averaged reflectance (0-100 % of full scale) at points; NaN outside the image.

    Only the bounding box of the points is filtered, so a 120-code frame does
    not filter the full frame 120 times.
    """
    h, w = gray.shape
    pad = aperture + 2
    x0 = max(int(np.floor(pts[:, 0].min())) - pad, 0)
    y0 = max(int(np.floor(pts[:, 1].min())) - pad, 0)
    x1 = min(int(np.ceil(pts[:, 0].max())) + pad + 1, w)
    y1 = min(int(np.ceil(pts[:, 1].max())) + pad + 1, h)
    if x1 <= x0 or y1 <= y0:
        return np.full(len(pts), np.nan, dtype=np.float32)
    crop = gray[y0:y1, x0:x1].astype(np.float32)
    if aperture > 1:
        crop = cv2.blur(crop, (aperture, aperture), borderType=cv2.BORDER_REPLICATE)
    mx = (pts[:, 0] - x0).astype(np.float32).reshape(-1, 1)
    my = (pts[:, 1] - y0).astype(np.float32).reshape(-1, 1)
    vals = cv2.remap(crop, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))
    return vals.reshape(-1) * (100.0 / 255.0)


def _orient(dark: np.ndarray, rows: int, cols: int) -> tuple[int, bool, float]:
    """Find the rotation (k·90°) and polarity whose finder/clock pattern matches best.

    zxing-cpp already reports corners in symbol orientation; this check keeps
    the measurement honest if a future decoder does not, and yields the
    fixed-pattern match ratio as a by-product.
    """
    mask, ideal = fixed_pattern(rows, cols)
    best = (0, False, -1.0)
    for k in range(4):
        g = np.rot90(dark, k)
        if g.shape != (rows, cols):
            continue
        for inverted in (False, True):
            obs = ~g if inverted else g
            match = float(np.mean(obs[mask] == ideal[mask]))
            if match > best[2]:
                best = (k, inverted, match)
            if match >= 0.95:  # the usual case, first try: no need to look at the other seven
                return best
    return best


def measure(
    gray: np.ndarray,
    corners: Sequence[tuple[float, float]],
    version: str | None,
    uec: float | None = None,
    decode_grade: int = 4,
) -> QualityReport:
    """Estimate ISO 15415-style grades for one decoded DataMatrix.

    `corners` are (top-left, top-right, bottom-right, bottom-left) in symbol
    orientation, image coordinates of `gray` (uint8, one channel). `uec` is the
    decoder's unused error correction 0..1 when it reports one.
    """
    size = parse_version(version)
    if size is None or gray.ndim != 2:
        return QualityReport(None, values={"reason": f"unknown symbol size {version!r}"})
    rows, cols = size
    c = np.asarray(corners, dtype=np.float64)
    top, bottom = np.linalg.norm(c[1] - c[0]), np.linalg.norm(c[2] - c[3])
    left, right = np.linalg.norm(c[3] - c[0]), np.linalg.norm(c[2] - c[1])
    xdim, ydim = (top + bottom) / 2 / cols, (left + right) / 2 / rows
    module_px = float((xdim + ydim) / 2)
    if module_px < 1.5:
        return QualityReport(None, values={"reason": f"module {module_px:.1f} px too small to sample", "module_px": round(module_px, 2)})

    H = _homography(corners, rows, cols)
    grid, affine_pinv = _module_space(rows, cols)
    pts = cv2.perspectiveTransform(grid.reshape(-1, 1, 2), H).reshape(-1, 2)
    aperture = max(1, int(round(0.5 * module_px)))
    refl = _sample(gray, pts, aperture)
    mod_r = refl[: rows * cols]
    if np.isnan(mod_r).any():
        return QualityReport(None, values={"reason": "symbol extends outside the image"})
    valid = refl[~np.isnan(refl)]
    rmax, rmin = float(valid.max()), float(valid.min())
    sc = rmax - rmin
    values: dict[str, Any] = {
        "version": f"{rows}x{cols}",
        "module_px": round(module_px, 2),
        "rmax": round(rmax, 1),
        "rmin": round(rmin, 1),
        "sc": round(sc, 1),
    }
    grades: dict[str, int] = {"decode": decode_grade, "sc": grade_at_least(sc, SC_MIN_PCT)}

    gt = (rmax + rmin) / 2
    symbol = mod_r.reshape(rows, cols)
    k, inverted, fp_match = _orient(symbol < gt, rows, cols)
    symbol = np.rot90(symbol, k)
    values["orientation_fix"] = 90 * k
    values["inverted"] = inverted
    values["finder_match"] = round(fp_match, 3)
    mod = 2.0 * np.abs(symbol - gt) / sc if sc > 0 else np.zeros_like(symbol)
    mod_grades = np.select([mod >= t for t in MOD_MIN], [4, 3, 2, 1], 0)
    values["mod_min"] = round(float(mod.min()), 3)
    values["mod_p05"] = round(float(np.partition(mod.ravel(), mod.size // 20)[mod.size // 20]), 3)
    grades["mod"] = _modulation_grade(mod_grades, rows, cols, values)

    if uec is not None:
        values["uec"] = round(float(uec), 3)
        grades["uec"] = grade_at_least(float(uec), UEC_MIN)

    an = float(abs(xdim - ydim) / module_px)
    values["an"] = round(float(an), 4)
    grades["an"] = grade_at_most(an, AN_MAX)
    gn = _grid_nonuniformity(pts[: rows * cols], grid[: rows * cols], affine_pinv, module_px)
    values["gn"] = round(gn, 3)
    grades["gn"] = grade_at_most(gn, GN_MAX)

    return QualityReport(float(min(grades.values())), grades, values)


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


def _grid_nonuniformity(img_pts: np.ndarray, centres: np.ndarray, affine_pinv: np.ndarray, module_px: float) -> float:
    """Largest distance, in modules, between the corner-defined grid and its best affine fit."""
    img = img_pts.astype(np.float64)
    A = np.hstack([centres.astype(np.float64), np.ones((len(centres), 1))])
    resid = np.linalg.norm(A @ (affine_pinv @ img) - img, axis=1)
    return float(resid.max() / module_px)


@lru_cache(maxsize=64)
def _module_space(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Module centres (row-major) then the quiet-zone ring one module outside, in module units; and the
    pseudo-inverse of the affine design matrix over the centres. Per size, not per symbol."""
    rr, cc = np.mgrid[0:rows, 0:cols]
    centres = np.stack([cc.ravel() + 0.5, rr.ravel() + 0.5], axis=1)
    ring = np.concatenate(
        [
            np.stack([np.arange(-1, cols + 1) + 0.5, np.full(cols + 2, -0.5)], 1),
            np.stack([np.arange(-1, cols + 1) + 0.5, np.full(cols + 2, rows + 0.5)], 1),
            np.stack([np.full(rows, -0.5), np.arange(rows) + 0.5], 1),
            np.stack([np.full(rows, cols + 0.5), np.arange(rows) + 0.5], 1),
        ]
    )
    grid = np.concatenate([centres, ring]).astype(np.float32)
    pinv = np.linalg.pinv(np.hstack([centres, np.ones((len(centres), 1))]))
    grid.setflags(write=False)
    pinv.setflags(write=False)
    return grid, pinv
