"""RAIN RFID readers over LLRP 1.0.1 (EPCglobal Low Level Reader Protocol, binary over TCP 5084).

A tunnel reader on a packaging line answers one question per case: which tags
were in the field while the case passed. So the primary mode is an inventory
*window*: the line starts it (START_ROSPEC) when the case enters and closes it
when the case leaves (STOP_ROSPEC); the window is decided when the reader
confirms the end of the ROSpec (a ROSpecEvent End_Of_ROSpec, which the driver
enables), because every report of that ROSpec is on the wire before it.
`trigger: continuous` instead keeps one ROSpec running and streams every tag.

Messages are encoded and decoded with llrpkit (MIT; its codec is bit-exact,
bounds-checked and covers every core message and parameter). Its client is not
used: framing, the handshake, keepalive supervision and reconnects are the
house ConnectionSupervisor's, so health and backoff behave as for every other
device, and the frame bound and silence timeouts are ours to choose.

On connect the reader must announce ConnectionAttemptEvent Success (a reader
held by another client says so, and that becomes the health reason). Set-up
then runs before health turns CONNECTED: capabilities (configured antennas
must exist), keepalive period and ROSpec events (SET_READER_CONFIG), every
ROSpec deleted (a reader keeps the previous client's, which would otherwise
inventory and report alongside ours), ours added and enabled. Anything that is
not LLRP (bad length, unknown message type, truncated or undecodable bytes)
drops the link with the reason and reconnects; no frame longer than
`max_message_bytes` is ever buffered, and silence longer than
`keepalive_timeout_s` counts as a lost reader.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from llrpkit.inventory import build_rospec
from llrpkit.protocol import LLRPMessage, UnknownCustomMessage, UnknownMessage, decode_message, enums, messages, params
from pydantic import Field, field_validator, model_validator

from linectl.drivers.base import DeviceError, DriverConfig, RfidReader, RfidWindow, TagRead, register_driver
from linectl.drivers.transport import ConnectionSupervisor, StreamWriterLike

HEADER_LEN = 10
#: what a refusing reader means, per ConnectionAttemptStatusType
REFUSALS = {
    1: "another connection, initiated by the reader, is already open",
    2: "another client is connected",
    3: "the reader refused for a reason other than an existing connection",
    4: "another connection attempt was made",
}
_StatusResponse = (
    messages.GET_READER_CAPABILITIES_RESPONSE,
    messages.SET_READER_CONFIG_RESPONSE,
    messages.ADD_ROSPEC_RESPONSE,
    messages.DELETE_ROSPEC_RESPONSE,
    messages.START_ROSPEC_RESPONSE,
    messages.STOP_ROSPEC_RESPONSE,
    messages.ENABLE_ROSPEC_RESPONSE,
    messages.DISABLE_ROSPEC_RESPONSE,
    messages.GET_ROSPECS_RESPONSE,
    messages.CLOSE_CONNECTION_RESPONSE,
    messages.ERROR_MESSAGE,
)


class LlrpConfig(DriverConfig):
    """`driver: llrp` — an LLRP reader (Impinj, Zebra, Kathrein...) as a tunnel or a gate.

    `connect_timeout_s` (DriverConfig) bounds TCP connect, handshake and ROSpec set-up together.
    """

    driver: Literal["llrp"]
    host: str = Field(min_length=1, description="the reader's address")
    port: int = Field(5084, ge=1, le=65535, description="LLRP port (IANA 5084)")
    antennas: list[int] = Field(default_factory=list, description="antenna IDs to inventory with; empty = all of the reader's")
    trigger: Literal["window", "continuous"] = Field(
        "window", description="window: inventory between start_window/end_window (read_window); continuous: always, tags()"
    )
    window_ms: int = Field(500, ge=10, le=600_000, description="read_window() length when the caller gives none")
    session: Literal[0, 1, 2, 3] = Field(1, description="Gen2 session: 1+ reads each tag once per window, 0 over and over")
    tag_population: int = Field(32, ge=1, le=65535, description="expected tags in the field (reader's Q hint)")
    report_every_n_tags: int | None = Field(
        None, ge=1, le=65535, description="reader reports every N tags; null: window mode at the end only, continuous every tag"
    )
    keepalive_s: float = Field(1.0, ge=0.01, le=3600, description="KEEPALIVE period asked of the reader")
    keepalive_timeout_s: float = Field(3.5, gt=0, le=36_000, description="no message for this long = reader lost, reconnect")
    rospec_id: int = Field(0x4C4E, ge=1, le=0xFFFFFFFF, description="ID of the driver's ROSpec on the reader")
    max_message_bytes: int = Field(1 << 20, ge=1024, le=1 << 26, description="longer LLRP messages are malformed")
    tag_queue: int = Field(10_000, ge=1, le=1_000_000, description="continuous mode: tag reads buffered for tags()")

    @field_validator("antennas")
    @classmethod
    def _antennas(cls, v: list[int]) -> list[int]:
        for a in v:
            if not 1 <= a <= 65535:
                raise ValueError(f"antenna ID {a} out of range 1-65535")
        if len(set(v)) != len(v):
            raise ValueError("antenna listed twice")
        return v

    @model_validator(mode="after")
    def _timeouts(self) -> LlrpConfig:
        if self.keepalive_timeout_s <= self.keepalive_s:
            raise ValueError("keepalive_timeout_s must be longer than keepalive_s (one lost KEEPALIVE is not a lost reader)")
        return self

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


# --------------------------------------------------------------------------- framing


class Malformed(Exception):
    """Bytes from the reader that are not LLRP. `reason` becomes the health reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Silent(Exception):
    pass


