"""Write operations, run by the writer thread inside a transaction (`Tx`).

Every function here either completes or raises; the writer turns a raise into
a rollback of that operation only. A transition reads the row by its key,
decides in Python (so a refusal can say exactly why) and updates by id; the
serial counts in serial_tally are adjusted in memory and written once per
transaction. Runs of UnitCommissioned, the bulk of a line's events, take one
look-up and one executemany for the whole run.
"""

from __future__ import annotations

import enum
import json
from collections import Counter
from typing import TYPE_CHECKING, Any

import structlog

from linectl.events import AlarmRaised, Severity
from linectl.store.audit import change
from linectl.store.identity import SignatureSpec, sign_record
from linectl.store.model import BATCH_DATES_KEY, Batch, PoolExhausted, StoreError, tally_name
from linectl.store.serials import random_serials, sequential_serial
from linectl.store.writer import BATCH_FORMS, Tx

if TYPE_CHECKING:  # the store takes the config's serial schemes, never the config module at run time
    from linectl.config import PoolSerials, RandomSerials, SequentialSerials

log = structlog.get_logger("linectl.store")

#: kinds that always leave an audit record; any other event does when it names an actor (an operator did it)
AUDITED_KINDS = frozenset({"batch_state", "alarm", "alarm_ack", "challenge_result"})


def unit_key(gtin: str, serial: str) -> str:
    """Aggregation child key of a unit: its GS1 element string, unambiguous because the GTIN is fixed-length."""
    return f"01{gtin}21{serial}"


def _sscc_ok(sscc: str) -> bool:
    if len(sscc) != 18 or not sscc.isdigit():
        return False
    total = sum(int(c) * (3 if i % 2 == 0 else 1) for i, c in enumerate(reversed(sscc[:-1])))
    return (10 - total % 10) % 10 == int(sscc[-1])


def _list(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" … (+{len(items) - n} more)" if len(items) > n else "")


_SEL = "SELECT id, serial, state, lot, sent_at FROM serials WHERE gtin=? AND serial=?"
_SEL_MANY = "SELECT id, serial, state, lot, sent_at FROM serials WHERE gtin=? AND serial IN (SELECT value FROM json_each(?))"


def _fetch(tx: Tx, gtin: str, serials: list[str]) -> dict[str, tuple[Any, ...]]:
    if len(serials) == 1:
        r = tx.cur.execute(_SEL, (gtin, serials[0])).fetchone()
        return {r[1]: r} if r else {}
    return {r[1]: r for r in tx.cur.execute(_SEL_MANY, (gtin, json.dumps(serials)))}


def _check(gtin: str, serials: list[str], found: dict[str, tuple[Any, ...]], action: str, allowed: tuple[str, ...],
           lot: str | None = None, never_sent: bool = False) -> None:
    """Raise naming every serial (first few) that may not take this transition, and why."""
    problems: list[str] = []
    for s in serials:
        r = found.get(s)
        if r is None:
            problems.append(f"{s} (unknown serial for this GTIN)")
        elif r[2] not in allowed:
            problems.append(f"{s} (it is {r[2]}, must be {' or '.join(allowed)})")
        elif lot is not None and r[2] != "provisioned" and r[3] != lot:
            problems.append(f"{s} (belongs to lot {r[3]}, not {lot})")
        elif never_sent and r[4] is not None:
            problems.append(f"{s} (was sent to a printer at {r[4]}; a serial ever sent can never be returned)")
    if problems:
        raise StoreError(f"cannot {action} {len(problems)} serial(s) of GTIN {gtin}: {_list(problems)}")


# --------------------------------------------------------------------------- events


def _commissioned(tx: Tx, ev: Any, seq: int) -> int | None:
    r = tx.cur.execute(_SEL, (ev.gtin, ev.serial)).fetchone()
    if r is None or r[2] != "sent" or (ev.lot is not None and r[3] != ev.lot):
        _check(ev.gtin, [ev.serial], {ev.serial: r} if r else {}, "commission", ("sent",), lot=ev.lot)
    tx.cur.execute("UPDATE serials SET state='commissioned', updated_at=? WHERE id=?", (tx.ts, r[0]))
    tx.move(ev.gtin, r[3], "sent", r[3], "commissioned")
    return r[0]  # type: ignore[no-any-return]


def _decommissioned(tx: Tx, ev: Any, seq: int) -> int | None:
    r = tx.cur.execute(_SEL, (ev.gtin, ev.serial)).fetchone()
    if r is None or r[2] not in ("sent", "commissioned"):
        _check(ev.gtin, [ev.serial], {ev.serial: r} if r else {}, "decommission", ("sent", "commissioned"))
    parent = tx.cur.execute(
        "SELECT parent FROM aggregation WHERE child_kind='unit' AND child_key=? AND removed_seq IS NULL",
        (unit_key(ev.gtin, ev.serial),),
    ).fetchone()
    if parent is not None:
        raise StoreError(
            f"cannot decommission serial {ev.serial} of GTIN {ev.gtin}: it is packed in SSCC {parent[0]}; unpack it first (same append)"
        )
    tx.cur.execute("UPDATE serials SET state='decommissioned', updated_at=? WHERE id=?", (tx.ts, r[0]))
    tx.move(ev.gtin, r[3], r[2], r[3], "decommissioned")
    if ev.read_serial is not None and (ev.read_gtin or ev.gtin, ev.read_serial) != (ev.gtin, ev.serial):
        # the unit carried another serial's code: the reject bin now holds a pack with that code
        tx.cur.execute(
            "INSERT INTO unit_copies(gtin, serial, carrier_gtin, carrier_serial, lot, station, unit_seq, reason, event_seq, created_at) "
            "VALUES (?,?,?,?,?,?,?,?,?,?)",
            (ev.read_gtin or ev.gtin, ev.read_serial, ev.gtin, ev.serial, ev.lot, ev.station, ev.seq, ev.reason.value, seq, tx.ts),
        )
    if ev.lot is not None:  # the reject reason outlives the outbox row (batch report after retention)
        _tally(tx, tally_name("rejects", ev.lot, ev.reason.value), 1)
    return r[0]  # type: ignore[no-any-return]


