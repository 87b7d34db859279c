"""What every driver shares: its config base, the registry, health, backoff and the role interfaces.

A driver knows nothing of MQTT, the store or the engine. The engine talks to a
device only through one of the role interfaces below (Printer, CodeReader,
Plc, RfidReader), so a new vendor protocol is a new module that registers itself, not a
change to the engine.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field

log = structlog.get_logger("linectl.drivers")


# --------------------------------------------------------------------------- config


class DriverConfig(BaseModel):
    """Base of every device config. Subclasses add `driver: Literal[...]` plus their own fields.

    Unknown keys are refused so that a typo in a line YAML is an error at
    check-config time, not a silently ignored setting on the line.
    """

    model_config = ConfigDict(extra="forbid")

    driver: str
    description: str = ""
    connect_timeout_s: float = Field(3.0, gt=0)
    reply_timeout_s: float = Field(2.0, gt=0)
    backoff_initial_s: float = Field(0.2, gt=0)
    backoff_max_s: float = Field(10.0, gt=0)


# --------------------------------------------------------------------------- registry

#: driver key -> driver class. Filled by @register_driver at import of each driver module.
DRIVERS: dict[str, type[Driver]] = {}


def register_driver(cls: type[Driver]) -> type[Driver]:
    """Class decorator: makes a driver selectable by its config's `driver:` literal."""
    key_field = cls.config_class.model_fields["driver"]
    args = getattr(key_field.annotation, "__args__", ())
    if not args:
        raise TypeError(f"{cls.__name__}.config_class.driver must be a Literal")
    for key in args:
        if key in DRIVERS and DRIVERS[key] is not cls:
            raise TypeError(f"driver key {key!r} registered twice")
        DRIVERS[key] = cls
    return cls


# --------------------------------------------------------------------------- health


class HealthState(str, enum.Enum):
    CONNECTED = "connected"
    DEGRADED = "degraded"
    DISCONNECTED = "disconnected"


@dataclass(frozen=True)
class Health:
    state: HealthState
    reason: str = ""
    since: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "reason": self.reason, "since": self.since}


