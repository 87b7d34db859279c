"""Read side: pooled connections of their own, read-only, each call one WAL snapshot.

In WAL mode readers never wait for the writer and the writer never waits for
readers, so the forwarder, the HMI and the CLI can read while the line runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, select
from sqlalchemy import exc as sa_exc

from linectl.events import RejectReason, event_from_json
from linectl.store import schema
from linectl.store.audit import GENESIS, META_COUNT, META_HEAD, verify_rows
from linectl.store.identity import verify_identity
from linectl.store.model import (
    BATCH_DATES_KEY,
    SERIAL_STATES,
    AuditCheck,
    AuditRecord,
    Batch,
    BatchTransition,
    Container,
    LotTallies,
    OutboxRow,
    SerialRecord,
    StoreError,
    tally_name,
)

_OUTBOX_COLS = "o.seq, o.event_id, o.kind, o.lot, o.created_at, o.body, o.forwarded_at, o.epcis"


def _row(r: Any) -> OutboxRow:
    return OutboxRow(seq=r[0], event_id=r[1], kind=r[2], lot=r[3], created_at=r[4], event=event_from_json(r[5]), forwarded_at=r[6], epcis=r[7])


def _batch(r: Any) -> Batch:
    return Batch(
        lot=r.lot, gtin=r.gtin, expiry=r.expiry, planned_qty=r.planned_qty, state=r.state, created_at=r.created_at,
        created_by=r.created_by, started_at=r.started_at, stopped_at=r.stopped_at, closed_at=r.closed_at,
        challenge=json.loads(r.challenge or "[]"),
        challenge_required=None if r.challenge_required is None else json.loads(r.challenge_required),
    )


class Reader:
    def __init__(self, engine: Engine, path: str) -> None:
        self.engine = engine
        self.path = path

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """One read transaction: everything read inside sees the same committed state."""
        try:
            with self.engine.connect() as c:
                yield c
        except sa_exc.DBAPIError as exc:
            raise StoreError(f"{self.path}: read failed: {schema.orig(exc)}") from None

    def q(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self.snapshot() as c:
            return list(c.exec_driver_sql(sql, params).fetchall())

    # ------------------------------------------------------------------ executed commands

    def command_reply(self, command_id: str) -> dict[str, Any] | None:
        r = self.q("SELECT name, reply FROM command_ids WHERE command_id=?", (command_id,))
        if not r:
            return None
        return {"ok": True, "command_id": command_id, "command": r[0][0], "result": json.loads(r[0][1])}

    # ------------------------------------------------------------------ outbox

    def outbox(self, after_seq: int = 0, limit: int = 1000, only_unforwarded: bool = True) -> list[OutboxRow]:
        where = "o.forwarded_at IS NULL AND o.seq > ?" if only_unforwarded else "o.seq > ?"
        rows = self.q(f"SELECT {_OUTBOX_COLS} FROM outbox o WHERE {where} ORDER BY o.seq LIMIT ?", (after_seq, limit))
        return [_row(r) for r in rows]

    def backlog(self) -> int:
        return int(self.q("SELECT count(*) FROM outbox WHERE forwarded_at IS NULL")[0][0])

    def last_seq(self) -> int:
        return int(self.q("SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name='outbox'), 0)")[0][0])

    def events_of_lot(self, lot: str, after_seq: int = 0, limit: int = 10000) -> list[OutboxRow]:
        rows = self.q(f"SELECT {_OUTBOX_COLS} FROM outbox o WHERE o.lot=? AND o.seq > ? ORDER BY o.seq LIMIT ?", (lot, after_seq, limit))
        return [_row(r) for r in rows]

    # ------------------------------------------------------------------ serials

    def serial_counts(self, gtin: str | None = None) -> dict[str, dict[str, int]]:
        if gtin is None:
            rows = self.q("SELECT gtin, state, sum(n) FROM serial_tally GROUP BY gtin, state")
        else:
            rows = self.q("SELECT gtin, state, sum(n) FROM serial_tally WHERE gtin=? GROUP BY gtin, state", (gtin,))
        out: dict[str, dict[str, int]] = {}
        for g, state, n in rows:
            out.setdefault(g, dict.fromkeys(SERIAL_STATES, 0))[state] = int(n)
        if gtin is not None and gtin not in out:
            out[gtin] = dict.fromkeys(SERIAL_STATES, 0)
        return {g: c for g, c in out.items() if any(c.values()) or g == gtin}

    def lot_counts(self, lot: str) -> dict[str, int]:
        """Serials of a batch by state (reconciliation); counts come from the tally, not a scan."""
        out = dict.fromkeys(SERIAL_STATES, 0)
        for state, n in self.q("SELECT state, sum(n) FROM serial_tally WHERE lot=? GROUP BY state", (lot,)):
            out[state] = int(n)
        return out

    def available(self, gtin: str) -> int:
        r = self.q("SELECT coalesce(sum(n), 0) FROM serial_tally WHERE gtin=? AND lot='' AND state='provisioned'", (gtin,))
        return int(r[0][0])

    def tally_mismatches(self) -> list[tuple[str, str, str, int, int]]:
        """(gtin, lot, state, tally, actual) where the kept counts disagree with a full count; [] when consistent."""
        with self.snapshot() as c:
            actual = {
                (g, lot, st): n
                for g, lot, st, n in c.exec_driver_sql(
                    "SELECT gtin, coalesce(lot, ''), state, count(*) FROM serials GROUP BY 1, 2, 3"
                )
            }
            kept = {(g, lot, st): n for g, lot, st, n in c.exec_driver_sql("SELECT gtin, lot, state, n FROM serial_tally")}
        keys = sorted(set(actual) | set(kept))
        return [(g, lot, st, kept.get((g, lot, st), 0), actual.get((g, lot, st), 0))
                for g, lot, st in keys if kept.get((g, lot, st), 0) != actual.get((g, lot, st), 0)]

    def serial(self, gtin: str, serial: str) -> SerialRecord | None:
        r = self.q("SELECT gtin, serial, state, lot, source, updated_at, sent_at FROM serials WHERE gtin=? AND serial=?", (gtin, serial))
        return SerialRecord(*r[0]) if r else None

    def serial_history(self, gtin: str, serial: str) -> list[OutboxRow]:
        rows = self.q(
            f"WITH s AS (SELECT id FROM serials WHERE gtin=? AND serial=?) "
            f"SELECT {_OUTBOX_COLS} FROM outbox o WHERE o.serial_id = (SELECT id FROM s) "
            f"UNION SELECT {_OUTBOX_COLS} FROM event_refs r JOIN outbox o ON o.seq = r.seq WHERE r.serial_id = (SELECT id FROM s) "
            f"ORDER BY 1",
            (gtin, serial),
        )
        return [_row(r) for r in rows]

    def unrendered_epcis_rows(self) -> int:
        """How many rows of EPCIS kinds carry no stored rendering (stored before schema 3, or without a mapper)."""
        from linectl.events import EVENT_KINDS_EPCIS

        marks = ",".join("?" * len(EVENT_KINDS_EPCIS))
        return int(self.q(f"SELECT count(*) FROM outbox WHERE epcis IS NULL AND kind IN ({marks})", tuple(EVENT_KINDS_EPCIS))[0][0])

    def was_commissioned(self, gtin: str, serial: str, before_seq: int) -> bool:
        """Whether the serial had a UnitCommissioned stored before outbox row `before_seq` (used to render
        an older store's decommissionings, which were stored without their rendering)."""
        r = self.q(
            "SELECT 1 FROM outbox o WHERE o.serial_id = (SELECT id FROM serials WHERE gtin=? AND serial=?) "
            "AND o.kind='unit_commissioned' AND o.seq < ? LIMIT 1",
            (gtin, serial, before_seq),
        )
        return bool(r)

    def in_flight(self, lot: str | None = None) -> list[tuple[str, str, str]]:
        if lot is None:
            rows = self.q("SELECT gtin, serial, lot FROM serials WHERE state='sent' ORDER BY id")
        else:
            # +lot: keep the planner on the small partial index of sent serials, not the whole lot
            rows = self.q("SELECT gtin, serial, lot FROM serials WHERE state='sent' AND +lot=? ORDER BY id", (lot,))
        return [(r[0], r[1], r[2]) for r in rows]

    def allocated(self, lot: str) -> list[tuple[str, str]]:
        """Allocated to the lot and never sent: what batch close returns or voids."""
        return [(r[0], r[1]) for r in self.q(
            "SELECT gtin, serial FROM serials INDEXED BY ix_serials_allocated WHERE lot=? AND state='allocated' ORDER BY id", (lot,)
        )]

    def purgeable(self, cutoff: str, after_seq: int, limit: int, bound: int) -> list[int]:
        """Forwarded before `cutoff`, at or below `bound`; scanned here, on a reader, so a long scan never holds the writer."""
        return [r[0] for r in self.q(
            "SELECT seq FROM outbox WHERE seq > ? AND seq <= ? AND forwarded_at IS NOT NULL AND forwarded_at < ? ORDER BY seq LIMIT ?",
            (after_seq, bound, cutoff, limit),
        )]

    # ------------------------------------------------------------------ sink cursors

    def cursors(self) -> dict[str, dict[str, Any]]:
        return {r[0]: {"seq": int(r[1]), "pending": r[2], "updated_at": r[3]}
                for r in self.q("SELECT sink, seq, pending, updated_at FROM sink_cursors ORDER BY sink")}

    def link_states(self) -> dict[str, dict[str, Any]]:
        """The last recorded state of every upstream link (ops.op_note_link_states), by link name."""
        from linectl.store.ops import LINK_STATE_KEY

        out: dict[str, dict[str, Any]] = {}
        for key, value in self.q("SELECT key, value FROM meta WHERE key >= ? AND key < ? ORDER BY key", (LINK_STATE_KEY, LINK_STATE_KEY[:-1] + ";")):
            try:
                out[key[len(LINK_STATE_KEY):]] = json.loads(value)
            except ValueError:
                continue  # not ours to judge: a state that cannot be read is left out
        return out

    def delivered_bound(self, enabled: frozenset[str] | None) -> int:
        from linectl.store.ops import bound_of

        return bound_of({r[0]: int(r[1]) for r in self.q("SELECT sink, seq FROM sink_cursors")}, enabled)

    def rows_after(self, after_seq: int) -> int:
        """Rows stored after `after_seq` (a sink's backlog)."""
        return int(self.q("SELECT count(*) FROM outbox WHERE seq > ?", (after_seq,))[0][0])

    def seqs_after(self, after_seq: int, limit: int) -> list[int]:
        """The seqs of the next `limit` rows after `after_seq` (primary key only: cheap)."""
        return [int(r[0]) for r in self.q("SELECT seq FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit))]

    # ------------------------------------------------------------------ batches, containers

    def batch(self, lot: str) -> Batch | None:
        with self.snapshot() as c:
            r = c.execute(select(schema.batches).where(schema.batches.c.lot == lot)).first()
        return _batch(r) if r else None

    def batch_dates(self, lot: str) -> dict[str, str]:
        """The batch's dates besides expiry (production_date, packaging_date, best_before, sell_by), as created.

        Kept in `meta` under batch_dates:<lot> (written with the batch, in its transaction) until a schema
        version gives batches a column for them."""
        r = self.q("SELECT value FROM meta WHERE key=?", (BATCH_DATES_KEY + lot,))
        return dict(json.loads(r[0][0])) if r else {}

    def batch_config(self, lot: str) -> dict[str, Any] | None:
        """The config hashes recorded with the batch at its creation (linectl.config_hash); None for a batch from before."""
        r = self.q("SELECT detail FROM audit WHERE action='batch_created' AND CASE WHEN json_valid(detail) THEN json_extract(detail, '$.lot')=? END "
                   "ORDER BY seq LIMIT 1", (lot,))
        if not r:
            return None
        try:
            cfg = json.loads(r[0][0]).get("config")
        except ValueError:
            return None
        return dict(cfg) if isinstance(cfg, dict) else None

    def batches(self, state: str | None = None) -> list[Batch]:
        stmt = select(schema.batches).order_by(schema.batches.c.created_at)
        if state is not None:
            stmt = stmt.where(schema.batches.c.state == state)
        with self.snapshot() as c:
            return [_batch(r) for r in c.execute(stmt)]

    def lot_tallies(self, lot: str) -> LotTallies | None:
        """Reject reasons and returned serials of a batch; None for a batch created before they were kept."""
        marker = tally_name("lot_tallies", lot)
        returned = tally_name("returned", lot)
        rejects = {tally_name("rejects", lot, r.value): r.value for r in RejectReason}
        names = [marker, returned, *rejects]
        got = dict(self.q(f"SELECT name, value FROM counters WHERE name IN ({','.join('?' * len(names))})", tuple(names)))
        if marker not in got:
            return None
        by_reason = {rejects[n]: int(v) for n, v in got.items() if n in rejects and v}
        return LotTallies(rejects=dict(sorted(by_reason.items())), returned=int(got.get(returned, 0)))

    def batch_history(self, lot: str) -> list[BatchTransition]:
        """Every state change of a batch, from the audit trail (every BatchStateChanged is audited)."""
        # json_valid first: an altered record that is no JSON any more must not make the report unreadable (audit verify names it)
        rows = self.q("SELECT detail FROM audit WHERE action='batch_state' AND CASE WHEN json_valid(detail) THEN json_extract(detail, '$.lot')=? END "
                      "ORDER BY seq", (lot,))
        out: list[BatchTransition] = []
        for (detail,) in rows:
            d = json.loads(detail)
            out.append(BatchTransition(
                time=datetime.fromisoformat(d["event_time"]).isoformat(),  # the form the event's own datetime prints in
                state=d["state"], previous=d.get("previous"), by=d["actor"], reason=d.get("reason", ""),
            ))
        return out

    def container(self, sscc: str) -> Container | None:
        r = self.q("SELECT sscc, level, state, lot, gtin, updated_at FROM containers WHERE sscc=?", (sscc,))
        return Container(*r[0]) if r else None

    def container_history(self, sscc: str) -> list[OutboxRow]:
        rows = self.q(
            f"SELECT DISTINCT {_OUTBOX_COLS} FROM event_refs r JOIN outbox o ON o.seq = r.seq WHERE r.sscc=? ORDER BY o.seq", (sscc,)
        )
        return [_row(r) for r in rows]

    def children(self, sscc: str) -> list[dict[str, Any]]:
        rows = self.q(
            "SELECT child_kind, child_key, child_gtin, child_serial, lot, added_seq FROM aggregation "
            "WHERE parent=? AND removed_seq IS NULL ORDER BY id",
            (sscc,),
        )
        return [
            {"kind": k, "sscc": key if k == "container" else None, "gtin": g, "serial": s, "lot": lot, "added_seq": a}
            for k, key, g, s, lot, a in rows
        ]

    def parent_of(self, child_kind: str, child_key: str) -> str | None:
        r = self.q(
            "SELECT parent FROM aggregation WHERE child_kind=? AND child_key=? AND removed_seq IS NULL", (child_kind, child_key)
        )
        return r[0][0] if r else None

    # ------------------------------------------------------------------ audit

    def verify_audit(self) -> AuditCheck:
        with self.snapshot() as c:  # meta and rows from one snapshot, or a concurrent append looks like tampering
            m: dict[str, str] = dict(c.exec_driver_sql("SELECT key, value FROM meta WHERE key IN (?, ?)", (META_COUNT, META_HEAD)).all())
            rows = c.exec_driver_sql("SELECT seq, ts, actor, origin, action, detail, prev_hash, hash FROM audit ORDER BY seq")
            check = verify_rows((tuple(r) for r in rows), int(m.get(META_COUNT, 0)), m.get(META_HEAD, GENESIS))
            if not check.ok:
                return check
            # the rows the trail vouches for: users and signatures carry the digest their last record wrote
            bad = verify_identity(c)
            if bad is not None:
                return AuditCheck(False, check.checked if bad[0] is None else bad[0] - 1, bad[0], bad[1])
            return check

    def audit_log(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRecord]:
        rows = self.q(
            "SELECT seq, ts, actor, origin, action, detail, prev_hash, hash FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        return [AuditRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7]) for r in rows]

    def meta(self) -> dict[str, str]:
        return dict(self.q("SELECT key, value FROM meta"))

    def integrity_check(self) -> list[str]:
        return [r[0] for r in self.q("PRAGMA integrity_check")]