class _Closed(Exception):
    pass


async def _read_exact(reader: asyncio.StreamReader, n: int, timeout: float) -> bytes:
    """n bytes within timeout; _Closed on EOF, TimeoutError carrying nothing on a stall (the caller knows what)."""
    buf = bytearray()
    async with asyncio.timeout(timeout):
        while len(buf) < n:
            chunk = await reader.read(n - len(buf))
            if not chunk:
                raise _Closed(len(buf))
            buf += chunk
    return bytes(buf)


async def read_message(reader: asyncio.StreamReader, *, idle_s: float, body_s: float, max_bytes: int) -> LLRPMessage:
    """One LLRP message. Silence for idle_s is _Silent; a message that stops arriving within body_s is Malformed."""
    try:
        first = await _read_exact(reader, 1, idle_s)
    except TimeoutError:
        raise _Silent() from None
    try:
        head = first + await _read_exact(reader, HEADER_LEN - 1, body_s)
    except TimeoutError:
        raise Malformed(f"truncated message: header cut off, stalled for {body_s:g}s") from None
    word = int.from_bytes(head[:2], "big")
    version, msg_type = (word >> 10) & 0x7, word & 0x3FF
    length = int.from_bytes(head[2:6], "big")
    if word >> 13:
        raise Malformed(f"reserved header bits set (0x{head[:2].hex()}): not an LLRP message")
    if version not in (1, 2):
        raise Malformed(f"LLRP version {version} in the header (1.0.1 is 1, 1.1 is 2)")
    if length < HEADER_LEN:
        raise Malformed(f"message length {length} is shorter than the {HEADER_LEN}-byte header")
    if length > max_bytes:
        raise Malformed(f"message length {length} exceeds max_message_bytes {max_bytes}")
    try:
        body = await _read_exact(reader, length - HEADER_LEN, body_s)
    except TimeoutError:
        raise Malformed(f"truncated message: type {msg_type} announced {length} bytes, the rest did not come within {body_s:g}s") from None
    except _Closed:
        raise Malformed(f"truncated message: type {msg_type} announced {length} bytes, connection closed before the end") from None
    try:
        msg = decode_message(head + body)
    except Exception as exc:  # llrpkit raises MessageDecodeError; anything else from arbitrary bytes is malformed too
        raise Malformed(f"undecodable message type {msg_type}: {exc}") from None
    if isinstance(msg, UnknownMessage):
        raise Malformed(f"unknown message type {msg_type}")
    return msg


def status_error(msg: LLRPMessage, request: str) -> DeviceError | None:
    """The reader's refusal in an LLRPStatus, as a DeviceError; None for success."""
    if not isinstance(msg, _StatusResponse):
        return None
    st = msg.llrp_status
    code = int(st.status_code)
    if code == int(enums.StatusCode.M_Success) and not isinstance(msg, messages.ERROR_MESSAGE):
        return None
    try:
        name = enums.StatusCode(code).name
    except ValueError:
        name = f"status {code}"
    detail = f": {st.error_description}" if st.error_description else ""
    return DeviceError(f"reader refused {request} ({name}{detail})", code=name)


