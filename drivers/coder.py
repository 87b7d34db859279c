"""Coding printers (CIJ, TIJ, laser): a vendor-neutral driver plus LCP/1, linectl's documented framed ASCII protocol.

Domino, Videojet and Markem-Imaje all work the same way at the level the
line cares about: select a message template, push the variable fields of each
unit ahead of the product trigger, get ACK/NAK, and hear back about prints and
faults. `CoderProtocol` captures exactly that (encode commands, decode replies
and events) without any I/O, so a vendor protocol is one more subclass in
`PROTOCOLS`; `CoderPrinter` does the connection, request correlation, health
and print confirmations once for all of them.

LCP/1 wire format (full description in docs_devices_printers.md):

    frame  = STX cmd *(FS field) ETX BCC
    BCC    = XOR of every byte after STX up to and including ETX, as two upper-case hex digits
    field  = printable ASCII (0x20-0x7E); "\\" -> "\\\\", GS (0x1D) -> "\\G", any other byte -> "\\xHH"

    host -> printer: SEL rid message | DAT rid jobseq name=value... | STA rid | CLR rid
    printer -> host: ACK rid [key=value...] | NAK rid code text | PRN jobseq product print | FLT code text
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from linectl.drivers.base import (
    DeviceError,
    DriverConfig,
    HealthState,
    PrintConfirm,
    Printer,
    PrintJob,
    register_driver,
)
from linectl.drivers.transport import ConnectionSupervisor, TransportConfig

STX, ETX, FS, GS = 0x02, 0x03, 0x1C, 0x1D
MAX_FRAME = 8192
#: jobs remembered as possibly on the printer; far above any printer buffer, bounds memory after many lost ACKs
MAX_INFLIGHT = 10_000

# --------------------------------------------------------------------------- LCP/1 codes

#: NAK codes: why the printer refused a command
NAK_CODES = {
    "01": "bad frame (checksum or syntax)",
    "02": "unknown command",
    "03": "bad arguments",
    "04": "unknown message template",
    "05": "no message selected",
    "06": "buffer full",
    "07": "printer faulted, not ready",
    "08": "job sequence already queued",
}

#: fault codes: 000 = all clear, 1xx = warning (still printing), 2xx = stopped (not printing)
FAULT_CODES = {
    "000": "no fault",
    "101": "ink low",
    "102": "solvent low",
    "103": "buffer underrun: a product trigger found the buffer empty, that product was not printed",
    "104": "buffer full",
    "201": "ink empty",
    "202": "print head fault",
    "203": "high voltage trip",
    "204": "cover open",
}


def fault_severity(code: str) -> Literal["ok", "warning", "stop"]:
    if code == "000":
        return "ok"
    return "warning" if code.startswith("1") else "stop"


# --------------------------------------------------------------------------- LCP/1 codec (shared with the simulator)


def escape_field(value: str) -> bytes:
    """Field text -> frame bytes: only printable ASCII on the wire, so framing bytes can never appear in data."""
    out = bytearray()
    for b in value.encode("utf-8"):
        if b == 0x5C:  # backslash
            out += b"\\\\"
        elif b == GS:
            out += b"\\G"
        elif 0x20 <= b <= 0x7E:
            out.append(b)
        else:
            out += b"\\x%02X" % b
    return bytes(out)


def unescape_field(raw: bytes) -> str:
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        b = raw[i]
        if b != 0x5C:
            if not 0x20 <= b <= 0x7E:
                raise ValueError(f"raw byte 0x{b:02X} in field")
            out.append(b)
            i += 1
            continue
        if i + 1 >= n:
            raise ValueError("dangling escape at end of field")
        nxt = raw[i + 1]
        if nxt == 0x5C:
            out.append(0x5C)
            i += 2
        elif nxt == ord("G"):
            out.append(GS)
            i += 2
        elif nxt == ord("x") and i + 3 < n:
            try:
                out.append(int(raw[i + 2 : i + 4].decode("ascii"), 16))
            except ValueError:
                raise ValueError("bad \\x escape") from None
            i += 4
        else:
            raise ValueError(f"unknown escape \\{chr(nxt)}")
    return out.decode("utf-8")


def bcc(body: bytes) -> bytes:
    x = 0
    for b in body:
        x ^= b
    return b"%02X" % x


def encode_frame(cmd: str, *fields: str) -> bytes:
    body = cmd.encode("ascii") + b"".join(bytes([FS]) + escape_field(f) for f in fields) + bytes([ETX])
    return bytes([STX]) + body + bcc(body)


@dataclass
class Frame:
    cmd: str
    fields: list[str]


class FrameDecoder:
    """Byte stream -> frames; anything that is not a well-formed frame is reported as garbage, never guessed at."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[Frame | str]:
        out: list[Frame | str] = []
        buf = self._buf
        buf += data
        while buf:
            if buf[0] != STX:
                i = buf.find(bytes([STX]))
                cut = len(buf) if i < 0 else i
                out.append("bytes outside a frame")
                del buf[:cut]
                continue
            j = buf.find(bytes([ETX]))
            if j < 0:
                k = buf.find(bytes([STX]), 1)
                if k > 0:
                    out.append("frame without ETX")
                    del buf[:k]
                    continue
                if len(buf) > self.max_frame:
                    out.append(f"frame longer than {self.max_frame} bytes")
                    buf.clear()
                break
            k = buf.find(bytes([STX]), 1, j)
            if k > 0:
                out.append("frame without ETX")
                del buf[:k]
                continue
            if len(buf) < j + 3:
                break  # BCC not here yet
            body = bytes(buf[1 : j + 1])
            got = bytes(buf[j + 1 : j + 3])
            del buf[: j + 3]
            if got.upper() != bcc(body):
                out.append("bad BCC")
                continue
            parts = body[:-1].split(bytes([FS]))
            try:
                cmd = parts[0].decode("ascii")
                fields = [unescape_field(p) for p in parts[1:]]
            except (UnicodeDecodeError, ValueError) as exc:
                out.append(f"bad field encoding: {exc}")
                continue
            if not cmd.isalpha() or not cmd.isupper():
                out.append(f"bad command {cmd!r}")
                continue
            out.append(Frame(cmd, fields))
        return out