def _tally(tx: Tx, name: str, n: int) -> None:
    tx.cur.execute(
        "INSERT INTO counters(name, value, updated_at) VALUES (?,?,?) "
        "ON CONFLICT(name) DO UPDATE SET value=value+excluded.value, updated_at=excluded.updated_at",
        (name, n, tx.ts),
    )


def _bulk(tx: Tx, ev: Any, seq: int, new_state: str, action: str, allowed: tuple[str, ...], never_sent: bool = False) -> None:
    serials = list(ev.serials)
    if len(set(serials)) != len(serials):
        raise StoreError(f"cannot {action} serials of GTIN {ev.gtin}: the list repeats a serial")
    if not serials:
        return
    found = _fetch(tx, ev.gtin, serials)
    _check(ev.gtin, serials, found, action, allowed, lot=ev.lot, never_sent=never_sent)
    clear_lot = new_state == "provisioned"  # returned to the pool: no longer tied to the batch
    rows = list(found.values())
    if clear_lot:
        tx.cur.executemany("UPDATE serials SET state=?, lot=NULL, updated_at=? WHERE id=?", [(new_state, tx.ts, r[0]) for r in rows])
    else:
        tx.cur.executemany("UPDATE serials SET state=?, updated_at=? WHERE id=?", [(new_state, tx.ts, r[0]) for r in rows])
    for r in rows:
        tx.move(ev.gtin, r[3], r[2], None if clear_lot else r[3], new_state)
    tx.cur.executemany("INSERT INTO event_refs(seq, serial_id) VALUES (?,?)", [(seq, r[0]) for r in rows])


def _voided(tx: Tx, ev: Any, seq: int) -> int | None:
    _bulk(tx, ev, seq, "voided", "void", ("allocated", "provisioned"))
    return None


def _returned(tx: Tx, ev: Any, seq: int) -> int | None:
    _bulk(tx, ev, seq, "provisioned", "return", ("allocated",), never_sent=True)
    if ev.lot is not None and ev.serials:  # a returned serial leaves the batch: only this count remembers it was given
        _tally(tx, tally_name("returned", ev.lot), len(ev.serials))
    return None


def _inspected(tx: Tx, ev: Any, seq: int) -> int | None:
    r = tx.cur.execute("SELECT id FROM serials WHERE gtin=? AND serial=?", (ev.gtin, ev.serial)).fetchone()
    if r is None:
        raise StoreError(f"cannot record inspection: serial {ev.serial} of GTIN {ev.gtin} is unknown")
    return int(r[0])


def _container(tx: Tx, sscc: str) -> tuple[str, str] | None:
    r = tx.cur.execute("SELECT level, state FROM containers WHERE sscc=?", (sscc,)).fetchone()
    return (r[0], r[1]) if r else None


def _container_commissioned(tx: Tx, ev: Any, seq: int) -> int | None:
    if not _sscc_ok(ev.sscc):
        raise StoreError(f"cannot commission SSCC {ev.sscc!r}: not 18 digits with a valid check digit")
    c = _container(tx, ev.sscc)
    if c is not None:
        raise StoreError(f"cannot commission SSCC {ev.sscc}: already used ({c[0]}, {c[1]}); an SSCC is never reused")
    tx.cur.execute(
        "INSERT INTO containers(sscc, level, state, lot, gtin, updated_at) VALUES (?,?,'commissioned',?,?,?)",
        (ev.sscc, ev.level, ev.lot, ev.gtin, tx.ts),
    )
    tx.cur.execute("INSERT INTO event_refs(seq, sscc) VALUES (?,?)", (seq, ev.sscc))
    return None


def _container_decommissioned(tx: Tx, ev: Any, seq: int) -> int | None:
    c = _container(tx, ev.sscc)
    if c is None:
        if ev.commissioned:
            raise StoreError(f"cannot decommission SSCC {ev.sscc}: event says it was commissioned, but it never was")
        # A label printed but never verified/committed (e.g. crash in between): record it so it is never reused.
        if not _sscc_ok(ev.sscc):
            raise StoreError(f"cannot decommission SSCC {ev.sscc!r}: not 18 digits with a valid check digit")
        tx.cur.execute(
            "INSERT INTO containers(sscc, level, state, lot, gtin, updated_at) VALUES (?,?,'decommissioned',?,NULL,?)",
            (ev.sscc, "unknown", ev.lot, tx.ts),
        )
    else:
        if c[1] == "decommissioned":
            raise StoreError(f"cannot decommission SSCC {ev.sscc}: already decommissioned")
        if not ev.commissioned:
            raise StoreError(f"cannot decommission SSCC {ev.sscc} with commissioned=False: it is commissioned (EPCIS needs the DELETE)")
        kids = tx.cur.execute(
            "SELECT count(*) FROM aggregation WHERE parent=? AND removed_seq IS NULL", (ev.sscc,)
        ).fetchone()[0]
        if kids:
            raise StoreError(f"cannot decommission SSCC {ev.sscc}: it still holds {kids} child(ren); unpack first (same append)")
        parent = tx.cur.execute(
            "SELECT parent FROM aggregation WHERE child_kind='container' AND child_key=? AND removed_seq IS NULL", (ev.sscc,)
        ).fetchone()
        if parent is not None:
            raise StoreError(f"cannot decommission SSCC {ev.sscc}: it is packed in {parent[0]}; unpack it first")
        tx.cur.execute("UPDATE containers SET state='decommissioned', updated_at=? WHERE sscc=?", (tx.ts, ev.sscc))
    tx.cur.execute("INSERT INTO event_refs(seq, sscc) VALUES (?,?)", (seq, ev.sscc))
    return None


_LEVEL_RANK = {"case": 1, "pallet": 2}


