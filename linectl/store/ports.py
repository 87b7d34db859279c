"""What the engine may ask of the store: the reads and writes its stations and commands use, as protocols.

The engine depends on these, not on the SQLite class: every SQL statement stays under linectl/store/, a
reader of the engine sees exactly which facts it reads and which it changes, and a fake or another store
implementation is checked against them by the type checker. `linectl.store.Store` is the one implementation
(`_store_conforms` below makes mypy check that it does).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Connection

from linectl.store import containers, plc_records
from linectl.store.model import Batch, BatchTransition, Container, LotTallies, OutboxRow, ProvisionResult, SerialRecord

if TYPE_CHECKING:
    pass


class StoreReads(Protocol):
    """Facts the engine reads (synchronous reads on the read pool: one indexed lookup each, or off the per-unit path)."""

    def serial(self, gtin: str, serial: str) -> SerialRecord | None: ...

    def batch(self, lot: str) -> Batch | None: ...

    def batches(self, state: str | None = None) -> list[Batch]: ...

    def batch_dates(self, lot: str) -> dict[str, str]:
        """The batch's dates besides expiry as created (production_date, packaging_date, best_before, sell_by)."""

    def batch_config(self, lot: str) -> dict[str, Any] | None:
        """The config hashes recorded with the batch at its creation (linectl.config_hash); None for a batch from before."""

    def unit_fates(self, lot: str | None = None, *, open_only: bool = False) -> list[plc_records.UnitFate]: ...

    def rejected_copies(self, gtin: str, serial: str) -> list[plc_records.UnitCopy]:
        """Rejected units that carried a copy of this serial's code (printer duplicates): packs with its code in the bin."""

    def in_flight(self, lot: str | None = None) -> list[tuple[str, str, str]]: ...

    def lot_counts(self, lot: str) -> dict[str, int]: ...

    def available(self, gtin: str) -> int: ...

    def plc_state(self, plc: str) -> plc_records.PlcEpochState | None: ...

    def outbox(self, after_seq: int = 0, limit: int = 1000, only_unforwarded: bool = True) -> list[OutboxRow]: ...

    def last_seq(self) -> int: ...

    def label_facts(self, sscc: str) -> containers.LabelFacts:
        """What a case/pallet label shows as the record says now (a reprint rebuilds the label from this)."""

    def label_intents(self, intent_action: str, recovery_action: str) -> containers.LabelIntents:
        """Label intents with no container row since the last recovery watermark (see engine recover_containers)."""

    def hierarchy_problems(self) -> list[str]:
        """Every violation of the aggregation invariants, in words; [] when consistent."""

    def command_reply(self, command_id: str) -> dict[str, Any] | None:
        """The reply of a command already executed with this command_id ({ok, command_id, command, result}), or None."""

    def container(self, sscc: str) -> Container | None: ...

    def read_snapshot(self) -> AbstractContextManager[Connection]:
        """One read transaction on the read pool (one WAL snapshot), for readers that query in SQL (linectl.store.trace)."""

    def pack_counts(self, lot: str) -> dict[str, int]: ...

    def unit_fate(self, gtin: str, serial: str) -> plc_records.UnitFate | None: ...

    def lot_tallies(self, lot: str) -> LotTallies | None: ...

    def batch_history(self, lot: str) -> list[BatchTransition]: ...

    def plc_counters(self, lot: str) -> list[dict[str, Any]]: ...

    def events_of_lot(self, lot: str, after_seq: int = 0, limit: int = 10000) -> list[OutboxRow]: ...

    def allocated(self, lot: str) -> list[tuple[str, str]]: ...


class StoreWrites(Protocol):
    """Changes the engine makes: each one a writer operation (one transaction), awaited until durable."""

    async def append(self, *events: Any) -> list[int]:
        """Store events in the outbox and apply them to the registry, atomically; returns their outbox seqs."""

    async def audit(
        self, actor: str, origin: str, action: str, detail: dict[str, Any] | None = None, *, command_id: str | None = None, reply: Any = None,
        signature: Any = None,
    ) -> int:
        """Append a hash-chained audit record; returns its seq. `signature` (identity.SignatureSpec): its e-signature, same transaction."""

    async def allocate(self, gtin: str, lot: str, n: int, scheme: Any) -> list[str]:
        """Take n never-used serials for the lot: pool (provisioned ones), random or sequential per the product's scheme."""

    async def mark_sent(self, gtin: str, lot: str, serials: Sequence[str]) -> None:
        """Record serials as sent, durably, before the printer gets them: a crash can then never lose track of one."""

    async def provision(self, gtin: str, serials: Iterable[str], source: str, *, actor: str = "system") -> ProvisionResult:
        """Add serials to the pool. Invalid and duplicate serials are counted and named, never stored."""

    async def create_batch(self, lot: str, gtin: str, expiry: str, planned_qty: int, actor: str, origin: str | None = None,
                           challenge_required: list[str] | None = None, dates: dict[str, str] | None = None,
                           audit_extra: dict[str, Any] | None = None) -> Batch: ...

    async def close_batch(
        self, lot: str, policy: str, actor: str, *, extra_unused: Iterable[str] = (), stop_reason: str | None = None
    ) -> dict[str, Any]:
        """Close a batch atomically (unused serials returned/voided, stray `sent` ones decommissioned); see ops.op_close_batch."""

    async def mark_fate_unknown(self, rows: list[tuple[str, str, str | None, str, str, int, int | None, str]]) -> int:
        """Open fate_unknown records for commissioned units whose fate at the gate is not proven; returns how many."""

    async def resolve_fates(self, gtin: str, serials: Sequence[str], outcome: str, actor: str, origin: str,
                            reason: str | None = None) -> list[str]: ...

    async def save_plc_state(
        self,
        plc: str,
        epoch: int,
        epoch_tag: int | None,
        trigger_count: int | None,
        gated: int | None,
        carried: int = 0,
        foreign: dict[int, int] | None = None,
    ) -> None:
        """The PLC epoch and counters last seen, so a restarted daemon can tell whether the PLC restarted meanwhile."""

    async def save_plc_counters(self, lot: str, plc: str, epoch: int, point: str, values: dict[str, int | None]) -> None: ...

    async def count_packs(self, lot: str, kind: str, n: int = 1) -> None:
        """Count packs of the batch that carry none of its serials (kind 'blank': no code printed / not ours)."""

    async def next_sscc_refs(self, company_prefix: str, extension: int, n: int) -> list[int]: ...


class EngineStore(StoreReads, StoreWrites, Protocol):
    """The store as the engine sees it."""


if TYPE_CHECKING:
    from linectl.store.store import Store

    def _store_conforms(store: Store) -> EngineStore:
        return store  # mypy: Store implements every read and write the engine uses, with the same signatures
