"""Smart readers (Cognex DataMan, Keyence SR, Datalogic...) that send one result line per read over TCP or serial.

Every vendor lets the line format be configured, so the driver takes it as a
template (`{seq};{sym}{data};{grade}` by default) rather than hard-coding one
reader. GS1 data may itself contain the separator (`;` and `,` are in GS1
character set 82) and GS bytes, so the template is compiled into an anchored
regex: fields before {data} are matched from the start, fields after it from
the end, and {data} is whatever lies between. Anything that does not decode
cleanly is garbage: it lowers health to DEGRADED and is counted, but is never
yielded as a read, because a line-noise "read" could pass a unit.

`LineCodeReader` (shared with drivers/scanner.py) owns the connection, line
framing, garbage accounting and the read queue; subclasses only parse a line.
"""

from __future__ import annotations

import asyncio
import re
import string
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from linectl.drivers.base import CodeReader, Decoded, DeviceError, DriverConfig, HealthState, Read, register_driver
from linectl.drivers.transport import ConnectionSupervisor, LineSplitter, TransportConfig

#: control bytes a code may legitimately carry: GS (GS1 separator), RS and EOT (ISO/IEC 15434 envelopes)
ALLOWED_CONTROLS = frozenset("\x1d\x1e\x04")
LETTER_GRADES = {"A": 4.0, "B": 3.0, "C": 2.0, "D": 1.0, "E": 0.0, "F": 0.0}
AIM_RE = re.compile(r"\][A-Za-z][0-9A-Za-z]")


