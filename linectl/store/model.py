"""Records the store hands out, and its one error type.

Plain frozen dataclasses rather than pydantic models: reads can return
thousands of rows and the records never need validation, only transport.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class StoreError(Exception):
    """The store refused or could not do something; the message says what and where, for an operator."""


class PoolExhausted(StoreError):
    """Fewer provisioned serials than asked for; nothing was allocated."""

    def __init__(self, message: str, available: int) -> None:
        super().__init__(message)
        self.available = available


SERIAL_STATES = ("provisioned", "allocated", "sent", "commissioned", "decommissioned", "voided")


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    event_id: str
    kind: str
    lot: str | None
    created_at: str
    event: Any  # a linectl.events domain event
    forwarded_at: str | None = None
    #: EPCIS rendering stored with the event (outbox.epcis): None = not rendered (older store)
    epcis: str | None = None


@dataclass(frozen=True, slots=True)
class ProvisionResult:
    accepted: int
    duplicates: int
    invalid: int
    problems: list[str]
    #: (0-based index in the input, serial, reason) of refused items, capped; lets the CLI name file lines
    rejected: list[tuple[int, str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SerialRecord:
    gtin: str
    serial: str
    state: str
    lot: str | None
    source: str
    updated_at: str
    sent_at: str | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    lot: str
    gtin: str
    expiry: str
    planned_qty: int
    state: str
    created_at: str
    created_by: str
    started_at: str | None = None
    stopped_at: str | None = None
    closed_at: str | None = None
    challenge: list[dict[str, Any]] = field(default_factory=list)
    #: kinds this batch must pass before production ([] = waived at create; None = created before schema v3)
    challenge_required: list[str] | None = None


#: meta key prefix of a batch's dates besides expiry (JSON {name: YYMMDD}); see Reads.batch_dates
BATCH_DATES_KEY = "batch_dates:"


@dataclass(frozen=True, slots=True)
class Container:
    sscc: str
    level: str
    state: str
    lot: str | None
    gtin: str | None
    updated_at: str


@dataclass(frozen=True, slots=True)
class AuditCheck:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str = ""


def tally_name(kind: str, lot: str, reason: str | None = None) -> str:
    """Name of a per-batch count in table counters (written by the store ops, read by Reader.lot_tallies)."""
    return f"{kind}:{lot}" if reason is None else f"{kind}:{reason}:{lot}"


@dataclass(frozen=True, slots=True)
class LotTallies:
    """Counts the writer keeps per batch in the transaction of each event (table counters).

    A batch report needs them long after retention has purged the forwarded
    outbox rows the events came in, so they are kept where nothing is purged.
    """

    rejects: dict[str, int]  # serials decommissioned with the batch, by reject reason
    returned: int  # serials returned to the pool (at close, policy "return")


@dataclass(frozen=True, slots=True)
class BatchTransition:
    """One state change of a batch, as the audit trail keeps it (never purged)."""

    time: str
    state: str
    previous: str | None
    by: str
    reason: str


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    ts: str
    actor: str
    origin: str
    action: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str
