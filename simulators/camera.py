"""Camera simulator: turns each unit at the read point into a 1280×1024 grey frame file.

The frame shows what the printer simulator put on the pack (`unit.image`, or
rendered here from `unit.content`), damaged the way the unit's ground truth
says, so the camera driver's decoder and quality estimate are exercised by
real pixels, never by being told the answer:

- print quality without damage -> symbol contrast (grade ≈ unit.quality);
- low_contrast -> ink close to the paper (SC ≈ 14 %, grade F);
- smudge_heavy -> a dense grey smear over a large part of the symbol;
- smudge_mild  -> a light, small smear (still reads, grade ≥ B);
- partial -> more than half of the symbol erased (unreadable);
- nothing printed -> a blank label.

Everything random is a pure function of (seed, unit.seq). Frames are written
by one background thread, in presentation order, atomically (temp file +
rename) as `frame_<seq:010d>.pgm` — PGM because it is a header plus raw
bytes, ~1 ms for 1.3 MB, where PNG takes tens of ms.

    python -m linectl.simulators.camera --folder /tmp/frames --rate 1500 --count 3000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from linectl.simulators.model import SimUnit

log = structlog.get_logger("linectl.simulators.camera")

FRAME_W, FRAME_H = 1280, 1024
PAPER = 226.0  # label white, grey level
BACKGROUND = 70.0  # carton/conveyor around the label
NOISE_SIGMA = 2.5
NOISE_VARIANTS = 4
DAMAGE_KINDS = ("low_contrast", "smudge_heavy", "smudge_mild", "partial")


def contrast_for(quality: float) -> float:
    """Symbol contrast (% of full scale) that an undamaged print of `quality` gets.

    Chosen so that the SC grade of the rendered symbol lands on the unit's
    grade: mid-band of GUIDE §5's 70/55/40/20 % thresholds.
    """
    q = max(0.0, min(4.0, quality))
    if q >= 1.5:
        return 17.5 + 15.0 * q  # 4.0 -> 77.5 (A), 3.0 -> 62.5 (B), 2.0 -> 47.5 (C)
    return 10.0 + 10.0 * q  # 1.2 -> 22 (D), 0.5 -> 15 (F)


def _rng(seed: int, seq: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, seq & 0xFFFFFFFF, stream])


def symbol_mask(unit: SimUnit, module_px: int = 6) -> np.ndarray | None:
    """True where ink is, quiet zone included; None when nothing is printed or it cannot be rendered."""
    if unit.content is None:
        return None
    if unit.image is not None:
        img = np.asarray(unit.image)
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        return img < 128
    return render_mask(unit.content, unit.symbology, module_px)


def render_mask(content: str, symbology: str, module_px: int = 6) -> np.ndarray | None:
    from linectl import gs1

    try:
        if symbology == "]d2":
            img = gs1.render_datamatrix(gs1.parse(content), module_px=module_px, quiet_zone=2, validate=False)
        else:
            img = gs1.render_plain_datamatrix(content, module_px=module_px, quiet_zone=2)
    except Exception as exc:  # a sim must not die on odd content; the frame shows a blank label instead
        log.warning("camera_sim_render_failed", content=content, symbology=symbology, error=repr(exc))
        return None
    return np.asarray(img) < 128


def paint(mask: np.ndarray, unit: SimUnit, seed: int) -> np.ndarray:
    """Grey label pixels (float32) of the symbol with the unit's print quality and damage applied."""
    damage = unit.extras.get("damage") or unit.defect or unit.variation
    damage = damage if damage in DAMAGE_KINDS else None
    sc = 14.0 if damage == "low_contrast" else contrast_for(unit.quality) if damage is None else 76.0
    ink = PAPER - sc * 2.55
    img = np.where(mask, np.float32(ink), np.float32(PAPER))
    h, w = mask.shape
    # symbol extent = bounding box of ink (quiet zone excluded)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return img
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    size = max(x1 - x0, y1 - y0)
    rng = _rng(seed, unit.seq, 1)
    if damage in ("smudge_heavy", "smudge_mild"):
        heavy = damage == "smudge_heavy"
        radius = size * (0.50 if heavy else 0.16)
        peak = 0.97 if heavy else 0.55
        cx = x0 + (x1 - x0) * rng.uniform(0.35, 0.65)
        cy = y0 + (y1 - y0) * rng.uniform(0.35, 0.65)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ax, ay = radius * rng.uniform(0.8, 1.25), radius * rng.uniform(0.8, 1.25)
        d2 = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2
        alpha = (peak * np.exp(-d2 * (0.7 if heavy else 2.0))).astype(np.float32)
        tone = np.float32((PAPER + ink) / 2 + rng.uniform(-6, 6))
        img = img * (1 - alpha) + tone * alpha
    elif damage == "partial":
        frac = rng.uniform(0.52, 0.62)
        side = int(rng.integers(4))
        if side == 0:
            img[:, x1 - int((x1 - x0) * frac) :] = PAPER
        elif side == 1:
            img[:, : x0 + int((x1 - x0) * frac)] = PAPER
        elif side == 2:
            img[y1 - int((y1 - y0) * frac) :, :] = PAPER
        else:
            img[: y0 + int((y1 - y0) * frac), :] = PAPER
    return cv2.GaussianBlur(img, (0, 0), 0.7)