# --------------------------------------------------------------------------- protocol interface


@dataclass
class Reply:
    """Answer to one host command. `rid` None = protocol without ids (answers come in order)."""

    rid: int | None
    ok: bool
    values: dict[str, str] = field(default_factory=dict)
    code: str | None = None
    text: str = ""


@dataclass
class Printed:
    seq: int
    product_count: int | None  # the printer's product-detect (trigger) counter for that print
    print_count: int | None  # the printer's print counter: a jump means prints without a PRN


@dataclass
class Fault:
    code: str
    text: str
    severity: Literal["ok", "warning", "stop"]


@dataclass
class Garbage:
    reason: str


Event = Reply | Printed | Fault | Garbage


class CoderProtocol(abc.ABC):
    """What a coding-printer protocol must provide. Sans-I/O: bytes in, events out; commands out as bytes.

    Implementations must never turn unparsable input into a Printed event:
    garbage is reported as Garbage and the driver degrades health instead.
    """

    name: ClassVar[str]
    #: True when replies carry the request id; else the driver matches replies to requests in order
    has_request_ids: ClassVar[bool] = True

    @abc.abstractmethod
    def feed(self, data: bytes) -> list[Event]: ...

    @abc.abstractmethod
    def select(self, rid: int, message: str) -> bytes: ...

    @abc.abstractmethod
    def job(self, rid: int, seq: int, values: dict[str, str]) -> bytes: ...

    @abc.abstractmethod
    def status(self, rid: int) -> bytes: ...

    @abc.abstractmethod
    def clear(self, rid: int) -> bytes: ...

    def describe_nak(self, code: str | None) -> str:
        return NAK_CODES.get(code or "", "refused")


class Lcp1Protocol(CoderProtocol):
    """LCP/1, the linectl coder protocol (see module docstring and docs_devices_printers.md)."""

    name = "lcp1"

    def __init__(self) -> None:
        self._dec = FrameDecoder()

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for fr in self._dec.feed(data):
            if isinstance(fr, str):
                events.append(Garbage(fr))
                continue
            try:
                events.append(self._event(fr))
            except (ValueError, IndexError) as exc:
                events.append(Garbage(f"bad {fr.cmd} frame: {exc}"))
        return events

    @staticmethod
    def _event(fr: Frame) -> Event:
        f = fr.fields
        if fr.cmd == "ACK":
            values = {}
            for kv in f[1:]:
                k, sep, v = kv.partition("=")
                if not sep:
                    raise ValueError(f"ACK field {kv!r} is not key=value")
                values[k] = v
            return Reply(int(f[0]), True, values)
        if fr.cmd == "NAK":
            return Reply(int(f[0]), False, code=f[1], text=f[2] if len(f) > 2 else "")
        if fr.cmd == "PRN":
            if len(f) != 3 or not all(x.isdigit() for x in f):
                raise ValueError("PRN needs job seq, product count and print count, all digits")
            return Printed(int(f[0]), int(f[1]), int(f[2]))
        if fr.cmd == "FLT":
            code = f[0]
            if len(code) != 3 or not code.isdigit():
                raise ValueError(f"fault code {code!r} is not 3 digits")
            return Fault(code, f[1] if len(f) > 1 else FAULT_CODES.get(code, ""), fault_severity(code))
        raise ValueError(f"unexpected command {fr.cmd!r} from printer")

    def select(self, rid: int, message: str) -> bytes:
        return encode_frame("SEL", str(rid), message)

    def job(self, rid: int, seq: int, values: dict[str, str]) -> bytes:
        for k in values:
            if not k or "=" in k:
                raise DeviceError(f"printer field name {k!r} is not valid in LCP/1")
        return encode_frame("DAT", str(rid), str(seq), *(f"{k}={v}" for k, v in values.items()))

    def status(self, rid: int) -> bytes:
        return encode_frame("STA", str(rid))

    def clear(self, rid: int) -> bytes:
        return encode_frame("CLR", str(rid))


