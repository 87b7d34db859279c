"""Typed domain events: what happened on the line, in the line's own words.

Stations emit these; the store writer commits them (and applies their effect
on the serial registry in the same transaction); the forwarder maps the
EPCIS-relevant ones to EPCIS 2.0. The `event_id` is fixed when the event is
created, so a re-sent event is recognisably the same event upstream.
"""

from __future__ import annotations

import enum
import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


def new_event_id() -> str:
    """A time-ordered UUID (RFC 9562 v7) as a URN: globally unique like v4, and appended in index order,
    which keeps the outbox's unique index on event_id from costing a random page write per event."""
    ms = time.time_ns() // 1_000_000
    r = int.from_bytes(secrets.token_bytes(10), "big")
    v = (ms << 80) | (0x7 << 76) | (((r >> 64) & 0xFFF) << 64) | (0b10 << 62) | (r & ((1 << 62) - 1))
    return f"urn:uuid:{uuid.UUID(int=v)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class RejectReason(str, enum.Enum):
    """Why a unit was rejected or decommissioned. Values are stable: they appear in reports and MQTT."""

    NO_READ = "no_read"
    WRONG_CONTENT = "wrong_content"
    NOT_GS1 = "not_gs1"
    DUPLICATE = "duplicate"
    LOW_GRADE = "low_grade"
    DATA_MISMATCH = "data_mismatch"  # lot or expiry differ from the batch
    MISSING_UNIT = "missing_unit"  # printed, never seen by the reader
    UNEXPECTED_UNIT = "unexpected_unit"  # seen by the reader, not printed by us (tracking out of sync)
    PRINT_FAILED = "print_failed"  # printer NAK / fault / timeout for this job
    PLC_FAILSAFE = "plc_failsafe"  # PLC rejected because no verdict arrived in time
    CRASH_RECOVERY = "crash_recovery"  # in flight when the daemon stopped; never commissioned blindly
    CHALLENGE = "challenge"  # deliberately bad challenge unit
    DAMAGED = "damaged"  # rework: destroyed by an operator
    LINE_STOPPED = "line_stopped"  # sent to printer but the line stopped before it was printed
    NOT_COMMISSIONED = "not_commissioned"  # verify station: a serial of this line that is not commissioned
    DECOMMISSIONED = "decommissioned"  # verify station: a serial decommissioned since it was commissioned
    # RFID label printers (print_verify, product carrier rfid/both): the label's tag is not the serial's EPC
    RFID_VOID = "rfid_void"  # the tag failed to encode: the printer printed the label VOID
    RFID_MISMATCH = "rfid_mismatch"  # the tag reads back another EPC (or EPC length) than the one sent
    RFID_NO_ANSWER = "rfid_no_answer"  # no verification of the tag came from the printer before the unit was decided


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: str = Field(default_factory=new_event_id)
    event_time: datetime = Field(default_factory=utcnow)
    lot: str | None = None
    station: str | None = None

    #: whether the forwarder maps this event to EPCIS (the rest go to alarms/state topics)
    epcis: ClassVar[bool] = False


class UnitCommissioned(Event):
    """A printed code was read back, verified, and the unit is released to the market."""

    kind: Literal["unit_commissioned"] = "unit_commissioned"
    epcis: ClassVar[bool] = True
    gtin: str
    serial: str
    expiry: str | None = None  # YYMMDD as printed
    #: the batch's other dates by name (production_date, packaging_date, best_before, sell_by): YYMMDD; EPCIS ILMD
    dates: dict[str, str] | None = None
    seq: int | None = None  # unit sequence (trigger count) on the line
    grade: float | None = None


class UnitDecommissioned(Event):
    """A serial that was sent to a printer (or commissioned) is taken out of circulation for ever."""

    kind: Literal["unit_decommissioned"] = "unit_decommissioned"
    epcis: ClassVar[bool] = True
    gtin: str
    serial: str
    reason: RejectReason
    detail: str = ""
    destroyed: bool = False
    seq: int | None = None
    actor: str | None = None
    #: the code read on the unit when it carried another serial than its own (a printed copy of that serial, e.g.
    #: a printer duplicate): the bin then holds a pack with that serial's code although that serial's own unit may
    #: have passed (store table unit_copies; reconcile_units counts them)
    read_gtin: str | None = None
    read_serial: str | None = None
    #: the EPC (hex, without the PC word) an RFID label printer read back from the unit's tag when it was not the
    #: serial's own (reason rfid_mismatch); when it decodes to an SGTIN, read_gtin/read_serial name that serial too
    read_epc: str | None = None


class SerialsVoided(Event):
    """Serials allocated to a batch but never printed, voided at batch close (policy `void`)."""

    kind: Literal["serials_voided"] = "serials_voided"
    epcis: ClassVar[bool] = True
    gtin: str
    serials: list[str]