def _packed(tx: Tx, ev: Any, seq: int) -> int | None:
    parent = _container(tx, ev.parent)
    if parent is None or parent[1] != "commissioned":
        what = "unknown" if parent is None else parent[1]
        raise StoreError(f"cannot pack into SSCC {ev.parent}: it is {what}; commission it first (ContainerCommissioned, may be in the same append)")
    if not ev.children:
        raise StoreError(f"cannot pack into SSCC {ev.parent}: no children listed")
    seen: set[tuple[str, str]] = set()
    agg_rows: list[tuple[Any, ...]] = []
    ref_rows: list[tuple[Any, ...]] = [(seq, None, ev.parent)]
    for ch in ev.children:
        if ch.sscc and not (ch.gtin or ch.serial):
            kind, key, gtin, serial = "container", ch.sscc, None, None
            c = _container(tx, ch.sscc)
            if c is None or c[1] != "commissioned":
                raise StoreError(f"cannot pack SSCC {ch.sscc} into {ev.parent}: it is {'unknown' if c is None else c[1]}")
            if ch.sscc == ev.parent or _LEVEL_RANK.get(c[0], 0) >= _LEVEL_RANK.get(parent[0], 0):
                raise StoreError(f"cannot pack {c[0]} {ch.sscc} into {parent[0]} {ev.parent}: a container only holds lower levels")
            ref_rows.append((seq, None, ch.sscc))
        elif ch.gtin and ch.serial and not ch.sscc:
            kind, key, gtin, serial = "unit", unit_key(ch.gtin, ch.serial), ch.gtin, ch.serial
            r = tx.cur.execute("SELECT id, state FROM serials WHERE gtin=? AND serial=?", (ch.gtin, ch.serial)).fetchone()
            if r is None or r[1] != "commissioned":
                raise StoreError(
                    f"cannot pack serial {ch.serial} of GTIN {ch.gtin} into {ev.parent}: it is {'unknown' if r is None else r[1]}, "
                    "only commissioned units can be packed"
                )
            ref_rows.append((seq, r[0], None))
        else:
            raise StoreError(f"cannot pack into {ev.parent}: a child must be either gtin+serial or sscc ({ch!r})")
        if (kind, key) in seen:
            raise StoreError(f"cannot pack into {ev.parent}: child {key} is listed twice")
        seen.add((kind, key))
        cur_parent = tx.cur.execute(
            "SELECT parent FROM aggregation WHERE child_kind=? AND child_key=? AND removed_seq IS NULL", (kind, key)
        ).fetchone()
        if cur_parent is not None:
            raise StoreError(f"cannot pack {key} into {ev.parent}: it is already packed in {cur_parent[0]}; unpack it first")
        agg_rows.append((ev.parent, kind, key, gtin, serial, ev.lot, seq))
    tx.cur.executemany(
        "INSERT INTO aggregation(parent, child_kind, child_key, child_gtin, child_serial, lot, added_seq) VALUES (?,?,?,?,?,?,?)",
        agg_rows,
    )
    tx.cur.executemany("INSERT INTO event_refs(seq, serial_id, sscc) VALUES (?,?,?)", ref_rows)
    return None


def _unpacked(tx: Tx, ev: Any, seq: int) -> int | None:
    if _container(tx, ev.parent) is None:
        raise StoreError(f"cannot unpack from SSCC {ev.parent}: unknown container")
    if not ev.children:
        active = tx.cur.execute(
            "SELECT id, child_kind, child_key, child_gtin, child_serial FROM aggregation WHERE parent=? AND removed_seq IS NULL",
            (ev.parent,),
        ).fetchall()
    else:
        active = []
        for ch in ev.children:
            if ch.sscc and not (ch.gtin or ch.serial):
                kind, key = "container", ch.sscc
            elif ch.gtin and ch.serial and not ch.sscc:
                kind, key = "unit", unit_key(ch.gtin, ch.serial)
            else:
                raise StoreError(f"cannot unpack from {ev.parent}: a child must be either gtin+serial or sscc ({ch!r})")
            r = tx.cur.execute(
                "SELECT id, child_kind, child_key, child_gtin, child_serial, parent FROM aggregation "
                "WHERE child_kind=? AND child_key=? AND removed_seq IS NULL",
                (kind, key),
            ).fetchone()
            if r is None or r[5] != ev.parent:
                where = "not packed anywhere" if r is None else f"packed in {r[5]}"
                raise StoreError(f"cannot unpack {key} from {ev.parent}: it is {where}")
            if any(a[0] == r[0] for a in active):
                raise StoreError(f"cannot unpack from {ev.parent}: child {key} is listed twice")
            active.append(r[:5])
    tx.cur.executemany("UPDATE aggregation SET removed_seq=? WHERE id=?", [(seq, a[0]) for a in active])
    refs: list[tuple[Any, ...]] = [(seq, None, ev.parent)]
    for _id, kind, key, gtin, serial in active:
        if kind == "container":
            refs.append((seq, None, key))
        else:
            r = tx.cur.execute("SELECT id FROM serials WHERE gtin=? AND serial=?", (gtin, serial)).fetchone()
            refs.append((seq, r[0] if r else None, None))
    tx.cur.executemany("INSERT INTO event_refs(seq, serial_id, sscc) VALUES (?,?,?)", refs)
    return None


def _batch_state(tx: Tx, ev: Any, seq: int) -> int | None:
    if ev.lot is None:
        raise StoreError("BatchStateChanged needs the lot")
    r = tx.cur.execute("SELECT gtin, state FROM batches WHERE lot=?", (ev.lot,)).fetchone()
    if r is None:
        raise StoreError(f"batch {ev.lot} does not exist (create_batch first)")
    gtin, state = r
    if gtin != ev.gtin:
        raise StoreError(f"batch {ev.lot} is for GTIN {gtin}, not {ev.gtin}")
    if state == "closed":
        raise StoreError(f"batch {ev.lot} is closed; a closed batch never changes state")
    new = ev.state.value
    if ev.previous is not None and ev.previous.value != state:
        raise StoreError(f"batch {ev.lot} is {state}, but the event says it was {ev.previous.value}")
    tx.cur.execute(
        "UPDATE batches SET state=?, updated_at=?, "
        "started_at = CASE WHEN ?='running' THEN coalesce(started_at, ?) ELSE started_at END, "
        "stopped_at = CASE WHEN ?='stopped' THEN ? ELSE stopped_at END, "
        "closed_at = CASE WHEN ?='closed' THEN ? ELSE closed_at END WHERE lot=?",
        (new, tx.ts, new, tx.ts, new, tx.ts, new, tx.ts, ev.lot),
    )
    return None


