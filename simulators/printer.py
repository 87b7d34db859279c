"""Printer simulators: a coding printer speaking LCP/1 and a ZPL label printer, with fault injection.

Both hold a real job queue and print at the product trigger (`on_trigger`,
called by the conveyor model) so a trigger that arrives before the data
finds an empty buffer, exactly the failure the per-printer queue exists for.
What ends up on the unit follows the defect the line simulator chose for it;
the simulator records the truth on the SimUnit, so missed and false rejects
are counted independently of linectl.

Images are rendered only with `render_images=True` (a camera needs pixels;
a smart reader needs only the content), which keeps 6,000 units/min cheap.

    python -m linectl.simulators.printer --protocol coder --port 7100
    python -m linectl.simulators.printer --protocol zpl --port 9100 --print-time 0.2
    python -m linectl.simulators.printer --protocol coder --serial /tmp/linectl-coder0
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from linectl.drivers.coder import FAULT_CODES, NAK_CODES, Frame, FrameDecoder, encode_frame, fault_severity
from linectl.simulators.model import UNIT_DEFECTS, VARIATIONS, SimUnit
from linectl.simulators.serialpty import SimServer, add_endpoint_args, log, run_forever

GS = "\x1d"
DefectFor = Callable[[int], "str | None"]


# --------------------------------------------------------------------------- what lands on the pack


def _bump_char(ch: str) -> str:
    if ch.isdigit():
        return str((int(ch) + 1) % 10)
    return "B" if ch == "A" else "A"


def _alter_ai(content: str, ai: str) -> str | None:
    """The same code with one character of AI `ai` changed, still a valid GS1 code (or None)."""
    try:
        from linectl import gs1

        parsed = gs1.parse(content)
        pairs = list(parsed.ais)
        for i, (a, v) in enumerate(pairs):
            if a == ai and v:
                pairs[i] = (a, v[:-1] + _bump_char(v[-1]))
                return gs1.compose(pairs).element_string
    except Exception:
        return None
    return None


def _wrong_data(content: str, seq: int) -> tuple[str, str] | None:
    """The code with one of its per-batch AIs wrong (lot, or a date moved one day), still a valid GS1 code.

    Which AI follows the unit seq through gs1.CodeTemplate.data_ais of the printed code (lot first, then its
    dates), so over a run every AI the line's template prints is damaged, with no draw from the shared rng.
    Returns (new content, the AI altered), or None for a code without per-batch AIs."""
    from linectl import gs1

    try:
        parsed = gs1.parse(content)
        data = gs1.CodeTemplate(tuple(a for a, _ in parsed.ais)).data_ais
        if not data:
            return None
        ai = data[(seq - 1) % len(data)]
        value = parsed.get(ai)
        assert value is not None
        pairs = [(a, gs1.wrong_value(a, v) if a == ai else v) for a, v in parsed.ais]
        return gs1.compose(pairs).element_string, ai
    except gs1.GS1Error:
        return None


def render_unit(unit: SimUnit) -> None:
    """Pixels of what is on the pack (GS1 or plain DataMatrix), for camera simulators."""
    from linectl import gs1

    if unit.content is None:
        unit.image = None
        return
    if unit.symbology == "]d2":
        unit.image = gs1.render_datamatrix(gs1.parse(unit.content), validate=False)
    else:
        unit.image = gs1.render_plain_datamatrix(unit.content)


def apply_print(
    unit: SimUnit,
    content: str,
    symbology: str,
    defect: str | None,
    rng: random.Random,
    previous: str | None,
    render_images: bool = False,
) -> None:
    """Put `content` on the unit, damaged as `defect` says; the truth fields record what was really done.

    A defect that cannot be applied (a duplicate of nothing, a wrong lot on a
    code without a lot) is not recorded, so the ground truth never claims a
    defect the pack does not have.
    """
    unit.content = content
    unit.symbology = symbology
    unit.quality = round(rng.uniform(3.2, 4.0), 1)
    applied: str | None = defect
    if defect == "no_print":
        unit.content = None
        unit.quality = 0.0
    elif defect == "smudge_heavy":
        unit.quality = round(rng.uniform(0.3, 1.2), 1)
        unit.extras["damage"] = "smudge_heavy"
    elif defect == "low_contrast":
        unit.quality = round(rng.uniform(0.5, 1.3), 1)
        unit.extras["damage"] = "low_contrast"
    elif defect == "partial":
        unit.quality = 0.0
        unit.extras["unreadable"] = True
        unit.extras["damage"] = "partial"
    elif defect == "wrong_code":
        alt = _alter_ai(content, "21")
        if alt is None:
            applied = None
        else:
            unit.content = alt
    elif defect == "duplicate":
        if previous is None or previous == content:
            applied = None
        else:
            unit.content = previous
    elif defect == "not_gs1":
        unit.symbology = "]d1"
    elif defect == "data_mismatch":
        wrong = _wrong_data(content, unit.seq)
        if wrong is None:
            applied = None
        else:
            unit.content, unit.extras["wrong_ai"] = wrong
    elif defect == "smudge_mild":
        unit.quality = round(rng.uniform(2.0, 3.0), 1)
        unit.extras["damage"] = "smudge_mild"
    elif defect is not None:
        raise ValueError(f"unknown defect {defect!r} (known: {UNIT_DEFECTS + VARIATIONS})")
    if applied in UNIT_DEFECTS:
        unit.defect = applied
    elif applied in VARIATIONS:
        unit.variation = applied
    if render_images:
        render_unit(unit)


def _nothing_printed(unit: SimUnit, cause: str) -> None:
    unit.content = None
    unit.quality = 0.0
    unit.image = None
    unit.defect = unit.defect or "no_print"
    unit.extras["cause"] = cause


# --------------------------------------------------------------------------- coding printer (LCP/1)


class CoderPrinterSim(SimServer):
    """A CIJ/TIJ printer speaking LCP/1 (drivers/coder.py) over TCP or a pty.

    Fault injection: random rates (seeded) and on-demand `inject(kind, ...)`:
    nak, fault, clear_fault, slow, silence, reset, garbage.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        serial_link: str | None = None,
        name: str = "coder",
        capacity: int = 64,
        code_field: str = "DM",
        messages: set[str] | None = None,
        defect_for: DefectFor | None = None,
        config: Any = None,
        render_images: bool = False,
        seed: int = 0,
        nak_rate: float = 0.0,
        fault_rate: float = 0.0,
        fault_triggers: int = 100,
        slow_rate: float = 0.0,
        slow_s: float = 0.5,
        reset_rate: float = 0.0,
        garbage_rate: float = 0.0,
    ) -> None:
        super().__init__(host=host, port=port, serial_link=serial_link, name=name)
        if config is not None:  # the driver's CoderConfig: accept its message, print its code field
            messages = {config.message} if messages is None else messages
            code_field = next((k for k, v in config.fields.items() if v == "element_string"), code_field)
        self.capacity = capacity
        self.code_field = code_field
        self.messages = messages
        self.defects = defect_for
        self.render_images = render_images
        self.rng = random.Random(seed)
        self.nak_rate, self.fault_rate, self.fault_triggers = nak_rate, fault_rate, fault_triggers
        self.slow_rate, self.slow_s = slow_rate, slow_s
        self.reset_rate, self.garbage_rate = reset_rate, garbage_rate
        self.queue: deque[tuple[int, dict[str, str]]] = deque()
        self.message: str | None = None
        self.print_count = 0
        self.faults: dict[str, str] = {}
        self.previous: str | None = None
        self.printed: deque[tuple[int, str | None]] = deque(maxlen=100_000)  # (job seq, content on the pack)
        self.underruns = 0
        self._nak_next: list[tuple[str, str]] = []
        self._slow_next = 0
        self._silent_next = 0
        self._fault_left = 0
        self.frames_in = 0

    # -- protocol

    async def handle(self, reader: asyncio.StreamReader, writer: Any) -> None:
        dec = FrameDecoder()
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for fr in dec.feed(data):
                if isinstance(fr, str):
                    self._out(encode_frame("NAK", "0", "01", NAK_CODES["01"]))
                    continue
                self.frames_in += 1
                if self.reset_rate and self.rng.random() < self.reset_rate:
                    self.reset_connection()
                    return
                if self._silent_next > 0:
                    self._silent_next -= 1
                    continue
                delay = 0.0
                if self._slow_next > 0:
                    self._slow_next -= 1
                    delay = self.slow_s
                elif self.slow_rate and self.rng.random() < self.slow_rate:
                    delay = self.slow_s
                if delay:
                    await asyncio.sleep(delay)
                self._out(self._answer(fr))

    def _out(self, frame: bytes) -> None:
        if self.garbage_rate and self.rng.random() < self.garbage_rate:
            frame = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 16))) + frame
        self.send(frame)

    def _answer(self, fr: Frame) -> bytes:
        f = fr.fields
        if not f or not f[0].isdigit():
            return encode_frame("NAK", "0", "03", "missing request id")
        rid = f[0]

        def nak(code: str, text: str = "") -> bytes:
            return encode_frame("NAK", rid, code, text or NAK_CODES[code])

        if self._nak_next and fr.cmd in ("DAT", "SEL", "CLR"):
            code, text = self._nak_next.pop(0)
            return nak(code, text)
        if fr.cmd == "SEL":
            if len(f) != 2 or not f[1]:
                return nak("03")
            if self.messages is not None and f[1] not in self.messages:
                return nak("04", f"unknown message {f[1]!r}")
            if f[1] != self.message:
                self.queue.clear()  # a new template invalidates queued data
            self.message = f[1]
            return encode_frame("ACK", rid)
        if fr.cmd == "DAT":
            if len(f) < 3 or not f[1].isdigit():
                return nak("03")
            if self.message is None:
                return nak("05")
            if any(fault_severity(c) == "stop" for c in self.faults):
                return nak("07")
            if self.nak_rate and self.rng.random() < self.nak_rate:
                return nak("07", "random refusal (simulated)")
            if len(self.queue) >= self.capacity:
                return nak("06")
            seq = int(f[1])
            if any(s == seq for s, _ in self.queue):
                return nak("08")
            values: dict[str, str] = {}
            for kv in f[2:]:
                k, sep, v = kv.partition("=")
                if not sep or not k:
                    return nak("03", f"field {kv!r} is not name=value")
                values[k] = v
            if self.code_field not in values:
                return nak("03", f"message needs field {self.code_field!r}")
            self.queue.append((seq, values))
            return encode_frame("ACK", rid, f"seq={seq}", f"buf={len(self.queue)}")
        if fr.cmd == "STA":
            code = self._fault_code()
            return encode_frame(
                "ACK",
                rid,
                f"state={'FAULT' if fault_severity(code) == 'stop' else 'READY'}",
                f"msg={self.message or ''}",
                f"buf={len(self.queue)}",
                f"cap={self.capacity}",
                f"flt={code}",
                f"txt={self.faults.get(code, FAULT_CODES['000'])}",
                f"cnt={self.print_count}",
            )
        if fr.cmd == "CLR":
            n = len(self.queue)
            self.queue.clear()
            return encode_frame("ACK", rid, f"cleared={n}")
        return nak("02", f"unknown command {fr.cmd}")

    def _fault_code(self) -> str:
        if not self.faults:
            return "000"
        stops = [c for c in self.faults if fault_severity(c) == "stop"]
        return sorted(stops or list(self.faults))[0]

    # -- the print head

    def on_trigger(self, unit: SimUnit) -> None:
        """Product trigger: print the head job on the unit, or nothing (fault, empty buffer)."""
        if self.fault_rate and not self.faults and self.rng.random() < self.fault_rate:
            self.raise_fault("101")
            self._fault_left = self.fault_triggers
        elif self._fault_left > 0:
            self._fault_left -= 1
            if self._fault_left == 0 and "101" in self.faults:
                self.clear_fault("101")
        if any(fault_severity(c) == "stop" for c in self.faults):
            _nothing_printed(unit, "printer fault " + self._fault_code())
            return
        if not self.queue:
            self.underruns += 1
            _nothing_printed(unit, "buffer underrun")
            if "103" not in self.faults:
                self.raise_fault("103")
            return
        seq, values = self.queue.popleft()
        content = values[self.code_field]
        defect = self.defects(unit.seq) if self.defects is not None else None
        apply_print(unit, content, "]d2", defect, self.rng, self.previous, self.render_images)
        unit.job_seq = seq
        self.previous = content
        self.printed.append((seq, unit.content))
        self.print_count += 1
        # product counter: the printer sees the same product detector as the PLC, so it is the unit's trigger count
        self._out(encode_frame("PRN", str(seq), str(unit.seq), str(self.print_count)))
        if "103" in self.faults:
            self.clear_fault("103")

    # -- faults

    def raise_fault(self, code: str, text: str | None = None) -> None:
        self.faults[code] = text or FAULT_CODES.get(code, "fault")
        self._out(encode_frame("FLT", code, self.faults[code]))

    def clear_fault(self, code: str | None = None) -> None:
        if code is None:
            self.faults.clear()
        else:
            self.faults.pop(code, None)
        if not self.faults:
            self._out(encode_frame("FLT", "000", FAULT_CODES["000"]))
        else:
            c = self._fault_code()
            self._out(encode_frame("FLT", c, self.faults[c]))

    def inject(self, kind: str, **kw: Any) -> None:
        """On-demand faults (also what the line simulator's control server calls)."""
        if kind == "nak":
            code = str(kw.get("code", "07"))
            self._nak_next.extend([(code, str(kw.get("text", NAK_CODES.get(code, "refused"))))] * int(kw.get("count", 1)))
        elif kind == "fault":
            self.raise_fault(str(kw.get("code", "202")), kw.get("text"))
        elif kind == "clear_fault":
            self.clear_fault(kw.get("code"))
        elif kind == "slow":
            self.slow_s = float(kw.get("seconds", self.slow_s))
            self._slow_next += int(kw.get("count", 1))
        elif kind == "silence":
            self._silent_next += int(kw.get("count", 1))
        elif kind == "reset":
            self.reset_connection()
        elif kind == "garbage":
            n = int(kw.get("nbytes", 32))
            self.send(bytes(self.rng.randrange(256) for _ in range(n)))
        else:
            raise ValueError(f"unknown fault kind {kind!r} for a coder printer (nak, fault, clear_fault, slow, silence, reset, garbage)")