class SerialsReturned(Event):
    """Serials allocated to a batch but never printed, returned to the pool at batch close (policy `return`)."""

    kind: Literal["serials_returned"] = "serials_returned"
    gtin: str
    serials: list[str]


class UnitInspected(Event):
    """QA sample or rework check: the unit was observed, not changed."""

    kind: Literal["unit_inspected"] = "unit_inspected"
    epcis: ClassVar[bool] = True
    gtin: str
    serial: str
    biz_step: Literal["sampling", "inspecting"] = "inspecting"
    actor: str | None = None


class ReadRejected(Event):
    """A verify station read a unit and rejected it: what was read (if anything) and why.

    A record, never an EPCIS event: the code may name a serial that was never commissioned (or none at all),
    and an EPCIS OBSERVE of it would tell upstream of a unit that does not exist."""

    kind: Literal["read_rejected"] = "read_rejected"
    reason: RejectReason
    detail: str = ""
    seq: int | None = None  # unit sequence (trigger count) at the station's PLC, or the read's own count
    gtin: str | None = None  # as read, when the code was a GS1 unit identity
    serial: str | None = None


class ContainerCommissioned(Event):
    """A case or pallet SSCC was labelled and its label verified."""

    kind: Literal["container_commissioned"] = "container_commissioned"
    epcis: ClassVar[bool] = True
    sscc: str
    level: Literal["case", "pallet"]
    gtin: str | None = None  # product inside, for reports


class ContainerDecommissioned(Event):
    """An SSCC voided: label bad, case rejected, crash between label and commit, or dissolved."""

    kind: Literal["container_decommissioned"] = "container_decommissioned"
    epcis: ClassVar[bool] = True
    sscc: str
    reason: str
    commissioned: bool = False  # True when the SSCC had been commissioned (then EPCIS DELETE)
    actor: str | None = None


class ChildRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    gtin: str | None = None
    serial: str | None = None
    sscc: str | None = None


class Packed(Event):
    """Children aggregated into a parent SSCC (EPCIS AggregationEvent ADD, bizStep packing)."""

    kind: Literal["packed"] = "packed"
    epcis: ClassVar[bool] = True
    parent: str  # SSCC
    children: list[ChildRef]
    actor: str | None = None


class Unpacked(Event):
    """Children removed from a parent (EPCIS AggregationEvent DELETE, bizStep unpacking)."""

    kind: Literal["unpacked"] = "unpacked"
    epcis: ClassVar[bool] = True
    parent: str
    children: list[ChildRef]  # empty = the whole content (dissolve)
    actor: str | None = None


class BatchState(str, enum.Enum):
    CREATED = "created"
    CHALLENGE = "challenge"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CLOSED = "closed"


class BatchStateChanged(Event):
    kind: Literal["batch_state"] = "batch_state"
    gtin: str
    state: BatchState
    previous: BatchState | None = None
    actor: str = "system"  # who: operator id, "plc:<name>", "mqtt:<client>", "cli:<user>"
    reason: str = ""


class ChallengeResult(Event):
    kind: Literal["challenge_result"] = "challenge_result"
    challenge: str  # no_code, wrong_code, duplicate, not_gs1, low_grade
    rejected: bool
    reason_seen: str | None = None
    seq: int | None = None


class Severity(str, enum.Enum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"  # stops the line


class AlarmRaised(Event):
    kind: Literal["alarm"] = "alarm"
    code: str  # stable machine code, e.g. "consecutive_rejects", "reject_not_confirmed", "pool_low"
    severity: Severity
    message: str
    alarm_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])


class AlarmAcknowledged(Event):
    kind: Literal["alarm_ack"] = "alarm_ack"
    alarm_id: str
    actor: str


DomainEvent = Annotated[
    (
        UnitCommissioned
        | UnitDecommissioned
        | SerialsVoided
        | SerialsReturned
        | UnitInspected
        | ReadRejected
        | ContainerCommissioned
        | ContainerDecommissioned
        | Packed
        | Unpacked
        | BatchStateChanged
        | ChallengeResult
        | AlarmRaised
        | AlarmAcknowledged
    ),
    Field(discriminator="kind"),
]

#: kinds the forwarder maps to EPCIS (Event.epcis)
EVENT_KINDS_EPCIS: frozenset[str] = frozenset(
    cls.model_fields["kind"].default
    for cls in (UnitCommissioned, UnitDecommissioned, SerialsVoided, UnitInspected, ContainerCommissioned,
                ContainerDecommissioned, Packed, Unpacked)
    if cls.epcis
)

EVENT_ADAPTER: TypeAdapter[DomainEvent] = TypeAdapter(DomainEvent)


def event_from_json(data: str | bytes) -> DomainEvent:
    return EVENT_ADAPTER.validate_json(data)