def _challenge(tx: Tx, ev: Any, seq: int) -> int | None:
    if ev.lot is None:
        return None
    result = {
        "challenge": ev.challenge, "station": ev.station, "rejected": ev.rejected, "reason_seen": ev.reason_seen,
        "seq": ev.seq, "event_id": ev.event_id, "at": ev.event_time.isoformat(),
    }
    cur = tx.cur.execute(
        "UPDATE batches SET challenge = json_insert(challenge, '$[#]', json(?)), updated_at=? WHERE lot=?",
        (json.dumps(result), tx.ts, ev.lot),
    )
    if cur.rowcount != 1:
        raise StoreError(f"challenge result for unknown batch {ev.lot}")
    return None


_APPLY = {
    "unit_commissioned": _commissioned,
    "unit_decommissioned": _decommissioned,
    "serials_voided": _voided,
    "serials_returned": _returned,
    "unit_inspected": _inspected,
    "container_commissioned": _container_commissioned,
    "container_decommissioned": _container_decommissioned,
    "packed": _packed,
    "unpacked": _unpacked,
    "batch_state": _batch_state,
    "challenge_result": _challenge,
}


def _choose_rendering(tx: Tx, ev: Any, rendering: Any) -> str | None:
    """A (if commissioned, if never commissioned) pair is decided here, before the event changes the serial:
    the writer is the one place that knows, at this instant, whether the serial was ever commissioned."""
    if type(rendering) is not tuple:
        return rendering  # type: ignore[no-any-return]
    r = tx.cur.execute("SELECT state FROM serials WHERE gtin=? AND serial=?", (ev.gtin, ev.serial)).fetchone()
    return rendering[0] if r is not None and r[0] == "commissioned" else rendering[1]  # type: ignore[no-any-return]


def apply_event(tx: Tx, ev: Any, body: str, rendering: Any = None) -> int:
    """Store one event in the outbox and apply its effect, in the caller's transaction. Returns its seq.

    `rendering`: its EPCIS rendering (see EpcisMapper.renderings), stored in the same row."""
    seq = tx.next_seq()
    d = ev.__dict__  # pydantic keeps fields here; .get avoids getattr's slow miss path for absent fields
    kind = d["kind"]
    epcis = _choose_rendering(tx, ev, rendering)
    fn = _APPLY.get(kind)
    actor = d.get("actor")
    audited = bool(actor) or kind in AUDITED_KINDS
    before = _held_state(tx, kind, d) if audited else None
    serial_id = fn(tx, ev, seq) if fn is not None else None
    tx.rows.append((seq, d["event_id"], kind, d["lot"], d.get("gtin"), d.get("serial"), serial_id, tx.ts, body, epcis))
    if audited:
        who = actor or "system"
        default_origin = f"station:{ev.station}" if ev.station else "line"
        origin = who.split(":", 1)[0] if ":" in who else default_origin
        detail = json.loads(body)
        detail.update(_event_change(tx, kind, d, before))
        tx.audit(who, origin, kind, detail)
    return seq


def _held_state(tx: Tx, kind: str, d: dict[str, Any]) -> str | None:
    """The state an audited event is about to change (read before it is applied): its serial's or its container's."""
    if kind == "unit_decommissioned":
        r = tx.cur.execute("SELECT state FROM serials WHERE gtin=? AND serial=?", (d["gtin"], d["serial"])).fetchone()
        return r[0] if r else None
    if kind == "container_decommissioned":
        r = tx.cur.execute("SELECT state FROM containers WHERE sscc=?", (d["sscc"],)).fetchone()
        return r[0] if r else None
    return None


def _event_change(tx: Tx, kind: str, d: dict[str, Any], before: str | None) -> dict[str, Any]:
    """old/new/reason of an audited event that changes something; {} for one that records a fact (a measurement)."""
    reason = d.get("reason")
    reason_text = reason.value if isinstance(reason, enum.Enum) else reason
    if kind == "batch_state":
        prev = d.get("previous")
        return change(prev.value if prev is not None else None, d["state"].value, reason_text)
    if kind == "alarm":
        return change(None, "active", d.get("message"))
    if kind == "alarm_ack":
        return change("unacknowledged", "acknowledged", None)
    if kind == "unit_decommissioned":
        why = f"{reason_text}: {d['detail']}" if d.get("detail") else reason_text
        return change({"serial_state": before}, {"serial_state": "decommissioned"}, why)
    if kind == "container_decommissioned":
        r = tx.cur.execute("SELECT state FROM containers WHERE sscc=?", (d["sscc"],)).fetchone()
        return change({"container_state": before}, {"container_state": r[0] if r else None}, reason_text)
    if kind == "packed":
        return change({"parent": None}, {"parent": d["parent"], "children": len(d["children"])}, None)
    if kind == "unpacked":
        return change({"parent": d["parent"]}, {"parent": None, "children": len(d["children"]) or "all"}, None)
    return {}


RUN_MIN = 8  # shorter runs of commissionings are not worth the bulk path


def op_append(tx: Tx, items: list[tuple[Any, str, Any]]) -> list[int]:
    """Events in order; runs of UnitCommissioned (the bulk of a line's events) go through one bulk look-up."""
    out: list[int] = []
    i, n = 0, len(items)
    while i < n:
        if items[i][0].__dict__["kind"] == "unit_commissioned":
            j = i + 1
            while j < n and items[j][0].__dict__["kind"] == "unit_commissioned":
                j += 1
            if j - i >= RUN_MIN:
                out.extend(_commission_run(tx, items[i:j]))
                i = j
                continue
        out.append(apply_event(tx, *items[i]))
        i += 1
    return out


def _op_append_batch(tx: Tx, arglist: list[tuple[Any, ...]]) -> list[list[int]]:
    """Consecutive append operations of one group as one sequence (fast path only: any refusal re-runs them one by one)."""
    flat: list[tuple[Any, str, Any]] = []
    for (items,) in arglist:
        flat.extend(items)
    seqs = op_append(tx, flat)
    out, k = [], 0
    for (items,) in arglist:
        out.append(seqs[k : k + len(items)])
        k += len(items)
    return out


BATCH_FORMS[op_append] = _op_append_batch


