"""PC camera with local decoding (`driver: camera`): frames in, Read objects out.

A frame is one read cycle. It comes from a FrameSource — an OpenCV
VideoCapture (device index, RTSP/HTTP URL, or a video file), or a folder of
image files (replay, or `watch: true` for files a camera SDK or the
simulator drops there). Decoding (zxing-cpp) and the quality estimate run in
a thread pool so the event loop never waits on pixels; reads are still
emitted in frame order.

What this driver will not do, because a wrong "good" at the reject gate is a
regulatory incident: report a code that was not decoded from the frame,
fill in a missing code, or turn an unreadable file into a no-read (a file
that is not an image is a health problem, not a read cycle). Grades are
estimates from an uncalibrated camera; see drivers/quality.py.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import concurrent.futures
import os
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from linectl.drivers import quality
from linectl.drivers.base import Backoff, CodeReader, Decoded, DeviceError, DriverConfig, HealthState, Read, register_driver
from linectl.drivers.decoders import DmtxDecoder, Symbol, ZxingDecoder, dmtx_available, zxing_version

FRAME_NAME = re.compile(r"^frame_(\d+)\.")
IMAGE_EXTENSIONS = (".pgm", ".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


class GradingConfig(BaseModel):
    """How the camera grades. `calibrated: true` only for a camera mounted square-on to the code at a fixed,
    known distance, with its scale checked against a reference: only then do axial and grid non-uniformity
    describe the print rather than the camera's pose, and only then may they reject a unit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="estimate ISO 15415-style grades (process indicator, not verification)")
    calibrated: bool = Field(False, description="AN and GN gate the grade too (they are reported either way)")


