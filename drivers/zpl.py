"""ZPL label printers (Zebra and compatibles) over TCP 9100 or serial: GS1 labels and honest print confirmation.

GS1 DataMatrix in ZPL is `^BX` at quality 200 with an escape character (the
7th parameter). Zebra firmware differs on the default escape (`_` on some
V60.13 firmware, `~` on others), so the driver always sets it explicitly.
In quality-200 field data `<esc>1` is FNC1, `<esc><esc>` a literal escape
character; the symbol starts with FNC1 (that is what makes it GS1, `]d2`)
and every GS separator of the element string becomes FNC1 as well. `^FH` is
never used on that field (hex processing would run before escape processing).
GS1-128 is `^BC` in mode N with invocation codes: `>;` start C, `>8` FNC1,
`>5`/`>6` switch to C/B, `><` a literal `>` in subset B.

ZPL has no per-label acknowledgement. What is confirmed and how (details in
docs_devices_printers.md): each job is one format with one label. The driver
polls `~HS` and takes the printer's outstanding work as "formats in receive
buffer" + "labels remaining in batch" (a format being printed may count
twice, which delays, never hastens, a confirmation). Jobs written at least
`settle_s` before an `~HS` request have been parsed by then; if m of them are
tracked and the printer reports n outstanding, the oldest m - n have left the
printer (FIFO; formats from another sender only make n larger). Such a job is
confirmed only if neither that answer nor the previous one reported a printing
fault (paper out, head open, ribbon out, temperature, corrupt RAM) and no
answer in between was missed or lost with the link; otherwise it is reported
unconfirmed, never as printed. A confirmation says the printer finished the
format without a reported fault, not that the label is legible: that is the
label reader's job.

RFID label printers (`rfid:` in the config, details in drivers/zpl_rfid.py):
a job with `epc_hex` gets its tag written and read back in the same format,
and the printer sends the read-back to the host for every label. Such a job
is confirmed "ok" only when both hold: its read-back equals the EPC sent, and
the ~HS accounting above saw its format leave the printer without a fault.
A VOID or another EPC is reported at once as a reject with its reason
(`PrintConfirm.rfid_status`); no read-back within `verify_timeout_s` after
the format left is reported "no_answer" and listed unconfirmed.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

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
from linectl.drivers.zpl_rfid import HV_LINE, ZplRfidConfig, check_epc_hex, judge, rfid_commands

GS = "\x1d"
STX, ETX = 0x02, 0x03
GS1_128_MAX_DATA = 48  # GS1 General Specifications: at most 48 data characters in one GS1-128 symbol


# --------------------------------------------------------------------------- field data encoders


def _check_zpl_safe(text: str, what: str) -> None:
    for i, ch in enumerate(text):
        if ch == GS:
            continue
        if ch in "^~" or not " " <= ch <= "~":
            raise DeviceError(f"{what}: character {ch!r} at position {i} cannot be sent in ZPL barcode data")


def datamatrix_field_data(element_string: str, esc: str = "_") -> str:
    """^FD data for `^BX..,200,,,,<esc>`: leading FNC1, FNC1 for each GS, escape char doubled."""
    _check_zpl_safe(element_string, "DataMatrix data")
    if element_string.startswith(GS) or not element_string:
        raise DeviceError("DataMatrix data must be a GS1 element string without a leading separator")
    fnc1 = esc + "1"
    out = [fnc1]
    for ch in element_string:
        if ch == GS:
            out.append(fnc1)
        elif ch == esc:
            out.append(esc + esc)
        else:
            out.append(ch)
    return "".join(out)


def gs1_128_field_data(element_string: str) -> str:
    """^FD data for `^BCN,h,N,N,N` (mode N): start C + FNC1, subset C for digit pairs, B otherwise."""
    _check_zpl_safe(element_string, "GS1-128 data")
    s = element_string
    if len(s.replace(GS, "")) > GS1_128_MAX_DATA:
        raise DeviceError(f"GS1-128 holds at most {GS1_128_MAX_DATA} data characters, this code has {len(s.replace(GS, ''))}")
    if len(s) < 2 or not s[:2].isdigit():
        raise DeviceError("GS1-128 data must start with an AI")
    out = [">;>8"]
    mode = "C"
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == GS:
            out.append(">8")
            i += 1
            continue
        if mode == "C":
            if i + 1 < len(s) and ch.isdigit() and s[i + 1].isdigit():
                out.append(s[i : i + 2])
                i += 2
            else:
                out.append(">6")
                mode = "B"
            continue
        run = 0
        while i + run < len(s) and s[i + run].isdigit():
            run += 1
        if run >= 4:
            if run % 2:
                out.append(ch)
                i += 1
            out.append(">5")
            mode = "C"
            continue
        out.append("><" if ch == ">" else ch)
        i += 1
    return "".join(out)


def text_field_data(text: str) -> str:
    """^FD data for a text field preceded by `^FH\\`: `\\`, `^`, `~` and non-ASCII as \\HH (UTF-8 with ^CI28)."""
    out = []
    for b in text.encode("utf-8"):
        if b in (0x5C, 0x5E, 0x7E) or not 0x20 <= b <= 0x7E:
            out.append(f"\\{b:02X}")
        else:
            out.append(chr(b))
    return "".join(out)


# --------------------------------------------------------------------------- ~HS


@dataclass(frozen=True)
class HostStatus:
    """The three ~HS strings (ZPL II guide, ~HS), with the fields linectl uses named."""

    paper_out: bool
    pause: bool
    label_length: int
    formats_in_buffer: int
    buffer_full: bool
    partial_format: bool
    corrupt_ram: bool
    under_temp: bool
    over_temp: bool
    head_up: bool
    ribbon_out: bool
    labels_remaining: int
    raw: tuple[str, ...] = ()

    @classmethod
    def parse(cls, strings: list[bytes]) -> HostStatus:
        if len(strings) != 3:
            raise ValueError(f"~HS answer has {len(strings)} strings, expected 3")
        s1 = strings[0].decode("ascii").split(",")
        s2 = strings[1].decode("ascii").split(",")
        if len(s1) < 12 or len(s2) < 11:
            raise ValueError(f"~HS strings have {len(s1)} and {len(s2)} fields, expected 12 and 11")

        def flag(v: str) -> bool:
            if v.strip() not in ("0", "1"):
                raise ValueError(f"flag {v!r} is not 0/1")
            return v.strip() == "1"

        return cls(
            paper_out=flag(s1[1]),
            pause=flag(s1[2]),
            label_length=int(s1[3]),
            formats_in_buffer=int(s1[4]),
            buffer_full=flag(s1[5]),
            partial_format=flag(s1[7]),
            corrupt_ram=flag(s1[9]),
            under_temp=flag(s1[10]),
            over_temp=flag(s1[11]),
            head_up=flag(s2[2]),
            ribbon_out=flag(s2[3]),
            labels_remaining=int(s2[8]),
            raw=tuple(x.decode("ascii") for x in strings),
        )

    @property
    def outstanding(self) -> int:
        return self.formats_in_buffer + self.labels_remaining

    @property
    def print_faults(self) -> list[str]:
        """Conditions under which a label in progress may be blank, partial or lost."""
        out = []
        if self.paper_out:
            out.append("paper out")
        if self.head_up:
            out.append("head open")
        if self.ribbon_out:
            out.append("ribbon out")
        if self.over_temp:
            out.append("head over temperature")
        if self.under_temp:
            out.append("under temperature")
        if self.corrupt_ram:
            out.append("corrupt RAM (configuration lost)")
        return out

    @property
    def warnings(self) -> list[str]:
        out = []
        if self.pause:
            out.append("paused")
        if self.buffer_full:
            out.append("receive buffer full")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "paper_out": self.paper_out,
            "pause": self.pause,
            "head_up": self.head_up,
            "ribbon_out": self.ribbon_out,
            "buffer_full": self.buffer_full,
            "formats_in_buffer": self.formats_in_buffer,
            "labels_remaining": self.labels_remaining,
            "partial_format": self.partial_format,
            "faults": self.print_faults,
            "warnings": self.warnings,
        }


# --------------------------------------------------------------------------- config


class ZplConfig(TransportConfig, DriverConfig):
    """`driver: zpl` — a ZPL label printer, TCP port 9100 by default.

    `template` is a complete ^XA...^XZ format with placeholders: {dm} (DataMatrix
    field data incl. the leading FNC1), {esc}, {gs1_128}, {hri}, {seq} and
    {f[key]} for job fields (text-escaped, use after `^FH\\`). Without a
    template the label is built from the layout fields below.
    """

    driver: Literal["zpl"]
    template: str | None = None
    escape_char: str = Field("_", min_length=1, max_length=1, description="^BX escape character (parameter g)")
    module_dots: int = Field(8, ge=1, le=100, description="DataMatrix module size in dots (^BX h)")
    x: int = Field(50, ge=0)
    y: int = Field(50, ge=0)
    hri: bool = True
    font_dots: int = Field(28, ge=10, le=32000)
    gs1_128: bool = Field(False, description="also print the element string as GS1-128 (max 48 data characters)")
    gs1_128_height: int = Field(100, ge=10, le=32000)
    text_fields: list[str] = Field(default_factory=list, description="job fields printed as text lines, e.g. [product, lot]")
    status_interval_s: float = Field(0.5, gt=0, description="~HS poll period; bounds how fast prints are confirmed")
    settle_s: float = Field(1.0, ge=0, description="a format sent this long before an empty-printer ~HS has been parsed")
    missed_status_limit: int = Field(3, ge=1, description="unanswered ~HS in a row before reconnecting")
    rfid: ZplRfidConfig | None = Field(None, description="RFID label printer: encode and verify each job's EPC")

    @model_validator(mode="before")
    @classmethod
    def _default_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("host") is not None and data.get("port") is None:
            data = {**data, "port": 9100}
        return data

    @field_validator("escape_char")
    @classmethod
    def _esc(cls, v: str) -> str:
        if v in "^~," or v.isdigit() or v.isspace():
            raise ValueError("escape_char must not be ^, ~, a comma, a digit or whitespace")
        return v

    @field_validator("template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        t = v.strip()
        if not t.startswith("^XA") or not t.endswith("^XZ") or t.count("^XA") != 1:
            raise ValueError("template must be exactly one format: ^XA ... ^XZ")
        if "{dm}" not in t and "{gs1_128}" not in t:
            raise ValueError("template has no {dm} or {gs1_128} placeholder: the code would never be printed")
        if any(q != "1" for q in re.findall(r"\^PQ(\d*)", t)):
            raise ValueError("template must print one label per format (^PQ1): confirmation counts formats")
        try:
            t.format_map(_ProbeMap())
        except (ValueError, IndexError) as exc:
            raise ValueError(f"template placeholders: {exc}") from None
        return t


class _ProbeMap(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> Any:
        if key not in ("dm", "esc", "gs1_128", "hri", "seq", "f"):
            raise ValueError(f"unknown placeholder {{{key}}}")
        return _AnyKey()


class _AnyKey(str):
    def __getitem__(self, key: Any) -> str:
        return ""


def default_template(cfg: ZplConfig) -> str:
    lines = ["^XA", "^CI28", "^LH0,0", f"^FO{cfg.x},{cfg.y}^BXN,{cfg.module_dots},200,,,,{{esc}}^FD{{dm}}^FS"]
    y = cfg.y + cfg.module_dots * 26 + 20  # below a 26x26 symbol, the typical pharma unit code
    if cfg.hri:
        lines.append(f"^FO{cfg.x},{y}^A0N,{cfg.font_dots},{cfg.font_dots}^FH\\^FD{{hri}}^FS")
        y += cfg.font_dots + 10
    if cfg.gs1_128:
        lines.append(f"^FO{cfg.x},{y}^BY2^BCN,{cfg.gs1_128_height},N,N,N^FD{{gs1_128}}^FS")
        y += cfg.gs1_128_height + 20
    for key in cfg.text_fields:
        lines.append(f"^FO{cfg.x},{y}^A0N,{cfg.font_dots},{cfg.font_dots}^FH\\^FD{{f[{key}]}}^FS")
        y += cfg.font_dots + 10
    lines += ["^PQ1", "^XZ"]
    return "\n".join(lines) + "\n"


class _Fields(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> str:
        raise DeviceError(f"label template needs job field {key!r}")


# --------------------------------------------------------------------------- driver


@dataclass
class _Job:
    seq: int
    written_at: float
    epc: str | None = None  # RFID: the EPC sent, None for a label without a tag
    voids: int = 0  # VOID labels reported for this job so far
    verdict: str | None = None  # "ok" | "void" | "mismatch" once the printer's read-back decided it
    epc_read: str | None = None
    reason: str = ""
    left: bool = False  # the ~HS accounting saw its format leave the printer
    uncertain: bool = False  # ... during a fault or an unobserved interval
    left_at: float = 0.0
    reported: bool = False


@register_driver
class ZplPrinter(Printer):
    """ZPL printer; confirmations come from ~HS counters as described in the module docstring."""

    config_class = ZplConfig
    config: ZplConfig

    def __init__(self, name: str, config: ZplConfig) -> None:
        super().__init__(name, config)
        self.template = config.template or default_template(config)
        self._sup = ConnectionSupervisor(self, config, self._session, on_lost=self._on_lost)
        self._lock = asyncio.Lock()
        self._writer: Any = None
        self._frames: list[bytes] = []
        self._answer: asyncio.Future[list[bytes]] | None = None
        self._jobs: deque[_Job] = deque()
        self._confirms: asyncio.Queue[PrintConfirm] = asyncio.Queue()
        self.last_status: HostStatus | None = None
        self._window_fault = True  # nothing is known about the time before the first answer
        self._skip_next = False
        self.unconfirmed: deque[tuple[int, str]] = deque(maxlen=1000)
        self._garbage_at = -1e9
        #: how long health stays DEGRADED after garbage from the printer
        self.garbage_hold_s = 5.0
        self.confirmed = 0
        self.garbage_count = 0
        rf = config.rfid
        self.rfid: ZplRfidConfig | None = rf if rf is not None and rf.enabled else None
        #: RFID jobs whose outcome has not been reported yet, in send order
        self._rfid_open: dict[int, _Job] = {}
        self._rfid_halt: str | None = None  # ^RS e=E: the printer stopped after VOID labels
        self._void_run = 0
        self.rfid_rejects = 0
        self.rfid_strays = 0  # verification lines naming no open job

    # -- Driver

    async def start(self) -> None:
        self._sup.start()

    async def stop(self) -> None:
        await self._sup.stop()

    @property
    def connected(self) -> bool:
        """The link is up (health may still be DEGRADED or show a device fault)."""
        return self._sup.connected

    def render(self, job: PrintJob) -> bytes:
        """The ZPL format for one job (also used by tests and the docs)."""
        cfg = self.config
        values = {
            "dm": datamatrix_field_data(job.element_string, cfg.escape_char),
            "esc": cfg.escape_char,
            "gs1_128": gs1_128_field_data(job.element_string) if "{gs1_128}" in self.template else "",
            "hri": text_field_data(job.hri),
            "seq": str(job.seq),
            "f": _Fields({k: text_field_data(v) for k, v in job.fields.items()}),
        }
        text = self.template.format_map(values)
        if job.epc_hex is not None:
            if self.rfid is None:
                raise DeviceError(f"job {job.seq} carries an EPC but printer {self.name} has no `rfid:` enabled")
            block = rfid_commands(self.rfid, job.seq, check_epc_hex(job.epc_hex))
            i = text.index("^XA") + 3
            text = text[:i] + "\n" + block + text[i:]
        elif self.rfid is not None and self.rfid.require_epc:
            raise DeviceError(f"job {job.seq} has no EPC for the RFID tag (rfid.require_epc)")
        return text.encode("utf-8")

    def pending(self) -> list[int]:
        return [j.seq for j in self._jobs]

    # -- session

    async def _session(self, reader: asyncio.StreamReader, writer: Any) -> None:
        self._writer = writer
        self._frames.clear()
        self._window_fault = True  # the printer ran unobserved while the link was down
        pump = asyncio.create_task(self._pump(reader))
        poll = asyncio.create_task(self._poller())
        try:
            done, _ = await asyncio.wait({pump, poll}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
        finally:
            for t in (pump, poll):
                t.cancel()
            self._writer = None

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        buf = bytearray()
        while True:
            data = await reader.read(65536)
            if not data:
                return
            buf += data
            while True:
                s = buf.find(bytes([STX]))
                if s < 0:
                    buf[:] = self._outside(bytes(buf), framed=False)
                    break
                if s > 0:
                    self._outside(bytes(buf[:s]), framed=True)
                    del buf[:s]
                e = buf.find(bytes([ETX]))
                if e < 0:
                    if len(buf) > 4096:
                        self._junk(b"x" * len(buf))
                        buf.clear()
                    break
                self._frames.append(bytes(buf[1:e]))
                del buf[: e + 1]
                if len(self._frames) >= 3:
                    ans, self._frames = self._frames[:3], self._frames[3:]
                    if self._answer is not None and not self._answer.done():
                        self._answer.set_result(ans)
                    else:
                        self.log.warning("zpl_unsolicited_status", strings=len(ans))

    def _outside(self, data: bytes, framed: bool) -> bytes:
        """Bytes outside ~HS strings: RFID verification lines, or garbage. Returns an unfinished line to keep.

        `framed`: an STX follows, so whatever is here is complete.
        """
        if self.rfid is None:
            self._junk(data.strip(b"\r\n"))
            return b""
        *lines, tail = data.split(b"\n")
        for line in lines:
            line = line.strip(b"\r")
            m = HV_LINE.fullmatch(line)
            if m is not None:
                self._on_verification(int(m.group(1)), m.group(2))
            else:
                self._junk(line)
        if framed or len(tail) > 4096:
            self._junk(tail.strip(b"\r"))
            return b""
        return tail

    def _junk(self, data: bytes) -> None:
        if data:
            self.garbage_count += 1
            self._garbage_at = time.monotonic()
            self.log.warning("zpl_garbage", nbytes=len(data), count=self.garbage_count)
            self.set_health(HealthState.DEGRADED, "garbage from printer: bytes outside ~HS strings")

    async def _poller(self) -> None:
        missed = 0
        while True:
            try:
                async with self._lock:
                    await self._poll()
                missed = 0
            except DeviceError as exc:
                missed += 1
                if missed >= self.config.missed_status_limit:
                    self._sup.drop(f"no answer to {missed} ~HS requests in a row")
                    return
                self.set_health(HealthState.DEGRADED, exc.reason)
            self._rfid_expire()
            await asyncio.sleep(self.config.status_interval_s)

    def _on_lost(self, reason: str) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(DeviceError(f"connection lost: {reason}"))

    # -- status and accounting (call with self._lock held)

    async def _poll(self) -> HostStatus:
        w = self._writer
        if w is None or w.is_closing():
            raise DeviceError(f"{self.name}: not connected ({self.health.reason})")
        self._frames.clear()
        fut: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        self._answer = fut
        t_req = time.monotonic()
        try:
            w.write(b"~HS")
            await w.drain()
            strings = await asyncio.wait_for(fut, self.config.reply_timeout_s)
        except TimeoutError:
            # a late answer would be taken for the next request's: do not count with it
            self._skip_next = True
            self._window_fault = True
            raise DeviceError(
                f"no answer to ~HS within {self.config.reply_timeout_s}s (printer busy, or in media out / head open)",
                code="timeout",
            ) from None
        except (ConnectionError, OSError) as exc:
            self._window_fault = True
            raise DeviceError(f"connection lost during ~HS: {exc}") from None
        finally:
            self._answer = None
        try:
            st = HostStatus.parse(strings)
        except (ValueError, UnicodeDecodeError) as exc:
            self.garbage_count += 1
            self._skip_next = False
            self._window_fault = True
            raise DeviceError(f"garbage from printer: malformed ~HS answer ({exc})") from None
        self.last_status = st
        self._account(st, t_req)
        self._health_from(st)
        return st

    def _health_from(self, st: HostStatus) -> None:
        if st.print_faults:
            self.set_health(HealthState.DISCONNECTED, "printer fault: " + ", ".join(st.print_faults))
        elif self._rfid_halt is not None:
            self.set_health(HealthState.DISCONNECTED, "printer fault: " + self._rfid_halt)
        elif self.rfid is not None and self._void_run >= self.rfid.void_run_limit:
            self.set_health(HealthState.DEGRADED, f"RFID: {self._void_run} labels VOID in a row (tags or encoder failing)")
        elif st.warnings:
            self.set_health(HealthState.DEGRADED, "printer " + ", ".join(st.warnings))
        elif time.monotonic() - self._garbage_at < self.garbage_hold_s:
            self.set_health(HealthState.DEGRADED, "garbage from printer: bytes outside ~HS strings")
        else:
            self.set_health(HealthState.CONNECTED, f"connected to {self.config.endpoint}")

    def _account(self, st: HostStatus, t_req: float) -> None:
        """Confirm the jobs that can no longer be in the printer, lower bound only.

        Jobs written at least settle_s before the request have reached the printer
        and been parsed (a prefix m of the FIFO); the printer still holds at most
        `outstanding` of them (foreign formats only make that number larger), so
        the first m - outstanding have left it. A job that left during a fault, a
        missed answer or a disconnect is reported unconfirmed instead.
        """
        faulted = bool(st.print_faults)
        uncertain = self._window_fault or faulted
        if self._skip_next:
            self._skip_next = False
            self._window_fault = True
            return
        self._window_fault = faulted
        cut = t_req - self.config.settle_s
        m = 0
        for j in self._jobs:
            if j.written_at > cut:
                break
            m += 1
        k = max(0, m - st.outstanding)
        done = [self._jobs.popleft() for _ in range(k)]
        now = time.time()
        for j in done:
            if j.epc is not None:
                j.left, j.uncertain, j.left_at = True, uncertain, time.monotonic()
                if j.seq == self._halted_seq():
                    self._rfid_halt = None  # its format left the printer (cancelled at the panel)
                self._rfid_settle(j)
                continue
            if uncertain:
                why = "left the printer during a fault or an unobserved interval"
                self.unconfirmed.append((j.seq, why))
                self.log.warning("zpl_print_unconfirmed", job_seq=j.seq, reason=why)
            else:
                self.confirmed += 1
                self._confirms.put_nowait(PrintConfirm(j.seq, now))

    # -- Printer

    async def send(self, job: PrintJob) -> None:
        label = self.render(job)
        if any(j.seq == job.seq for j in self._jobs):
            raise DeviceError(f"job {job.seq} is already on the printer")
        async with self._lock:
            w = self._writer
            if w is None or w.is_closing():
                raise DeviceError(f"{self.name}: not connected ({self.health.reason})")
            st = self.last_status
            if st is not None and (st.print_faults or st.buffer_full):
                raise DeviceError(f"printer not ready: {', '.join(st.print_faults + st.warnings)}; label not sent")
            if self._rfid_halt is not None:
                raise DeviceError(f"printer not ready: {self._rfid_halt}; label not sent")
            try:
                w.write(label)
                await w.drain()
            except (ConnectionError, OSError) as exc:
                raise DeviceError(f"connection lost while sending job {job.seq}: {exc}") from None
            # From here the label may print: track it so that a real print is still confirmed.
            j = _Job(job.seq, time.monotonic(), epc=None if job.epc_hex is None else check_epc_hex(job.epc_hex))
            self._jobs.append(j)
            if j.epc is not None:
                self._rfid_open[j.seq] = j
            st = await self._poll()
        if st.print_faults:
            raise DeviceError(f"printer fault after job {job.seq} was sent: {', '.join(st.print_faults)}")

    async def confirmations(self) -> AsyncIterator[PrintConfirm]:
        while True:
            yield await self._confirms.get()

    async def status(self) -> dict[str, Any]:
        async with self._lock:
            st = await self._poll()
        out: dict[str, Any] = {
            **st.as_dict(),
            "pending": len(self._jobs),
            "confirmed": self.confirmed,
            "unconfirmed": len(self.unconfirmed),
            "garbage": self.garbage_count,
        }
        if self.rfid is not None:
            out["rfid"] = {
                "open": len(self._rfid_open),
                "rejects": self.rfid_rejects,
                "void_run": self._void_run,
                "halted": self._rfid_halt,
                "strays": self.rfid_strays,
            }
        return out

    async def clear(self) -> None:
        """~JA cancels every format in the buffer; their jobs are never confirmed."""
        async with self._lock:
            w = self._writer
            if w is None or w.is_closing():
                raise DeviceError(f"{self.name}: not connected")
            w.write(b"~JA")
            await w.drain()
            self._window_fault = True
            while self._jobs:
                j = self._jobs.popleft()
                if not j.reported:
                    self.unconfirmed.append((j.seq, "cancelled by ~JA"))
                j.reported = True
                self._rfid_open.pop(j.seq, None)
            self._rfid_halt = None
            await self._poll()

    # -- RFID verification

    def _halted_seq(self) -> int | None:
        for j in self._rfid_open.values():
            if self._rfid_halt is not None and j.verdict is None and j.voids:
                return j.seq
        return None

    def _on_verification(self, seq: int, data: bytes) -> None:
        """One `EPC#<seq>[...]` line: the read-back of one label the printer finished."""
        rf = self.rfid
        assert rf is not None
        j = self._rfid_open.get(seq)
        if j is None or j.verdict is not None or j.epc is None:
            self.rfid_strays += 1
            self.log.warning("zpl_rfid_stray_verification", job_seq=seq, data=data[:64].decode("ascii", "replace"))
            return
        verdict, epc_read, reason = judge(j.epc, data)
        if verdict == "void":
            j.voids += 1
            self.log.warning("zpl_rfid_void", job_seq=seq, voids=j.voids, reason=reason)
            if j.voids % rf.labels_per_format:
                return  # the printer tries the next label with the same format
            if rf.error_handling == "E":
                self._rfid_halt = f"RFID: job {seq} VOID on {j.voids} label(s), printer in error mode until cleared (^RS e=E)"
                self.set_health(HealthState.DISCONNECTED, "printer fault: " + self._rfid_halt)
                return  # the format stays on the printer: the job stays open
            reason = f"{reason}; {j.voids} VOID label(s), the printer dropped the format (^RS e=N)"
        if j.seq == self._halted_seq():
            self._rfid_halt = None
        j.verdict, j.epc_read, j.reason = verdict, epc_read, reason
        self._rfid_settle(j)

    def _rfid_settle(self, j: _Job) -> None:
        """Report an RFID job once its outcome is known: a reject at once, an ok once its format left clean."""
        if j.reported:
            return
        if j.verdict in ("void", "mismatch"):
            self._rfid_report(j, "void" if j.verdict == "void" else "mismatch", j.reason)
        elif j.verdict == "ok" and j.left:
            if j.uncertain:
                j.reported = True
                self._rfid_open.pop(j.seq, None)
                why = "left the printer during a fault or an unobserved interval"
                self.unconfirmed.append((j.seq, why))
                self.log.warning("zpl_print_unconfirmed", job_seq=j.seq, reason=why, epc_read=j.epc_read)
            else:
                self.confirmed += 1
                self._rfid_report(j, "ok", "")

    def _rfid_expire(self) -> None:
        """Jobs whose format left the printer `verify_timeout_s` ago without a verdict: no answer."""
        if self.rfid is None:
            return
        now = time.monotonic()
        for j in [j for j in self._rfid_open.values() if j.left and j.verdict is None]:
            if now - j.left_at >= self.rfid.verify_timeout_s:
                why = f"no RFID verification from the printer within {self.rfid.verify_timeout_s}s after the label left it"
                if j.voids:
                    why += f" ({j.voids} VOID label(s) seen)"
                self.unconfirmed.append((j.seq, why))
                self._rfid_report(j, "no_answer", why)

    def _rfid_report(self, j: _Job, status: Literal["ok", "void", "mismatch", "no_answer"], reason: str) -> None:
        j.reported = True
        self._rfid_open.pop(j.seq, None)
        if status == "ok":
            self._void_run = 0
        else:
            self.rfid_rejects += 1
            self._void_run = self._void_run + 1 if status == "void" else 0
            self.log.warning("zpl_rfid_reject", job_seq=j.seq, status=status, reason=reason)
        self._confirms.put_nowait(
            PrintConfirm(j.seq, time.time(), epc_read=j.epc_read, rfid_status=status, rfid_reason=reason, rfid_void_labels=j.voids)
        )
