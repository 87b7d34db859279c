"""Byte streams to devices (TCP, serial, pty, pyserial URLs) and the one reconnect loop every stream driver uses.

Coding printers, smart readers and scanners all speak a byte protocol over
either TCP or RS-232. Keeping the transport and the reconnect policy here means
a protocol driver only ever sees an asyncio (StreamReader, writer) pair and a
"session" coroutine that returns when the link is gone; how to get the link
back, how long to wait, and what health to report while it is away exists once.

Serial without extra dependencies: pyserial opens and configures the port
(termios), then the file descriptor is switched to non-blocking and watched
with ``loop.add_reader`` / ``loop.add_writer``. pyserial URLs without a file
descriptor (``loop://``, ``rfc2217://``) fall back to a reader thread, and
``socket://host:port`` is plain asyncio TCP.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from linectl.drivers.base import Backoff, Driver, HealthState

log = structlog.get_logger("linectl.drivers.transport")

READ_CHUNK = 65536
#: a sim or driver that cannot get rid of its output (nobody reads the pty) drops beyond this
MAX_WRITE_BUFFER = 1 << 20


# --------------------------------------------------------------------------- config


class TransportConfig(BaseModel):
    """Mixin for device configs: TCP (`host` + `port`) or serial (`serial_port`), never both.

    Exactly one is required so that a config that names a serial port but also
    kept a stale `host:` line is refused instead of silently using the wrong one.
    `serial_port` is a device path (`/dev/ttyUSB0`, `/dev/pts/5`) or a pyserial
    URL (`socket://127.0.0.1:7000`, `rfc2217://host:port`, `loop://`).
    """

    model_config = ConfigDict(extra="forbid")

    host: str | None = Field(None, description="TCP host of the device")
    port: int | None = Field(None, ge=1, le=65535, description="TCP port of the device")
    serial_port: str | None = Field(None, description="serial device path or pyserial URL")
    baudrate: int = Field(9600, gt=0)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    stopbits: float = Field(1, description="1, 1.5 or 2")

    @field_validator("stopbits")
    @classmethod
    def _stopbits(cls, v: float) -> float:
        if v not in (1, 1.5, 2):
            raise ValueError(f"stopbits must be 1, 1.5 or 2, not {v}")
        return v

    @model_validator(mode="after")
    def _exactly_one_transport(self) -> TransportConfig:
        tcp = self.host is not None
        ser = self.serial_port is not None
        if tcp == ser:
            raise ValueError("give exactly one transport: host + port (TCP) or serial_port (serial/pty/pyserial URL)")
        if tcp and self.port is None:
            raise ValueError("TCP transport needs port")
        if ser and "port" in self.model_fields_set and self.port is not None:
            raise ValueError("port is the TCP port; with serial_port leave it out")
        return self

    @property
    def endpoint(self) -> str:
        if self.serial_port is not None:
            return self.serial_port
        return f"{self.host}:{self.port}"


class StreamWriterLike(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...
    def is_closing(self) -> bool: ...


# --------------------------------------------------------------------------- fd streams (serial, pty)


class FdStream:
    """A non-blocking file descriptor as an asyncio StreamReader + writer.

    Used for pyserial ports and for the master side of the simulators' ptys.
    `on_close` releases the owner (pyserial object, fd) once, after the fd is
    no longer watched by the loop.
    """

    def __init__(
        self,
        fd: int,
        *,
        on_close: Callable[[], None] | None = None,
        limit: int = READ_CHUNK * 4,
        eof_on_eio: bool = True,
        label: str = "fd",
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.fd = fd
        self.label = label
        self.reader = asyncio.StreamReader(limit=limit, loop=self._loop)
        self._on_close = on_close
        self._eof_on_eio = eof_on_eio
        self._buf = bytearray()
        self._closed = False
        self._writing = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._error: BaseException | None = None
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._on_readable)

    # -- reading

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno == errno.EIO and not self._eof_on_eio:
                return  # pty master with no slave open: not an end of stream
            self._fail(exc)
            return
        if not data:
            self._fail(None)
            return
        self.reader.feed_data(data)

    def _fail(self, exc: BaseException | None) -> None:
        if self._error is None:
            self._error = exc or ConnectionResetError(f"{self.label}: end of stream")
        if not self.reader.at_eof():
            self.reader.feed_eof()
        self.close()

    # -- writing (StreamWriter-like)

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionResetError(f"{self.label}: stream closed")
        if not data:
            return
        if not self._buf:
            try:
                n = os.write(self.fd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._fail(exc)
                raise ConnectionResetError(f"{self.label}: write failed: {exc}") from exc
            data = data[n:]
            if not data:
                return
        if len(self._buf) + len(data) > MAX_WRITE_BUFFER:
            log.warning("write_buffer_overflow", stream=self.label, dropped=len(data))
            return
        self._buf += data
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            n = os.write(self.fd, self._buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(exc)
            return
        del self._buf[:n]
        if not self._buf:
            self._stop_writing()
            self._wake_drain()

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self.fd)

    def _wake_drain(self) -> None:
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()

    async def drain(self) -> None:
        if self._closed and self._error is not None:
            raise ConnectionResetError(f"{self.label}: {self._error}")
        if not self._buf:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(fut)
        await fut
        if self._error is not None:
            raise ConnectionResetError(f"{self.label}: {self._error}")

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self.fd)
        self._stop_writing()
        self._buf.clear()
        if self._error is None:
            self._error = ConnectionResetError(f"{self.label}: closed")
        self._wake_drain()
        if not self.reader.at_eof():
            self.reader.feed_eof()
        if self._on_close is not None:
            cb, self._on_close = self._on_close, None
            try:
                cb()
            except Exception:  # closing must never raise into the caller's cleanup
                log.debug("fd_close_failed", stream=self.label, exc_info=True)

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"fd": self.fd, "label": self.label}.get(name, default)


class ThreadSerialStream:
    """pyserial ports without a file descriptor (loop://, rfc2217://): a reader thread feeds the loop."""

    def __init__(self, ser: Any, *, label: str, limit: int = READ_CHUNK * 4) -> None:
        self._loop = asyncio.get_running_loop()
        self._ser = ser
        self.label = label
        self.reader = asyncio.StreamReader(limit=limit, loop=self._loop)
        self._closed = False
        self._pending: list[bytes] = []
        self._flush_task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        ser.timeout = 0.05
        self._thread = threading.Thread(target=self._read_loop, name=f"serial-{label}", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        while not self._closed:
            try:
                data = self._ser.read(max(1, self._ser.in_waiting))
            except Exception as exc:  # the port went away: end of stream for the driver
                if not self._closed:
                    self._loop.call_soon_threadsafe(self._fail, exc)
                return
            if data and not self._closed:
                self._loop.call_soon_threadsafe(self._feed, data)

    def _feed(self, data: bytes) -> None:
        if not self.reader.at_eof():
            self.reader.feed_data(data)

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self.close()

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionResetError(f"{self.label}: stream closed")
        self._pending.append(bytes(data))
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = self._loop.create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending and not self._closed:
            chunk = b"".join(self._pending)
            self._pending.clear()
            try:
                await asyncio.to_thread(self._ser.write, chunk)
            except Exception as exc:
                self._fail(exc)
                return

    async def drain(self) -> None:
        task = self._flush_task
        if task is not None and not task.done():
            await asyncio.shield(task)
        if self._error is not None:
            raise ConnectionResetError(f"{self.label}: {self._error}")

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.reader.at_eof():
            self.reader.feed_eof()
        try:
            self._ser.close()
        except Exception:
            log.debug("serial_close_failed", stream=self.label, exc_info=True)

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


# --------------------------------------------------------------------------- open


async def open_tcp(host: str, port: int, *, limit: int = READ_CHUNK * 4) -> tuple[asyncio.StreamReader, StreamWriterLike]:
    reader, writer = await asyncio.open_connection(host, port, limit=limit)
    return reader, writer


async def open_serial(cfg: TransportConfig) -> tuple[asyncio.StreamReader, StreamWriterLike]:
    """Open a serial device path or pyserial URL; `socket://` becomes asyncio TCP."""
    url = cfg.serial_port
    assert url is not None
    if url.startswith("socket://"):
        hostport = url[len("socket://") :].split("?", 1)[0].rstrip("/")
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bad socket:// URL {url!r} (expected socket://host:port)")
        return await open_tcp(host.strip("[]"), int(port))

    import serial  # pyserial; imported here so TCP-only installs never need it

    def _open() -> Any:
        return serial.serial_for_url(
            url,
            baudrate=cfg.baudrate,
            bytesize=cfg.bytesize,
            parity=cfg.parity,
            stopbits=cfg.stopbits,
            timeout=0,
            write_timeout=None,
            exclusive=True if "://" not in url else None,
        )

    ser = await asyncio.to_thread(_open)
    fd: int | None
    try:
        fd = ser.fileno()
    except Exception:
        fd = None
    if fd is None or "://" in url:
        stream: Any = ThreadSerialStream(ser, label=url)
        return stream.reader, stream
    fds = FdStream(fd, on_close=ser.close, label=url)
    return fds.reader, fds


async def open_stream(cfg: TransportConfig) -> tuple[asyncio.StreamReader, StreamWriterLike]:
    """(reader, writer) for a TransportConfig; the caller bounds it with connect_timeout_s."""
    if cfg.serial_port is not None:
        return await open_serial(cfg)
    assert cfg.host is not None and cfg.port is not None
    return await open_tcp(cfg.host, cfg.port)


async def close_writer(writer: StreamWriterLike | None) -> None:
    if writer is None:
        return
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (TimeoutError, Exception):
        pass


# --------------------------------------------------------------------------- supervisor

Session = Callable[[asyncio.StreamReader, StreamWriterLike], Awaitable[None]]


class LinkConfig(Protocol):
    """A device config the supervisor can keep connected: a TransportConfig that is also a DriverConfig."""

    @property
    def endpoint(self) -> str: ...
    @property
    def connect_timeout_s(self) -> float: ...
    @property
    def backoff_initial_s(self) -> float: ...
    @property
    def backoff_max_s(self) -> float: ...


class ConnectionSupervisor:
    """Connect, run the driver's session, and on any loss reconnect with Backoff. Never raises.

    Health: DISCONNECTED with the reason while away, CONNECTED when the link
    is up (the session may lower it to DEGRADED for device-reported trouble).
    Reasons are stable strings so that a device that stays away logs one line
    (Driver.set_health logs on change only), not one per retry.
    The backoff is reset only after a link stayed up for `stable_s`, so a
    device that accepts and immediately drops does not cause a tight loop.
    """

    def __init__(
        self,
        driver: Driver,
        cfg: LinkConfig,
        session: Session,
        *,
        on_lost: Callable[[str], None] | None = None,
        opener: Callable[[], Awaitable[tuple[asyncio.StreamReader, StreamWriterLike]]] | None = None,
        stable_s: float | None = None,
    ) -> None:
        self.driver = driver
        self.cfg = cfg
        self._session = session
        self._on_lost = on_lost
        if opener is None:
            if not isinstance(cfg, TransportConfig):
                raise TypeError(f"{type(cfg).__name__} has no transport (host or serial_port): pass an opener")
            transport = cfg
            opener = lambda: open_stream(transport)  # noqa: E731
        self._opener = opener
        self._stable_s = stable_s if stable_s is not None else max(1.0, 5 * cfg.backoff_initial_s)
        self.writer: StreamWriterLike | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.connects = 0
        self.disconnects = 0
        self._drop_reason = ""
        self._connected_evt = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    def _stop_requested(self) -> bool:
        """stop() sets the flag from another task while _run awaits: read it fresh each time (a call, not a narrowed attribute)."""
        return self._stopping

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=f"conn-{self.driver.name}")

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        await close_writer(self.writer)
        self.writer = None
        self.driver.set_health(HealthState.DISCONNECTED, "stopped")

    def drop(self, reason: str) -> None:
        """Abandon the current link (protocol state unknown); the loop reconnects."""
        w = self.writer
        if w is not None and not w.is_closing():
            self.driver.log.warning("dropping_connection", reason=reason)
            self._drop_reason = reason
            w.close()

    async def wait_connected(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._connected_evt.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _run(self) -> None:
        cfg = self.cfg
        backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s)
        where = cfg.endpoint
        while not self._stop_requested():
            self._drop_reason = ""
            try:
                reader, writer = await asyncio.wait_for(self._opener(), cfg.connect_timeout_s)
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                self.driver.set_health(HealthState.DISCONNECTED, f"cannot connect to {where}: timeout after {cfg.connect_timeout_s}s")
                await backoff.sleep()
                continue
            except Exception as exc:  # OSError, SerialException, bad URL: all "not there yet"
                self.driver.set_health(HealthState.DISCONNECTED, f"cannot connect to {where}: {_describe(exc)}")
                await backoff.sleep()
                continue
            self.writer = writer
            self.connects += 1
            up_at = time.monotonic()
            self.driver.set_health(HealthState.CONNECTED, f"connected to {where}")
            self._connected_evt.set()
            reason = "connection closed by the device"
            try:
                await self._session(reader, writer)
            except asyncio.CancelledError:
                self._connected_evt.clear()
                self.writer = None
                await close_writer(writer)
                if self._on_lost is not None:
                    self._on_lost("driver stopped")
                raise
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
                reason = f"connection lost: {_describe(exc)}"
            except Exception as exc:  # a driver bug must not kill reconnecting
                self.driver.log.exception("session_failed")
                reason = f"driver error: {_describe(exc)}"
            self._connected_evt.clear()
            self.writer = None
            await close_writer(writer)
            if self._drop_reason:
                reason = self._drop_reason
            self.disconnects += 1
            if self._stop_requested():
                return
            self.driver.set_health(HealthState.DISCONNECTED, reason)
            if self._on_lost is not None:
                try:
                    self._on_lost(reason)
                except Exception:
                    self.driver.log.exception("on_lost_failed")
            if time.monotonic() - up_at >= self._stable_s:
                backoff.reset()
            await backoff.sleep()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# --------------------------------------------------------------------------- line framing


class LineSplitter:
    """Splits a byte stream into terminator-delimited lines and flags overlong noise.

    A line that grows past `max_line` without a terminator is reported once as
    garbage and everything up to the next terminator is discarded with it, so a
    babbling device can neither exhaust memory nor have a fragment of its noise
    glued to the next real line.
    """

    def __init__(self, terminator: bytes, max_line: int) -> None:
        if not terminator:
            raise ValueError("terminator must not be empty")
        self.terminator = terminator
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[tuple[bytes | None, str | None]]:
        """Returns [(line, None) | (None, garbage_reason)] in stream order."""
        out: list[tuple[bytes | None, str | None]] = []
        self._buf += data
        term = self.terminator
        while True:
            i = self._buf.find(term)
            if i < 0:
                break
            line = bytes(self._buf[:i])
            del self._buf[: i + len(term)]
            if self._discarding:
                self._discarding = False
                continue
            if len(line) > self.max_line:
                out.append((None, f"line longer than {self.max_line} bytes"))
                continue
            out.append((line, None))
        if len(self._buf) > self.max_line + len(term):
            if not self._discarding:
                out.append((None, f"more than {self.max_line} bytes without a terminator"))
            self._discarding = True
            # keep a tail so a terminator split across chunks is still found
            del self._buf[: len(self._buf) - (len(term) - 1)]
        return out
