"""PLC tag maps (Modbus and S7), their byte-level encoding, read planning, and the polled-PLC runtime.

Both PLC drivers and the PLC simulator import this module, so the driver and
the simulator can never disagree about where a tag lives or how its bytes are
ordered: a word-order bug shows up as a failing test, not as a wrong reject
on the line.

The engine only ever sees logical tag names (`heartbeat_plc`, `verdict_ring`,
...); the YAML tag map says where each one sits in the PLC.
"""

from __future__ import annotations

import abc
import asyncio
import math
import re
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from linectl.drivers.base import Backoff, DeviceError, DriverConfig, HealthState, Plc, TagError

# --------------------------------------------------------------------------- logical tags

#: tags linectl writes and never needs to poll (they are still readable with read_tags([...]))
ENGINE_WRITTEN = frozenset(
    {
        "heartbeat_ctl", "line_mode", "line_running", "fault", "alarm_code", "good_count", "reject_count", "verdict_ring",
        "case_result", "case_seq",
        # PackTags out (PACKML_* below)
        "packml_cmd_result", "packml_state_current", "packml_unit_mode_current", "packml_stop_reason", "packml_blocked",
        "packml_starved", "packml_prod_processed_count", "packml_prod_defective_count",
    }
)
# PackTags (ISA-TR88.00.02) on the PLC: the PackML command handshake and the Status/Admin tags a PLC programmed to
# PackML expects, under logical names like every other tag (README "PackTags on the PLC").
#: Command.CntrlCmd (PLC -> linectl): the PackML command number, read on a rising edge of the change request
PACKML_CNTRL_CMD = "packml_cntrl_cmd"
#: Command.CmdChangeRequest (PLC sets it, linectl clears it when the command was handled: the acknowledge)
PACKML_CMD_CHANGE_REQUEST = "packml_cmd_change_request"
#: Command.UnitMode / Command.UnitModeChangeRequest: the same handshake for a unit mode change (1 Production, ...)
PACKML_UNIT_MODE = "packml_unit_mode"
PACKML_UNIT_MODE_CHANGE_REQUEST = "packml_unit_mode_change_request"
#: linectl -> PLC, written before the acknowledge: what became of the last request, command or mode (PACKML_RESULT_*)
PACKML_CMD_RESULT = "packml_cmd_result"
#: Status/Admin PackTags linectl writes: logical tag -> the PackTags name it carries
PACKML_STATUS_TAGS: dict[str, str] = {
    "packml_state_current": "Status.StateCurrent",
    "packml_unit_mode_current": "Status.UnitModeCurrent",
    "packml_stop_reason": "Admin.StopReason.ID",
    "packml_blocked": "Status.EquipmentBlocked",
    "packml_starved": "Status.EquipmentStarved",
    "packml_prod_processed_count": "Admin.ProdProcessedCount",
    "packml_prod_defective_count": "Admin.ProdDefectiveCount",
}
#: packml_cmd_result values (0: no command handled since linectl started)
PACKML_RESULT_NONE = 0
PACKML_RESULT_DONE = 1  # executed: StateCurrent shows the new state
PACKML_RESULT_INVALID_STATE = 2  # the PackML state model does not allow it now: nothing changed
PACKML_RESULT_UNKNOWN_COMMAND = 3  # CntrlCmd holds no PackML command number: nothing changed
PACKML_RESULT_REFUSED = 4  # allowed by PackML, refused by the line (fault active, no batch, device down...): nothing changed
PACKML_RESULT_CHANGED = 5  # CntrlCmd changed while the command ran: the first value was executed, the new one was not
PACKML_RESULT_STALE = 6  # the request was already up when linectl started: not executed (send it again)
#: PLC -> linectl, optional and polled: the equipment around the line as the PLC sees it (README "PackTags on the PLC").
#: downstream_blocked: the machine after the line takes no product (Status.EquipmentBlocked; a running line is
#: Suspended); infeed_starved: no product at the infeed (Status.EquipmentStarved, beside linectl's own
#: packml.starved_after_s timer; Suspended). Both resume by themselves when the PLC clears them.
PACKML_BLOCKED_INPUT = "downstream_blocked"
PACKML_STARVED_INPUT = "infeed_starved"
PACKML_EQUIPMENT_INPUTS = (PACKML_BLOCKED_INPUT, PACKML_STARVED_INPUT)
_PACKML_BOOL_OK = ("packml_cmd_change_request", "packml_unit_mode_change_request", "packml_blocked", "packml_starved", *PACKML_EQUIPMENT_INPUTS)