class DeviceError(Exception):
    """A device answered with a fault, a NAK, garbage, or not at all. `reason` is for the operator."""

    def __init__(self, reason: str, *, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Backoff:
    """Capped exponential backoff with full jitter, so a line of devices does not reconnect in lockstep."""

    def __init__(self, initial: float = 0.2, maximum: float = 10.0, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        cap = min(self.maximum, self.initial * (2 ** self.attempt))
        self.attempt += 1
        return self._rng.uniform(cap / 2, cap)

    def reset(self) -> None:
        self.attempt = 0

    async def sleep(self) -> None:
        await asyncio.sleep(self.next_delay())


# --------------------------------------------------------------------------- base driver


class Driver(abc.ABC):
    """One device. Owns its connection, reconnects by itself and reports health changes.

    Health transitions are logged once per change (not per retry) so a device
    that is away for a night leaves a handful of log lines, not thousands.
    """

    config_class: ClassVar[type[DriverConfig]]
    role: ClassVar[Literal["printer", "reader", "plc", "rfid_reader"]]

    def __init__(self, name: str, config: DriverConfig) -> None:
        self.name = name
        self.config = config
        self._health = Health(HealthState.DISCONNECTED, "not started")
        self._health_listeners: list[Any] = []
        self.log = log.bind(device=name, driver=config.driver)

    @property
    def health(self) -> Health:
        return self._health

    def on_health(self, callback: Any) -> None:
        """callback(driver, Health) is called on every state change."""
        self._health_listeners.append(callback)

    def set_health(self, state: HealthState, reason: str = "") -> None:
        if state == self._health.state and reason == self._health.reason:
            return
        old = self._health
        self._health = Health(state, reason)
        self.log.info("device_health", state=state.value, was=old.state.value, reason=reason)
        for cb in list(self._health_listeners):
            cb(self, self._health)

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin connecting in the background; returns at once. The driver keeps reconnecting until stop()."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Close the connection and cancel background tasks."""

    async def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._health.state == HealthState.CONNECTED:
                return True
            await asyncio.sleep(0.02)
        return self._health.state == HealthState.CONNECTED


# --------------------------------------------------------------------------- role: printer


@dataclass(frozen=True)
class PrintJob:
    """One code to print. `seq` is the engine's unit sequence number for tracking."""

    seq: int
    element_string: str  # GS1 element string, GS (0x1d) separated, no leading FNC1
    hri: str  # "(01)...(21)..."
    fields: dict[str, str] = field(default_factory=dict)  # extra variable fields (lot, expiry text, product name...)
    #: EPC to encode into the label's RFID tag (EPC bank, hex, whole 16-bit words), for RFID label printers;
    #: None = no tag to encode. Opaque to the driver: the encoding (SGTIN-96/198, SSCC-96) is decided upstream.
    epc_hex: str | None = None


@dataclass(frozen=True)
class PrintConfirm:
    """The printer's own statement that it printed job `seq` (print-complete acknowledgement)."""

    seq: int
    printed_at: float
    #: the printer's product (trigger) counter when it printed this job; equals the PLC's trigger count
    #: for that unit, which is how a printed code is tracked to the read and the gate
    product_count: int | None = None
    #: RFID label printers only (job with `epc_hex`): the EPC the printer read back from the label's tag
    #: after writing it, None when nothing readable came back
    epc_read: str | None = None
    #: RFID outcome, None for a job without a tag: "ok" (read back equals the EPC sent) is the only good one;
    #: "void" (encoding failed, the label came out VOID), "mismatch" (the tag holds another EPC or length) and
    #: "no_answer" (the printer sent no verification for the label in time) are rejects, reason in `rfid_reason`
    rfid_status: Literal["ok", "void", "mismatch", "no_answer"] | None = None
    rfid_reason: str = ""
    #: VOID labels the printer produced for this job (a failed tag prints VOID; with ^RS retries an "ok" job
    #: may follow some): physical labels that carry no valid code and must not pass
    rfid_void_labels: int = 0


class Printer(Driver):
    """A printer takes jobs ahead of the product trigger and confirms each one it printed."""

    role = "printer"

    @abc.abstractmethod
    async def send(self, job: PrintJob) -> None:
        """Queue one job on the printer. Returns once the printer ACKed it; raises DeviceError on NAK/timeout/fault."""

    @abc.abstractmethod
    def confirmations(self) -> AsyncIterator[PrintConfirm]:
        """Print-complete acknowledgements, in print order."""

    @abc.abstractmethod
    async def status(self) -> dict[str, Any]:
        """Query the printer's status (faults, buffer level). Raises DeviceError when it does not answer."""

    async def clear(self) -> None:
        """Drop every job queued on the printer (batch stop). Default: nothing to clear."""


# --------------------------------------------------------------------------- role: reader


@dataclass(frozen=True)
class Decoded:
    """One decoded symbol as reported by the device."""

    data: str  # decoded content; GS1 element string with GS separators when GS1
    symbology: str | None  # symbology identifier such as "]d2", "]d1", None if the device did not send one
    grade: float | None = None  # ISO 15415 overall grade 0.0-4.0 when known (estimated for local decoding)
    grade_detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Read:
    """One read cycle: zero codes (no read), one code, or several (case camera)."""

    seq: int | None  # trigger/sequence id reported by the device, or None when it has none
    codes: tuple[Decoded, ...]
    received_at: float  # time.monotonic() when the driver received it
    raw: bytes = b""


class CodeReader(Driver):
    """Smart readers, cameras with local decoding, and scanners all yield Read objects."""

    role = "reader"

    @abc.abstractmethod
    def reads(self) -> AsyncIterator[Read]:
        """Every read cycle, in arrival order. Garbage from the device is reported via health, not yielded as a read."""

    async def trigger(self, seq: int | None = None) -> None:
        """Software trigger. Default: not supported."""
        raise DeviceError(f"{self.config.driver} does not support a software trigger")


# --------------------------------------------------------------------------- role: PLC


class TagError(DeviceError):
    pass


class Plc(Driver):
    """Named tags from the YAML tag map; reads are batched per poll cycle, writes are confirmed."""

    role = "plc"

    def __init__(self, name: str, config: DriverConfig) -> None:
        super().__init__(name, config)
        self.preamble: dict[str, Any] = {}

    def set_preamble(self, values: dict[str, Any]) -> None:
        """Tag values written at the start of every session, before the first heartbeat_ctl toggle.

        A controller restarted within the PLC's heartbeat timeout would otherwise keep the dead one's
        line_mode/line_running alive with its first toggle: the PLC would go on feeding product (or challenge
        packs) that nobody commanded. With a preamble the PLC sees this controller alive only once it holds
        what this controller wants; a preamble that cannot be written breaks the session (no heartbeat, so the
        PLC's own watchdog stops the line).
        """
        self.preamble = dict(values)

    @abc.abstractmethod
    async def read_tags(self, names: list[str] | None = None) -> dict[str, Any]:
        """Read the named tags (all poll tags when None) in as few requests as possible."""

    @abc.abstractmethod
    async def write_tag(self, name: str, value: Any, index: int | None = None) -> None:
        """Write and confirm (read back or protocol acknowledgement). Raises DeviceError.

        `index` is an element offset into an array tag; a list value writes
        consecutive elements in one protocol request (atomic on the PLC side).
        """

    async def write_tags(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            await self.write_tag(k, v)

    @property
    @abc.abstractmethod
    def tag_names(self) -> list[str]:
        ...

    def latest(self) -> dict[str, Any]:
        """The last polled values (empty before the first poll)."""
        return {}


# --------------------------------------------------------------------------- role: RFID reader


@dataclass(frozen=True)
class TagRead:
    """One RAIN RFID tag as the reader reported it, or merged over a window (counts summed, strongest read kept).

    `epc_hex` is the EPC bank content as sent (lower-case hex, whole bytes; `epc_bits` says how many bits count:
    96 for SGTIN-96 / SSCC-96, the PC word's length for longer EPCs such as SGTIN-198 in 208 bits). Decoding it
    into a GS1 key is not the driver's business. Timestamps are the reader's UTC clock in microseconds.
    """

    epc_hex: str
    epc_bits: int
    antenna: int | None  # antenna of the strongest read
    peak_rssi: int | None  # dBm
    first_seen_us: int | None
    last_seen_us: int | None
    seen_count: int


@dataclass(frozen=True)
class RfidWindow:
    """The tags of one inventory window (e.g. a case passing a tunnel), de-duplicated by EPC.

    `complete` is True when the reader confirmed the end of the inventory (End_Of_ROSpec), so every report of
    the window arrived before it was closed; False when the driver closed it on a timeout instead.
    """

    started_at: float  # time.time() when the inventory was started
    ended_at: float  # time.time() when the window was decided
    tags: tuple[TagRead, ...]  # in order of first report
    reports: int  # TagReportData received in the window (one tag can be reported several times)
    complete: bool

    @property
    def epcs(self) -> frozenset[str]:
        return frozenset(t.epc_hex for t in self.tags)


class RfidReader(Driver):
    """A RAIN RFID reader: inventory windows started and stopped by the line, or a continuous stream of tags."""

    role = "rfid_reader"

    @abc.abstractmethod
    async def start_window(self) -> None:
        """Start an inventory now. Raises DeviceError when not connected or a window is already open."""

    @abc.abstractmethod
    async def end_window(self) -> RfidWindow:
        """Stop the inventory and return the window's tags once the reader has reported all of them.

        Raises DeviceError when no window is open or the connection was lost during it (a window with a gap
        is never returned as if it were whole).
        """

    @abc.abstractmethod
    async def read_window(self, duration_s: float | None = None) -> RfidWindow:
        """start_window(), wait `duration_s` (default: the configured window), end_window()."""

    @abc.abstractmethod
    def tags(self) -> AsyncIterator[TagRead]:
        """Continuous mode: every tag report as it arrives (bounded; the oldest are dropped and counted when not consumed)."""