def tag_read(trd: params.TagReportData) -> TagRead:
    p = trd.epc_parameter
    if isinstance(p, params.EPC_96):
        raw, bits = p.epc, 96
    else:
        raw, bits = p.epc.data, p.epc.bit_len
    return TagRead(
        epc_hex=raw.hex(),
        epc_bits=bits,
        antenna=trd.antenna_id.antenna_id if trd.antenna_id is not None else None,
        peak_rssi=trd.peak_rssi.peak_rssi if trd.peak_rssi is not None else None,
        first_seen_us=trd.first_seen_timestamp_utc.microseconds if trd.first_seen_timestamp_utc is not None else None,
        last_seen_us=trd.last_seen_timestamp_utc.microseconds if trd.last_seen_timestamp_utc is not None else None,
        seen_count=trd.tag_seen_count.tag_count if trd.tag_seen_count is not None else 1,
    )


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def merge(a: TagRead, b: TagRead) -> TagRead:
    """Two reports of one EPC: counts add up, the span widens, the strongest read gives RSSI and antenna."""
    stronger = b if (b.peak_rssi is not None and (a.peak_rssi is None or b.peak_rssi > a.peak_rssi)) else a
    return TagRead(
        epc_hex=a.epc_hex,
        epc_bits=max(a.epc_bits, b.epc_bits),
        antenna=stronger.antenna,
        peak_rssi=stronger.peak_rssi,
        first_seen_us=_min(a.first_seen_us, b.first_seen_us),
        last_seen_us=_max(a.last_seen_us, b.last_seen_us),
        seen_count=a.seen_count + b.seen_count,
    )


# --------------------------------------------------------------------------- the driver


@dataclass
class _Link:
    reader: asyncio.StreamReader
    writer: StreamWriterLike
    pending: dict[int, asyncio.Future[LLRPMessage]] = field(default_factory=dict)
    last_id: int = 0

    def next_id(self) -> int:
        self.last_id = self.last_id % 0xFFFFFFFE + 1
        return self.last_id


@dataclass
class _Window:
    started_at: float
    tags: dict[str, TagRead] = field(default_factory=dict)
    reports: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False  # STOP_ROSPEC sent: only an End_Of_ROSpec after it closes this window
    lost: str | None = None