def _commission_run(tx: Tx, run: list[tuple[Any, str, Any]]) -> list[int]:
    """Same checks and effects as _commissioned, with one look-up and one executemany for the whole run."""
    keys = [(ev.gtin, ev.serial) for ev, _, _ in run]
    if len(set(keys)) != len(keys):
        dup = next(k for k, c in Counter(keys).items() if c > 1)
        raise StoreError(f"cannot commission serial {dup[1]} of GTIN {dup[0]} twice")
    found: dict[tuple[str, str], tuple[Any, ...]] = {}
    by_gtin: dict[str, list[str]] = {}
    for g, s in keys:
        by_gtin.setdefault(g, []).append(s)
    for g, ss in by_gtin.items():
        for r in tx.cur.execute(_SEL_MANY, (g, json.dumps(ss))):
            found[(g, r[1])] = r
    upd: list[tuple[str, int]] = []
    out: list[int] = []
    ts = tx.ts
    rows = tx.rows
    for ev, body, rendering in run:
        d = ev.__dict__
        g, s, lot = d["gtin"], d["serial"], d["lot"]
        r = found.get((g, s))
        if r is None or r[2] != "sent" or (lot is not None and r[3] != lot):
            _check(g, [s], {s: r} if r else {}, "commission", ("sent",), lot=lot)
        upd.append((ts, r[0]))
        tx.move(g, r[3], "sent", r[3], "commissioned")
        seq = tx.next_seq()
        rows.append((seq, d["event_id"], "unit_commissioned", lot, g, s, r[0], ts, body, rendering))
        out.append(seq)
    tx.cur.executemany("UPDATE serials SET state='commissioned', updated_at=? WHERE id=?", upd)
    return out


# --------------------------------------------------------------------------- serial pool


def _batch_for_allocation(tx: Tx, gtin: str, lot: str) -> None:
    r = tx.cur.execute("SELECT gtin, state FROM batches WHERE lot=?", (lot,)).fetchone()
    if r is None:
        raise StoreError(f"cannot allocate serials to lot {lot}: no such batch")
    if r[0] != gtin:
        raise StoreError(f"cannot allocate serials of GTIN {gtin} to lot {lot}: the batch is for GTIN {r[0]}")
    if r[1] == "closed":
        raise StoreError(f"cannot allocate serials to lot {lot}: the batch is closed")


_INSERT_NEW = (
    "INSERT OR IGNORE INTO serials(gtin, serial, state, lot, source, updated_at) "
    "SELECT ?, value, 'allocated', ?, ?, ? FROM json_each(?) RETURNING serial"
)


def op_allocate(tx: Tx, gtin: str, lot: str, n: int, scheme: RandomSerials | SequentialSerials | PoolSerials) -> list[str]:
    _batch_for_allocation(tx, gtin, lot)
    if n <= 0:
        return []
    if scheme.scheme == "pool":
        return _allocate_pool(tx, gtin, lot, n, int(scheme.low_water))
    if scheme.scheme == "random":
        return _allocate_random(tx, gtin, lot, n, scheme.alphabet, int(scheme.length))
    if scheme.scheme == "sequential":
        return _allocate_sequential(tx, gtin, lot, n, int(scheme.start), int(scheme.step), int(scheme.width))
    raise StoreError(f"unknown serial scheme {scheme.scheme!r}")


def _allocate_pool(tx: Tx, gtin: str, lot: str, n: int, low_water: int) -> list[str]:
    rows = tx.cur.execute(
        "UPDATE serials SET state='allocated', lot=?, updated_at=? WHERE id IN "
        "(SELECT id FROM serials WHERE gtin=? AND state='provisioned' ORDER BY id LIMIT ?) RETURNING id, serial",
        (lot, tx.ts, gtin, n),
    ).fetchall()
    if len(rows) < n:
        raise PoolExhausted(f"serial pool of GTIN {gtin} has only {len(rows)} of the {n} serials asked for; nothing allocated", len(rows))
    rows.sort()
    tx.move(gtin, None, "provisioned", lot, "allocated", n)
    if low_water > 0:
        _pool_low_check(tx, gtin, lot, n, low_water)
    return [r[1] for r in rows]


def _pool_low_check(tx: Tx, gtin: str, lot: str, n: int, low_water: int) -> None:
    """Alarm once per descent below low water, and once when a pool is already low at its first use.

    A persisted flag (counters 'pool_low:<gtin>') remembers the alarm was given;
    it re-arms when the pool is seen at or above low water again (re-provisioned).
    """
    after = tx.cur.execute(
        "SELECT count(*) FROM (SELECT 1 FROM serials WHERE gtin=? AND state='provisioned' LIMIT ?)", (gtin, low_water)
    ).fetchone()[0]
    name = f"pool_low:{gtin}"
    r = tx.cur.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
    flagged = bool(r and r[0])
    if after >= low_water:
        if flagged:
            tx.cur.execute("UPDATE counters SET value=0, updated_at=? WHERE name=?", (tx.ts, name))
        return
    if flagged and after + n < low_water:
        return  # already alarmed for this descent
    tx.cur.execute(
        "INSERT INTO counters(name, value, updated_at) VALUES (?,1,?) ON CONFLICT(name) DO UPDATE SET value=1, updated_at=excluded.updated_at",
        (name, tx.ts),
    )
    alarm = AlarmRaised(
        code="pool_low",
        severity=Severity.WARNING,
        message=f"serial pool of GTIN {gtin} is low: {after} available, low water {low_water}",
        lot=lot,
    )
    apply_event(tx, alarm, alarm.model_dump_json())
    tx.after_commit(lambda: log.warning("serial_pool_low", gtin=gtin, available=after, low_water=low_water))


