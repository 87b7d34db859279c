"""The ISO 15415-style estimates in drivers/quality.py, on symbols rendered and decoded by real zxing-cpp."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import zxingcpp

from linectl.drivers import quality as q
from linectl.drivers.decoders import ZxingDecoder

DM = zxingcpp.BarcodeFormat.DataMatrix

# GF(256) with the DataMatrix field polynomial x^8+x^5+x^3+x^2+1 (0x12D)
EXP = [0] * 512
LOG = [0] * 256
_x = 1
for _i in range(255):
    EXP[_i], LOG[_x] = _x, _i
    _x <<= 1
    if _x & 0x100:
        _x ^= 0x12D
for _i in range(255, 512):
    EXP[_i] = EXP[_i - 255]


def syndromes(cws: list[int], nsym: int) -> list[int]:
    out = []
    for j in range(1, nsym + 1):
        s = 0
        for c in cws:
            s = (EXP[(LOG[s] + j) % 255] if s else 0) ^ c
        out.append(s)
    return out


def render(content: str = "[01]09506000134352[21]ABC123[10]LOT1[17]271231", scale: int = 6, pad: int = 40, **kw: object) -> np.ndarray:
    b = zxingcpp.create_barcode(content, DM, gs1=content.startswith("["), **kw)
    img = np.asarray(zxingcpp.write_barcode_to_image(b, scale=scale, add_quiet_zones=False))
    return np.pad(img, pad, constant_values=255)


def shade(img: np.ndarray, paper: float, ink: float) -> np.ndarray:
    return np.where(img < 128, ink, paper).astype(np.uint8)


def measure(img: np.ndarray, **kw: object) -> q.QualityReport:
    (sym,) = ZxingDecoder(try_invert=True).decode(img)
    return q.measure(img, sym.corners, sym.version, sym.uec, **kw)


def test_grade_thresholds_follow_guide_section_5() -> None:
    assert [q.grade_at_least(v, q.SC_MIN_PCT) for v in (70, 69.9, 55, 40, 20, 19.9)] == [4, 3, 3, 2, 1, 0]
    assert [q.grade_at_least(v, q.MOD_MIN) for v in (0.5, 0.4, 0.3, 0.2, 0.19)] == [4, 3, 2, 1, 0]
    assert [q.grade_at_least(v, q.UEC_MIN) for v in (0.62, 0.5, 0.37, 0.25, 0.2)] == [4, 3, 2, 1, 0]
    assert [q.grade_at_most(v, q.AN_MAX) for v in (0.06, 0.08, 0.10, 0.12, 0.13)] == [4, 3, 2, 1, 0]
    assert [q.grade_at_most(v, q.GN_MAX) for v in (0.38, 0.5, 0.63, 0.75, 0.8)] == [4, 3, 2, 1, 0]


@pytest.mark.parametrize("version", list(range(1, 31)))
def test_module_placement_yields_valid_reed_solomon_codewords(version: int) -> None:
    """Every ECC200 size (squares 1-24, rectangles 25-30): sampled codewords have zero syndromes."""
    img = render("A12", scale=4, pad=8, version=version)
    (sym,) = ZxingDecoder().decode(img)
    rows, cols = q.parse_version(sym.version)  # type: ignore[misc]
    H = q._homography(sym.corners, rows, cols)
    rr, cc = np.mgrid[0:rows, 0:cols]
    pts = cv2.perspectiveTransform(np.stack([cc.ravel() + 0.5, rr.ravel() + 0.5], 1).astype(np.float32).reshape(-1, 1, 2), H)
    pts = np.round(pts.reshape(-1, 2)).astype(int)
    bits = (img[pts[:, 1], pts[:, 0]] < 128).reshape(rows, cols)
    mapped = q.data_modules(bits, rows, cols)
    place = q.placement(*mapped.shape)
    data, ec, _, _, blocks = q.ECC200[(rows, cols)]
    cw = [0] * (data + ec)
    for (i, j), v in np.ndenumerate(place):
        if v >= 0 and mapped[i, j]:
            cw[v // 8] |= 0x80 >> (v % 8)
    for b in range(blocks):
        assert not any(syndromes(cw[b:data:blocks] + cw[data + b :: blocks], ec // blocks)), (rows, cols, b)
    # and the finder/clock model matches the symbol
    mask, dark = q.fixed_pattern(rows, cols)
    assert np.array_equal(bits[mask], dark[mask])


def test_clean_symbol_grades_a() -> None:
    rep = measure(shade(render(), 235, 20))
    assert rep.overall == 4.0
    assert rep.grades == {"decode": 4, "sc": 4, "mod": 4, "uec": 4, "fpd": 4, "an": 4, "gn": 4}
    d = rep.detail()
    assert d["estimated"] is True and d["letter"] == "A" and d["version"] == "22x22" and d["finder_match"] == 1.0


@pytest.mark.parametrize(("paper", "ink", "grade"), [(235, 40, 4), (220, 70, 3), (200, 95, 2), (180, 120, 1), (170, 135, 0)])
def test_symbol_contrast_grade(paper: int, ink: int, grade: int) -> None:
    rep = measure(shade(render(), paper, ink))
    assert rep.grades["sc"] == grade
    assert rep.values["sc"] == pytest.approx((paper - ink) / 2.55, abs=1.0)


@pytest.mark.parametrize("angle", [0, 30, 90, 180, 250])
def test_rotation_does_not_change_the_grade(angle: float) -> None:
    img = shade(render(pad=80), 230, 25)
    M = cv2.getRotationMatrix2D((img.shape[1] / 2, img.shape[0] / 2), angle, 1.0)
    rot = cv2.warpAffine(img, M, img.shape[::-1], flags=cv2.INTER_LINEAR, borderValue=230)
    rep = measure(rot)
    assert rep.overall is not None and rep.overall >= 3
    assert rep.values["orientation"] == "0"  # zxing-cpp corners follow the symbol
    assert rep.values["finder_match"] >= 0.95


def test_inverted_symbol_is_measured() -> None:
    rep = measure(255 - shade(render(), 235, 20))
    assert rep.values["inverted"] is True and rep.overall == 4.0


def test_modulation_drops_with_grey_modules_where_ec_cannot_absorb_them() -> None:
    img = shade(render(), 230, 25).astype(np.float32)
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    band = (xx > w * 0.30) & (xx < w * 0.62)  # a third of the symbol pulled towards the threshold
    img[band] = img[band] * 0.25 + 128 * 0.75
    rep = measure(img.astype(np.uint8))
    assert rep.grades["mod"] <= 1
    assert rep.overall is not None and rep.overall <= 1
    # a small light smear is absorbed by error correction
    img2 = shade(render(), 230, 25).astype(np.float32)
    spot = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < 12**2
    img2[spot] = img2[spot] * 0.5 + 128 * 0.5
    assert measure(img2.astype(np.uint8)).grades["mod"] >= 3


def test_axial_and_grid_nonuniformity_from_geometry() -> None:
    img = shade(render(pad=60), 230, 25)
    stretched = cv2.resize(img, None, fx=1.2, fy=1.0, interpolation=cv2.INTER_NEAREST)
    rep = measure(stretched)
    assert rep.values["an"] == pytest.approx(0.18, abs=0.02)
    assert rep.grades["an"] == 0
    # an uncalibrated camera cannot tell a stretched print from a tilted camera: AN is reported, not gated
    assert rep.overall == 4.0 and rep.overall_all == 0.0 and "an" in rep.detail()["report_only"]
    (sym,) = ZxingDecoder().decode(stretched)
    cal = q.measure(stretched, sym.corners, sym.version, sym.uec, calibrated=True)
    assert cal.overall == 0.0 and "an" in cal.detail()["gating"]
    # perspective (keystone) is removed by the fitted homography: it is not grid non-uniformity (issue 10)
    h, w = img.shape
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = np.float32([[0, 0], [w, 40], [w, h - 40], [0, h]])
    keystone = cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), (w, h), borderValue=230)
    assert measure(keystone).values["gn"] < 0.2
    assert measure(img).values["gn"] < 0.2
    # a real grid error: a band of columns in the middle of the symbol printed 1/3 module lower
    band = img.copy()
    band[:, 102:150] = np.roll(img[:, 102:150], 2, axis=0)
    assert measure(band).values["gn"] >= 0.25


def test_uec_and_decode_grades_enter_the_overall() -> None:
    img = shade(render(), 235, 20)
    (sym,) = ZxingDecoder().decode(img)
    assert q.measure(img, sym.corners, sym.version, uec=0.3).overall == 1.0
    assert q.measure(img, sym.corners, sym.version, uec=1.0, decode_grade=0).overall == 0.0


def test_unmeasurable_symbols_get_no_grade() -> None:
    img = shade(render(), 235, 20)
    (sym,) = ZxingDecoder().decode(img)
    assert q.measure(img, sym.corners, None).overall is None
    rep = q.measure(img, [(40, 40), (62, 40), (62, 62), (40, 62)], "22x22")  # 1 px modules
    assert rep.overall is None and "too small" in rep.values["reason"]
    rep = q.measure(img, [(-100, -100), (200, -100), (200, 200), (-100, 200)], "22x22")
    assert rep.overall is None and "outside" in rep.values["reason"]


def test_one_pixel_corner_error_does_not_change_the_grade() -> None:
    """Issue 10: moving one reported corner by a pixel changed the letter; the grid fit must absorb it."""
    # 5 px modules, blurred: modulation near the B/C threshold, where the corner-only estimate went D/C/B
    img = cv2.GaussianBlur(shade(render(scale=5), 225, 35), (0, 0), 1.6)
    (sym,) = ZxingDecoder().decode(img)
    ref = q.measure(img, sym.corners, sym.version, sym.uec)
    assert ref.letter == "B"
    for i in range(4):
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            corners = [list(c) for c in sym.corners]
            corners[i][0] += dx
            corners[i][1] += dy
            rep = q.measure(img, corners, sym.version, sym.uec)
            got = (rep.letter, rep.grades["sc"], rep.grades["mod"], rep.grades["fpd"])
            assert got == (ref.letter, ref.grades["sc"], ref.grades["mod"], ref.grades["fpd"]), (i, dx, dy)