class CameraSim:
    """Camera at a conveyor read point (`present(unit)`) or a case station (`present_many(units)`).

    Constructed by the line simulator as CameraSim(config=<CameraConfig>, name=...)
    — the frames go to the folder the camera driver watches — or directly
    with `folder=`.
    """

    def __init__(
        self,
        *,
        config: Any = None,
        name: str = "camera",
        folder: str | os.PathLike[str] | None = None,
        fmt: str = "pgm",
        seed: int = 0,
        module_px: int = 6,
        jitter_px: tuple[int, int] = (30, 25),
        queue_max: int = 512,
    ) -> None:
        if folder is None:
            if config is None or not isinstance(getattr(config, "source", None), str):
                raise ValueError("CameraSim needs folder= or a camera config whose source is a folder")
            folder = config.source
        self.folder = Path(folder)
        self.name = name
        self.fmt = fmt.lower().lstrip(".")
        if self.fmt not in ("pgm", "bmp", "png"):
            raise ValueError("fmt must be pgm, bmp or png")
        self.seed = seed
        self.module_px = module_px
        self.jitter = jitter_px
        self._q: queue.Queue[tuple[str, Any, int] | None] = queue.Queue(maxsize=queue_max)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._noise = [
            _rng(seed, -1 - k).normal(0, NOISE_SIGMA, (FRAME_H, FRAME_W)).astype(np.float32) for k in range(NOISE_VARIANTS)
        ]
        self._bg: list[np.ndarray] = [np.clip(BACKGROUND + n, 0, 255).astype(np.uint8) for n in self._noise]
        self._case_seq = 0
        self._faults: dict[str, int] = {"garbage": 0, "drop": 0}
        self.frames_written = 0
        self.address = f"folder {self.folder}"

    # ------------------------------------------------------------------ lifecycle (line simulator)

    async def start(self) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._ensure_thread()
        return self.address

    async def stop(self) -> None:
        import asyncio

        await asyncio.to_thread(self.close)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self.folder.mkdir(parents=True, exist_ok=True)
                self._thread = threading.Thread(target=self._worker, name=f"camera-sim-{self.name}", daemon=True)
                self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every presented frame is on disk."""
        deadline = time.monotonic() + timeout
        while self._q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.002)
        return not self._q.unfinished_tasks

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._q.put(None)
            self._thread.join(timeout=10)
        self._thread = None

    # ------------------------------------------------------------------ read point

    def present(self, unit: SimUnit) -> None:
        """The unit is under the camera: queue its frame (returns at once; the event loop never renders)."""
        self._ensure_thread()
        self._q.put(("one", unit, unit.seq))

    def present_many(self, units: Sequence[SimUnit], seq: int | None = None) -> int:
        """One frame holding up to 120 unit codes in a grid (a case camera). Returns the frame seq."""
        if len(units) > 120:
            raise ValueError("at most 120 codes per frame")
        self._ensure_thread()
        self._case_seq = seq if seq is not None else self._case_seq + 1
        self._q.put(("many", list(units), self._case_seq))
        return self._case_seq

    def inject(self, kind: str, **kw: Any) -> None:
        """garbage: the next `count` frames are written as non-image bytes; drop: the next `count` are not written."""
        if kind not in self._faults:
            raise ValueError(f"unknown fault kind {kind!r} for a camera (garbage, drop)")
        self._faults[kind] += int(kw.get("count", 1))

    # ------------------------------------------------------------------ rendering

    def render(self, unit: SimUnit) -> np.ndarray:
        """The full frame for one unit (used by the writer thread, tests and the benchmark)."""
        rng = _rng(self.seed, unit.seq, 0)
        k = int(unit.seq) % NOISE_VARIANTS
        frame = self._bg[k].copy()
        mask = symbol_mask(unit, self.module_px)
        if mask is None:
            label = np.full((200, 200), PAPER, np.float32)
        else:
            label = np.pad(paint(mask, unit, self.seed), 24, constant_values=PAPER)
        h, w = label.shape
        cx = FRAME_W // 2 + int(rng.integers(-self.jitter[0], self.jitter[0] + 1))
        cy = FRAME_H // 2 + int(rng.integers(-self.jitter[1], self.jitter[1] + 1))
        x, y = max(0, min(FRAME_W - w, cx - w // 2)), max(0, min(FRAME_H - h, cy - h // 2))
        self._blit(frame, label, x, y, k)
        return frame

    def render_many(self, units: Sequence[SimUnit], seq: int = 0) -> np.ndarray:
        n = len(units)
        frame = self._bg[seq % NOISE_VARIANTS].copy()
        if n == 0:
            return frame
        cols = max(1, math.ceil(math.sqrt(n * FRAME_W / FRAME_H)))
        rows = math.ceil(n / cols)
        cw, ch = FRAME_W // cols, FRAME_H // rows
        k = seq % NOISE_VARIANTS
        for i, unit in enumerate(units):
            r, c = divmod(i, cols)
            cell = np.full((ch - 4, cw - 4), PAPER, np.float32)
            mask = self._case_mask(unit, min(ch, cw) - 8)
            if mask is not None:
                sym = paint(mask, unit, self.seed)
                sh, sw = sym.shape
                oy, ox = (cell.shape[0] - sh) // 2, (cell.shape[1] - sw) // 2
                cell[oy : oy + sh, ox : ox + sw] = sym
            self._blit(frame, cell, c * cw + 2, r * ch + 2, k)
        return frame

    def _case_mask(self, unit: SimUnit, fit: int) -> np.ndarray | None:
        """Symbol at the largest whole-pixel module size that fits a grid cell."""
        if unit.content is None:
            return None
        m1 = render_mask(unit.content, unit.symbology, module_px=1)
        if m1 is None:
            return None
        scale = max(1, fit // max(m1.shape))
        return np.kron(m1, np.ones((scale, scale), dtype=bool)) if scale > 1 else m1

    def _blit(self, frame: np.ndarray, label: np.ndarray, x: int, y: int, k: int) -> None:
        h, w = label.shape
        h, w = min(h, FRAME_H - y), min(w, FRAME_W - x)
        region = label[:h, :w] + self._noise[k][y : y + h, x : x + w]
        frame[y : y + h, x : x + w] = np.clip(region, 0, 255).astype(np.uint8)

    # ------------------------------------------------------------------ delivery

    def _worker(self) -> None:
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                kind, payload, seq = job
                if self._take_fault("drop"):
                    continue
                frame = self.render(payload) if kind == "one" else self.render_many(payload, seq)
                self.write(frame, seq, garbage=self._take_fault("garbage"))
            except Exception as exc:  # never kill the writer: the next unit must still get its frame
                log.warning("camera_sim_frame_failed", error=repr(exc))
            finally:
                self._q.task_done()

    def _take_fault(self, kind: str) -> bool:
        if self._faults[kind] > 0:
            self._faults[kind] -= 1
            return True
        return False

    def write(self, frame: np.ndarray, seq: int, garbage: bool = False) -> Path:
        """Atomically publish one frame file: the driver never sees a half-written image."""
        final = self.folder / f"frame_{seq:010d}.{self.fmt}"
        tmp = self.folder / f".{final.name}.tmp"
        if garbage:
            data = b"this is not an image " + os.urandom(64)
        elif self.fmt == "pgm":
            data = b"P5\n%d %d\n255\n" % (frame.shape[1], frame.shape[0]) + frame.tobytes()
        else:
            ok, enc = cv2.imencode("." + self.fmt, frame, [cv2.IMWRITE_PNG_COMPRESSION, 1] if self.fmt == "png" else [])
            if not ok:
                raise RuntimeError(f"cannot encode frame as {self.fmt}")
            data = enc.tobytes()
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, final)
        self.frames_written += 1
        return final


# --------------------------------------------------------------------------- grading ground truth

CORPUS_EXTENSIONS = (".png", ".webp", ".jpg", ".jpeg", ".bmp", ".pgm", ".tif", ".tiff")


def tilt_view(img: np.ndarray, degrees: float, axis: str = "y", focal: float = 3.0, background: float = PAPER) -> np.ndarray:
    """The label as a pinhole camera sees it when the label is turned `degrees` about its vertical ("y"),
    horizontal ("x") or diagonal ("xy") axis: a real perspective (foreshortening plus keystone), so what
    is ground truth here is the pose, never a grade. `focal` is in label widths."""
    h, w = img.shape[:2]
    f = focal * max(w, h)
    t = math.radians(degrees)
    if axis == "y":
        R = np.array([[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]])
    elif axis == "x":
        R = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    elif axis == "xy":
        a = np.array([1.0, 1.0, 0.0]) / math.sqrt(2)
        K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
        R = np.eye(3) + math.sin(t) * K + (1 - math.cos(t)) * K @ K
    else:
        raise ValueError("axis is x, y or xy")
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
    pts = np.array([[x - w / 2, y - h / 2, 0.0] for x, y in src]) @ R.T + [0, 0, f]
    proj = pts[:, :2] / pts[:, 2:3] * f
    dst = (proj - proj.min(axis=0) + 0.1 * max(w, h)).astype(np.float32)
    size = (int(dst[:, 0].max() + 0.1 * max(w, h)) + 1, int(dst[:, 1].max() + 0.1 * max(w, h)) + 1)
    M = cv2.getPerspectiveTransform(src, dst)
    return cv2.warpPerspective(img, M, size, flags=cv2.INTER_LINEAR, borderValue=background)


def render_code_grid(contents: Sequence[str], module_px: int = 4, gap_modules: int = 4, columns: int = 20) -> np.ndarray:
    """One grey frame with every content as a plain DataMatrix in a grid (many-codes ground truth)."""
    masks = [render_mask(c, "]d1", module_px) for c in contents]
    if any(m is None for m in masks):
        raise ValueError("a content could not be rendered")
    cell = max(max(m.shape) for m in masks if m is not None) + gap_modules * module_px
    rows = math.ceil(len(masks) / columns)
    frame = np.full((rows * cell + cell // 2, min(columns, len(masks)) * cell + cell // 2), PAPER, np.uint8)
    for i, m in enumerate(masks):
        assert m is not None
        r, c = divmod(i, columns)
        y, x = r * cell + cell // 4, c * cell + cell // 4
        frame[y : y + m.shape[0], x : x + m.shape[1]][m] = 30
    return frame


def corpus_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files of a sample corpus (zxing-cpp's test/samples layout: NAME.ext beside NAME.txt)."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in CORPUS_EXTENSIONS and p.is_file())


# --------------------------------------------------------------------------- standalone


def demo_units(count: int, seed: int, defect_rate: float, gtin: str) -> Iterable[SimUnit]:
    """Units as the printer simulator would print them, with its defect plan and quality spread."""
    from linectl import gs1
    from linectl.simulators.defects import DefectPlan
    from linectl.simulators.printer import apply_print

    plan = DefectPlan(
        rate=defect_rate,
        mix={"low_contrast": 1, "smudge_heavy": 1, "partial": 1, "not_gs1": 1, "no_print": 1},
        seed=seed,
        variation_rate=defect_rate / 2,
    )
    rng = random.Random(seed)
    previous = None
    for seq in range(1, count + 1):
        serial = "".join(rng.choice("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(12))
        content = gs1.compose_unit(gtin, serial, lot="LOT1", expiry="301231").element_string
        unit = SimUnit(seq=seq)
        apply_print(unit, content, "]d2", plan(seq), rng, previous)
        previous = content
        yield unit


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m linectl.simulators.camera", description="Camera simulator: frames of generated codes into a folder.")
    p.add_argument("--folder", required=True, help="where frame_<seq>.pgm files appear (the camera driver's source)")
    p.add_argument("--rate", type=float, default=600.0, help="units per minute (0 = as fast as possible)")
    p.add_argument("--count", type=int, default=0, help="frames to produce (0 = until interrupted)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--defect-rate", type=float, default=0.0, help="fraction of damaged units (low contrast, smudge, partial, ...)")
    p.add_argument("--gtin", default="09501101530003")
    p.add_argument("--format", choices=("pgm", "bmp", "png"), default="pgm")
    p.add_argument("--case", type=int, default=0, help="codes per frame for a case camera (grid, up to 120); 0 = one unit per frame")
    p.add_argument("--truth", action="store_true", help="print one JSON line per frame with what it shows")
    a = p.parse_args(argv)
    sim = CameraSim(folder=a.folder, fmt=a.format, seed=a.seed)
    count = a.count or 10**12
    period = 60.0 / a.rate if a.rate > 0 else 0.0
    per_frame = max(1, a.case)
    t0 = time.monotonic()
    n = 0
    batch: list[SimUnit] = []
    try:
        for unit in demo_units(count * per_frame, a.seed, a.defect_rate, a.gtin):
            if a.case:
                batch.append(unit)
                if len(batch) < per_frame:
                    continue
                seq = sim.present_many(batch)
                if a.truth:
                    print(json.dumps({"seq": seq, "codes": [u.content for u in batch]}), flush=True)
                batch = []
            else:
                sim.present(unit)
                if a.truth:
                    print(json.dumps({"seq": unit.seq, "content": unit.content, "symbology": unit.symbology,
                                      "quality": unit.quality, "defect": unit.defect, "variation": unit.variation}), flush=True)
            n += 1
            if n >= count:
                break
            if period:
                delay = t0 + n * period - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
    except KeyboardInterrupt:
        pass
    finally:
        sim.flush()
        sim.close()
        print(f"{sim.frames_written} frames in {time.monotonic() - t0:.1f}s -> {a.folder}", file=sys.stderr)


if __name__ == "__main__":
    main()