class CameraConfig(DriverConfig):
    """A camera read point. `source`: device index (0), URL (rtsp://, http://), video file, or folder."""

    driver: Literal["camera"]
    source: int | str
    watch: bool = Field(False, description="folder: keep picking up new files after the existing ones")
    delete_after: bool = Field(False, description="folder: delete each file once it is loaded")
    skip_existing: bool = Field(False, description="folder watch: ignore files already there at start (no replay after a restart)")
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    poll_interval_s: float = Field(0.005, gt=0, le=1.0, description="folder watch: rescan period when idle")
    trigger: Literal["hardware", "software"] = Field(
        "hardware", description="hardware: every frame the source delivers is a read cycle; software: only on trigger()"
    )
    frame_timeout_s: float = Field(2.0, gt=0, description="software trigger: wait this long for the frame")
    roi: tuple[int, int, int, int] | None = Field(None, description="[x, y, w, h] in frame pixels")
    max_codes: int = Field(1, ge=1, le=1000, description="codes reported per frame (case camera: e.g. 120)")
    workers: int = Field(1, ge=1, le=32, description="decode threads")
    try_rotate: bool = True
    try_invert: bool = False
    try_downscale: bool = True
    grading: GradingConfig = Field(default_factory=lambda: GradingConfig(), description="true/false, or {enabled, calibrated}")
    dmtx: Literal["off", "confirm"] = Field(
        "off", description="confirm: libdmtx must decode each code to the same content (when installed)"
    )
    dmtx_timeout_s: float = Field(0.1, gt=0, description="per symbol; libdmtx searches its whole budget on a symbol it cannot read")
    pipeline_depth: int = Field(8, ge=1, le=1024, description="frames in flight between acquisition and output")

    @field_validator("roi")
    @classmethod
    def _roi(cls, v: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if v is not None and (v[0] < 0 or v[1] < 0 or v[2] <= 0 or v[3] <= 0):
            raise ValueError("roi is [x, y, w, h] with x, y >= 0 and w, h > 0")
        return v

    @field_validator("grading", mode="before")
    @classmethod
    def _grading(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v  # `grading: false` stays valid

    @field_validator("dmtx", mode="before")
    @classmethod
    def _dmtx(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 readers turn a bare `off` into false

    @field_validator("extensions")
    @classmethod
    def _ext(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in v)

    @model_validator(mode="after")
    def _folder_only(self) -> CameraConfig:
        if source_kind(self.source) != "folder" and (self.watch or self.delete_after or self.skip_existing):
            raise ValueError("watch, delete_after and skip_existing apply to a folder source only")
        if self.skip_existing and not self.watch:
            raise ValueError("skip_existing needs watch: true (otherwise there is nothing to read)")
        return self


def source_kind(source: int | str) -> Literal["device", "url", "file", "folder"]:
    if isinstance(source, int) or (isinstance(source, str) and source.isdigit()):
        return "device"
    if "://" in source:
        return "url"
    if os.path.isfile(source):
        return "file"
    return "folder"


# --------------------------------------------------------------------------- frame sources


@dataclass
class Frame:
    """One acquired image. `error` set (and image None) when the source delivered something unusable."""

    image: np.ndarray | None
    name: str
    received_at: float
    seq: int | None = None  # from a frame_<seq>.* file name
    error: str | None = None


def to_gray(img: np.ndarray) -> np.ndarray:
    """Decoding and grading work on one 8-bit channel; cameras deliver BGR, BGRA or 16-bit too.

    A 16-bit file is scaled by the bits it actually uses: a 10- or 12-bit
    sensor stored in 16 bits would otherwise come out nearly black (and its
    symbol contrast a few %), while a full 16-bit image keeps its top byte.
    """
    if img.dtype == np.uint16:
        bits = max(8, int(img.max()).bit_length())
        img = (img >> (bits - 8)).astype(np.uint8)
    elif img.dtype != np.uint8:
        # dst=None (allocate the output) is OpenCV's documented form; the stubs of OpenCV < 5.1 require an array there
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)  # type: ignore[call-overload, unused-ignore]
    if img.ndim == 3:
        if img.shape[2] == 4:
            return cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
        if img.shape[2] == 3:
            return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        return np.ascontiguousarray(img[:, :, 0])
    return img


def _truncated(data: bytes) -> bool:
    """A JPEG without its end marker or a PNG without IEND: OpenCV decodes what is there and only warns."""
    if data[:3] == b"\xff\xd8\xff":
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-16:]
    return False


def load_image(data: bytes, name: str) -> tuple[np.ndarray | None, str | None]:
    """(grey 8-bit image, None) or (None, reason): the one loader for frame files and `linectl decode`."""
    if not data:
        return None, f"{name}: empty file"
    if _truncated(data):
        return None, f"{name}: truncated image file ({len(data)} bytes)"
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        return None, f"{name}: not a readable image ({len(data)} bytes)"
    if img.ndim not in (2, 3) or min(img.shape[:2]) < 8:
        return None, f"{name}: image of shape {img.shape} is not a frame"
    return to_gray(img), None


class FrameSource(abc.ABC):
    """Where frames come from. All methods block; the driver calls them from one acquisition thread."""

    finished = False  # a replay (folder without watch, video file) that has nothing more to give
    dropped = 0  # frames lost because the driver did not keep up (live streams only)

    @abc.abstractmethod
    def open(self) -> None:
        """Raise DeviceError with an operator-readable reason when the source is not there."""

    @abc.abstractmethod
    def read(self, timeout: float) -> Frame | None:
        """The next frame in delivery order, or None if none arrived within `timeout`. DeviceError when lost."""

    def read_now(self, timeout: float) -> Frame | None:
        """Software trigger: a frame captured after this call (a folder has no "now": next file)."""
        return self.read(timeout)

    @abc.abstractmethod
    def close(self) -> None: ...

    def describe(self) -> str:
        return type(self).__name__


class FolderSource(FrameSource):
    """Image files in name order; with `watch`, new files as they appear.

    Writers must create files atomically (write a temp name, then rename):
    hidden files and other extensions are ignored, so `.frame_x.pgm.tmp` is
    never half-read. Only names that sort after the last one taken are picked
    up, so name frames in arrival order (zero-padded sequence numbers); this
    keeps the per-poll cost flat instead of remembering every name ever seen.
    """

    def __init__(
        self,
        folder: str,
        *,
        watch: bool,
        delete_after: bool,
        extensions: tuple[str, ...],
        poll_interval_s: float,
        skip_existing: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.watch = watch
        self.delete_after = delete_after
        self.extensions = extensions
        self.poll_interval_s = poll_interval_s
        self.skip_existing = skip_existing
        self._pending: collections.deque[str] = collections.deque()
        self._last = ""  # survives close()/open(): a reconnect must not replay frames already read
        self._opened_once = False

    def describe(self) -> str:
        return f"folder {self.folder}"

    def open(self) -> None:
        if not self.folder.is_dir():
            raise DeviceError(f"frame folder {self.folder} does not exist")
        if self.skip_existing and not self._opened_once:
            self._scan()
            if self._pending:
                self._last = self._pending[-1]
                self._pending.clear()
        self._opened_once = True

    def _scan(self) -> None:
        try:
            with os.scandir(self.folder) as it:
                names = sorted(
                    e.name
                    for e in it
                    if not e.name.startswith(".") and e.name > self._last and os.path.splitext(e.name)[1].lower() in self.extensions
                )
        except OSError as exc:
            raise DeviceError(f"frame folder {self.folder}: {exc.strerror or exc}") from exc
        self._pending.extend(names)

    def read(self, timeout: float) -> Frame | None:
        deadline = time.monotonic() + timeout
        while True:
            if not self._pending:
                self._scan()
            while self._pending:
                name = self._pending.popleft()
                self._last = name
                frame = self._load(name)
                if frame is not None:
                    return frame
            if not self.watch:
                self.finished = True
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(self.poll_interval_s)

    def close(self) -> None:
        """Nothing held open between polls."""

    def _load(self, name: str) -> Frame | None:
        path = self.folder / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None  # taken away by someone else between scan and read: nothing was delivered
        except OSError as exc:
            raise DeviceError(f"frame folder {self.folder}: {exc.strerror or exc}") from exc
        received = time.monotonic()
        m = FRAME_NAME.match(name)
        seq = int(m.group(1)) if m else None
        img, error = load_image(data, f"frame {name}")
        if self.delete_after:
            try:
                path.unlink()
            except OSError:
                pass
        if img is None:
            return Frame(None, name, received, seq, error=error)
        return Frame(img, name, received, seq)


class CaptureSource(FrameSource):
    """cv2.VideoCapture (device index, RTSP/HTTP URL, video file) drained by its own grabber thread.

    Draining continuously keeps the capture buffer from serving stale frames
    to a software trigger; in hardware mode frames are queued in order and a
    full queue drops the oldest (logged by the driver via `dropped`).
    """

    def __init__(self, source: int | str, open_timeout_s: float, read_timeout_s: float, queue_max: int = 64) -> None:
        self.source: int | str = int(source) if isinstance(source, str) and source.isdigit() else source
        self.is_file = isinstance(self.source, str) and os.path.isfile(self.source)
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        self._cap: Any = None
        self._frames: collections.deque[Frame] = collections.deque(maxlen=queue_max)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._error: str | None = None
        self._thread: threading.Thread | None = None
        self._count = 0
        self.dropped = 0

    def describe(self) -> str:
        return f"capture {self.source}"

    def open(self) -> None:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.read_timeout_s * 1000),
        ]
        cap = cv2.VideoCapture(self.source, cv2.CAP_ANY, params)
        if not cap.isOpened():
            cap.release()
            raise DeviceError(f"cannot open video source {self.source!r}")
        self._cap = cap
        self._frames.clear()
        self._stop.clear()
        self._error = None
        self._thread = threading.Thread(target=self._grab, name=f"camera-grab-{self.source}", daemon=True)
        self._thread.start()

    def _grab(self) -> None:
        while not self._stop.is_set():
            ok, img = self._cap.read()
            now = time.monotonic()
            with self._cond:
                if not ok or img is None:
                    if self.is_file:
                        self.finished = True
                    self._error = "end of video file" if self.is_file else f"video source {self.source!r} stopped delivering frames"
                    self._cond.notify_all()
                    return
                self._count += 1
                if self.is_file:  # a recording is replayed whole: wait for room instead of dropping
                    self._cond.wait_for(lambda: len(self._frames) < (self._frames.maxlen or 1) or self._stop.is_set())
                elif len(self._frames) == self._frames.maxlen:
                    self.dropped += 1
                self._frames.append(Frame(img, f"frame {self._count}", now))
                self._cond.notify_all()

    def read(self, timeout: float) -> Frame | None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._frames or self._error, timeout):
                return None
            if self._frames:
                f = self._frames.popleft()
                self._cond.notify_all()
                if f.image is not None:
                    f.image = to_gray(f.image)
                return f
            if self.finished:
                return None
            raise DeviceError(self._error or "video source lost")

    def read_now(self, timeout: float) -> Frame | None:
        with self._cond:
            self._frames.clear()
        return self.read(timeout)

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.read_timeout_s + 1)
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def make_source(cfg: CameraConfig) -> FrameSource:
    kind = source_kind(cfg.source)
    if kind == "folder":
        return FolderSource(
            str(cfg.source),
            watch=cfg.watch,
            delete_after=cfg.delete_after,
            extensions=cfg.extensions,
            poll_interval_s=cfg.poll_interval_s,
            skip_existing=cfg.skip_existing,
        )
    return CaptureSource(cfg.source, cfg.connect_timeout_s, cfg.reply_timeout_s)