def _allocate_random(tx: Tx, gtin: str, lot: str, n: int, alphabet: str, length: int) -> list[str]:
    """One block of exactly n candidates first (the common case: no collision); then top-up rounds.

    A top-up round oversamples (at least 256 candidates) and filters out known serials before inserting
    exactly what is missing, so a nearly full space is not mistaken for an exhausted one.
    """
    got = [r[0] for r in tx.cur.execute(_INSERT_NEW, (gtin, lot, "random", tx.ts, json.dumps(random_serials(n, alphabet, length))))]
    out = list(got)
    idle = 0
    while len(out) < n:
        need = n - len(out)
        cand = list(dict.fromkeys(random_serials(max(4 * need, 256), alphabet, length)))
        known = {r[0] for r in tx.cur.execute(
            "SELECT serial FROM serials WHERE gtin=? AND serial IN (SELECT value FROM json_each(?))", (gtin, json.dumps(cand))
        )}
        fresh = [c for c in cand if c not in known][:need]
        got = [r[0] for r in tx.cur.execute(_INSERT_NEW, (gtin, lot, "random", tx.ts, json.dumps(fresh)))] if fresh else []
        out.extend(got)
        idle = 0 if got else idle + 1
        if idle >= 20:
            raise StoreError(f"random serial space of GTIN {gtin} ({len(alphabet)}^{length}) is exhausted")
    tx.count(gtin, lot, "allocated", len(out))
    return out


def _allocate_sequential(tx: Tx, gtin: str, lot: str, n: int, start: int, step: int, width: int) -> list[str]:
    name = f"seq:{gtin}"
    r = tx.cur.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
    nxt = max(int(r[0]) if r else start, start)
    out: list[str] = []
    while len(out) < n:
        need = n - len(out)
        try:
            cand = [sequential_serial(nxt + i * step, width) for i in range(need)]
        except ValueError as exc:
            raise StoreError(f"sequential serials of GTIN {gtin} exhausted: {exc}") from None
        got = [r[0] for r in tx.cur.execute(_INSERT_NEW, (gtin, lot, "sequential", tx.ts, json.dumps(cand))).fetchall()]
        out.extend(got)
        tx.count(gtin, lot, "allocated", len(got))
        nxt += need * step
    tx.cur.execute(
        "INSERT INTO counters(name, value, updated_at) VALUES (?,?,?) ON CONFLICT(name) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
        (name, nxt, tx.ts),
    )
    return out


def op_mark_sent(tx: Tx, gtin: str, lot: str, serials: list[str]) -> None:
    if len(set(serials)) != len(serials):
        raise StoreError(f"cannot mark serials of GTIN {gtin} sent: the list repeats a serial")
    if not serials:
        return
    found = _fetch(tx, gtin, serials)
    if len(found) != len(serials) or any(r[2] != "allocated" or r[3] != lot for r in found.values()):
        _check(gtin, serials, found, f"mark sent (lot {lot})", ("allocated",), lot=lot)
    tx.cur.executemany("UPDATE serials SET state='sent', updated_at=?, sent_at=? WHERE id=?", [(tx.ts, tx.ts, r[0]) for r in found.values()])
    tx.move(gtin, lot, "allocated", lot, "sent", len(serials))


def op_provision(tx: Tx, gtin: str, candidates: list[str], source: str, actor: str, invalid: int, repeats: int,
                 reason: str | None = None) -> list[str]:
    before = _pool_size(tx, gtin)
    inserted = [
        r[0]
        for r in tx.cur.execute(
            "INSERT OR IGNORE INTO serials(gtin, serial, state, lot, source, updated_at) "
            "SELECT ?, value, 'provisioned', NULL, ?, ? FROM json_each(?) RETURNING serial",
            (gtin, source, tx.ts, json.dumps(candidates)),
        ).fetchall()
    ]
    tx.count(gtin, None, "provisioned", len(inserted))
    tx.audit(actor, None, "serials_provisioned", {
        "gtin": gtin, "source": source, "accepted": len(inserted),
        "duplicates": repeats + len(candidates) - len(inserted), "invalid": invalid,
        **change({"provisioned": before}, {"provisioned": before + len(inserted)}, reason),
    })
    return inserted


def _pool_size(tx: Tx, gtin: str) -> int:
    """Serials of `gtin` in the pool (provisioned, no lot) as this transaction sees them: the table plus its pending counts."""
    r = tx.cur.execute("SELECT n FROM serial_tally WHERE gtin=? AND lot='' AND state='provisioned'", (gtin,)).fetchone()
    return (int(r[0]) if r else 0) + tx.tally.get((gtin, "", "provisioned"), 0)


def op_next_sscc_refs(tx: Tx, company_prefix: str, extension: int, n: int) -> list[int]:
    digits = 16 - len(company_prefix)
    name = f"sscc:{extension}:{company_prefix}"
    r = tx.cur.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
    last = int(r[0]) if r else 0
    top = 10**digits - 1
    if last + n > top:
        raise StoreError(
            f"SSCC serial references for company prefix {company_prefix} extension {extension} exhausted "
            f"({last} of {top} used, {n} asked)"
        )
    tx.cur.execute(
        "INSERT INTO counters(name, value, updated_at) VALUES (?,?,?) ON CONFLICT(name) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
        (name, last + n, tx.ts),
    )
    return list(range(last + 1, last + n + 1))


# --------------------------------------------------------------------------- batches, products, audit, outbox


def op_create_batch(tx: Tx, lot: str, gtin: str, expiry: str, planned_qty: int, actor: str, origin: str | None,
                    challenge_required: list[str] | None = None, dates: dict[str, str] | None = None,
                    audit_extra: dict[str, Any] | None = None) -> Batch:
    r = tx.cur.execute("SELECT gtin, state FROM batches WHERE lot=?", (lot,)).fetchone()
    if r is not None:
        raise StoreError(f"batch {lot} already exists (GTIN {r[0]}, {r[1]}); a lot number is used once")
    required = None if challenge_required is None else json.dumps(list(challenge_required))
    tx.cur.execute(
        "INSERT INTO batches(lot, gtin, expiry, planned_qty, state, created_by, created_at, updated_at, challenge, challenge_required) "
        "VALUES (?,?,?,?,'created',?,?,?,'[]',?)",
        (lot, gtin, expiry, planned_qty, actor, tx.ts, tx.ts, required),
    )
    detail: dict[str, Any] = {"lot": lot, "gtin": gtin, "expiry": expiry, "planned_qty": planned_qty}
    if dates:
        tx.cur.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (BATCH_DATES_KEY + lot, json.dumps(dict(dates), sort_keys=True)))
        detail.update(dates)
    if challenge_required is not None:
        detail["challenge_required"] = list(challenge_required)
    _tally(tx, tally_name("lot_tallies", lot), 1)  # this batch's reject and return counts are kept from its first event
    detail.update(audit_extra or {})
    detail.update(change(None, {"state": "created", "planned_qty": planned_qty}, None))
    tx.audit(actor, origin, "batch_created", detail)
    return Batch(lot=lot, gtin=gtin, expiry=expiry, planned_qty=planned_qty, state="created", created_at=tx.ts, created_by=actor,
                 challenge_required=None if challenge_required is None else list(challenge_required))