#: tags linectl writes (so they must live in a writable area)
ENGINE_WRITES = ENGINE_WRITTEN | {"cmd_start", "cmd_stop", "cmd_pause", "cmd_reset"} | {PACKML_CMD_CHANGE_REQUEST, PACKML_UNIT_MODE_CHANGE_REQUEST}
#: the verdict protocol's values
VERDICT_GOOD = 1
VERDICT_REJECT = 2
#: case_result values a case station writes (the PLC's reject pusher acts on a change of case_seq)
CASE_ACCEPT = 1
CASE_REJECT = 2
#: the case-divert handshake: result first, then the counter the PLC watches
CASE_TAGS = ("case_result", "case_seq")
#: PLC -> linectl: +1 for every case that enters an RFID tunnel (its photo-eye); each count opens one read window
CASE_TRIGGER = "case_trigger"
#: line_mode values
MODE_IDLE, MODE_CHALLENGE, MODE_PRODUCTION = 0, 1, 2


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- Modbus tag spec

ModbusTable = Literal["coil", "discrete", "holding", "input"]
ModbusType = Literal["bool", "int16", "uint16", "int32", "uint32", "float32"]
_MB_STRUCT = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}
_MB_WORDS = {"bool": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}
_INT_RANGE = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "INT": (-(2**15), 2**15 - 1),
    "UINT": (0, 2**16 - 1),
    "WORD": (0, 2**16 - 1),
    "DINT": (-(2**31), 2**31 - 1),
    "UDINT": (0, 2**32 - 1),
    "DWORD": (0, 2**32 - 1),
    "BYTE": (0, 255),
    # OPC UA built-in types (drivers/opcua.py): handshake counters and case tags may be any integer type
    "Byte": (0, 255),
    "Int16": (-(2**15), 2**15 - 1),
    "UInt16": (0, 2**16 - 1),
    "Int32": (-(2**31), 2**31 - 1),
    "UInt32": (0, 2**32 - 1),
}


class ModbusTagSpec(_Model):
    """Where one logical tag lives in a Modbus device. Addresses are 0-based protocol addresses."""

    table: ModbusTable
    address: int = Field(ge=0, le=65535)
    type: ModbusType = "uint16"
    count: int = Field(1, ge=1, le=2000, description="> 1 makes an array tag (value is a list)")
    byte_order: Literal["big", "little"] = Field("big", description="byte order inside each 16-bit register")
    word_order: Literal["big", "little"] = Field("big", description="register order of 32-bit values")
    poll: bool | None = Field(None, description="poll every cycle; default: yes, except tags only linectl writes")

    @model_validator(mode="after")
    def _check(self) -> ModbusTagSpec:
        bit_table = self.table in ("coil", "discrete")
        if bit_table and self.type != "bool":
            raise ValueError(f"a {self.table} tag holds single bits: its type must be bool, not {self.type}")
        if not bit_table and self.type == "bool":
            raise ValueError(
                f"a {self.table} register tag cannot be type bool: put it in table coil/discrete, "
                "or use uint16 holding 0/1"
            )
        end = self.address + self.size - 1
        if end > 65535:
            raise ValueError(f"tag ends at address {end}, past 65535")
        return self

    @property
    def is_bits(self) -> bool:
        return self.table in ("coil", "discrete")

    @property
    def width(self) -> int:
        """Registers (or bits) per element."""
        return _MB_WORDS[self.type]

    @property
    def size(self) -> int:
        return self.width * self.count

    @property
    def writable(self) -> bool:
        return self.table in ("coil", "holding")

    # -- encoding ----------------------------------------------------------------

    def encode(self, values: list[Any]) -> list[int] | list[bool]:
        """Elements -> registers (or bits) exactly as they go on the wire."""
        if self.is_bits:
            return [bool(v) for v in values]
        fmt = _MB_STRUCT[self.type]
        regs: list[int] = []
        for v in values:
            words = [int.from_bytes(w, "big") for w in _chunks(struct.pack(fmt, v), 2)]
            if self.word_order == "little":
                words.reverse()
            if self.byte_order == "little":
                words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
            regs.extend(words)
        return regs

    def decode(self, regs: list[int] | list[bool]) -> list[Any]:
        """Registers (or bits) -> elements. `regs` covers whole elements."""
        if self.is_bits:
            return [bool(b) for b in regs]
        fmt = _MB_STRUCT[self.type]
        w = self.width
        out = []
        for i in range(0, len(regs), w):
            words = list(regs[i : i + w])
            if self.byte_order == "little":
                words = [((x & 0xFF) << 8) | (x >> 8) for x in words]
            if self.word_order == "little":
                words.reverse()
            out.append(struct.unpack(fmt, b"".join(int(x).to_bytes(2, "big") for x in words))[0])
        return out

    def check_value(self, v: Any) -> Any:
        return _check_scalar(self.type, v)

    def describe(self) -> str:
        return f"{self.table} {self.address}" + (f"..{self.address + self.size - 1}" if self.size > 1 else "")