class Garbage(Exception):
    """A line that is not a read. `reason` is stable text (it becomes the health reason)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LineReaderConfig(TransportConfig, DriverConfig):
    """What every line-oriented reader shares: terminator, line bound, encoding."""

    terminator: str = Field("\r\n", min_length=1, description="end of each result line")
    max_line: int = Field(4096, ge=16, le=1 << 20, description="longer lines are garbage")
    encoding: Literal["ascii", "utf-8", "latin-1"] = "ascii"
    garbage_hold_s: float = Field(5.0, ge=0, description="health stays DEGRADED this long after the last garbage")


def decode_line(raw: bytes, encoding: str) -> str:
    """Bytes -> text, refusing what no reader sends for a code (non-decodable bytes, stray control characters)."""
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        raise Garbage(f"bytes not valid {encoding}") from None
    for ch in text:
        if (ch < " " and ch not in ALLOWED_CONTROLS) or ch == "\x7f":
            raise Garbage("control characters in line")
    return text


class LineCodeReader(CodeReader):
    """Base for line readers: connection, framing, garbage → health, reads queue."""

    config: LineReaderConfig
    kind = "reader"

    def __init__(self, name: str, config: LineReaderConfig) -> None:
        super().__init__(name, config)
        self._sup = ConnectionSupervisor(self, config, self._session)
        self._reads: asyncio.Queue[Read] = asyncio.Queue()
        self._writer: Any = None
        self._garbage_reason = ""
        self._garbage_at = 0.0
        self.garbage_count = 0
        self.read_count = 0

    async def start(self) -> None:
        self._sup.start()

    async def stop(self) -> None:
        await self._sup.stop()

    @property
    def connected(self) -> bool:
        """The link is up (health may still be DEGRADED or show a device fault)."""
        return self._sup.connected

    async def reads(self) -> AsyncIterator[Read]:
        while True:
            yield await self._reads.get()

    def parse_line(self, text: str, raw: bytes, received_at: float) -> Read:
        raise NotImplementedError

    async def _session(self, reader: asyncio.StreamReader, writer: Any) -> None:
        cfg = self.config
        splitter = LineSplitter(cfg.terminator.encode("latin-1"), cfg.max_line)
        self._writer = writer
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                now = time.monotonic()
                for line, bad in splitter.feed(data):
                    if bad is not None:
                        self._garbage(bad, b"")
                        continue
                    assert line is not None
                    if not line.strip():
                        continue  # keep-alive blank lines some readers send
                    try:
                        read = self.parse_line(decode_line(line, cfg.encoding), line, now)
                    except Garbage as g:
                        self._garbage(g.reason, line)
                        continue
                    self.read_count += 1
                    self._reads.put_nowait(read)
                    self._maybe_recover()
        finally:
            self._writer = None

    def _garbage(self, reason: str, sample: bytes) -> None:
        self.garbage_count += 1
        self._garbage_at = time.monotonic()
        self._garbage_reason = f"garbage from {self.kind}: {reason}"
        self.log.debug("reader_garbage", reason=reason, sample=sample[:64], count=self.garbage_count)
        self.set_health(HealthState.DEGRADED, self._garbage_reason)

    def _maybe_recover(self) -> None:
        if (
            self._garbage_reason
            and self.health.state == HealthState.DEGRADED
            and time.monotonic() - self._garbage_at >= self.config.garbage_hold_s
        ):
            self._garbage_reason = ""
            self.set_health(HealthState.CONNECTED, f"connected to {self.config.endpoint}")

    async def _write(self, data: bytes) -> None:
        w = self._writer
        if w is None or w.is_closing():
            raise DeviceError(f"{self.name}: not connected ({self.health.reason})")
        try:
            w.write(data)
            await asyncio.wait_for(w.drain(), self.config.reply_timeout_s)
        except TimeoutError:
            raise DeviceError(f"{self.name}: write not accepted within {self.config.reply_timeout_s}s") from None
        except (ConnectionError, OSError) as exc:
            raise DeviceError(f"{self.name}: connection lost: {exc}") from None


# --------------------------------------------------------------------------- smart reader

_FIELD_PATTERNS = {
    "seq": r"(?P<seq>\d{1,18})",
    "sym": r"(?P<sym>\][A-Za-z][0-9A-Za-z])?",
    "data": r"(?P<data>.*)",
    "grade": r"(?P<grade>\d{1,3}(?:\.\d+)?|[A-Fa-f])?",
    "time": r"(?P<time>[0-9A-Za-z.:+\-]*)",
}


def compile_line_format(fmt: str) -> re.Pattern[str]:
    """`{seq};{sym}{data};{grade}` -> anchored regex; refuses templates that cannot be parsed unambiguously."""
    parts: list[str] = []
    seen: list[str] = []
    prev_field: str | None = None
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as exc:
        raise ValueError(f"line_format: {exc}") from None
    for literal, fname, spec, conv in parsed:
        if literal:
            parts.append(re.escape(literal))
            prev_field = None
        if fname is None:
            continue
        if fname not in _FIELD_PATTERNS:
            raise ValueError(f"line_format: unknown field {{{fname}}} (known: {', '.join(_FIELD_PATTERNS)})")
        if spec or conv:
            raise ValueError(f"line_format: {{{fname}}} takes no format spec")
        if fname in seen:
            raise ValueError(f"line_format: {{{fname}}} appears twice")
        if prev_field is not None and not (prev_field == "sym" and fname == "data"):
            raise ValueError(f"line_format: {{{prev_field}}} and {{{fname}}} need a separator between them")
        seen.append(fname)
        parts.append(_FIELD_PATTERNS[fname])
        prev_field = fname
    if "data" not in seen:
        raise ValueError("line_format must contain {data}")
    return re.compile("^" + "".join(parts) + "$", re.DOTALL)


def parse_grade(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    up = value.upper()
    if up in LETTER_GRADES:
        return LETTER_GRADES[up]
    g = float(value)
    if not 0.0 <= g <= 4.0:
        raise Garbage("grade out of range 0-4")
    return g


class ReaderConfig(LineReaderConfig):
    """`driver: reader` — result lines of a smart reader, optional software trigger."""

    driver: Literal["reader"]
    line_format: str = Field("{seq};{sym}{data};{grade}", description="fields: seq, sym, data, grade, time")
    no_read: str = Field("NOREAD", min_length=1, description="what the reader sends instead of data when nothing decoded")
    trigger_command: str | None = Field(
        "TRIGGER {seq}\r\n", description="software trigger bytes ({seq} optional); null = hardware trigger only"
    )

    @field_validator("line_format")
    @classmethod
    def _fmt(cls, v: str) -> str:
        compile_line_format(v)
        return v

    @field_validator("trigger_command")
    @classmethod
    def _trig(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            v.format(seq=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"trigger_command may only use {{seq}}: {exc}") from None
        v.encode("latin-1")
        return v

    @model_validator(mode="after")
    def _noread_vs_format(self) -> ReaderConfig:
        if self.terminator in self.no_read:
            raise ValueError("no_read contains the terminator")
        return self


@register_driver
class LineReader(LineCodeReader):
    """Smart reader: parses configurable result lines; no-read lines yield a Read with no codes."""

    config_class = ReaderConfig
    config: ReaderConfig

    def __init__(self, name: str, config: ReaderConfig) -> None:
        super().__init__(name, config)
        self._rx = compile_line_format(config.line_format)
        self._trigger_seq = 0

    def parse_line(self, text: str, raw: bytes, received_at: float) -> Read:
        cfg = self.config
        if text == cfg.no_read:
            return Read(None, (), received_at, raw)
        m = self._rx.match(text)
        if m is None:
            raise Garbage("line does not match line_format")
        gd = m.groupdict()
        seq = int(gd["seq"]) if gd.get("seq") else None
        sym = gd.get("sym") or None
        data = gd["data"]
        if data == cfg.no_read or (sym or "") + data == cfg.no_read:
            return Read(seq, (), received_at, raw)
        if data == "":
            raise Garbage("empty data")
        try:
            grade = parse_grade(gd.get("grade"))
        except ValueError:
            raise Garbage("bad grade") from None
        detail: dict[str, Any] = {}
        if gd.get("time"):
            detail["read_time"] = gd["time"]
        return Read(seq, (Decoded(data, sym, grade, detail),), received_at, raw)

    async def trigger(self, seq: int | None = None) -> None:
        cmd = self.config.trigger_command
        if cmd is None:
            raise DeviceError(f"{self.name}: no trigger_command configured (hardware trigger only)")
        if seq is None:
            self._trigger_seq += 1
            seq = self._trigger_seq
        await self._write(cmd.format(seq=seq).encode("latin-1"))