def op_upsert_products(tx: Tx, rows: list[tuple[str, str, str, str]], actor: str) -> int:
    """Registers products; a changed configuration is an audited change (Annex 11: controlled configuration)."""
    changed = 0
    for gtin, name, scheme, config in rows:
        r = tx.cur.execute("SELECT config FROM products WHERE gtin=?", (gtin,)).fetchone()
        if r is not None and r[0] == config:
            continue
        tx.cur.execute(
            "INSERT INTO products(gtin, name, scheme, config, updated_at) VALUES (?,?,?,?,?) "
            "ON CONFLICT(gtin) DO UPDATE SET name=excluded.name, scheme=excluded.scheme, config=excluded.config, updated_at=excluded.updated_at",
            (gtin, name, scheme, config, tx.ts),
        )
        detail: dict[str, Any] = {"gtin": gtin, "config": json.loads(config)}
        if r is not None:
            detail["previous"] = json.loads(r[0])
        detail.update(change(detail.get("previous"), detail["config"], "configuration loaded"))
        tx.audit(actor, None, "product_changed" if r is not None else "product_registered", detail)
        changed += 1
    return changed


def op_audit(tx: Tx, actor: str, origin: str, action: str, detail: dict[str, Any], command: tuple[str, str, str] | None = None,
             signature: SignatureSpec | None = None) -> int:
    seq = tx.audit(actor, origin, action, detail)
    if signature is not None:  # the signature of this record, in its transaction (identity.sign_record)
        result = detail.get("result")
        sign_record(tx, seq, signature, origin, action, detail.get("lot") or (result.get("lot") if isinstance(result, dict) else None))
    if command is not None:  # (command_id, name, reply JSON): same transaction as the audit record
        tx.cur.execute(
            "INSERT OR IGNORE INTO command_ids(command_id, name, origin, reply, ts) VALUES (?,?,?,?,?)",
            (command[0], command[1], origin or "", command[2], tx.ts),
        )
    return seq


def op_purge_command_ids(tx: Tx, cutoff: str) -> int:
    return tx.cur.execute("DELETE FROM command_ids WHERE ts < ?", (cutoff,)).rowcount


def delivered_bound(cur: Any, enabled: frozenset[str] | None) -> int:
    """The highest seq every enabled sink has delivered: the smallest of their cursors (0 when one has none yet).

    enabled None: every sink that has a cursor. No sink at all: 0, nothing counts as delivered.
    """
    return bound_of(dict(cur.execute("SELECT sink, seq FROM sink_cursors").fetchall()), enabled)


def bound_of(rows: dict[str, int], enabled: frozenset[str] | None) -> int:
    names = set(rows) if enabled is None else set(enabled)
    if not names:
        return 0
    return min(int(rows.get(n, 0)) for n in names)


def op_open_cursor(tx: Tx, sink: str) -> tuple[int, int | None]:
    """The sink's (cursor, pending); a sink seen for the first time starts before the oldest row kept (0)."""
    tx.cur.execute("INSERT OR IGNORE INTO sink_cursors(sink, seq, pending, updated_at) VALUES (?, 0, NULL, ?)", (sink, tx.ts))
    r = tx.cur.execute("SELECT seq, pending FROM sink_cursors WHERE sink=?", (sink,)).fetchone()
    return int(r[0]), (None if r[1] is None else int(r[1]))


def op_cursor_pending(tx: Tx, sink: str, last_seq: int | None) -> None:
    """Record the delivery the sink is about to make (its last seq), before it makes it."""
    cur = tx.cur.execute("UPDATE sink_cursors SET pending=?, updated_at=? WHERE sink=?", (last_seq, tx.ts, sink))
    if cur.rowcount != 1:
        raise StoreError(f"sink {sink!r} has no cursor")


#: meta key prefix of the last recorded state of an upstream link (sink or serial source): linectl/upstream/link_state.py
LINK_STATE_KEY = "link_state:"


def op_note_link_states(tx: Tx, states: dict[str, dict[str, Any]]) -> None:
    """Record each link's state (connected, last error, parked ...) with the time, for `upstream status` read from the
    store while the daemon is down. Operational state, not a record: overwritten, never audited."""
    for name, st in states.items():
        tx.cur.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                       (LINK_STATE_KEY + name, json.dumps({**st, "as_of": tx.ts}, sort_keys=True, default=str)))


def op_advance_cursor(tx: Tx, sink: str, seq: int, enabled: frozenset[str] | None, chunk: int) -> int:
    """Move the sink's cursor forward to `seq` (never back), clear a pending delivery it covers, then stamp
    forwarded_at on up to `chunk` rows every enabled sink has now delivered; returns how many were stamped."""
    tx.cur.execute(
        "INSERT INTO sink_cursors(sink, seq, pending, updated_at) VALUES (?, ?, NULL, ?) "
        "ON CONFLICT(sink) DO UPDATE SET seq=max(seq, excluded.seq), updated_at=excluded.updated_at, "
        "pending=CASE WHEN pending <= excluded.seq THEN NULL ELSE pending END",
        (sink, int(seq), tx.ts),
    )
    return op_stamp_forwarded(tx, enabled, chunk)


def op_stamp_forwarded(tx: Tx, enabled: frozenset[str] | None, chunk: int) -> int:
    """forwarded_at = now on up to `chunk` rows at or below the delivered bound that do not have it yet."""
    bound = delivered_bound(tx.cur, enabled)
    if bound <= 0:
        return 0
    cur = tx.cur.execute(
        "UPDATE outbox SET forwarded_at=? WHERE seq IN "
        "(SELECT seq FROM outbox WHERE forwarded_at IS NULL AND seq <= ? ORDER BY seq LIMIT ?)",
        (tx.ts, bound, int(chunk)),
    )
    return int(cur.rowcount)