PROTOCOLS: dict[str, type[CoderProtocol]] = {"lcp1": Lcp1Protocol}

_JOB_SOURCES = ("element_string", "hri", "seq")


# --------------------------------------------------------------------------- config + driver


class CoderConfig(TransportConfig, DriverConfig):
    """`driver: coder` — a coding printer over TCP or serial.

    `fields` maps the printer template's variable field names to what the job
    carries: `element_string` (GS1 data, GS separated), `hri`, `seq`, or
    `fields.<key>` for an extra job field (lot text, expiry text...).
    """

    driver: Literal["coder"]
    protocol: Literal["lcp1"] = "lcp1"
    message: str = Field(min_length=1, description="message template selected on the printer")
    fields: dict[str, str] = Field(
        default_factory=lambda: {"DM": "element_string", "HRI": "hri"},
        description="printer field name -> job source (element_string, hri, seq, fields.<key>)",
    )
    status_interval_s: float = Field(2.0, ge=0, description="STA keep-alive period; 0 = off")
    missed_status_limit: int = Field(2, ge=1, description="unanswered STA in a row before reconnecting")
    clear_on_connect: bool = Field(False, description="send CLR after every (re)connect")

    @field_validator("fields")
    @classmethod
    def _sources(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("fields must map at least one printer field")
        for name, src in v.items():
            if src not in _JOB_SOURCES and not (src.startswith("fields.") and len(src) > 7):
                raise ValueError(f"field {name!r}: source {src!r} must be one of {', '.join(_JOB_SOURCES)} or fields.<key>")
        if "element_string" not in v.values():
            raise ValueError("no printer field takes element_string: the code would never be printed")
        return v


@register_driver
class CoderPrinter(Printer):
    """A coding printer behind a CoderProtocol. Confirms only jobs the printer itself reported as printed."""

    config_class = CoderConfig
    config: CoderConfig

    def __init__(self, name: str, config: CoderConfig) -> None:
        super().__init__(name, config)
        self.proto: CoderProtocol = PROTOCOLS[config.protocol]()
        self._sup = ConnectionSupervisor(self, config, self._session, on_lost=self._on_lost)
        self._rid = 0
        self._waiters: OrderedDict[int, asyncio.Future[Reply]] = OrderedDict()
        #: jobs DAT-sent (ACKed or not yet answered) and not yet reported printed, in send order
        self._inflight: OrderedDict[int, float] = OrderedDict()
        self._confirms: asyncio.Queue[PrintConfirm] = asyncio.Queue()
        self._faults: dict[str, str] = {}
        self._last_count: int | None = None
        self._writer: Any = None
        self._write_lock = asyncio.Lock()
        self.garbage_count = 0
        self.confirmed = 0
        self.lost_prints = 0

    # -- Driver

    async def start(self) -> None:
        self._sup.start()

    async def stop(self) -> None:
        await self._sup.stop()
        self._fail_waiters("driver stopped")

    @property
    def connected(self) -> bool:
        """The link is up (health may still be DEGRADED or show a device fault)."""
        return self._sup.connected

    @property
    def faults(self) -> dict[str, str]:
        return dict(self._faults)

    def pending(self) -> list[int]:
        """Job seqs sent to the printer and not (yet) reported printed."""
        return list(self._inflight)

    # -- session

    async def _session(self, reader: asyncio.StreamReader, writer: Any) -> None:
        self.proto = PROTOCOLS[self.config.protocol]()  # fresh framing state per link
        self._writer = writer
        ka: asyncio.Task[None] | None = None
        pump = asyncio.create_task(self._pump(reader))
        try:
            sel = await self._request(lambda rid: self.proto.select(rid, self.config.message), "SEL")
            if not sel.ok:
                raise DeviceError(
                    f"printer refused message {self.config.message!r}: NAK {sel.code} "
                    f"{sel.text or self.proto.describe_nak(sel.code)}"
                )
            st = await self._request(self.proto.status, "STA")
            self._apply_status(st)
            if self.config.clear_on_connect:
                await self.clear()
            self._refresh_health()
            if self.config.status_interval_s > 0:
                ka = asyncio.create_task(self._keepalive())
            await pump
        except DeviceError as exc:
            self.log.warning("coder_setup_failed", reason=exc.reason)
            raise ConnectionError(f"setup failed: {exc.reason}") from None
        finally:
            for t in (ka, pump):
                if t is not None and not t.done():
                    t.cancel()
            self._writer = None

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for ev in self.proto.feed(data):
                self._on_event(ev)

    async def _keepalive(self) -> None:
        missed = 0
        while True:
            await asyncio.sleep(self.config.status_interval_s)
            try:
                st = await self._request(self.proto.status, "STA")
            except DeviceError as exc:
                if exc.code != "timeout":
                    continue  # a fault or a refusal is an answer: the printer is alive
                missed += 1
                if missed >= self.config.missed_status_limit:
                    self._sup.drop(f"no answer to {missed} status requests ({exc.reason})")
                    return
                continue
            missed = 0
            self._apply_status(st)
            self._refresh_health()

    def _on_lost(self, reason: str) -> None:
        self._fail_waiters(f"connection lost: {reason}")

    def _fail_waiters(self, reason: str) -> None:
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(DeviceError(reason))
        self._waiters.clear()

    # -- events from the printer

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, Reply):
            self._on_reply(ev)
        elif isinstance(ev, Printed):
            self._on_printed(ev)
        elif isinstance(ev, Fault):
            self._on_fault(ev)
        else:
            self.garbage_count += 1
            self.log.warning("coder_garbage", reason=ev.reason, count=self.garbage_count)
            self._garbage_reason = f"garbage from printer: {ev.reason}"
            self._garbage_at = time.monotonic()
            self._refresh_health()

    def _on_reply(self, rep: Reply) -> None:
        if rep.rid is None:
            rid = next(iter(self._waiters), None)
        else:
            rid = rep.rid
        fut = self._waiters.pop(rid, None) if rid is not None else None
        if fut is None:
            self.log.warning("coder_stale_reply", rid=rep.rid, ok=rep.ok)
            return
        if not fut.done():
            fut.set_result(rep)

    def _on_printed(self, ev: Printed) -> None:
        if ev.print_count is not None and self._last_count is not None and ev.print_count != self._last_count + 1:
            gap = ev.print_count - self._last_count - 1
            if gap > 0:
                self.lost_prints += gap
                self.log.warning("coder_print_count_jump", last=self._last_count, now=ev.print_count, unreported_prints=gap)
        if ev.print_count is not None:
            self._last_count = ev.print_count
        if ev.seq not in self._inflight:
            # The printer printed something linectl never sent (or already reported): not ours to confirm.
            self.log.warning("coder_print_of_unknown_job", job_seq=ev.seq)
            return
        skipped = []
        for s in list(self._inflight):
            if s == ev.seq:
                break
            skipped.append(s)
            del self._inflight[s]
        if skipped:
            self.log.warning("coder_jobs_skipped", skipped=skipped, printed=ev.seq)
        del self._inflight[ev.seq]
        if "103" in self._faults:  # an underrun is an event; the next good print ends it
            del self._faults["103"]
            self._refresh_health()
        self.confirmed += 1
        self._confirms.put_nowait(PrintConfirm(ev.seq, time.time(), ev.product_count))

    def _on_fault(self, ev: Fault) -> None:
        if ev.severity == "ok":
            if self._faults:
                self.log.info("coder_faults_cleared", was=sorted(self._faults))
            self._faults.clear()
        else:
            self._faults[ev.code] = ev.text or FAULT_CODES.get(ev.code, "")
            self.log.warning("coder_fault", code=ev.code, text=ev.text, severity=ev.severity)
            if ev.severity == "stop":
                # whoever waits on the printer must hear it now, not at its timeout
                err = DeviceError(f"printer fault {ev.code}: {ev.text}", code=ev.code)
                for fut in self._waiters.values():
                    if not fut.done():
                        fut.set_exception(err)
                self._waiters.clear()
        self._refresh_health()

    def _apply_status(self, rep: Reply) -> None:
        code = rep.values.get("flt", "000")
        if code == "000":
            self._faults.clear()
        elif code not in self._faults:
            self._faults[code] = rep.values.get("txt", FAULT_CODES.get(code, ""))
        cnt = rep.values.get("cnt")
        if cnt is not None and cnt.isdigit() and self._last_count is None:
            self._last_count = int(cnt)

    _garbage_reason = ""
    _garbage_at = 0.0
    #: how long health stays DEGRADED after the last garbage from the printer
    garbage_hold_s = 5.0

    def _refresh_health(self) -> None:
        if not self._sup.connected:
            return
        stops = {c: t for c, t in self._faults.items() if fault_severity(c) == "stop"}
        warns = {c: t for c, t in self._faults.items() if fault_severity(c) == "warning"}
        if stops:
            self.set_health(HealthState.DISCONNECTED, "printer fault " + "; ".join(f"{c} {t}" for c, t in sorted(stops.items())))
        elif warns:
            self.set_health(HealthState.DEGRADED, "printer warning " + "; ".join(f"{c} {t}" for c, t in sorted(warns.items())))
        elif self._garbage_reason and time.monotonic() - self._garbage_at < self.garbage_hold_s:
            self.set_health(HealthState.DEGRADED, self._garbage_reason)
        else:
            self.set_health(HealthState.CONNECTED, f"connected to {self.config.endpoint}")

    # -- requests

    def _next_rid(self) -> int:
        self._rid = self._rid % 99999 + 1
        return self._rid

    async def _request(self, build: Any, what: str) -> Reply:
        w = self._writer
        if w is None or w.is_closing():
            raise DeviceError(f"{self.name}: not connected ({self.health.reason})")
        rid = self._next_rid()
        frame = build(rid)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        try:
            async with self._write_lock:
                w.write(frame)
                await w.drain()
            return await asyncio.wait_for(asyncio.shield(fut), self.config.reply_timeout_s)
        except TimeoutError:
            raise DeviceError(f"{self.name}: no answer to {what} within {self.config.reply_timeout_s}s", code="timeout") from None
        except (ConnectionError, OSError) as exc:
            raise DeviceError(f"{self.name}: connection lost during {what}: {exc}") from None
        finally:
            if self._waiters.get(rid) is fut:
                del self._waiters[rid]
            if not fut.done():
                fut.cancel()

    def _values(self, job: PrintJob) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, src in self.config.fields.items():
            if src == "element_string":
                out[name] = job.element_string
            elif src == "hri":
                out[name] = job.hri
            elif src == "seq":
                out[name] = str(job.seq)
            else:
                key = src[len("fields.") :]
                if key not in job.fields:
                    raise DeviceError(f"job {job.seq} has no field {key!r} (needed for printer field {name!r})")
                out[name] = job.fields[key]
        return out

    # -- Printer

    async def send(self, job: PrintJob) -> None:
        values = self._values(job)
        if job.seq in self._inflight:
            raise DeviceError(f"job {job.seq} is already on the printer")
        # Registered before the bytes leave: if the ACK is lost but the printer prints, its PRN is still ours.
        self._inflight[job.seq] = time.monotonic()
        while len(self._inflight) > MAX_INFLIGHT:
            old, _ = self._inflight.popitem(last=False)
            self.log.warning("coder_inflight_overflow", dropped_job=old)
        try:
            rep = await self._request(lambda rid: self.proto.job(rid, job.seq, values), f"DAT {job.seq}")
        except DeviceError:
            raise  # outcome unknown: keep it in flight so a real PRN is still reported
        if not rep.ok:
            self._inflight.pop(job.seq, None)
            raise DeviceError(
                f"printer refused job {job.seq}: NAK {rep.code} {rep.text or self.proto.describe_nak(rep.code)}",
                code=rep.code,
            )

    async def confirmations(self) -> AsyncIterator[PrintConfirm]:
        while True:
            yield await self._confirms.get()

    async def status(self) -> dict[str, Any]:
        rep = await self._request(self.proto.status, "STA")
        if not rep.ok:
            raise DeviceError(f"status refused: NAK {rep.code} {rep.text}", code=rep.code)
        self._apply_status(rep)
        self._refresh_health()
        return {
            **rep.values,
            "faults": dict(self._faults),
            "pending": len(self._inflight),
            "confirmed": self.confirmed,
            "garbage": self.garbage_count,
            "unreported_prints": self.lost_prints,
        }

    async def clear(self) -> None:
        rep = await self._request(self.proto.clear, "CLR")
        if not rep.ok:
            raise DeviceError(f"clear refused: NAK {rep.code} {rep.text}", code=rep.code)
        dropped = list(self._inflight)
        self._inflight.clear()
        if dropped:
            self.log.info("coder_queue_cleared", jobs=dropped, printer_said=rep.values.get("cleared"))