# --------------------------------------------------------------------------- driver


@register_driver
class Camera(CodeReader):
    """Camera read point: one Read per frame (hardware trigger) or per trigger() call (software)."""

    config_class = CameraConfig
    config: CameraConfig

    def __init__(self, name: str, config: CameraConfig) -> None:
        super().__init__(name, config)
        self._dmtx: DmtxDecoder | None = None
        if config.dmtx == "confirm":
            if dmtx_available():
                self._dmtx = DmtxDecoder(config.dmtx_timeout_s)
            else:
                self.log.warning("camera_dmtx_unavailable", reason="pylibdmtx/libdmtx not installed; zxing-cpp only")
        self._decoder = FrameDecoder(config, self.log, self._dmtx)
        self._out: asyncio.Queue[Read] = asyncio.Queue(maxsize=1000)
        self._triggers: asyncio.Queue[int | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._acq: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._frames = 0
        self.stats: dict[str, Any] = {"frames": 0, "reads": 0, "no_reads": 0, "bad_frames": 0, "dropped": 0, "decode_ms": None}
        self.source_description = ""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is not None:
            return
        self._acq = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"cam-acq-{self.name}")
        self._pool = concurrent.futures.ThreadPoolExecutor(self.config.workers, thread_name_prefix=f"cam-dec-{self.name}")
        self._task = asyncio.create_task(self._run(), name=f"camera-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for pool in (self._pool, self._acq):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._acq = None
        if self._dmtx is not None:
            await asyncio.to_thread(self._dmtx.close)
        self.set_health(HealthState.DISCONNECTED, "stopped")

    async def reads(self) -> AsyncIterator[Read]:
        while True:
            yield await self._out.get()

    async def trigger(self, seq: int | None = None) -> None:
        """Grab the next frame now; `seq` (the engine's unit seq) becomes Read.seq."""
        if self.config.trigger != "software":
            raise DeviceError("camera trigger is 'hardware': every frame from the source is a read cycle")
        if self.health.state == HealthState.DISCONNECTED:
            raise DeviceError(f"camera not connected: {self.health.reason}")
        self._triggers.put_nowait(seq)

    # ------------------------------------------------------------------ acquisition

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        source: FrameSource | None = None
        while True:
            try:
                if source is None:  # one instance for the driver's life: a folder remembers what it has read
                    source = make_source(self.config)
                    self.source_description = source.describe()
                await loop.run_in_executor(self._acq, source.open)
            except Exception as exc:  # DeviceError or anything OpenCV throws: never out of the task
                self.set_health(HealthState.DISCONNECTED, exc.reason if isinstance(exc, DeviceError) else repr(exc))
                await backoff.sleep()
                continue
            backoff.reset()
            self.log.info("camera_source_open", source=self.source_description, zxing=zxing_version())
            self.set_health(HealthState.CONNECTED, "")
            try:
                await self._pump(source)
            except asyncio.CancelledError:
                raise
            except DeviceError as exc:
                self.set_health(HealthState.DISCONNECTED, exc.reason)
            except Exception as exc:
                self.log.exception("camera_pump_failed")
                self.set_health(HealthState.DISCONNECTED, repr(exc))
            finally:
                try:
                    await loop.run_in_executor(self._acq, source.close)
                except Exception:
                    self.log.warning("camera_source_close_failed", exc_info=True)
            if source.finished:
                self.set_health(HealthState.DISCONNECTED, f"replay finished after {self._frames} frames")
                return
            await backoff.sleep()

    async def _pump(self, source: FrameSource) -> None:
        """Acquire frames and submit decodes; a second task emits results in frame order."""
        loop = asyncio.get_running_loop()
        inflight: asyncio.Queue[tuple[Frame, int, asyncio.Future[tuple[Decoded, ...]]] | None] = asyncio.Queue(
            maxsize=self.config.pipeline_depth
        )
        emitter = asyncio.create_task(self._emit(inflight), name=f"camera-emit-{self.name}")
        try:
            while not emitter.done():
                trig_seq: int | None = None
                if self.config.trigger == "software":
                    trig_seq = await self._triggers.get()
                    frame = await loop.run_in_executor(self._acq, source.read_now, self.config.frame_timeout_s)
                    if frame is None:
                        self.set_health(HealthState.DEGRADED, f"trigger {trig_seq}: no frame within {self.config.frame_timeout_s}s")
                        if source.finished:
                            break
                        continue
                else:
                    frame = await loop.run_in_executor(self._acq, source.read, 0.25)
                    if frame is None:
                        if source.finished:
                            break
                        continue
                self._frames += 1
                self.stats["frames"] = self._frames
                if source.dropped != self.stats.get("dropped", 0):
                    self.log.warning("camera_frames_dropped", total=source.dropped)
                    self.stats["dropped"] = source.dropped
                assert frame.image is not None or frame.error is not None
                if frame.error is None and frame.image is not None and self._roi_outside(frame.image):
                    frame.error = f"roi {list(self.config.roi or ())} lies outside the {frame.image.shape[1]}x{frame.image.shape[0]} frame"
                if frame.error is not None:
                    self.stats["bad_frames"] += 1
                    self.log.warning("camera_frame_bad", frame=frame.name, reason=frame.error)
                    self.set_health(HealthState.DEGRADED, frame.error)
                    continue
                if self.health.state == HealthState.DEGRADED:
                    self.set_health(HealthState.CONNECTED, "")
                assert frame.image is not None  # a frame without an error has its image (asserted above)
                seq = trig_seq if trig_seq is not None else frame.seq if frame.seq is not None else self._frames
                fut = loop.run_in_executor(self._pool, self.decode_frame, frame.image)
                await inflight.put((frame, seq, fut))
            if not emitter.done():
                await inflight.put(None)
            await emitter
        finally:
            if not emitter.done():
                emitter.cancel()
                try:
                    await emitter
                except (asyncio.CancelledError, Exception):
                    pass

    async def _emit(self, inflight: asyncio.Queue[Any]) -> None:
        while True:
            item = await inflight.get()
            if item is None:
                return
            frame, seq, fut = item
            try:
                codes = await fut
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a decoder failure is not a no-read: report it as health, yield nothing
                self.log.warning("camera_decode_failed", frame=frame.name, error=repr(exc))
                self.set_health(HealthState.DEGRADED, f"frame {frame.name}: decode failed: {exc!r}")
                continue
            self.stats["reads" if codes else "no_reads"] += 1
            await self._out.put(Read(seq=seq, codes=codes, received_at=frame.received_at))

    # ------------------------------------------------------------------ decoding (worker threads)

    def decode_frame(self, gray: np.ndarray) -> tuple[Decoded, ...]:
        """Decode and grade one frame. Runs in a worker thread; pure apart from logging and stats."""
        t0 = time.perf_counter()
        codes = self._decoder.decode(gray)
        self.stats["decode_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return codes

    def _roi_outside(self, gray: np.ndarray) -> bool:
        return roi_outside(self.config.roi, gray)


def roi_outside(roi: tuple[int, int, int, int] | None, gray: np.ndarray) -> bool:
    return roi is not None and (roi[0] >= gray.shape[1] or roi[1] >= gray.shape[0])


class FrameDecoder:
    """Decode and grade one grey frame: the one path shared by the camera driver and `linectl decode`.

    Thread-safe (zxing-cpp is; the libdmtx child is serialised by its own lock).
    """

    def __init__(self, config: CameraConfig, log: Any, dmtx: DmtxDecoder | None = None) -> None:
        self.config = config
        self.log = log
        self._zx = ZxingDecoder(config.try_rotate, config.try_invert, config.try_downscale)
        self._dmtx = dmtx

    def decode(self, gray: np.ndarray) -> tuple[Decoded, ...]:
        sub, offset = gray, (0, 0)
        if self.config.roi is not None:
            x, y, w, h = self.config.roi
            sub, offset = gray[y : y + h, x : x + w], (x, y)  # clipped by numpy at the frame edge
        symbols = self._zx.decode(np.ascontiguousarray(sub), offset)
        if len(symbols) > self.config.max_codes:
            self.log.warning("camera_codes_truncated", found=len(symbols), max_codes=self.config.max_codes)
            symbols = symbols[: self.config.max_codes]
        return tuple(self._decoded(gray, s) for s in symbols)

    def _decoded(self, gray: np.ndarray, s: Symbol) -> Decoded:
        detail: dict[str, Any] = {
            "decoder": f"zxing-cpp {zxing_version()}",
            "content_type": s.content_type,
            "corners": [list(c) for c in s.corners],
        }
        decode_grade = 4
        if self._dmtx is not None:
            verdict = self._confirm(gray, s)
            detail["dmtx"] = verdict
            if verdict == "disagree":
                decode_grade = 0  # two decoders, two answers: the content is not reliable
        grading = self.config.grading
        if not grading.enabled:
            detail["estimated"] = True
            return Decoded(data=s.data, symbology=s.symbology, grade=0.0 if decode_grade == 0 else None, grade_detail=detail)
        rep = quality.measure(gray, s.corners, s.version, s.uec, decode_grade, calibrated=grading.calibrated)
        detail.update(rep.detail())
        detail["parameters"] = rep.parameters()
        return Decoded(data=s.data, symbology=s.symbology, grade=rep.overall, grade_detail=detail)

    def _confirm(self, gray: np.ndarray, s: Symbol) -> str:
        """libdmtx on a crop around the symbol zxing found: agree / disagree / no_read / timeout / crashed."""
        assert self._dmtx is not None
        xs = [c[0] for c in s.corners]
        ys = [c[1] for c in s.corners]
        margin = max(12, (max(xs) - min(xs)) // 4)
        H, W = gray.shape[:2]
        crop = gray[max(min(ys) - margin, 0) : min(max(ys) + margin, H), max(min(xs) - margin, 0) : min(max(xs) + margin, W)]
        status, results = self._dmtx.decode(crop, max_count=1)
        if status != "ok":
            return status
        if not results:
            return "no_read"
        data, sym = results[0]
        if (data, sym) == (s.data, s.symbology):
            return "agree"
        self.log.warning("camera_decoders_disagree", zxing=(s.symbology, s.data), libdmtx=(sym, data))
        return "disagree"