# --------------------------------------------------------------------------- ZPL


def pc_bytes(epc_hex: str) -> bytes:
    """PC word of a GS1 EPC of this many hex digits (length in words in bits 15-11)."""
    return ((len(epc_hex) // 4) << 11).to_bytes(2, "big")


@dataclass(frozen=True)
class RfidSetup:
    """^RSt,p,v,n,e: tag type, programming position, VOID length, labels tried, error handling."""

    tag_type: str = "8"
    position: str = ""
    void_length: int | None = None
    labels: int = 3  # manual default
    error_handling: str = "N"  # manual default


@dataclass(frozen=True)
class RfidWrite:
    """^RFW,f,b,n,m with its ^FD: format, start block (16-bit word), bytes, memory bank, data."""

    fmt: str
    block: int | None
    nbytes: int | None
    bank: str
    data: str


@dataclass(frozen=True)
class RfidRead:
    """^RFR,f,b,n,m into field ^FN<field>."""

    fmt: str
    block: int | None
    nbytes: int | None
    bank: str
    field: int | None


@dataclass(frozen=True)
class HostVerification:
    """^HV#,n,h,t,a: field, characters returned, header, termination (after ^FH), F = per format / L = per label."""

    field: int
    nbytes: int
    header: str
    termination: str
    applies: str


@dataclass
class ZplLabel:
    raw: bytes
    dm: tuple[str, str] | None = None  # (symbology "]d2"/"]d1", data with GS for FNC1)
    gs1_128: str | None = None
    texts: list[str] = field(default_factory=list)
    quantity: int = 1
    errors: list[str] = field(default_factory=list)
    rfid_setup: RfidSetup | None = None
    rfid_writes: list[RfidWrite] = field(default_factory=list)
    rfid_reads: list[RfidRead] = field(default_factory=list)
    host_verifications: list[HostVerification] = field(default_factory=list)
    voids: int = 0  # VOID labels this format has produced so far (printer state, not format content)

    @property
    def epc_sent(self) -> str | None:
        """The EPC this format writes (EPC bank from word 2, or bank E/A), None without one."""
        for w in self.rfid_writes:
            if (w.bank == "1" and w.block == 2) or w.bank in ("E", "A"):
                return w.data.upper()
        return None


def decode_bx_data(data: str, esc: str) -> tuple[str, str]:
    """Quality-200 ^BX field data -> (symbology, data): leading <esc>1 = GS1 (]d2), later <esc>1 = GS."""
    out: list[str] = []
    gs1 = False
    i = 0
    while i < len(data):
        c = data[i]
        if c != esc:
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(data):
            raise ValueError("escape character at the end of the data")
        n = data[i + 1]
        if n == esc:
            out.append(esc)
            i += 2
        elif n == "1":
            if i == 0:
                gs1 = True
            else:
                out.append(GS)
            i += 2
        elif n == "d":
            out.append(chr(int(data[i + 2 : i + 5])))
            i += 5
        elif "@" <= n <= "_":
            out.append(chr(ord(n) - 64))
            i += 2
        else:
            raise ValueError(f"unsupported escape {esc}{n}")
    return ("]d2" if gs1 else "]d1"), "".join(out)


def decode_bc_data(data: str) -> str:
    """^BC mode-N field data with invocation codes -> data (FNC1 first = GS1-128; later FNC1 = GS)."""
    out: list[str] = []
    mode = "B"
    i = 0
    started = False
    while i < len(data):
        c = data[i]
        if c == ">" and i + 1 < len(data):
            n = data[i + 1]
            i += 2
            if n == ";":
                mode = "C"
            elif n == ":":
                mode = "B"
            elif n == "9":
                mode = "A"
            elif n == "5":
                mode = "C"
            elif n == "6":
                mode = "B"
            elif n == "7":
                mode = "A"
            elif n == "8":
                if started:
                    out.append(GS)
                started = True
            elif n == "<":
                out.append(">")
                started = True
            elif n == "=":
                out.append("~")
                started = True
            else:
                raise ValueError(f"unsupported invocation >{n}")
            continue
        started = True
        if mode == "C":
            pair = data[i : i + 2]
            if len(pair) != 2 or not pair.isdigit():
                raise ValueError(f"subset C needs digit pairs, got {pair!r}")
            out.append(pair)
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _unhex(data: str, ind: str) -> str:
    raw = bytearray()
    i = 0
    b = data.encode("latin-1")
    while i < len(b):
        if chr(b[i]) == ind and i + 2 < len(b) and re.fullmatch(rb"[0-9A-Fa-f]{2}", b[i + 1 : i + 3]):
            raw.append(int(b[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(b[i])
            i += 1
    return raw.decode("utf-8", errors="replace")


def _opt_int(v: str, what: str, lo: int, hi: int) -> int | None:
    if v.strip() == "":
        return None
    n = int(v)
    if not lo <= n <= hi:
        raise ValueError(f"{what} {n} outside {lo}..{hi}")
    return n


def _parse_rs(arg: str) -> RfidSetup:
    p = (arg.split(",") + [""] * 5)[:5]
    if p[0] not in ("", "8"):
        raise ValueError(f"^RS tag type {p[0]!r}: only 8 (EPC Gen 2) is simulated")
    e = p[4].strip().upper() or "N"
    if e not in ("N", "P", "E"):
        raise ValueError(f"^RS error handling {e!r} is not N, P or E")
    labels = _opt_int(p[3], "^RS number of labels", 1, 10)
    return RfidSetup("8", p[1], _opt_int(p[2], "^RS void length", 0, 32000), 3 if labels is None else labels, e)


def _finish_rfid_field(label: ZplLabel, kind: str, params: list[str], data: str | None, fn: int | None, fh: str | None) -> None:
    p = (params + [""] * 5)[:5]
    if kind in ("rfw", "rfr"):
        fmt = p[1].strip().upper() or "H"
        if fmt not in ("H", "A", "E"):
            raise ValueError(f"^RF format {fmt!r} is not H, A or E")
        block = _opt_int(p[2], "^RF start block", 0, 65535)
        nbytes = _opt_int(p[3], "^RF byte count", 1, 512)
        bank = p[4].strip().upper() or "E"
        if bank not in ("0", "1", "2", "3", "E", "A"):
            raise ValueError(f"^RF memory bank {bank!r} is not 0-3, E or A")
        if kind == "rfr":
            label.rfid_reads.append(RfidRead(fmt, block, nbytes, bank, fn))
            return
        if data is None:
            raise ValueError("^RFW without ^FD data")
        if fh is not None:
            data = _unhex(data, fh)
        if fmt == "H":
            if not re.fullmatch(r"[0-9A-Fa-f]*", data) or len(data) % 2:
                raise ValueError(f"^RFW,H data {data[:24]!r} is not whole hex bytes")
            if nbytes is not None and len(data) != 2 * nbytes:
                raise ValueError(f"^RFW,H data has {len(data) // 2} bytes, the command says {nbytes}")
        label.rfid_writes.append(RfidWrite(fmt, block, nbytes, bank, data))
    else:  # hv
        hv = [x for x in params] + [""] * 5
        header, term = hv[2], hv[3]
        if fh is not None:
            header, term = _unhex(header, fh), _unhex(term, fh)
        applies = hv[4].strip().upper() or "F"
        if applies not in ("F", "L"):
            raise ValueError(f"^HV applies-to {applies!r} is not F or L")
        n = _opt_int(hv[1], "^HV byte count", 1, 256)
        label.host_verifications.append(HostVerification(int(hv[0] or "0"), 64 if n is None else n, header, term, applies))


def parse_zpl_format(raw: bytes) -> ZplLabel:
    """The parts of one ^XA...^XZ format this simulator understands (^BX, ^BC, text, ^FH, ^PQ, ^RS, ^RF, ^FN, ^HV)."""
    label = ZplLabel(raw=raw)
    text = raw.decode("latin-1")
    kind: str | None = None
    params: list[str] = []
    fh: str | None = None
    data: str | None = None
    fn: int | None = None
    for tok in text.split("^")[1:]:
        cmd, arg = tok[:2].upper(), tok[2:]
        if cmd != "FD":
            arg = arg.strip("\r\n ")
        if cmd == "RS":
            try:
                label.rfid_setup = _parse_rs(arg)
            except ValueError as exc:
                label.errors.append(f"^RS{arg}: {exc}")
        elif cmd == "RF":
            op = arg[:1].upper()
            if op not in ("W", "R"):
                label.errors.append(f"^RF{arg}: operation {op!r} not simulated (W, R)")
            kind, params = ("rfw" if op == "W" else "rfr"), arg.split(",")
        elif cmd == "HV":
            kind, params = "hv", arg.split(",")
        elif cmd == "FN":
            try:
                fn = int(arg or "0")
            except ValueError:
                label.errors.append(f"bad ^FN {arg!r}")
        elif cmd == "BX":
            kind, params = "bx", arg.split(",")
        elif cmd == "BC":
            kind, params = "bc", arg.split(",")
        elif cmd[0] == "A" and kind is None:
            kind = "text"
        elif cmd == "FH":
            fh = arg[:1] or "_"
        elif cmd == "FD":
            data = arg.rstrip("\r\n")
        elif cmd == "PQ":
            try:
                label.quantity = int(arg.split(",")[0] or "1")
            except ValueError:
                label.errors.append(f"bad ^PQ {arg!r}")
        elif cmd == "FS" and kind in ("rfw", "rfr", "hv"):
            try:
                _finish_rfid_field(label, kind, params, data, fn, fh)
            except (ValueError, IndexError) as exc:
                label.errors.append(f"^{kind.upper()} field: {exc}")
            kind, params, fh, data, fn = None, [], None, None, None
        elif cmd == "FS":
            fn = None
            if data is not None:
                try:
                    if fh is not None:
                        data = _unhex(data, fh)
                    if kind == "bx":
                        quality = params[2] if len(params) > 2 else "0"
                        if quality != "200":
                            label.errors.append(f"^BX quality {quality!r}: only ECC 200 is GS1")
                        esc = params[6] if len(params) > 6 and params[6] else "~"  # current firmware default
                        label.dm = decode_bx_data(data, esc)
                    elif kind == "bc":
                        label.gs1_128 = decode_bc_data(data)
                    else:
                        label.texts.append(data)
                except (ValueError, IndexError) as exc:
                    label.errors.append(f"field {data[:20]!r}: {exc}")
            kind, params, fh, data = None, [], None, None
    return label


#: on-demand RFID faults of the ZPL printer simulator (ZplPrinterSim.inject)
RFID_FAULTS = ("void", "void_run", "wrong_epc", "no_answer")


@dataclass
class RfidLabelTruth:
    """What one physical label of an RFID format really carries (the simulator's ground truth)."""

    unit_seq: int
    epc_sent: str | None  # the EPC the format asked to write
    tag_pc: str | None  # PC word the tag holds afterwards; None = the tag does not answer
    tag_epc: str | None  # EPC the tag answers an inventory with (per its PC length); None = no answer
    void: bool  # the printer printed VOID on this label
    fault: str | None  # injected fault that shaped this label, None for a clean encode
    verification: bytes | None  # what the printer sent the host for this label (^HV), None = nothing


class _Tag:
    """The EPC memory bank (bank 1) of one Gen 2 inlay: CRC word, PC word, EPC words."""

    def __init__(self, rng: random.Random, epc_bits: int) -> None:
        self.mem = bytearray(4 + (epc_bits + 15) // 16 * 2)
        self.mem[2:4] = bytes.fromhex("3000")  # pre-encoded at the converter: 96-bit EPC
        self.mem[4:16] = bytes(rng.randrange(256) for _ in range(12))[: len(self.mem) - 4]
        self.dead = False

    @property
    def pc(self) -> str:
        return self.mem[2:4].hex().upper()

    @property
    def epc(self) -> str:
        words = int.from_bytes(self.mem[2:4], "big") >> 11
        return self.mem[4 : 4 + 2 * words].hex().upper()

    def write(self, w: RfidWrite) -> bool:
        data = bytes.fromhex(w.data) if w.fmt == "H" else w.data.encode("latin-1")
        if w.bank == "1":
            at = 2 * (w.block or 0)
            if at < 2:  # word 0 is the CRC the tag computes itself
                return False
        elif w.bank in ("E", "A"):
            at = 4
            if w.bank == "E" and len(data) != 12:
                return False
        else:
            return False  # reserved/TID/user memory are not simulated
        if at + len(data) > len(self.mem):
            return False  # beyond this inlay's EPC memory
        self.mem[at : at + len(data)] = data
        if w.bank == "A":
            pc = (int.from_bytes(self.mem[2:4], "big") & 0x07FF) | ((len(data) + 1) // 2 << 11)
            self.mem[2:4] = pc.to_bytes(2, "big")
        return True

    def read(self, r: RfidRead) -> str:
        if r.bank == "1":
            at = 2 * (r.block or 0)
            n = r.nbytes if r.nbytes is not None else len(self.mem) - at
            return self.mem[at : at + n].hex().upper()
        if r.bank == "E":
            return self.mem[4:16].hex().upper()
        return ""


class ZplPrinterSim(SimServer):
    """A ZPL printer on port 9100: receive buffer, print engine, ~HS, and paper/head/pause faults.

    `auto_print=True` prints each format `print_time_s` after the previous
    one (a print-and-apply head running free); with False the conveyor calls
    `on_trigger(unit)` and the head label goes on that unit.
    A format interrupted by paper out / head open is reprinted after recovery
    (Zebra's reprint-after-error default).

    RFID: a format with ^RFW encodes the tag of the label it prints on (each
    label a fresh inlay pre-encoded with a random 96-bit EPC, `tag_epc_bits`
    of EPC memory), ^RFR reads it back into its ^FN field and ^HV sends that
    field to the host. A tag that fails is printed VOID and the format is
    tried on the next label, up to ^RS n labels; then ^RS e = N drops the
    format, E stops the printer (`rfid_error`) until `clear_fault`. Faults
    (`inject`): void, void_run (count), wrong_epc (the encoder wrote the
    neighbouring inlay: this tag keeps its EPC), no_answer (no ^HV line).
    `rfid_labels` records what every RFID label really carries; the unit gets
    `rfid_epc` / `rfid_pc` / `rfid_void`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        serial_link: str | None = None,
        name: str = "zpl",
        auto_print: bool = True,
        print_time_s: float = 0.05,
        defect_for: DefectFor | None = None,
        config: Any = None,
        render_images: bool = False,
        silent_on_error: bool = False,
        seed: int = 0,
        reset_rate: float = 0.0,
        garbage_rate: float = 0.0,
        slow_s: float = 0.0,
        tag_epc_bits: int = 496,
        rfid_void_rate: float = 0.0,
        rfid_wrong_epc_rate: float = 0.0,
        rfid_no_answer_rate: float = 0.0,
    ) -> None:
        super().__init__(host=host, port=port, serial_link=serial_link, name=name)
        self.tag_epc_bits = tag_epc_bits
        self.rfid_rates = {"void": rfid_void_rate, "wrong_epc": rfid_wrong_epc_rate, "no_answer": rfid_no_answer_rate}
        self._rfid_next: deque[tuple[str, str | None]] = deque()
        #: ^RS e=E/P stopped the printer after VOID labels (reason), until clear_fault
        self.rfid_error: str | None = None
        self.rfid_labels: deque[RfidLabelTruth] = deque(maxlen=100_000)
        self.auto_print = auto_print
        self.print_time_s = print_time_s
        self.defects = defect_for
        self.render_images = render_images
        self.silent_on_error = silent_on_error
        self.rng = random.Random(seed)
        self.reset_rate, self.garbage_rate, self.slow_s = reset_rate, garbage_rate, slow_s
        self.buffer: deque[ZplLabel] = deque()
        self.current: ZplLabel | None = None
        self.printed: deque[ZplLabel] = deque(maxlen=100_000)
        self.units: deque[SimUnit] = deque(maxlen=100_000)
        self.paper_out = False
        self.head_open = False
        self.ribbon_out = False
        self.paused = False
        self.formats_received = 0
        self.cancelled = 0
        self._wake = asyncio.Event()
        self._engine: asyncio.Task[None] | None = None
        self._previous: str | None = None
        self._unit_seq = 0
        #: called with (label, unit) for every label printed: the packer simulator hands it to a label reader
        self.on_label: Callable[[ZplLabel, SimUnit], None] | None = None

    async def on_started(self) -> None:
        if self.auto_print:
            self._engine = asyncio.create_task(self._print_engine())

    async def on_stopping(self) -> None:
        if self._engine is not None:
            self._engine.cancel()
            try:
                await self._engine
            except (asyncio.CancelledError, Exception):
                pass

    @property
    def ready(self) -> bool:
        return not (self.paper_out or self.head_open or self.ribbon_out or self.paused or self.rfid_error)

    # -- host side

    async def handle(self, reader: asyncio.StreamReader, writer: Any) -> None:
        buf = b""
        while True:
            data = await reader.read(65536)
            if not data:
                return
            if self.reset_rate and self.rng.random() < self.reset_rate:
                self.reset_connection()
                return
            buf += data
            while True:
                a = buf.find(b"^XA")
                t = buf.find(b"~")
                if t >= 0 and (a < 0 or t < a):
                    if len(buf) < t + 3:
                        break
                    cmd = buf[t + 1 : t + 3].upper()
                    buf = buf[t + 3 :]
                    await self._tilde(cmd)
                    continue
                if a < 0:
                    buf = buf[-2:] if buf.endswith((b"^", b"^X")) else b""
                    break
                z = buf.find(b"^XZ", a)
                if z < 0:
                    buf = buf[a:]
                    break
                self._receive(buf[a : z + 3])
                buf = buf[z + 3 :]

    def _receive(self, raw: bytes) -> None:
        label = parse_zpl_format(raw)
        self.formats_received += 1
        if label.errors:
            log.warning("zpl_sim_format_errors", errors=label.errors)
        self.buffer.append(label)
        self._wake.set()

    async def _tilde(self, cmd: bytes) -> None:
        if cmd == b"HS":
            if self.silent_on_error and (self.paper_out or self.head_open):
                return
            if self.slow_s:
                await asyncio.sleep(self.slow_s)
            out = self.host_status()
            if self.garbage_rate and self.rng.random() < self.garbage_rate:
                out = bytes(self.rng.randrange(256) for _ in range(8)) + out
            self.send(out)
        elif cmd == b"JA":
            self.cancelled += len(self.buffer)
            self.buffer.clear()
            self.rfid_error = None  # the format that stopped the printer is gone
        elif cmd == b"PS":
            self.paused = False
            self._wake.set()
        elif cmd == b"PP":
            self.paused = True

    def host_status(self) -> bytes:
        eee = len(self.buffer)
        remaining = 1 if self.current is not None else 0
        s1 = f"030,{int(self.paper_out)},{int(self.paused)},1218,{eee:03d},{int(eee >= 999)},0,0,000,0,0,0"
        s2 = f"001,0,{int(self.head_open)},{int(self.ribbon_out)},1,2,6,0,{remaining:08d},1,000"
        s3 = "1234,0"
        return b"".join(b"\x02" + s.encode() + b"\x03\r\n" for s in (s1, s2, s3))

    # -- print engine

    async def _print_engine(self) -> None:
        while True:
            while not (self.buffer and self.ready):
                self._wake.clear()
                await self._wake.wait()
            label = self.buffer.popleft()
            self.current = label
            t_end = time.monotonic() + self.print_time_s
            interrupted = False
            try:
                while time.monotonic() < t_end:
                    await asyncio.sleep(min(0.01, max(0.0, t_end - time.monotonic())))
                    if self.paper_out or self.head_open or self.ribbon_out:
                        interrupted = True
                        break
            except asyncio.CancelledError:
                if self.current is label:  # stopped mid-label: it was not printed
                    self.buffer.appendleft(label)
                    self.current = None
                raise
            self.current = None
            if interrupted:
                self.buffer.appendleft(label)  # reprint after error
                continue
            self._unit_seq += 1
            if not self._print_on(label, SimUnit(seq=self._unit_seq)):
                self.buffer.appendleft(label)  # RFID VOID: the format goes on the next label

    def _print_on(self, label: ZplLabel, unit: SimUnit) -> bool:
        """Print the head format on the unit's label; False when it stays on the printer (RFID VOID, retry or error)."""
        fields: dict[int, str] = {}
        if label.rfid_writes or label.rfid_reads:
            done = self._encode(label, unit, fields)
            if done is not None:
                return done
        self.printed.append(label)
        if label.dm is None:
            _nothing_printed(unit, "label has no DataMatrix")
        else:
            sym, content = label.dm
            defect = self.defects(unit.seq) if self.defects is not None else None
            apply_print(unit, content, sym, defect, self.rng, self._previous, self.render_images)
            self._previous = content
        self._label_out(label, unit)
        return True

    def _label_out(self, label: ZplLabel, unit: SimUnit) -> None:
        self.units.append(unit)
        if self.on_label is not None:
            try:
                self.on_label(label, unit)
            except Exception as exc:  # noqa: BLE001 - the print engine must outlive a broken observer
                log.warning("zpl_sim_on_label_failed", error=repr(exc))

    def _next_rfid_fault(self) -> tuple[str | None, str | None]:
        if self._rfid_next:
            kind, epc = self._rfid_next.popleft()
            return kind, epc
        for kind, rate in self.rfid_rates.items():
            if rate and self.rng.random() < rate:
                return kind, None
        return None, None

    def _encode(self, label: ZplLabel, unit: SimUnit, fields: dict[int, str]) -> bool | None:
        """Encode this label's tag. None: encoded, print the label as usual (fields hold the read-back);
        True/False: the label came out VOID and the format is done / stays on the printer."""
        tag = _Tag(self.rng, self.tag_epc_bits)
        fault, other = self._next_rfid_fault()
        ok = True
        if fault == "void":
            tag.dead = True
            ok = False
        elif fault == "wrong_epc":  # the neighbouring inlay got the write; this one keeps what it holds
            if other is not None:
                tag.mem[2:4] = pc_bytes(other)
                tag.mem[4 : 4 + len(other) // 2] = bytes.fromhex(other)
        else:
            for w in label.rfid_writes:
                if not tag.write(w):
                    ok = False
                    break
        if ok:
            for r in label.rfid_reads:
                if r.field is not None:
                    fields[r.field] = tag.read(r)
        sent = self._verify_to_host(label, fields, last=ok or self._format_done_after_void(label))
        truth = RfidLabelTruth(
            unit.seq,
            label.epc_sent,
            None if tag.dead else tag.pc,
            None if tag.dead else tag.epc,
            not ok,
            fault,
            None if fault == "no_answer" else sent,
        )
        if fault == "no_answer":
            pass  # the line never reached the host
        elif sent is not None:
            self.send(sent)
        self.rfid_labels.append(truth)
        unit.rfid_pc, unit.rfid_epc, unit.rfid_void = truth.tag_pc, truth.tag_epc, truth.void
        unit.extras["rfid_epc_sent"] = truth.epc_sent
        unit.extras["rfid_fault"] = fault
        if ok:
            if fault == "wrong_epc":
                unit.defect = unit.defect or "rfid_wrong_epc"
            return None
        # VOID: the tag failed; the printer prints VOID across the label instead of the format
        label.voids += 1
        unit.defect = "rfid_void"
        unit.extras["void"] = True
        _nothing_printed(unit, "RFID tag failed: label printed VOID")
        self._label_out(label, unit)
        setup = label.rfid_setup or RfidSetup()
        if label.voids % setup.labels:
            return False  # tried again on the next label
        if setup.error_handling == "N":
            log.warning("zpl_sim_rfid_format_dropped", sim=self.name, voids=label.voids)
            return True
        self.rfid_error = f"RFID: {label.voids} VOID label(s), error handling {setup.error_handling}"
        return False

    def _format_done_after_void(self, label: ZplLabel) -> bool:
        setup = label.rfid_setup or RfidSetup()
        return (label.voids + 1) % setup.labels == 0 and setup.error_handling == "N"

    def _verify_to_host(self, label: ZplLabel, fields: dict[int, str], last: bool) -> bytes | None:
        """The ^HV responses of this label: each per label (L), or per format (F) on its last label."""
        out = b""
        for hv in label.host_verifications:
            if hv.applies == "L" or last:
                out += (hv.header + fields.get(hv.field, "")[: hv.nbytes] + hv.termination).encode("latin-1")
        return out or None

    def on_trigger(self, unit: SimUnit) -> None:
        """Print-and-apply at the product trigger; a conveyor driving the printer replaces free-running printing."""
        if self._engine is not None:
            self._engine.cancel()
            self._engine = None
            if self.current is not None:  # the label in progress was not finished: it is the next one
                self.buffer.appendleft(self.current)
                self.current = None
            self.auto_print = False
            log.info("zpl_sim_trigger_mode", sim=self.name)
        if not self.ready:
            _nothing_printed(unit, "printer not ready")
            return
        if not self.buffer:
            _nothing_printed(unit, "no label in buffer")
            return
        label = self.buffer.popleft()
        if not self._print_on(label, unit):
            self.buffer.appendleft(label)  # RFID VOID: the format goes on the next unit's label

    def inject(self, kind: str, **kw: Any) -> None:
        on = bool(kw.get("on", True))
        if kind == "paper_out":
            self.paper_out = on
        elif kind == "head_open":
            self.head_open = on
        elif kind == "ribbon_out":
            self.ribbon_out = on
        elif kind == "pause":
            self.paused = on
        elif kind == "clear_fault":
            self.paper_out = self.head_open = self.ribbon_out = self.paused = False
            self.rfid_error = None
        elif kind in ("void", "void_run", "no_answer"):
            n = int(kw.get("count", 3 if kind == "void_run" else 1))
            self._rfid_next.extend([("no_answer" if kind == "no_answer" else "void", None)] * n)
        elif kind == "wrong_epc":
            other = kw.get("epc")
            self._rfid_next.extend([("wrong_epc", None if other is None else str(other).upper())] * int(kw.get("count", 1)))
        elif kind == "reset":
            self.reset_connection()
        elif kind == "garbage":
            self.send(bytes(self.rng.randrange(256) for _ in range(int(kw.get("nbytes", 32)))))
        elif kind == "slow":
            self.slow_s = float(kw.get("seconds", 0.5))
        else:
            raise ValueError(
                f"unknown fault kind {kind!r} for a ZPL printer (paper_out, head_open, ribbon_out, pause, clear_fault, "
                f"reset, garbage, slow, {', '.join(RFID_FAULTS)})"
            )
        self._wake.set()


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m linectl.simulators.printer", description="Printer simulator: LCP/1 coding printer or ZPL label printer.")
    p.add_argument("--protocol", choices=("coder", "zpl"), required=True)
    add_endpoint_args(p, default_port=None)
    p.add_argument("--rate", type=float, default=60.0, help="coder: product triggers per minute while jobs are queued (default 60)")
    p.add_argument("--capacity", type=int, default=64, help="coder: job buffer size")
    p.add_argument("--print-time", type=float, default=0.2, help="zpl: seconds per label (default 0.2)")
    p.add_argument("--nak-rate", type=float, default=0.0)
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--slow-rate", type=float, default=0.0)
    p.add_argument("--reset-rate", type=float, default=0.0)
    p.add_argument("--garbage-rate", type=float, default=0.0)
    args = p.parse_args(argv)
    from linectl.logging import setup_logging

    setup_logging()
    port = args.port if args.port is not None else (9100 if args.protocol == "zpl" else 7100)
    sim: SimServer
    if args.protocol == "coder":
        sim = CoderPrinterSim(
            host=args.host, port=port, serial_link=args.serial, capacity=args.capacity, seed=args.seed,
            nak_rate=args.nak_rate, fault_rate=args.fault_rate, slow_rate=args.slow_rate,
            reset_rate=args.reset_rate, garbage_rate=args.garbage_rate,
        )
    else:
        sim = ZplPrinterSim(
            host=args.host, port=port, serial_link=args.serial, print_time_s=args.print_time, seed=args.seed,
            reset_rate=args.reset_rate, garbage_rate=args.garbage_rate,
        )

    async def run() -> None:
        if isinstance(sim, CoderPrinterSim) and args.rate > 0:

            async def triggers() -> None:
                n = 0
                while True:
                    await asyncio.sleep(60.0 / args.rate)
                    if sim.queue:
                        n += 1
                        sim.on_trigger(SimUnit(seq=n))

            asyncio.get_running_loop().create_task(triggers())
        await run_forever(sim)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
