"""Local DataMatrix decoders for the camera driver.

zxing-cpp is the decoder of record: it is fast (a few ms per 1280×1024 frame),
finds many symbols per frame, and reports what a verification needs — the
symbology identifier (``]d2`` = GS1 with FNC1 first, ``]d1`` = plain), the
bytes with GS (0x1D) where FNC1 separated fields, the symbol size, the corner
points and the unused error correction (``extra["UEC"]``, zxing-cpp ≥ 3.1).

libdmtx (through pylibdmtx) is an optional second opinion: an independent
implementation that must decode the same symbol to the same content. It only
runs when pylibdmtx and the system library are installed, and always in a
child process with a deadline, because libdmtx can search for seconds on a
busy image or abort the whole process on an internal C assertion.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import multiprocessing as mp
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import zxingcpp

log = structlog.get_logger("linectl.drivers.decoders")

GS = "\x1d"
STARTUP_TIMEOUT_S = 15.0
FNC1_MARK = 0xE8  # what libdmtx is told to emit for FNC1 (a byte that plain ASCII data cannot produce by accident)


@functools.lru_cache(maxsize=1)
def zxing_version() -> str:
    try:
        return importlib.metadata.version("zxing-cpp")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source build without metadata
        return "unknown"


@dataclass(frozen=True)
class Symbol:
    """One symbol as a decoder saw it, in the coordinates of the full frame."""

    data: str  # element string (GS separated) for GS1, else the decoded text
    symbology: str  # "]d2", "]d1", ...
    corners: tuple[tuple[int, int], ...]  # top-left, top-right, bottom-right, bottom-left in symbol orientation
    version: str | None  # "ROWSxCOLS"
    uec: float | None  # unused error correction 0..1, None when the decoder does not say
    content_type: str = ""


class ZxingDecoder:
    """DataMatrix only: restricting formats is both faster and one less way to misread."""

    def __init__(self, try_rotate: bool = True, try_invert: bool = False, try_downscale: bool = True) -> None:
        self.opts: dict[str, Any] = dict(
            formats=zxingcpp.BarcodeFormat.DataMatrix,
            try_rotate=try_rotate,
            try_invert=try_invert,
            try_downscale=try_downscale,
            text_mode=zxingcpp.TextMode.Plain,  # Plain keeps GS separators; HRI would give "(01)..."
        )

    def decode(self, gray: np.ndarray, offset: tuple[int, int] = (0, 0)) -> list[Symbol]:
        """Decode every DataMatrix in `gray`; `offset` is added to corners (ROI origin in the frame)."""
        ox, oy = offset
        out: list[Symbol] = []
        for b in zxingcpp.read_barcodes(gray, **self.opts):
            if not b.valid:
                continue
            p = b.position
            corners = tuple((pt.x + ox, pt.y + oy) for pt in (p.top_left, p.top_right, p.bottom_right, p.bottom_left))
            extra = b.extra if isinstance(b.extra, dict) else {}  # zxing-cpp's stub types it `object`; a dict at run time
            uec = extra.get("UEC")
            out.append(
                Symbol(
                    data=b.text,
                    symbology=b.symbology_identifier,
                    corners=corners,
                    version=extra.get("Version"),
                    uec=float(uec) if uec is not None else None,
                    content_type=b.content_type.name,
                )
            )
        # reading order (rows, then columns) so a case frame lists units the same way every time
        out.sort(key=lambda s: (_centre(s)[1] // 32, _centre(s)[0]))
        return out


def _centre(s: Symbol) -> tuple[float, float]:
    xs = [c[0] for c in s.corners]
    ys = [c[1] for c in s.corners]
    return sum(xs) / 4, sum(ys) / 4


# --------------------------------------------------------------------------- libdmtx in a child process


def dmtx_available() -> bool:
    """True when pylibdmtx imports and finds the system libdmtx (checked in-process: loading is harmless)."""
    if importlib.util.find_spec("pylibdmtx") is None:
        return False
    try:
        with warnings.catch_warnings():  # pylibdmtx 0.1.10 still uses distutils' LooseVersion
            warnings.simplefilter("ignore", DeprecationWarning)
            from pylibdmtx import pylibdmtx  # noqa: F401
    except Exception:  # ImportError when libdmtx.so is missing
        return False
    return True


def _dmtx_decode_in_child(gray: np.ndarray, timeout_ms: int, max_count: int) -> list[tuple[str, str]]:
    """libdmtx decode loop with FNC1 reported, so GS1 vs plain and the separators can be compared.

    pylibdmtx's own decode() drops FNC1 entirely (GS1 element strings lose
    their separators), hence this loop over its internals.
    """
    from ctypes import cast

    from pylibdmtx import pylibdmtx as d
    from pylibdmtx.wrapper import DmtxProperty, dmtxDecodeSetProp, dmtxTimeAdd, dmtxTimeNow

    pixels, width, height, bpp = d._pixel_data(np.ascontiguousarray(gray))
    deadline = dmtxTimeAdd(dmtxTimeNow(), timeout_ms)
    results: list[tuple[str, str]] = []
    with d._image(cast(pixels, d.c_ubyte_p), width, height, d._PACK_ORDER[bpp]) as img:
        with d._decoder(img, 1) as dec:
            dmtxDecodeSetProp(dec, DmtxProperty.DmtxPropFnc1, FNC1_MARK)
            while len(results) < max_count:
                with d._region(dec, deadline) as region:
                    if not region:
                        break
                    res = d._decode_region(dec, region, d.DmtxUndefined, 1)
                    if res:
                        raw: bytes = res.data
                        if raw[:1] == bytes([FNC1_MARK]):
                            sym, raw = "]d2", raw[1:]
                        else:
                            sym = "]d1"
                        results.append((raw.replace(bytes([FNC1_MARK]), GS.encode()).decode("latin-1"), sym))
    return results


def _dmtx_child(conn: Any) -> None:
    try:
        from pylibdmtx import pylibdmtx  # noqa: F401  (import cost paid before the first deadline)
    except Exception as exc:
        conn.send(("error", repr(exc)))
        return
    conn.send(("ready", None))
    while True:
        try:
            req = conn.recv()
        except EOFError:
            return
        if req is None:
            return
        buf, shape, timeout_ms, max_count = req
        try:
            gray = np.frombuffer(buf, dtype=np.uint8).reshape(shape)
            conn.send(("ok", _dmtx_decode_in_child(gray, timeout_ms, max_count)))
        except Exception as exc:  # report, keep serving
            conn.send(("error", repr(exc)))


class DmtxDecoder:
    """libdmtx in one long-lived child process; a hang or a crash costs one answer, not the line.

    Calls are serialised (one child); the camera only sends small crops
    around symbols zxing already found, so each call is a few ms.
    """

    def __init__(self, timeout_s: float = 0.5) -> None:
        self.timeout_s = timeout_s
        self._ctx = mp.get_context("spawn")  # never fork a process that holds decoder threads
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None
        self.restarts = 0

    def _ensure(self) -> None:
        """Start the child if needed and wait for it to have loaded libdmtx (start-up is not a decode timeout)."""
        if self._proc is not None and self._proc.is_alive():
            return
        self._kill()
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_dmtx_child, args=(child,), daemon=True, name="linectl-dmtx")
        self._proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(STARTUP_TIMEOUT_S):
            self._kill()
            raise OSError("libdmtx child did not start")
        status, payload = parent.recv()
        if status != "ready":
            self._kill()
            raise OSError(f"libdmtx child failed to start: {payload}")

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(timeout=2)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def decode(self, gray: np.ndarray, max_count: int = 1) -> tuple[str, list[tuple[str, str]]]:
        """("ok", [(data, symbology), ...]) or ("timeout"|"crashed"|"error", []). Thread-safe, blocking."""
        gray = np.ascontiguousarray(gray, dtype=np.uint8)
        with self._lock:
            try:
                self._ensure()
                # libdmtx gets a slightly shorter budget of its own so it normally answers in time
                self._conn.send((gray.tobytes(), gray.shape, max(1, int(self.timeout_s * 800)), max_count))
                if not self._conn.poll(self.timeout_s):
                    log.warning("dmtx_timeout", timeout_s=self.timeout_s)
                    self._kill()
                    self.restarts += 1
                    return "timeout", []
                status, payload = self._conn.recv()
            except (EOFError, BrokenPipeError, ConnectionResetError, OSError) as exc:
                code = self._proc.exitcode if self._proc is not None else None
                log.warning("dmtx_crashed", error=repr(exc), exitcode=code)
                self._kill()
                self.restarts += 1
                return "crashed", []
            if status != "ok":
                log.warning("dmtx_error", error=payload)
                return "error", []
            return "ok", payload

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._proc is not None and self._proc.is_alive():
                try:
                    self._conn.send(None)
                    self._proc.join(timeout=1)
                except OSError:
                    pass
            self._kill()