# --------------------------------------------------------------------------- S7 tag spec

S7Type = Literal["BOOL", "BYTE", "INT", "UINT", "WORD", "DINT", "UDINT", "DWORD", "REAL", "STRING"]
_S7_STRUCT = {
    "BYTE": ">B",
    "INT": ">h",
    "UINT": ">H",
    "WORD": ">H",
    "DINT": ">i",
    "UDINT": ">I",
    "DWORD": ">I",
    "REAL": ">f",
}
_S7_OFFSET = re.compile(r"^(\d+)(?:\.(\d+))?$")


class S7TagSpec(_Model):
    """Where one logical tag lives in an S7 data block (non-optimised DB, absolute addressing)."""

    db: int = Field(ge=1, le=65535)
    offset: str = Field(description='byte offset "12", or "12.3" (byte.bit) for BOOL')
    type: S7Type
    count: int = Field(1, ge=1, le=4096, description="> 1 makes an array tag (value is a list)")
    length: int | None = Field(None, ge=1, le=254, description="STRING[length]: characters")
    poll: bool | None = Field(None, description="poll every cycle; default: yes, except tags only linectl writes")

    @field_validator("type", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("offset", mode="before")
    @classmethod
    def _offset_str(cls, v: Any) -> Any:
        # YAML reads 12.3 as a float and 12 as an int: take both, but keep the text form.
        if isinstance(v, bool):
            return v
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return repr(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> S7TagSpec:
        m = _S7_OFFSET.match(self.offset)
        if not m:
            raise ValueError(f'offset {self.offset!r} is not "BYTE" or "BYTE.BIT" (e.g. "12" or "12.3")')
        bit = m.group(2)
        if self.type == "BOOL":
            if bit is None:
                raise ValueError(f'BOOL offset needs a bit: "{self.offset}.0" .. "{self.offset}.7"')
            if int(bit) > 7:
                raise ValueError(f"bit {bit} in offset {self.offset!r} is not 0..7")
        elif bit is not None:
            raise ValueError(f'only BOOL offsets take a bit; a {self.type} sits at a byte offset ("{m.group(1)}")')
        if self.type == "STRING" and self.length is None:
            raise ValueError("a STRING tag needs length (its declared STRING[n] size)")
        if self.type != "STRING" and self.length is not None:
            raise ValueError(f"length is only for STRING tags, not {self.type}")
        return self

    @property
    def byte(self) -> int:
        return int(self.offset.split(".")[0])

    @property
    def bit(self) -> int:
        parts = self.offset.split(".")
        return int(parts[1]) if len(parts) > 1 else 0

    @property
    def elem_size(self) -> int:
        """Bytes per element (BOOL: not meaningful, see bit_span)."""
        if self.type == "STRING":
            return (self.length or 0) + 2
        if self.type == "BOOL":
            return 1
        return struct.calcsize(_S7_STRUCT[self.type])

    def bit_span(self) -> tuple[int, int]:
        """[first bit, end bit) of the tag as absolute bit numbers in the DB."""
        start = self.byte * 8 + self.bit
        if self.type == "BOOL":
            return start, start + self.count
        return start, start + 8 * self.elem_size * self.count

    def byte_span(self, index: int = 0, n: int | None = None) -> tuple[int, int]:
        """(start byte, byte count) covering elements [index, index+n)."""
        n = self.count - index if n is None else n
        if self.type == "BOOL":
            first = self.byte * 8 + self.bit + index
            last = first + n - 1
            return first // 8, last // 8 - first // 8 + 1
        start = self.byte + index * self.elem_size
        return start, n * self.elem_size

    @property
    def writable(self) -> bool:
        return True

    # -- encoding ----------------------------------------------------------------

    def decode(self, buf: bytes | bytearray, buf_start: int, index: int = 0, n: int | None = None) -> list[Any]:
        """Elements [index, index+n) from `buf`, whose first byte is DB byte `buf_start`."""
        n = self.count - index if n is None else n
        out: list[Any] = []
        if self.type == "BOOL":
            first = self.byte * 8 + self.bit + index
            for k in range(n):
                b = first + k
                out.append(bool(buf[b // 8 - buf_start] >> (b % 8) & 1))
            return out
        size = self.elem_size
        base = self.byte + index * size - buf_start
        for k in range(n):
            off = base + k * size
            if self.type == "STRING":
                cur = min(buf[off + 1], self.length or 0)
                out.append(bytes(buf[off + 2 : off + 2 + cur]).decode("latin-1"))
            else:
                out.append(struct.unpack_from(_S7_STRUCT[self.type], buf, off)[0])
        return out

    def encode(self, values: list[Any]) -> bytes:
        """Non-BOOL elements -> bytes as stored in the DB (big-endian, S7 STRING header)."""
        if self.type == "BOOL":
            raise TagError("BOOL tags are written bit by bit")
        parts = []
        for v in values:
            if self.type == "STRING":
                data = str(v).encode("latin-1")
                n = self.length or 0
                if len(data) > n:
                    raise TagError(f"string of {len(data)} characters does not fit STRING[{n}]")
                parts.append(bytes([n, len(data)]) + data + b"\x00" * (n - len(data)))
            else:
                parts.append(struct.pack(_S7_STRUCT[self.type], v))
        return b"".join(parts)

    def check_value(self, v: Any) -> Any:
        if self.type == "STRING":
            if not isinstance(v, str):
                raise TagError(f"a STRING tag takes text, not {type(v).__name__}")
            try:
                data = v.encode("latin-1")
            except UnicodeEncodeError as exc:
                raise TagError("a STRING tag takes latin-1 text") from exc
            if len(data) > (self.length or 0):
                raise TagError(f"string of {len(data)} characters does not fit STRING[{self.length}]")
            return v
        return _check_scalar(self.type, v)

    def describe(self) -> str:
        return f"DB{self.db}.{self.offset} {self.type}" + (f"[{self.count}]" if self.count > 1 else "")


def _check_scalar(typ: str, v: Any) -> Any:
    if typ in ("bool", "BOOL"):
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        raise TagError(f"a bool tag takes true/false (or 0/1), not {v!r}")
    if typ in ("float32", "REAL"):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TagError(f"a {typ} tag takes a number, not {v!r}")
        f = float(v)
        if math.isfinite(f) and abs(f) > 3.4028234663852886e38:
            raise TagError(f"{v!r} does not fit a 32-bit float")
        return f
    lo, hi = _INT_RANGE[typ]
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int):
        raise TagError(f"a {typ} tag takes an integer, not {v!r}")
    if not lo <= v <= hi:
        raise TagError(f"{v} is out of range for {typ} ({lo}..{hi})")
    return v


def next_counter(typ: str, value: int) -> int:
    """value + 1, wrapping inside the tag type's range, so a handshake counter never fails a range check."""
    lo, hi = _INT_RANGE[typ]
    return value + 1 if lo <= value < hi else max(lo, 0)


def counter_delta(typ: str, old: int, new: int) -> int:
    """Counts a PLC counter of the tag's type moved from old to new, across a wrap as next_counter wraps it.

    A counter that went back (a PLC cold start) comes out as nearly a whole range: callers treat a jump larger
    than anything the line can do between two polls as a restart, not as that many counts.
    """
    if new >= old:
        return new - old
    lo, hi = _INT_RANGE.get(typ, (0, 2**32 - 1))
    base = max(lo, 0)
    return (hi - old) + 1 + (new - base) if new >= base else hi - lo + 1


def fit_counter(typ: str, value: int) -> int:
    """A count as a PLC counter of the tag's type holds it: wrapped past its top, never a range error mid-batch."""
    rng = _INT_RANGE.get(typ)
    if rng is None or rng[0] <= value <= rng[1]:
        return value
    return value % (rng[1] + 1) if value > 0 else rng[0]


def _chunks(b: bytes, n: int) -> list[bytes]:
    return [b[i : i + n] for i in range(0, len(b), n)]


# --------------------------------------------------------------------------- tag map validation


def polled(name: str, spec: Any) -> bool:
    if spec.poll is not None:
        return bool(spec.poll)
    return name not in ENGINE_WRITTEN


def check_tag_map(tags: dict[str, Any], heartbeat: bool) -> None:
    """Cross-tag rules pydantic cannot see per field. Raises ValueError naming the tags."""
    if heartbeat:
        missing = [t for t in ("heartbeat_plc", "heartbeat_ctl") if t not in tags]
        if missing:
            raise ValueError(
                f"heartbeat is on but the tag map has no {' / '.join(missing)} "
                "(set heartbeat: false only for a PLC that cannot toggle one)"
            )
    for name in sorted(ENGINE_WRITES & tags.keys()):
        if not tags[name].writable:
            where = f"table {tags[name].table}" if isinstance(tags[name], ModbusTagSpec) else f"{tags[name].describe()} (writable: false)"
            raise ValueError(f"tag {name}: linectl writes it, so it cannot be in read-only {where}")
    for ring, min_count in (("verdict_ring", 2), ("reject_ring", 1)):
        spec = tags.get(ring)
        if spec is None:
            continue
        if spec.type not in ("uint32", "int32", "UDINT", "DINT", "DWORD", "UInt32", "Int32"):
            raise ValueError(f"tag {ring} must be a 32-bit integer array (uint32 / UDINT / UInt32), not {spec.type}")
        if spec.count < min_count or (ring == "verdict_ring" and spec.count % 2):
            raise ValueError(
                f"tag {ring} count {spec.count}: "
                + ("must be 2 x R slots ([seq, verdict] pairs)" if ring == "verdict_ring" else "must be >= 1")
            )
    for name in (*CASE_TAGS, CASE_TRIGGER):
        spec = tags.get(name)
        if spec is None:
            continue
        # A divert decision is one number; a float or a bit cannot carry 1/2 or a wrapping counter.
        if spec.type not in _INT_RANGE or spec.count != 1:
            raise ValueError(
                f"tag {name} must be a single integer (uint16 / uint32 / INT / UDINT ...), "
                f"not {spec.type}" + (f"[{spec.count}]" if spec.count != 1 else "")
            )
    check_packml_tags(tags)
    if "verdict_ring" in tags and "reject_ring" in tags:
        r = tags["verdict_ring"].count // 2
        if tags["reject_ring"].count != r:
            raise ValueError(f"reject_ring count {tags['reject_ring'].count} must equal the verdict ring's R = {r}")
    # overlaps, per table / DB, at bit resolution
    spans: dict[Any, list[tuple[int, int, str]]] = {}
    for name, spec in tags.items():
        if isinstance(spec, ModbusTagSpec):
            key: Any = spec.table
            span = (spec.address, spec.address + spec.size)
        elif isinstance(spec, S7TagSpec):
            key = ("DB", spec.db)
            span = spec.bit_span()
        else:
            continue  # a node-addressed tag (OPC UA) has no byte layout: its driver checks duplicates
        spans.setdefault(key, []).append((span[0], span[1], name))
    for key, items in spans.items():
        items.sort()
        for (_a0, a1, an), (b0, _b1, bn) in zip(items, items[1:]):
            if b0 < a1:
                where = key if isinstance(key, str) else f"DB{key[1]}"
                raise ValueError(f"tags {an} and {bn} overlap in {where}")


def check_packml_tags(tags: dict[str, Any]) -> None:
    """The PackTags of a tag map: the handshake complete, each tag a single value of a type that can carry it.

    A command request without its command (or without a result to refuse through) would be a handshake the PLC
    cannot finish; a state number in a bit or a float would be a number the PLC cannot compare."""
    for req, value in ((PACKML_CMD_CHANGE_REQUEST, PACKML_CNTRL_CMD), (PACKML_UNIT_MODE_CHANGE_REQUEST, PACKML_UNIT_MODE)):
        given = [t for t in (value, req) if t in tags]
        if given and (len(given) != 2 or PACKML_CMD_RESULT not in tags):
            missing = [t for t in (value, req, PACKML_CMD_RESULT) if t not in tags]
            raise ValueError(
                f"PackML handshake incomplete: {', '.join(given)} given, {', '.join(missing)} missing "
                f"(the PLC writes {value} then sets {req}; linectl writes {PACKML_CMD_RESULT} and clears the request)"
            )
    if PACKML_CMD_RESULT in tags and PACKML_CNTRL_CMD not in tags and PACKML_UNIT_MODE not in tags:
        raise ValueError(f"{PACKML_CMD_RESULT} without {PACKML_CNTRL_CMD} or {PACKML_UNIT_MODE}: no request it could answer")
    for name in (PACKML_CNTRL_CMD, PACKML_CMD_CHANGE_REQUEST, PACKML_UNIT_MODE, PACKML_UNIT_MODE_CHANGE_REQUEST, PACKML_CMD_RESULT,
                 *PACKML_STATUS_TAGS, *PACKML_EQUIPMENT_INPUTS):
        spec = tags.get(name)
        if spec is None:
            continue
        is_bool = spec.type in ("bool", "BOOL", "Boolean")
        if spec.count != 1 or not (spec.type in _INT_RANGE or (is_bool and name in _PACKML_BOOL_OK)):
            kinds = "a bool or a single integer" if name in _PACKML_BOOL_OK else "a single integer (uint16 / INT / UDINT / Int32 ...)"
            raise ValueError(f"PackML tag {name} must be {kinds}, not {spec.type}" + (f"[{spec.count}]" if spec.count != 1 else ""))
    for n in (PACKML_CNTRL_CMD, PACKML_CMD_CHANGE_REQUEST, PACKML_UNIT_MODE, PACKML_UNIT_MODE_CHANGE_REQUEST, CASE_TRIGGER,
              *PACKML_EQUIPMENT_INPUTS):
        if n in tags and not polled(n, tags[n]):
            raise ValueError(f"{n} is written by the PLC for linectl to act on: it cannot be poll: false")


# --------------------------------------------------------------------------- read planning


@dataclass(frozen=True)
class ReadBlock:
    """One protocol read: `area` (Modbus table or S7 DB number), [start, start+length)."""

    area: Any
    start: int
    length: int


def plan_reads(spans: Iterable[tuple[Any, int, int]], max_gap: int, max_len: int | None) -> list[ReadBlock]:
    """Merge (area, start, length) spans into as few reads as possible.

    Spans closer than `max_gap` are read together (reading a few unused
    registers is cheaper than another round trip); no block exceeds `max_len`
    (a tag bigger than that is split across blocks).
    """
    by_area: dict[Any, list[tuple[int, int]]] = {}
    for area, start, length in spans:
        by_area.setdefault(area, []).append((start, start + length))
    out: list[ReadBlock] = []
    for area in sorted(by_area, key=str):
        ivs = sorted(by_area[area])
        cur_s, cur_e = ivs[0]
        merged: list[tuple[int, int]] = []
        for s, e in ivs[1:]:
            if s <= cur_e + max_gap and (max_len is None or max(e, cur_e) - cur_s <= max_len):
                cur_e = max(cur_e, e)
            else:
                merged.append((cur_s, cur_e))
                cur_s, cur_e = s, e
        merged.append((cur_s, cur_e))
        for s, e in merged:
            while max_len is not None and e - s > max_len:
                out.append(ReadBlock(area, s, max_len))
                s += max_len
            out.append(ReadBlock(area, s, e - s))
    return out


# --------------------------------------------------------------------------- shared config


class PlcConfigBase(DriverConfig):
    """Fields every PLC driver shares (poll, heartbeat)."""

    poll_interval_s: float = Field(0.02, gt=0, le=10, description="background poll period of the poll tags")
    heartbeat: bool = Field(True, description="toggle heartbeat_ctl and watch heartbeat_plc (both tags required)")
    heartbeat_interval_s: float = Field(0.5, gt=0, description="how often linectl toggles heartbeat_ctl")
    heartbeat_timeout_s: float = Field(2.0, gt=0, description="no heartbeat_plc toggle for this long = PLC lost")
    reply_timeout_s: float = Field(0.5, gt=0, le=30, description="bound of one request; a stalled PLC costs no more")

    def tag_specs(self) -> dict[str, Any]:
        """The tag map; each protocol's config declares `tags` with its own spec type."""
        raise NotImplementedError

    @model_validator(mode="after")
    def _hb(self) -> PlcConfigBase:
        if self.heartbeat and self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must be longer than heartbeat_interval_s")
        check_tag_map(self.tag_specs(), self.heartbeat)
        return self


# --------------------------------------------------------------------------- polled PLC runtime


class ConnectionLost(DeviceError):
    """The session is unusable; the supervisor reconnects."""


class PolledPlc(Plc):
    """Connection supervisor, poll loop and heartbeat shared by the Modbus and S7 drivers.

    One session at a time: connect, then poll the poll tags every
    `poll_interval_s` and toggle `heartbeat_ctl` every `heartbeat_interval_s`,
    until a request fails; then close, report DISCONNECTED with the reason
    and reconnect with backoff. The PLC's own heartbeat decides health even
    while requests succeed: a PLC in STOP, or a socket the library still
    believes in, must not look healthy.
    """

    config: PlcConfigBase

    def __init__(self, name: str, config: PlcConfigBase) -> None:
        super().__init__(name, config)
        self._tags: dict[str, Any] = config.tag_specs()
        self._poll_names = [n for n, s in self._tags.items() if polled(n, s)]
        self._latest: dict[str, Any] = {}
        self._latest_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._io = asyncio.Lock()
        self._session_ok = False
        self._broken: asyncio.Event | None = None
        self._broken_reason = ""
        self._hb_value: Any = None
        self._hb_changed_at = 0.0
        self._hb_lost = False
        self._hb_ctl = False
        self._stopping = False
        self.stats = {"reads": 0, "writes": 0, "failures": 0, "sessions": 0}

    # -- abstract protocol part -----------------------------------------------------

    @abc.abstractmethod
    async def _open(self) -> None:
        """Connect the protocol client; raise on failure."""

    @abc.abstractmethod
    async def _close(self) -> None:
        """Close the protocol client; never raises."""

    @abc.abstractmethod
    async def _read(self, names: list[str]) -> dict[str, Any]:
        """Batched read of the named tags. Raise ConnectionLost when the session is unusable, DeviceError else."""

    @abc.abstractmethod
    async def _write(self, name: str, spec: Any, values: list[Any], index: int) -> None:
        """Write elements [index, index+len(values)) in one request and confirm."""

    @abc.abstractmethod
    def _where(self) -> str:
        """host:port or serial port, for messages."""

    # -- Plc interface --------------------------------------------------------------

    @property
    def tag_names(self) -> list[str]:
        return list(self._tags)

    def latest(self) -> dict[str, Any]:
        return dict(self._latest)

    @property
    def latest_age(self) -> float:
        """Seconds since the last successful poll (inf before the first)."""
        return time.monotonic() - self._latest_at if self._latest_at else math.inf

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._stopping = False
            self.set_health(HealthState.DISCONNECTED, "connecting")
            self._task = asyncio.create_task(self._supervise(), name=f"plc:{self.name}")

    async def stop(self) -> None:
        # A flag as well as cancel(): asyncio.wait_for in 3.11 (and client libraries) can swallow a
        # cancellation that races with a completing request; the loops then end on the flag.
        self._stopping = True
        if self._broken is not None:
            self._broken.set()
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        if task is not None and not task.cancelled():
            task.exception()  # retrieved: never "exception was never retrieved"
        await self._close()
        self._session_ok = False
        self.set_health(HealthState.DISCONNECTED, "stopped")

    async def read_tags(self, names: list[str] | None = None) -> dict[str, Any]:
        names = list(self._poll_names if names is None else names)
        unknown = [n for n in names if n not in self._tags]
        if unknown:
            raise TagError(f"{self.name}: no tag {', '.join(unknown)} in the tag map")
        self._require_session()
        try:
            values = await self._read(names)
        except ConnectionLost as exc:
            self._mark_broken(exc.reason)
            raise
        self.stats["reads"] += 1
        self._latest.update(values)
        return values

    async def write_tag(self, name: str, value: Any, index: int | None = None) -> None:
        spec = self._tags.get(name)
        if spec is None:
            raise TagError(f"{self.name}: no tag {name} in the tag map")
        if not spec.writable:
            raise TagError(f"{self.name}: tag {name} is in read-only {spec.describe()}")
        if isinstance(value, (list, tuple)):
            values = list(value)
            if not values:
                raise TagError(f"{self.name}: empty list written to {name}")
        else:
            values = [value]
        start = 0 if index is None else index
        if index is None and spec.count > 1 and len(values) != spec.count:
            raise TagError(f"{self.name}: {name} has {spec.count} elements; give index= to write {len(values)}")
        if start < 0 or start + len(values) > spec.count:
            raise TagError(
                f"{self.name}: elements {start}..{start + len(values) - 1} are outside {name}[0..{spec.count - 1}]"
            )
        values = [spec.check_value(v) for v in values]
        self._require_session()
        try:
            await self._write(name, spec, values, start)
        except ConnectionLost as exc:
            self._mark_broken(exc.reason)
            raise
        self.stats["writes"] += 1
        if polled(name, spec) or name in self._latest:
            cur = self._latest.get(name)
            if spec.count == 1:
                self._latest[name] = values[0]
            elif isinstance(cur, list) and len(cur) == spec.count:
                cur = list(cur)
                cur[start : start + len(values)] = values
                self._latest[name] = cur

    # -- session machinery ----------------------------------------------------------

    def _require_session(self) -> None:
        if not self._session_ok:
            raise DeviceError(f"{self.name}: PLC not connected ({self.health.reason or 'no session'})")

    def _mark_broken(self, reason: str) -> None:
        self.stats["failures"] += 1
        if self._session_ok:
            self._session_ok = False
            self._broken_reason = reason
            if self._broken is not None:
                self._broken.set()

    async def _supervise(self) -> None:
        cfg = self.config
        backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s)
        while not self._stopping:
            try:
                await asyncio.wait_for(self._open(), cfg.connect_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure to connect is a health state, not a crash
                await self._close()
                self.set_health(HealthState.DISCONNECTED, f"cannot connect to {self._where()}: {_why(exc)}")
                await backoff.sleep()
                continue
            self.stats["sessions"] += 1
            self._broken = asyncio.Event()
            self._broken_reason = ""
            self._session_ok = True
            reason = "connection lost"
            try:
                reason = await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                reason = _why(exc)
            finally:
                self._session_ok = False
                await self._close()
            self.set_health(HealthState.DISCONNECTED, reason)
            backoff.reset()
            await backoff.sleep()

    async def _session(self) -> str:
        """Poll + heartbeat until the session breaks; returns why it broke."""
        cfg = self.config
        assert self._broken is not None
        now = time.monotonic()
        self._hb_value = None
        self._hb_changed_at = now
        self._hb_lost = False
        next_hb = now
        first = True
        if self.preamble:
            try:
                await self.write_tags(self.preamble)
            except ConnectionLost:
                return self._broken_reason
            except DeviceError as exc:
                return f"could not write {', '.join(self.preamble)} before the first heartbeat: {exc.reason}"
        while not self._stopping:
            t0 = time.monotonic()
            if cfg.heartbeat and t0 >= next_hb:
                self._hb_ctl = not self._hb_ctl
                try:
                    await self.write_tag("heartbeat_ctl", self._hb_ctl)
                except ConnectionLost:
                    return self._broken_reason
                except DeviceError as exc:
                    self.log.debug("heartbeat_write_failed", reason=exc.reason)
                next_hb = t0 + cfg.heartbeat_interval_s
            if self._poll_names:
                try:
                    await self.read_tags(None)
                except ConnectionLost:
                    return self._broken_reason
                except DeviceError as exc:
                    # The session still stands (an exception reply, a missed reply on a serial line):
                    # report it and go on polling rather than reopen the port.
                    self.set_health(HealthState.DISCONNECTED, exc.reason)
                    if await self._pause(cfg.poll_interval_s):
                        return self._broken_reason
                    continue
                self._latest_at = time.monotonic()
            self._watch_heartbeat(first)
            first = False
            if self._broken.is_set():
                return self._broken_reason
            if await self._pause(cfg.poll_interval_s - (time.monotonic() - t0)):
                return self._broken_reason
        return "stopped"

    async def _pause(self, delay: float) -> bool:
        """Sleep up to `delay`; True when the session broke meanwhile (a failed write from another task)."""
        assert self._broken is not None
        if delay <= 0:
            await asyncio.sleep(0)
            return self._broken.is_set()
        try:
            await asyncio.wait_for(self._broken.wait(), delay)
            return True
        except TimeoutError:
            return False

    def _watch_heartbeat(self, first: bool) -> None:
        cfg = self.config
        now = time.monotonic()
        if cfg.heartbeat and "heartbeat_plc" in self._latest:
            v = self._latest["heartbeat_plc"]
            if first or v != self._hb_value:
                if not first:
                    self._hb_changed_at = now
                    if self._hb_lost:
                        self.log.info("plc_heartbeat_back")
                    self._hb_lost = False
                self._hb_value = v
            if now - self._hb_changed_at > cfg.heartbeat_timeout_s:
                self._hb_lost = True
                self.set_health(HealthState.DISCONNECTED, "PLC heartbeat lost")
                return
            if first:
                # Comms work; the PLC's program has not yet proven it runs.
                self.set_health(HealthState.DEGRADED, "waiting for PLC heartbeat")
                return
            if self.health.state == HealthState.DEGRADED and self.health.reason == "waiting for PLC heartbeat":
                if self._hb_changed_at == now:
                    self.set_health(HealthState.CONNECTED)
                return
        if not self._hb_lost:
            self.set_health(HealthState.CONNECTED)


def _why(exc: BaseException) -> str:
    if isinstance(exc, DeviceError):
        return exc.reason
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text
