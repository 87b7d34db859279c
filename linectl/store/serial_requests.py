"""Serial requests to an L3/L4 source: the writer operations and reads behind linectl/sources/provisioner.py.

The order the record keeps is the order that makes a crash harmless:
1. `op_request_new` records the request (state pending) before it is sent;
2. `op_request_answered` records the answer as received (raw) and what the source read in it, before anything
   is imported;
3. `op_request_import` imports the page's serials into the pool and marks the page imported in ONE transaction.
Killed between 1 and 2: the row is still pending, and the provisioner re-sends it with the same key (a protocol that
honours keys answers the same numbers) or records it `lost` (serialbox has no key: those numbers were maybe allocated
at the L3 and are never used here). Killed between 2 and 3: the row is answered and the import runs from the stored
answer at the next start. After 3 a page can never be imported again: the import checks its state in the same
transaction. Every serial refused (invalid, duplicate, another GTIN's) is kept on the row with its reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from linectl.store.model import StoreError
from linectl.store.ops import op_provision
from linectl.store.writer import Tx

#: refused serials kept with their reasons per row (more are counted, not listed)
REFUSED_KEPT = 10_000
OPEN_STATES = ("pending", "answered", "parked")

_COLS = (
    "id, kind, source, gtin, size, key, page, lot, continuation, state, created_at, sent_at, answered_at, imported_at, "
    "accepted, duplicates, invalid, foreign_serials, error, attempts, updated_at"
)


@dataclass(frozen=True)
class RequestRecord:
    """One row of serial_requests (raw answer and refused serials left out: `request_answer` / `request_problems`)."""

    id: int
    kind: str
    source: str
    gtin: str
    size: int
    key: str
    page: int
    lot: str | None
    continuation: str | None
    state: str
    created_at: str
    sent_at: str | None
    answered_at: str | None
    imported_at: str | None
    accepted: int | None
    duplicates: int | None
    invalid: int | None
    foreign: int | None
    error: str | None
    attempts: int
    updated_at: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ImportResult:
    accepted: int
    duplicates: int
    invalid: int
    foreign: int
    problems: list[tuple[str, str]] = field(default_factory=list)
    already: bool = False  # the page had been imported before: nothing done now


def _record(r: Any) -> RequestRecord:
    return RequestRecord(*r)


def _row(tx: Tx, request_id: int) -> tuple[Any, ...]:
    r = tx.cur.execute("SELECT kind, state, gtin, source, size, key, answer FROM serial_requests WHERE id=?", (request_id,)).fetchone()
    if r is None:
        raise StoreError(f"no serial request {request_id}")
    return tuple(r)


def op_request_new(tx: Tx, kind: str, source: str, gtin: str, size: int, key: str, page: int, lot: str | None,
                   continuation: str | None, serials: list[str] | None) -> int:
    """Record a request (or a give-back, with the serials it gives back) as pending, before it is sent."""
    if kind not in ("request", "return"):
        raise StoreError(f"serial request kind {kind!r} is neither request nor return")
    r = tx.cur.execute(
        "INSERT INTO serial_requests(kind, source, gtin, size, key, page, lot, continuation, state, created_at, answer, attempts, updated_at) "
        "VALUES (?,?,?,?,?,?,?,?,'pending',?,?,0,?) RETURNING id",
        (kind, source, gtin, int(size), key, int(page), lot, continuation, tx.ts,
         None if serials is None else json.dumps({"serials": serials}), tx.ts),
    ).fetchone()
    tx.audit("system", None, f"serial_{kind}_recorded", {"request": int(r[0]), "source": source, "gtin": gtin, "size": int(size),
                                                           "key": key, "page": int(page), "lot": lot})
    return int(r[0])


def op_request_attempt(tx: Tx, request_id: int) -> int:
    """An attempt is about to be sent (again): count it and stamp sent_at. Returns the attempt number."""
    r = tx.cur.execute(
        "UPDATE serial_requests SET attempts = attempts + 1, sent_at=?, updated_at=? WHERE id=? AND state='pending' RETURNING attempts",
        (tx.ts, tx.ts, request_id),
    ).fetchone()
    if r is None:
        raise StoreError(f"serial request {request_id} is not pending")
    return int(r[0])


def op_request_answered(tx: Tx, request_id: int, raw: str, answer: dict[str, Any]) -> None:
    kind, state, *_ = _row(tx, request_id)
    if state != "pending":
        raise StoreError(f"serial request {request_id} is {state}, not pending: an answer is recorded once")
    tx.cur.execute(
        "UPDATE serial_requests SET state='answered', raw=?, answer=?, answered_at=?, error=NULL, updated_at=? WHERE id=?",
        (raw, json.dumps(answer), tx.ts, tx.ts, request_id),
    )


def op_request_import(tx: Tx, request_id: int, source_text: str, actor: str) -> ImportResult:
    """Import an answered page into the pool and mark it imported, in this one transaction (never twice)."""
    from linectl.store.store import _screen

    kind, state, gtin, source, _size, _key, answer_json = _row(tx, request_id)
    if state == "imported":
        r = tx.cur.execute(
            "SELECT accepted, duplicates, invalid, foreign_serials FROM serial_requests WHERE id=?", (request_id,)
        ).fetchone()
        return ImportResult(int(r[0] or 0), int(r[1] or 0), int(r[2] or 0), int(r[3] or 0), already=True)
    if kind != "request" or state != "answered":
        raise StoreError(f"serial request {request_id} is a {kind} in state {state}; only an answered request is imported")
    answer = json.loads(answer_json or "{}")
    items: list[Any] = list(answer.get("serials") or [])
    foreign = [(str(s), str(why)) for s, why in (answer.get("foreign") or [])]
    candidates, _problems, rejected, invalid, repeats, positions = _screen(items)
    inserted = op_provision(tx, gtin, candidates, source_text, actor, invalid, repeats) if candidates else []
    refused: list[tuple[str, str]] = [(s, why) for _i, s, why in rejected]
    dups = repeats
    if len(inserted) != len(candidates):
        got = set(inserted)
        for s in candidates:
            if s not in got:
                dups += 1
                refused.append((s, f"duplicate: already known for GTIN {gtin}"))
    refused.sort(key=lambda p: positions.get(p[0], -1))
    refused.extend((s, f"foreign: {why}") for s, why in foreign)
    tx.cur.execute(
        "UPDATE serial_requests SET state='imported', imported_at=?, accepted=?, duplicates=?, invalid=?, foreign_serials=?, problems=?, "
        "updated_at=? WHERE id=?",
        (tx.ts, len(inserted), dups, invalid, len(foreign), json.dumps(refused[:REFUSED_KEPT]), tx.ts, request_id),
    )
    if dups or invalid or foreign:
        tx.audit(actor, None, "serials_refused", {
            "request": request_id, "source": source, "gtin": gtin, "duplicates": dups, "invalid": invalid, "foreign": len(foreign),
            "examples": [list(p) for p in refused[:10]],
        })
    return ImportResult(len(inserted), dups, invalid, len(foreign), refused[:REFUSED_KEPT])


def op_request_failed(tx: Tx, request_id: int, error: str, state: str | None, actor: str) -> None:
    """An attempt failed: keep the error; `state` parked (the L3 refused) or lost (maybe allocated, never received)."""
    kind, cur_state, gtin, source, size, key, _ = _row(tx, request_id)
    if state is None:
        tx.cur.execute("UPDATE serial_requests SET error=?, updated_at=? WHERE id=?", (error[:2000], tx.ts, request_id))
        return
    if state not in ("parked", "lost", "reported", "returned") or cur_state != "pending":
        raise StoreError(f"serial request {request_id} ({cur_state}) cannot become {state}")
    tx.cur.execute("UPDATE serial_requests SET state=?, error=?, updated_at=? WHERE id=?", (state, error[:2000], tx.ts, request_id))
    tx.audit(actor, None, f"serial_{kind}_{state}", {"request": request_id, "source": source, "gtin": gtin, "size": size, "key": key,
                                                      "reason": error[:500]})


def op_request_done(tx: Tx, request_id: int, state: str, note: str | None, actor: str) -> None:
    """A give-back ended: returned to the L3, or reported (its protocol has no return)."""
    op_request_failed(tx, request_id, note or state, state, actor)


def op_request_unpark(tx: Tx, source: str, gtin: str, actor: str, origin: str) -> list[int]:
    ids = [int(r[0]) for r in tx.cur.execute(
        "UPDATE serial_requests SET state='pending', error=NULL, updated_at=? WHERE source=? AND gtin=? AND state='parked' RETURNING id",
        (tx.ts, source, gtin),
    )]
    if ids:
        tx.audit(actor, origin, "serial_requests_retried", {"source": source, "gtin": gtin, "requests": sorted(ids)})
    return sorted(ids)


# --------------------------------------------------------------------------- reads (a read connection's cursor)


def q_requests(conn: Any, *, source: str | None = None, gtin: str | None = None, states: tuple[str, ...] | None = None,
               kind: str | None = None, limit: int = 1000) -> list[RequestRecord]:
    where, params = [], []
    for col, val in (("source", source), ("gtin", gtin), ("kind", kind)):
        if val is not None:
            where.append(f"{col}=?")
            params.append(val)
    if states:
        where.append(f"state IN ({','.join('?' * len(states))})")
        params.extend(states)
    sql = f"SELECT {_COLS} FROM serial_requests" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id LIMIT ?"
    return [_record(r) for r in conn.exec_driver_sql(sql, (*params, int(limit))).all()]


def q_answer(conn: Any, request_id: int) -> tuple[str | None, dict[str, Any] | None, list[tuple[str, str]]]:
    """(raw, answer, refused serials with reasons) of one request."""
    r = conn.exec_driver_sql("SELECT raw, answer, problems FROM serial_requests WHERE id=?", (request_id,)).first()
    if r is None:
        raise StoreError(f"no serial request {request_id}")
    return r[0], None if r[1] is None else json.loads(r[1]), [(str(a), str(b)) for a, b in json.loads(r[2] or "[]")]


def q_voided_unreturned(conn: Any, gtin: str, lot: str, source_prefix: str) -> list[str]:
    """Serials of `lot` voided (never printed) that came from the source's requests (their source text starts with
    source_prefix) and that no give-back row names yet."""
    given: set[str] = set()
    for (answer,) in conn.exec_driver_sql(
        "SELECT answer FROM serial_requests WHERE kind='return' AND gtin=? AND lot=?", (gtin, lot)
    ).all():
        given.update(json.loads(answer or "{}").get("serials") or [])
    rows = conn.exec_driver_sql(
        "SELECT serial FROM serials WHERE gtin=? AND lot=? AND state='voided' AND substr(source, 1, ?) = ? ORDER BY id",
        (gtin, lot, len(source_prefix), source_prefix),
    ).all()
    return [r[0] for r in rows if r[0] not in given]


def q_summary(conn: Any) -> dict[str, dict[str, Any]]:
    """Per source: request counts by state, serials lost (size of lost requests), last error, oldest open request."""
    out: dict[str, dict[str, Any]] = {}
    for source, kind, state, n, size in conn.exec_driver_sql(
        "SELECT source, kind, state, count(*), sum(size) FROM serial_requests GROUP BY 1, 2, 3"
    ).all():
        s = out.setdefault(source, {"requests": {}, "returns": {}, "serials_lost": 0, "serials_reported_unused": 0})
        s["requests" if kind == "request" else "returns"][state] = int(n)
        if kind == "request" and state == "lost":
            s["serials_lost"] += int(size or 0)
        if kind == "return" and state == "reported":
            s["serials_reported_unused"] += int(size or 0)
    for source, err, ts in conn.exec_driver_sql(
        "SELECT source, error, max(updated_at) FROM serial_requests WHERE error IS NOT NULL GROUP BY source"
    ).all():
        if source in out:
            out[source]["last_error"] = err
            out[source]["last_error_at"] = ts
    for source, ts in conn.exec_driver_sql(
        "SELECT source, min(created_at) FROM serial_requests WHERE state IN ('pending','answered','parked') GROUP BY source"
    ).all():
        if source in out:
            out[source]["oldest_open_request_at"] = ts
    for source, n in conn.exec_driver_sql(
        "SELECT source, coalesce(sum(accepted), 0) FROM serial_requests WHERE kind='request' GROUP BY source"
    ).all():
        if source in out:
            out[source]["serials_imported"] = int(n)
    return out