@register_driver
class LlrpReader(RfidReader):
    config_class = LlrpConfig
    config: LlrpConfig

    def __init__(self, name: str, config: LlrpConfig) -> None:
        super().__init__(name, config)
        self._sup = ConnectionSupervisor(self, config, self._session, opener=self._open)
        self._opened: _Link | None = None  # set up by _open, taken over by _session
        self._link: _Link | None = None
        self._window: _Window | None = None
        self._tags: asyncio.Queue[TagRead] = asyncio.Queue(maxsize=config.tag_queue)
        self.max_antennas: int | None = None
        self.deleted_rospecs = 0  # ROSpecs found on the reader at set-up (a previous client's, or ours)
        self.dropped_tags = 0
        self.late_reports = 0  # TagReportData that arrived with no window open (window mode)
        self.windows_without_end = 0  # windows closed on timeout: the reader sent no End_Of_ROSpec
        self._background: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._sup.start()

    async def stop(self) -> None:
        link = self._link
        if link is not None:
            try:  # leave the reader idle and say goodbye; a reader that does not answer is closed anyway
                await self._request(messages.DELETE_ROSPEC(ro_spec_id=self.config.rospec_id))
                link.writer.write(messages.CLOSE_CONNECTION().to_bytes(message_id=link.next_id()))
                async with asyncio.timeout(self.config.reply_timeout_s):
                    await link.writer.drain()
            except (DeviceError, TimeoutError, ConnectionError, OSError):
                pass
        await self._sup.stop()

    @property
    def connected(self) -> bool:
        return self._link is not None

    # ------------------------------------------------------------------ connect and set up (the supervisor's opener)

    async def _open(self) -> tuple[asyncio.StreamReader, StreamWriterLike]:
        cfg = self.config
        reader, writer = await asyncio.open_connection(cfg.host, cfg.port, limit=1 << 16)
        link = _Link(reader, writer)
        try:
            try:
                first = await self._next(link, cfg.reply_timeout_s)
            except _Silent:
                raise DeviceError(f"no ConnectionAttemptEvent within {cfg.reply_timeout_s:g}s (is this an LLRP reader?)") from None
            event = first.reader_event_notification_data.connection_attempt_event if isinstance(first, messages.READER_EVENT_NOTIFICATION) else None
            if event is None:
                raise DeviceError(f"the reader sent {type(first).__name__} before its ConnectionAttemptEvent")
            status = int(event.status)
            if status != int(enums.ConnectionAttemptStatusType.Success):
                raise DeviceError(f"reader refused the connection: {REFUSALS.get(status, f'status {status}')}")
            await self._set_up(link)
        except BaseException:
            writer.close()
            raise
        self._opened = link
        return reader, writer

    async def _set_up(self, link: _Link) -> None:
        cfg = self.config
        caps = await self._call(link, messages.GET_READER_CAPABILITIES(requested_data=enums.GetReaderCapabilitiesRequestedData.All))
        gdc = caps.general_device_capabilities if isinstance(caps, messages.GET_READER_CAPABILITIES_RESPONSE) else None
        if gdc is not None:
            self.max_antennas = int(gdc.max_number_of_antenna_supported)
            missing = [a for a in cfg.antennas if a > self.max_antennas]
            if missing:
                raise DeviceError(f"antennas {missing} configured but the reader has {self.max_antennas}")
        await self._call(
            link,
            messages.SET_READER_CONFIG(
                reset_to_factory_default=False,
                keepalive_spec=params.KeepaliveSpec(
                    keepalive_trigger_type=enums.KeepaliveTriggerType.Periodic,
                    periodic_trigger_value=max(1, round(cfg.keepalive_s * 1000)),
                ),
                reader_event_notification_spec=params.ReaderEventNotificationSpec(
                    event_notification_states=[
                        params.EventNotificationState(event_type=enums.NotificationEventType.ROSpec_Event, notification_state=True)
                    ]
                ),
            ),
        )
        await self._delete_all(link)
        n = cfg.report_every_n_tags or (1 if cfg.trigger == "continuous" else 0)
        spec = build_rospec(
            ro_spec_id=cfg.rospec_id, antennas=cfg.antennas, session=cfg.session, tag_population=cfg.tag_population, report_every_n=n
        )
        await self._call(link, messages.ADD_ROSPEC(ro_spec=spec))
        await self._call(link, messages.ENABLE_ROSPEC(ro_spec_id=cfg.rospec_id))
        if cfg.trigger == "continuous":  # reports can beat the START response: they are the stream's first tags
            await self._call(link, messages.START_ROSPEC(ro_spec_id=cfg.rospec_id), keep_reports=True)

    async def _delete_all(self, link: _Link) -> None:
        """Every ROSpec goes: ID 0 means all; a reader that refuses that gets its ROSpecs listed and deleted one by one."""
        listing = await self._call(link, messages.GET_ROSPECS())
        ids = [s.ro_spec_id for s in listing.ro_specs] if isinstance(listing, messages.GET_ROSPECS_RESPONSE) else []
        if not ids:
            return
        try:
            await self._call(link, messages.DELETE_ROSPEC(ro_spec_id=0))
        except DeviceError:
            for i in ids:
                await self._call(link, messages.DELETE_ROSPEC(ro_spec_id=i))
        self.deleted_rospecs += len(ids)
        self.log.info("llrp_rospecs_deleted", ids=ids)

    async def _next(self, link: _Link, idle_s: float) -> LLRPMessage:
        try:
            return await read_message(link.reader, idle_s=idle_s, body_s=self.config.reply_timeout_s, max_bytes=self.config.max_message_bytes)
        except Malformed as m:
            raise DeviceError(f"malformed LLRP from the reader: {m.reason}") from None
        except _Closed:
            raise DeviceError("the reader closed the connection during set-up") from None

    async def _call(self, link: _Link, msg: LLRPMessage, *, keep_reports: bool = False) -> LLRPMessage:
        """Request/response before the session runs: other traffic is answered (KEEPALIVE) or is stale and skipped."""
        name = type(msg).__name__
        mid = link.next_id()
        link.writer.write(msg.to_bytes(message_id=mid))
        await link.writer.drain()
        deadline = time.monotonic() + self.config.reply_timeout_s
        while True:
            try:
                reply = await self._next(link, max(0.0, deadline - time.monotonic()))
            except _Silent:
                raise DeviceError(f"no answer to {name} within {self.config.reply_timeout_s:g}s") from None
            if isinstance(reply, messages.KEEPALIVE):
                link.writer.write(messages.KEEPALIVE_ACK().to_bytes(message_id=reply.message_id))
                continue
            if keep_reports and isinstance(reply, messages.RO_ACCESS_REPORT):
                self._on_report(reply)
                continue
            if isinstance(reply, (messages.RO_ACCESS_REPORT, messages.READER_EVENT_NOTIFICATION)) or reply.message_id != mid:
                continue
            err = status_error(reply, name)
            if err is not None:
                raise err
            return reply

    # ------------------------------------------------------------------ the session

    async def _session(self, reader: asyncio.StreamReader, writer: StreamWriterLike) -> None:
        link = self._opened
        assert link is not None and link.reader is reader
        self._opened = None
        self._link = link
        cfg = self.config
        reason = "connection closed by the reader"
        try:
            while True:
                try:
                    msg = await read_message(reader, idle_s=cfg.keepalive_timeout_s, body_s=cfg.reply_timeout_s, max_bytes=cfg.max_message_bytes)
                except _Silent:
                    reason = f"no message from the reader for {cfg.keepalive_timeout_s:g}s (KEEPALIVE expected every {cfg.keepalive_s:g}s)"
                    self._sup.drop(reason)
                    return
                except Malformed as m:
                    reason = f"malformed LLRP from the reader: {m.reason}"
                    self._sup.drop(reason)
                    return
                except _Closed:
                    return
                self._dispatch(link, msg)
                if link.writer.is_closing():  # dropped by the dispatch (ConnectionCloseEvent)
                    reason = "the reader closed the connection (ConnectionCloseEvent)"
                    return
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc}"
            raise
        finally:
            self._link = None
            lost = DeviceError(f"{self.name}: {reason}")
            for fut in link.pending.values():
                if not fut.done():
                    fut.set_exception(lost)
            link.pending.clear()
            win = self._window
            if win is not None and win.lost is None:
                win.lost = reason
                win.ended.set()

    def _dispatch(self, link: _Link, msg: LLRPMessage) -> None:
        if isinstance(msg, messages.KEEPALIVE):
            link.writer.write(messages.KEEPALIVE_ACK().to_bytes(message_id=msg.message_id))
        elif isinstance(msg, messages.RO_ACCESS_REPORT):
            self._on_report(msg)
        elif isinstance(msg, messages.READER_EVENT_NOTIFICATION):
            self._on_event(msg.reader_event_notification_data)
        elif isinstance(msg, UnknownCustomMessage):
            self.log.debug("llrp_custom_message_ignored", vendor=msg.vendor_id, subtype=msg.subtype)
        else:
            fut = link.pending.pop(msg.message_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif isinstance(msg, messages.ERROR_MESSAGE):
                self.log.warning("llrp_reader_error", status=int(msg.llrp_status.status_code), description=msg.llrp_status.error_description)
            else:
                self.log.debug("llrp_unexpected_message", type=type(msg).__name__, message_id=msg.message_id)

    def _on_report(self, msg: messages.RO_ACCESS_REPORT) -> None:
        win = self._window
        for trd in msg.tag_report_datas:
            tag = tag_read(trd)
            if self.config.trigger == "continuous":
                if self._tags.full():
                    self._tags.get_nowait()
                    self.dropped_tags += 1
                    if self.dropped_tags == 1 or self.dropped_tags % 1000 == 0:
                        self.log.warning("llrp_tags_dropped", dropped=self.dropped_tags, queue=self.config.tag_queue)
                self._tags.put_nowait(tag)
            elif win is not None:
                win.reports += 1
                old = win.tags.get(tag.epc_hex)
                win.tags[tag.epc_hex] = tag if old is None else merge(old, tag)
            else:
                self.late_reports += 1
                self.log.debug("llrp_report_outside_window", epc=tag.epc_hex)

    def _on_event(self, data: params.ReaderEventNotificationData) -> None:
        ev = data.ro_spec_event
        if ev is not None and ev.ro_spec_id == self.config.rospec_id and int(ev.event_type) == int(enums.ROSpecEventType.End_Of_ROSpec):
            if self._window is not None and self._window.stopping:
                self._window.ended.set()
        if data.connection_close_event is not None:
            self._sup.drop("the reader closed the connection (ConnectionCloseEvent)")
        if data.reader_exception_event is not None:
            self.log.warning("llrp_reader_exception", message=data.reader_exception_event.message)
        if data.connection_attempt_event is not None:
            self.log.info("llrp_connection_attempt_event", status=int(data.connection_attempt_event.status))

    async def _request(self, msg: LLRPMessage) -> LLRPMessage:
        """Request/response during the session. A reader that does not answer is dropped: its state is unknown."""
        link = self._link
        name = type(msg).__name__
        if link is None:
            raise DeviceError(f"{self.name}: not connected ({self.health.reason})")
        mid = link.next_id()
        fut: asyncio.Future[LLRPMessage] = asyncio.get_running_loop().create_future()
        link.pending[mid] = fut
        try:
            async with asyncio.timeout(self.config.reply_timeout_s):
                link.writer.write(msg.to_bytes(message_id=mid))
                await link.writer.drain()
                reply = await fut
        except TimeoutError:
            reason = f"no answer to {name} within {self.config.reply_timeout_s:g}s"
            self._sup.drop(reason)
            raise DeviceError(f"{self.name}: {reason}") from None
        except (ConnectionError, OSError) as exc:
            raise DeviceError(f"{self.name}: connection lost: {exc}") from None
        finally:
            link.pending.pop(mid, None)
        err = status_error(reply, name)
        if err is not None:
            raise DeviceError(f"{self.name}: {err.reason}", code=err.code)
        return reply

    # ------------------------------------------------------------------ windows

    async def start_window(self) -> None:
        if self.config.trigger != "window":
            raise DeviceError(f"{self.name}: trigger is {self.config.trigger}; windows need trigger: window")
        if self._window is not None:
            raise DeviceError(f"{self.name}: an inventory window is already open")
        if self._link is None:
            raise DeviceError(f"{self.name}: not connected ({self.health.reason})")
        win = _Window(time.time())
        self._window = win  # before START: the first report can beat the response
        try:
            await self._request(messages.START_ROSPEC(ro_spec_id=self.config.rospec_id))
        except BaseException:
            self._window = None
            raise

    async def end_window(self) -> RfidWindow:
        win = self._window
        if win is None:
            raise DeviceError(f"{self.name}: no inventory window is open")
        try:
            if win.lost is None:
                win.stopping = True
                await self._request(messages.STOP_ROSPEC(ro_spec_id=self.config.rospec_id))
                try:
                    async with asyncio.timeout(self.config.reply_timeout_s):
                        await win.ended.wait()
                except TimeoutError:
                    self.windows_without_end += 1
                    if self.windows_without_end == 1:
                        self.log.warning("llrp_no_end_of_rospec", note="the reader sends no End_Of_ROSpec; windows close on timeout")
            if win.lost is not None:
                raise DeviceError(f"{self.name}: connection lost during the window ({win.lost})")
        finally:
            self._window = None
        complete = win.ended.is_set()
        return RfidWindow(win.started_at, time.time(), tuple(win.tags.values()), win.reports, complete)

    async def read_window(self, duration_s: float | None = None) -> RfidWindow:
        await self.start_window()
        try:
            await asyncio.sleep(self.config.window_ms / 1000.0 if duration_s is None else duration_s)
        except asyncio.CancelledError:
            self._abandon_window()
            raise
        return await self.end_window()

    def _abandon_window(self) -> None:
        """A caller cancelled mid-window: stop the reader in the background so the next window can start."""
        self._window = None

        async def stop_quietly() -> None:
            try:
                await self._request(messages.STOP_ROSPEC(ro_spec_id=self.config.rospec_id))
            except DeviceError:
                pass

        if self._link is not None:
            task = asyncio.get_running_loop().create_task(stop_quietly())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def tags(self) -> AsyncIterator[TagRead]:
        if self.config.trigger != "continuous":
            raise DeviceError(f"{self.name}: tags() streams in trigger: continuous; this reader works in windows")
        while True:
            yield await self._tags.get()

