"""PLC epochs, units of unknown fate and batch PLC counters: writer operations and reads.

Kept apart from the event registry (ops.py) because none of this is an event
that leaves the plant: it is the line's own memory of what the PLC said, and
of which units it can no longer vouch for. A unit of unknown fate stays
`commissioned` in the serial registry (its commissioning event is already
upstream, and the pack may well be on the market); the open record here is
what keeps the batch report from balancing until an operator decides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from linectl.store.audit import change
from linectl.store.model import StoreError
from linectl.store.writer import Tx

FATE_UNKNOWN = "fate_unknown"
RESOLVED = "resolved"
OUTCOMES = ("in_bin", "passed")


@dataclass(frozen=True)
class PlcEpochState:
    plc: str
    epoch: int
    epoch_tag: int | None
    trigger_count: int | None
    gated: int | None
    updated_at: str
    carried: int | None = None  # of gated, units of the previous epoch counted after a counter reset
    foreign_ring: str | None = None  # JSON {"slot": seq}: reject-ring values that are units of an earlier epoch

    def foreign(self) -> dict[int, int]:
        """Reject-ring slot -> unit number of an earlier epoch it still holds."""
        if not self.foreign_ring:
            return {}
        return {int(k): int(v) for k, v in json.loads(self.foreign_ring).items()}


@dataclass(frozen=True)
class UnitFate:
    gtin: str
    serial: str
    lot: str | None
    station: str | None
    plc: str | None
    epoch: int | None
    seq: int | None
    state: str
    cause: str
    outcome: str | None
    resolved_by: str | None
    created_at: str
    resolved_at: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- writer ops


def op_plc_state(
    tx: Tx,
    plc: str,
    epoch: int,
    epoch_tag: int | None,
    trigger_count: int | None,
    gated: int | None,
    carried: int = 0,
    foreign: dict[int, int] | None = None,
) -> None:
    ring = json.dumps({str(k): v for k, v in sorted((foreign or {}).items())})
    tx.cur.execute(
        "INSERT INTO plc_epochs(plc, epoch, epoch_tag, trigger_count, gated, updated_at, carried, foreign_ring) "
        "VALUES (?,?,?,?,?,?,?,?) "
        "ON CONFLICT(plc) DO UPDATE SET epoch=excluded.epoch, epoch_tag=excluded.epoch_tag, "
        "trigger_count=excluded.trigger_count, gated=excluded.gated, updated_at=excluded.updated_at, "
        "carried=excluded.carried, foreign_ring=excluded.foreign_ring",
        (plc, epoch, epoch_tag, trigger_count, gated, tx.ts, carried, ring),
    )


def op_fate_unknown(tx: Tx, rows: list[tuple[str, str, str | None, str, str, int, int | None, str]]) -> int:
    """(gtin, serial, lot, station, plc, epoch, seq, cause) -> open records; a serial already recorded is left alone."""
    n = 0
    for gtin, serial, lot, station, plc, epoch, seq, cause in rows:
        st = tx.cur.execute("SELECT state FROM serials WHERE gtin=? AND serial=?", (gtin, serial)).fetchone()
        if st is None or st[0] != "commissioned":
            continue  # only a commissioned unit can be on the market; anything else was never let out
        cur = tx.cur.execute(
            "INSERT OR IGNORE INTO unit_fates(gtin, serial, lot, station, plc, epoch, seq, state, cause, created_at) "
            "VALUES (?,?,?,?,?,?,?,?,?,?)",
            (gtin, serial, lot, station, plc, epoch, seq, FATE_UNKNOWN, cause[:500], tx.ts),
        )
        n += cur.rowcount
    if n:
        tx.audit("system", "engine", "units_fate_unknown", {"count": n, "serials": [r[1] for r in rows][:50], "cause": rows[0][7][:200]})
    return n


def op_resolve_fates(tx: Tx, gtin: str, serials: list[str], outcome: str, actor: str, origin: str, reason: str | None = None) -> list[str]:
    """Close open fate records; refuses (naming them) serials that have none open. Returns the serials closed."""
    if outcome not in OUTCOMES:
        raise StoreError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
    missing = []
    for s in serials:
        r = tx.cur.execute("SELECT state FROM unit_fates WHERE gtin=? AND serial=?", (gtin, s)).fetchone()
        if r is None or r[0] != FATE_UNKNOWN:
            missing.append(s)
    if missing:
        raise StoreError(f"no open fate_unknown record for serial(s) {', '.join(missing[:10])}" + (" …" if len(missing) > 10 else ""))
    for s in serials:
        tx.cur.execute(
            "UPDATE unit_fates SET state=?, outcome=?, resolved_by=?, resolved_at=? WHERE gtin=? AND serial=?",
            (RESOLVED, outcome, f"{actor}@{origin}", tx.ts, gtin, s),
        )
    tx.audit(actor, origin, "units_reconciled", {
        "gtin": gtin, "outcome": outcome, "serials": serials[:200], "count": len(serials),
        **change({"fate": FATE_UNKNOWN}, {"fate": RESOLVED, "outcome": outcome}, reason),
    })
    return serials


def op_plc_counters(tx: Tx, lot: str, plc: str, epoch: int, point: str, values: dict[str, int | None]) -> None:
    tx.cur.execute(
        "INSERT INTO plc_counters(lot, plc, epoch, point, trigger_count, pass_total, reject_total, gate_reject_total, ts) "
        "VALUES (?,?,?,?,?,?,?,?,?)",
        (lot, plc, epoch, point, values.get("trigger_count"), values.get("pass_total"), values.get("reject_total"), values.get("gate_reject_total"), tx.ts),
    )


def op_count_packs(tx: Tx, lot: str, kind: str, n: int) -> None:
    """Packs of a batch that carry no serial of it (blank packs): counted, since no serial event records them."""
    if kind not in PACK_KINDS:
        raise StoreError(f"unknown pack kind {kind!r}")
    tx.cur.execute(
        "INSERT INTO counters(name, value, updated_at) VALUES (?,?,?) "
        "ON CONFLICT(name) DO UPDATE SET value=value+excluded.value, updated_at=excluded.updated_at",
        (f"packs:{kind}:{lot}", int(n), tx.ts),
    )


# --------------------------------------------------------------------------- reads


PACK_KINDS = ("blank",)


def read_pack_counts(reader: Any, lot: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for kind in PACK_KINDS:
        rows = reader.q("SELECT value FROM counters WHERE name=?", (f"packs:{kind}:{lot}",))
        out[kind] = int(rows[0][0]) if rows else 0
    return out


_FATE_COLS = "gtin, serial, lot, station, plc, epoch, seq, state, cause, outcome, resolved_by, created_at, resolved_at"


def read_plc_state(reader: Any, plc: str) -> PlcEpochState | None:
    rows = reader.q("SELECT plc, epoch, epoch_tag, trigger_count, gated, updated_at, carried, foreign_ring FROM plc_epochs WHERE plc=?", (plc,))
    return PlcEpochState(*rows[0]) if rows else None


def read_fates(reader: Any, lot: str | None = None, *, open_only: bool = False) -> list[UnitFate]:
    sql = f"SELECT {_FATE_COLS} FROM unit_fates"
    where: list[str] = []
    params: list[Any] = []
    if lot is not None:
        where.append("lot=?")
        params.append(lot)
    if open_only:
        where.append("state=?")
        params.append(FATE_UNKNOWN)
    if where:
        sql += " WHERE " + " AND ".join(where)
    return [UnitFate(*r) for r in reader.q(sql + " ORDER BY id", tuple(params))]


def read_fate(reader: Any, gtin: str, serial: str) -> UnitFate | None:
    rows = reader.q(f"SELECT {_FATE_COLS} FROM unit_fates WHERE gtin=? AND serial=?", (gtin, serial))
    return UnitFate(*rows[0]) if rows else None


@dataclass(frozen=True)
class UnitCopy:
    """A rejected unit that carried a copy of serial (gtin, serial) instead of its own (carrier) serial."""

    gtin: str
    serial: str
    carrier_gtin: str
    carrier_serial: str
    lot: str | None
    station: str | None
    unit_seq: int | None
    reason: str
    created_at: str


def read_copies(reader: Any, gtin: str, serial: str) -> list[UnitCopy]:
    rows = reader.q(
        "SELECT gtin, serial, carrier_gtin, carrier_serial, lot, station, unit_seq, reason, created_at FROM unit_copies "
        "WHERE gtin=? AND serial=? ORDER BY id",
        (gtin, serial),
    )
    return [UnitCopy(*r) for r in rows]


def read_plc_counters(reader: Any, lot: str) -> list[dict[str, Any]]:
    rows = reader.q(
        "SELECT plc, epoch, point, trigger_count, pass_total, reject_total, gate_reject_total, ts FROM plc_counters WHERE lot=? ORDER BY id",
        (lot,),
    )
    keys = ("plc", "epoch", "point", "trigger_count", "pass_total", "reject_total", "gate_reject_total", "ts")
    return [dict(zip(keys, r)) for r in rows]