def op_purge(tx: Tx, seqs: list[int], cutoff: str, enabled: frozenset[str] | None) -> int:
    js = json.dumps(seqs)
    # re-checked here: the candidate list was read outside this transaction; and never past a row some enabled
    # sink has not delivered (a sink enabled later starts behind rows forwarded before it existed)
    bound = delivered_bound(tx.cur, enabled)
    gone = [r[0] for r in tx.cur.execute(
        "DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?)) AND forwarded_at IS NOT NULL AND forwarded_at < ? "
        "AND seq <= ? RETURNING seq",
        (js, cutoff, bound),
    )]
    if gone:
        tx.cur.execute("DELETE FROM event_refs WHERE seq IN (SELECT value FROM json_each(?))", (json.dumps(gone),))
    return len(gone)


def op_set_max_pages(tx: Tx, pages: int | None) -> int:
    value = 4294967294 if pages is None else max(1, int(pages))
    return int(tx.cur.execute(f"PRAGMA max_page_count={value}").fetchone()[0])


def op_page_size(tx: Tx) -> int:
    return int(tx.cur.execute("PRAGMA page_size").fetchone()[0])


def op_claim_identity(tx: Tx, identity: dict[str, str], actor: str, origin: str) -> dict[str, Any]:
    """Record the line's identity in a store that has none (new, or from before identities); refuse another line's.

    Decided under the write lock, so two first openers cannot both adopt.
    """
    r = tx.cur.execute("SELECT value FROM meta WHERE key='line_identity'").fetchone()
    if r is not None:
        recorded = json.loads(r[0])
        if recorded != identity:
            raise IdentityMismatch(recorded, identity)
        return {"adopted": False, "identity": recorded}
    tx.cur.execute("INSERT INTO meta(key, value) VALUES ('line_identity', ?)", (json.dumps(identity, sort_keys=True),))
    tx.audit(actor, origin, "line_identity_recorded", {"identity": identity})
    return {"adopted": True, "identity": identity}


def describe_identity(identity: dict[str, str]) -> str:
    path = "/".join(str(identity.get(k, "?")) for k in ("enterprise", "site", "area", "line"))
    return f"line {path} (GLN {identity.get('gln', '?')})"


class IdentityMismatch(StoreError):
    def __init__(self, recorded: dict[str, str], wanted: dict[str, str]) -> None:
        super().__init__(
            f"this store belongs to {describe_identity(recorded)}, not to {describe_identity(wanted)} of the config; "
            "refusing to mix the records of two lines"
        )
        self.recorded = recorded
        self.wanted = wanted


def op_close_batch(tx: Tx, lot: str, policy: str, extra_unused: list[str], actor: str, stop_reason: str | None) -> dict[str, Any]:
    """Close a batch in one transaction: unused serials returned or voided, serials still `sent` decommissioned.

    The daemon's `close_batch` and the offline `linectl batch close` both run
    this, so a batch closed without the line is recorded exactly like one
    closed by it. `stop_reason` (offline only) first records a batch left
    running/challenge/paused by a crash as stopped; without it such a batch is
    refused (the daemon stops the line before closing).
    """
    from linectl.events import BatchState, BatchStateChanged, RejectReason, SerialsReturned, SerialsVoided, UnitDecommissioned

    r = tx.cur.execute("SELECT gtin, state FROM batches WHERE lot=?", (lot,)).fetchone()
    if r is None:
        raise StoreError(f"no batch {lot} in this store")
    gtin, state = r
    if state == "closed":
        raise StoreError(f"batch {lot} is already closed")
    events: list[Any] = []
    previous = state
    if state in ("running", "challenge", "paused"):
        if stop_reason is None:
            raise StoreError(f"batch {lot} is {state}; stop it before closing")
        events.append(BatchStateChanged(lot=lot, gtin=gtin, state=BatchState.STOPPED, previous=BatchState(state), actor=actor, reason=stop_reason))
        state = "stopped"
    allocated = [row[0] for row in tx.cur.execute(
        "SELECT serial FROM serials INDEXED BY ix_serials_allocated WHERE lot=? AND state='allocated' ORDER BY id", (lot,)
    )]
    unused = sorted(set(allocated) | set(extra_unused))
    for i in range(0, len(unused), 1000):
        chunk = unused[i : i + 1000]
        events.append(SerialsVoided(gtin=gtin, lot=lot, serials=chunk) if policy == "void" else SerialsReturned(gtin=gtin, lot=lot, serials=chunk))
    # anything still 'sent' for this lot cannot be accounted for as printed-and-decided: decommission it
    stray = [row[0] for row in tx.cur.execute("SELECT serial FROM serials WHERE state='sent' AND +lot=? AND gtin=? ORDER BY id", (lot, gtin))]
    events.extend(
        UnitDecommissioned(gtin=gtin, serial=s, lot=lot, reason=RejectReason.LINE_STOPPED, detail="still in flight at batch close") for s in stray
    )
    events.append(BatchStateChanged(lot=lot, gtin=gtin, state=BatchState.CLOSED, previous=BatchState(state), actor=actor,
                                    reason=f"close; unused serials: {policy} {len(unused)}"))
    for ev in events:
        apply_event(tx, ev, ev.model_dump_json())
    return {"lot": lot, "gtin": gtin, "previous": previous, "policy": policy, "unused": len(unused), "decommissioned": len(stray)}


def op_stop_batch(tx: Tx, lot: str, actor: str, reason: str) -> dict[str, Any]:
    """Record a batch left running/challenge/paused (by a crash) as stopped, without a line to drain."""
    from linectl.events import BatchState, BatchStateChanged

    r = tx.cur.execute("SELECT gtin, state FROM batches WHERE lot=?", (lot,)).fetchone()
    if r is None:
        raise StoreError(f"no batch {lot} in this store")
    gtin, state = r
    if state not in ("running", "challenge", "paused"):
        raise StoreError(f"batch {lot} is {state}; only a running, challenge or paused batch can be stopped")
    ev = BatchStateChanged(lot=lot, gtin=gtin, state=BatchState.STOPPED, previous=BatchState(state), actor=actor, reason=reason)
    apply_event(tx, ev, ev.model_dump_json())
    return {"lot": lot, "previous": state, "state": "stopped"}
