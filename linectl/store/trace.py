"""Trace, recall and scan-based verification, read straight from the store.

An inspector, a recall coordinator or a pharmacist's scan all ask the same
store the same question from a different angle; answering from SQL on the
store's read-only connection (one WAL snapshot per answer) means none of them
ever waits on, or slows, the line writer.

- `trace(store, code)`: what a unit, case or pallet is, its status, every
  event about it, its parents up to the pallet and, for a container, its whole
  tree with each child's status.
- `recall(store, lot)` / `write_recall_csv` / `write_recall_json`: every
  pallet, case and unit of a batch with status and parent, streamed so a
  1,000,000-unit batch never sits in memory twice.
- `verify_code(store, code)`: genuine / decommissioned / recalled / unknown /
  suspicious for one scan.
- `mark_recalled(store, lot, ...)`: the recall flag is an audit record
  (action `batch_recalled`), so who recalled what and when is in the
  hash-chained trail and nothing in the store schema had to change.

Outbox rows are purged after the retention period once forwarded; event
histories cover what the outbox still holds (the registry, aggregation and
audit trail are never purged).
"""

from __future__ import annotations

import csv
import json
import sqlite3
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

import structlog

from linectl import gs1
from linectl.store.audit import change
from linectl.store.model import BATCH_DATES_KEY

if TYPE_CHECKING:
    from linectl.store.ports import EngineStore

log = structlog.get_logger("linectl.store.trace")

MAX_DEPTH = 8  # unit -> case -> pallet needs 2; anything deeper is a data fault, not a reason to loop
EVENT_CHILDREN_SHOWN = 12  # a Packed of 120 units in a unit's history says "120 children", not all of them
PRINTED_STATES = ("sent", "commissioned", "decommissioned")  # a recall lists what may physically exist
RECALL_COLUMNS = ("level", "sscc", "gtin", "serial", "status", "parent", "pallet")
RECALL_ACTION = "batch_recalled"

VERDICTS = ("genuine", "decommissioned", "recalled", "unknown", "suspicious")


class TraceError(ValueError):
    """The code is not a GS1 unit (GTIN + serial) or SSCC identity."""


# --------------------------------------------------------------------------- store access


@contextmanager
def snapshot(store: EngineStore) -> Iterator[sqlite3.Connection]:
    """A raw sqlite3 connection inside one read transaction: every query sees the same committed state.

    Raw cursors instead of SQLAlchemy rows: a recall fetches a million rows and
    the per-row overhead is what decides whether it takes one second or five.
    """
    with store.read_snapshot() as c:
        c.exec_driver_sql("SELECT 1")  # autobegin: BEGIN on the read connection, one WAL snapshot from here
        raw = c.connection.driver_connection
        assert raw is not None
        yield raw


def unit_key(gtin: str, serial: str) -> str:
    return f"01{gtin}21{serial}"


# --------------------------------------------------------------------------- identity


def identify_code(code: str) -> dict[str, Any]:
    """Raw scan (`]d2…`, `]C1…`), HRI, element string, EPC URN or Digital Link -> identity dict."""
    if not isinstance(code, str) or not code.strip():
        raise TraceError("empty code")
    code = code.strip("\r\n")
    if len(code) == 18 and code.isdigit() and gs1.is_valid_sscc(code):
        code = "(00)" + code  # a bare SSCC as an operator types it from the label
    sym = code[:3] if code.startswith("]") and len(code) >= 3 else None
    try:
        # A plain DataMatrix (]d1) is not GS1, so gs1 refuses it; its text still names
        # the unit a counterfeiter copied, which is what the verdict needs.
        ident = gs1.identify(code[3:] if sym == gs1.SYMBOLOGY_DM else code)
    except gs1.GS1Error as exc:
        raise TraceError(f"cannot identify {code[:80]!r}: {exc.reason}") from None
    if ident.kind == "sscc":
        return {"kind": "sscc", "sscc": ident.sscc, "gtin": None, "serial": None, "lot": None, "expiry": None, "symbology": sym}
    out: dict[str, Any] = {
        "kind": "sgtin", "sscc": None, "gtin": ident.gtin, "serial": ident.serial, "lot": ident.lot, "expiry": ident.expiry, "symbology": sym,
    }
    if ident.dates:
        out["dates"] = dict(ident.dates)
    return out


def _products(store: EngineStore, conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """GTIN -> {name, company_prefix_length}: master data for EPC URNs and names (a handful of rows, read each time)."""
    out: dict[str, dict[str, Any]] = {}
    for gtin, name, config in conn.execute("SELECT gtin, name, config FROM products"):
        try:
            cpl = int(json.loads(config).get("company_prefix_length"))
        except (TypeError, ValueError):
            cpl = None
        out[gtin] = {"name": name, "company_prefix_length": cpl}
    return out


def _epc_unit(products: dict[str, dict[str, Any]], gtin: str, serial: str) -> str | None:
    cpl = (products.get(gtin) or {}).get("company_prefix_length")
    try:
        return gs1.sgtin_urn(gtin, serial, cpl) if cpl else None
    except gs1.GS1Error:
        return None


def _epc_sscc(products: dict[str, dict[str, Any]], sscc: str, gtin: str | None) -> str | None:
    cpl = (products.get(gtin or "") or {}).get("company_prefix_length")
    if not cpl:  # the SSCC was made from one of our products' company prefixes: find which
        for g, p in products.items():
            n = p.get("company_prefix_length")
            if n and sscc[1 : 1 + n] == g[1 : 1 + n]:
                cpl = n
                break
    try:
        return gs1.sscc_urn(sscc, cpl) if cpl else None
    except gs1.GS1Error:
        return None


# --------------------------------------------------------------------------- facts used by stations and rework


@dataclass(frozen=True)
class UnitFacts:
    gtin: str
    serial: str
    state: str | None  # None = unknown to this store
    lot: str | None
    parent: str | None


@dataclass(frozen=True)
class ContainerFacts:
    sscc: str
    level: str | None  # None = unknown to this store
    state: str | None
    lot: str | None
    gtin: str | None
    parent: str | None
    children: int


_UNIT_FACTS_SQL = (
    "SELECT j.value ->> '$[0]', j.value ->> '$[1]', s.state, s.lot, a.parent "
    "FROM json_each(?) j "
    "LEFT JOIN serials s ON s.gtin = j.value ->> '$[0]' AND s.serial = j.value ->> '$[1]' "
    "LEFT JOIN aggregation a ON a.child_kind = 'unit' AND a.child_key = '01' || (j.value ->> '$[0]') || '21' || (j.value ->> '$[1]') "
    "AND a.removed_seq IS NULL"
)


def unit_facts(store: EngineStore, units: list[tuple[str, str]], conn: sqlite3.Connection | None = None) -> dict[tuple[str, str], UnitFacts]:
    """State, lot and current parent of many units in one query (a case of 120 is checked in one round trip)."""
    if not units:
        return {}
    if conn is None:
        with snapshot(store) as c:
            return unit_facts(store, units, c)
    rows = conn.execute(_UNIT_FACTS_SQL, (json.dumps([list(u) for u in units]),)).fetchall()
    return {(g, s): UnitFacts(g, s, st, lot, parent) for g, s, st, lot, parent in rows}


_CONTAINER_FACTS_SQL = (
    "SELECT j.value, c.level, c.state, c.lot, c.gtin, a.parent, "
    "(SELECT count(*) FROM aggregation k WHERE k.parent = j.value AND k.removed_seq IS NULL) "
    "FROM json_each(?) j "
    "LEFT JOIN containers c ON c.sscc = j.value "
    "LEFT JOIN aggregation a ON a.child_kind = 'container' AND a.child_key = j.value AND a.removed_seq IS NULL"
)


def container_facts(store: EngineStore, ssccs: list[str], conn: sqlite3.Connection | None = None) -> dict[str, ContainerFacts]:
    if not ssccs:
        return {}
    if conn is None:
        with snapshot(store) as c:
            return container_facts(store, ssccs, c)
    rows = conn.execute(_CONTAINER_FACTS_SQL, (json.dumps(list(ssccs)),)).fetchall()
    return {r[0]: ContainerFacts(r[0], r[1], r[2], r[3], r[4], r[5], int(r[6])) for r in rows}


def active_children(store: EngineStore, sscc: str, conn: sqlite3.Connection | None = None) -> list[dict[str, Any]]:
    """Current children of one container: [{kind: unit, gtin, serial} | {kind: container, sscc}] in packing order."""
    if conn is None:
        with snapshot(store) as c:
            return active_children(store, sscc, c)
    out = []
    for kind, key, g, s in conn.execute(
        "SELECT child_kind, child_key, child_gtin, child_serial FROM aggregation WHERE parent=? AND removed_seq IS NULL ORDER BY id", (sscc,)
    ):
        out.append({"kind": "unit", "gtin": g, "serial": s} if kind == "unit" else {"kind": "container", "sscc": key})
    return out


# --------------------------------------------------------------------------- trace


def _parent_of(conn: sqlite3.Connection, kind: str, key: str) -> str | None:
    r = conn.execute("SELECT parent FROM aggregation WHERE child_kind=? AND child_key=? AND removed_seq IS NULL", (kind, key)).fetchone()
    return r[0] if r else None


def _chain(conn: sqlite3.Connection, first_parent: str | None) -> list[dict[str, Any]]:
    """Parents from the nearest up (case, then pallet)."""
    out: list[dict[str, Any]] = []
    parent = first_parent
    while parent is not None and len(out) < MAX_DEPTH:
        c = conn.execute("SELECT level, state, lot FROM containers WHERE sscc=?", (parent,)).fetchone()
        out.append({"sscc": parent, "level": c[0] if c else None, "status": c[1] if c else None, "lot": c[2] if c else None})
        parent = _parent_of(conn, "container", parent)
    return out


def _event(seq: int, kind: str, event_id: str, created_at: str, body: str) -> dict[str, Any]:
    e = json.loads(body)
    children = e.pop("children", None)
    out: dict[str, Any] = {"seq": seq, "kind": kind, "event_id": event_id, "event_time": e.pop("event_time", None), "stored_at": created_at}
    e.pop("kind", None)
    e.pop("event_id", None)
    out.update({k: v for k, v in e.items() if v is not None})
    if children is not None:
        out["children_count"] = len(children)
        if len(children) <= EVENT_CHILDREN_SHOWN:
            out["children"] = [{k: v for k, v in c.items() if v is not None} for c in children]
    return out


def _unit_history(conn: sqlite3.Connection, serial_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT o.seq, o.kind, o.event_id, o.created_at, o.body FROM outbox o WHERE o.serial_id = ?1 "
        "UNION SELECT o.seq, o.kind, o.event_id, o.created_at, o.body FROM event_refs r JOIN outbox o ON o.seq = r.seq WHERE r.serial_id = ?1 "
        "ORDER BY 1",
        (serial_id,),
    ).fetchall()
    return [_event(*r) for r in rows]


def _container_history(conn: sqlite3.Connection, sscc: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT DISTINCT o.seq, o.kind, o.event_id, o.created_at, o.body FROM event_refs r JOIN outbox o ON o.seq = r.seq "
        "WHERE r.sscc = ? ORDER BY o.seq",
        (sscc,),
    ).fetchall()
    return [_event(*r) for r in rows]


_TREE_SQL = (
    "SELECT a.parent, a.child_kind, a.child_key, a.child_gtin, a.child_serial, s.state, c.level, c.state "
    "FROM aggregation a "
    "LEFT JOIN serials s ON a.child_kind = 'unit' AND s.gtin = a.child_gtin AND s.serial = a.child_serial "
    "LEFT JOIN containers c ON a.child_kind = 'container' AND c.sscc = a.child_key "
    "WHERE a.parent IN (SELECT value FROM json_each(?)) AND a.removed_seq IS NULL ORDER BY a.id"
)


def _tree(conn: sqlite3.Connection, root: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Children of `root` recursively, with status; one query per level, not per node."""
    nodes: dict[str, list[dict[str, Any]]] = {root: []}
    counts: dict[str, int] = {}
    level = [root]
    depth = 0
    while level and depth < MAX_DEPTH:
        nxt: list[str] = []
        for parent, kind, key, g, s, ustate, clevel, cstate in conn.execute(_TREE_SQL, (json.dumps(level),)):
            if kind == "unit":
                node = {"kind": "unit", "gtin": g, "serial": s, "status": ustate}
                counts["units"] = counts.get("units", 0) + 1
            else:
                node = {"kind": clevel or "container", "sscc": key, "status": cstate, "children": []}
                nodes[key] = node["children"]
                counts[f"{clevel or 'container'}s"] = counts.get(f"{clevel or 'container'}s", 0) + 1
                nxt.append(key)
            nodes[parent].append(node)
        level = nxt
        depth += 1
    return nodes[root], counts


def trace(store: EngineStore, code: str) -> dict[str, Any]:
    """Everything known about one code; `found` False (status "unknown") when this store never issued it.

    Raises TraceError when the code is not a GS1 unit or SSCC identity.
    """
    ident = identify_code(code)
    with snapshot(store) as conn:
        products = _products(store, conn)
        if ident["kind"] == "sscc":
            return _trace_container(store, conn, products, code, ident["sscc"])
        return _trace_unit(store, conn, products, code, ident)


def _batch_info(store: EngineStore, conn: sqlite3.Connection, lot: str | None) -> dict[str, Any] | None:
    if not lot:
        return None
    b = conn.execute("SELECT lot, gtin, expiry, state FROM batches WHERE lot=?", (lot,)).fetchone()
    if b is None:
        return {"lot": lot, "known": False, "recalled": is_recalled(store, lot, conn)}
    return {"lot": b[0], "gtin": b[1], "expiry": b[2], "state": b[3], "recalled": is_recalled(store, lot, conn)}


def _trace_unit(store: EngineStore, conn: sqlite3.Connection, products: dict[str, Any], code: str, ident: dict[str, Any]) -> dict[str, Any]:
    gtin, serial = ident["gtin"], ident["serial"]
    identity = {"gtin": gtin, "serial": serial, "epc": _epc_unit(products, gtin, serial)}
    r = conn.execute("SELECT id, state, lot, updated_at, sent_at FROM serials WHERE gtin=? AND serial=?", (gtin, serial)).fetchone()
    out: dict[str, Any] = {"code": code, "kind": "unit", "found": r is not None, "identity": identity}
    if r is None:
        out.update(status="unknown", lot=None, batch=None, parent=None, parents=[], events=[])
        return out
    sid, state, lot, updated_at, sent_at = r
    parent = _parent_of(conn, "unit", unit_key(gtin, serial))
    out.update(
        status=state,
        lot=lot,
        product=(products.get(gtin) or {}).get("name"),
        batch=_batch_info(store, conn, lot),
        updated_at=updated_at,
        sent_at=sent_at,
        parent=parent,
        parents=_chain(conn, parent),
        events=_unit_history(conn, sid),
    )
    fate = store.unit_fate(gtin, serial)
    if fate is not None:
        # a PLC restart left its passage of the reject gate unproven: shown until (and after) an operator decides
        out["fate"] = fate.as_dict()
        if fate.state == "fate_unknown":
            out["status"] = f"{state} (fate_unknown)"
    return out


def _trace_container(store: EngineStore, conn: sqlite3.Connection, products: dict[str, Any], code: str, sscc: str) -> dict[str, Any]:
    c = conn.execute("SELECT level, state, lot, gtin, updated_at FROM containers WHERE sscc=?", (sscc,)).fetchone()
    identity = {"sscc": sscc, "epc": _epc_sscc(products, sscc, c[3] if c else None)}
    out: dict[str, Any] = {"code": code, "kind": "container", "found": c is not None, "identity": identity}
    if c is None:
        out.update(status="unknown", level=None, lot=None, batch=None, parent=None, parents=[], contents={}, tree=[], events=[])
        return out
    level, state, lot, gtin, updated_at = c
    parent = _parent_of(conn, "container", sscc)
    tree, counts = _tree(conn, sscc)
    out.update(
        kind=level,
        status=state,
        level=level,
        lot=lot,
        gtin=gtin,
        product=(products.get(gtin or "") or {}).get("name"),
        batch=_batch_info(store, conn, lot),
        updated_at=updated_at,
        parent=parent,
        parents=_chain(conn, parent),
        contents=counts,
        tree=tree,
        events=_container_history(conn, sscc),
    )
    return out


# --------------------------------------------------------------------------- recall


_RECALL_CONTAINERS_SQL = (
    "SELECT c.level, c.sscc, c.gtin, c.state, a.parent FROM containers c "
    "LEFT JOIN aggregation a ON a.child_kind = 'container' AND a.child_key = c.sscc AND a.removed_seq IS NULL "
    "WHERE c.lot = ? ORDER BY CASE c.level WHEN 'pallet' THEN 0 WHEN 'case' THEN 1 ELSE 2 END, c.sscc"
)
_CSV_SERIAL = (
    "CASE WHEN instr(a.child_serial, ',') OR instr(a.child_serial, '\"') "
    "THEN '\"' || replace(a.child_serial, '\"', '\"\"') || '\"' ELSE a.child_serial END"
)
# Units packed in the lot's containers, walked parent by parent through ix_aggregation_parent: the
# rows of one case were inserted together, so this is a near-sequential read; one query per pallet,
# whose SSCC is a parameter (a per-row JSON extraction would cost more than the whole walk).
# Nested-loop order = the parents in list order, then packing order (index entries are in rowid order).
_PACKED_FROM = (
    "FROM json_each(?1) j JOIN aggregation a ON a.parent = j.value "
    "WHERE a.removed_seq IS NULL AND +a.child_kind = 'unit'"  # '+': walk by parent, not the child-key index
)
_PACKED_SQL = {
    "rows": f"SELECT 'unit', '', a.child_gtin, a.child_serial, 'commissioned', a.parent, ?2 {_PACKED_FROM}",
    "csv": f"SELECT group_concat(format('unit,,%s,%s,commissioned,%s,%s', a.child_gtin, {_CSV_SERIAL}, a.parent, ?2), char(10)), count(*) {_PACKED_FROM}",
    "json": "SELECT group_concat(json_object('gtin', a.child_gtin, 'serial', a.child_serial, 'status', 'commissioned', "
    f"'parent', a.parent, 'pallet', nullif(?2, '')), ','), count(*) {_PACKED_FROM}",
}
# Printed units of the lot outside its containers: in-flight and decommissioned ones are never packed;
# commissioned ones are looked for only when the packed walk found fewer than the lot has (mid-production,
# rework), with an index-only existence probe per unit (no table read, unlike fetching the parent).
_LOOSE_OTHERS = "SELECT id, gtin, serial, state FROM serials WHERE lot = ?1 AND state IN ('sent', 'decommissioned') ORDER BY id"
_LOOSE_ALL = (
    "SELECT s.id, s.gtin, s.serial, s.state FROM serials s WHERE s.lot = ?1 AND (s.state IN ('sent', 'decommissioned') "
    "OR (s.state = 'commissioned' AND NOT EXISTS (SELECT 1 FROM aggregation a WHERE a.child_kind = 'unit' "
    "AND a.child_key = '01' || s.gtin || '21' || s.serial AND a.removed_seq IS NULL))) ORDER BY s.id"
)


def _recall_parts(conn: sqlite3.Connection, lot: str, fmt: str) -> Iterator[tuple[str, Any, int]]:
    """(level, payload, rows): containers one by one, packed units as one text chunk per pallet, loose units.

    Status of a packed unit is "commissioned" without reading it: the store
    only packs commissioned units and refuses to decommission a packed one
    (UnitDecommissioned needs Unpacked first, in the same transaction), so
    reading a million states back would only repeat what the writer enforced.
    Pallets first, then cases (by SSCC), then units: packed ones by pallet,
    case and packing order, then loose ones in allocation order. Containers
    hold units of their own lot only (the stations and rework check it), so a
    unit of the lot packed anywhere is packed in one of the lot's containers.
    """
    containers = conn.execute(_RECALL_CONTAINERS_SQL, (lot,)).fetchall()
    level_of = {r[1]: r[0] for r in containers}
    up = {r[1]: r[4] for r in containers}

    def pallet_of(p: str | None) -> str:
        for _ in range(MAX_DEPTH):
            if p is None:
                return ""
            if level_of.get(p) == "pallet":
                return p
            p = up.get(p) if p in level_of else _parent_of(conn, "container", p)
        return ""

    for level, sscc, gtin, state, parent in containers:
        yield level, (level, sscc, gtin or "", "", state, parent or "", "" if level == "pallet" else pallet_of(parent)), 1
    groups: dict[str, list[str]] = {}
    for level, sscc, _g, _state, _p in containers:
        if level != "pallet":
            groups.setdefault(pallet_of(sscc), []).append(sscc)
    for level, sscc, _g, _s, _p in containers:
        if level == "pallet":
            groups.setdefault(sscc, []).append(sscc)  # units straight on a pallet, after its cases
    order = sorted(p for p in groups if p) + ([""] if "" in groups else [])
    packed = 0
    sql = _PACKED_SQL[fmt]
    for pallet in order:
        parents = groups[pallet]
        for i in range(0, len(parents), 2000):
            args = (json.dumps(parents[i : i + 2000]), pallet)
            if fmt == "rows":
                rows = conn.execute(sql, args).fetchall()
                packed += len(rows)
                for r in rows:
                    yield "unit", tuple(x or "" for x in r), 1
            else:
                text, n = conn.execute(sql, args).fetchone()
                if n:
                    packed += n
                    yield "unit", text, n
    tally = dict(conn.execute("SELECT state, sum(n) FROM serial_tally WHERE lot = ? GROUP BY state", (lot,)).fetchall())
    cur = conn.execute(_LOOSE_OTHERS if packed == int(tally.get("commissioned") or 0) else _LOOSE_ALL, (lot,))
    while True:
        rows = cur.fetchmany(10_000)
        if not rows:
            break
        for _id, g, s, st in rows:
            yield "unit", ("unit", "", g, s, st, "", ""), 1


def recall_rows(store: EngineStore, lot: str, conn: sqlite3.Connection | None = None) -> Iterator[tuple[str, ...]]:
    """(level, sscc, gtin, serial, status, parent, pallet) for every pallet, case and unit of the lot.

    Units listed are those ever sent to a printer (in flight, commissioned or
    decommissioned): serials never printed cannot be on a shelf.
    """
    if conn is None:
        with snapshot(store) as c:
            yield from recall_rows(store, lot, c)
        return
    for _level, row, _n in _recall_parts(conn, lot, "rows"):
        yield row


def _count(counts: dict[str, dict[str, int]], level: str, status: str, n: int = 1) -> None:
    lv = counts.setdefault(level, {})
    lv[status] = lv.get(status, 0) + n


def write_recall_csv(store: EngineStore, lot: str, out: IO[str]) -> dict[str, dict[str, int]]:
    """Stream the recall list as CSV (header + one row per object); returns counts by level and status."""
    counts: dict[str, dict[str, int]] = {}
    w = csv.writer(out, lineterminator="\n")
    w.writerow(RECALL_COLUMNS)
    with snapshot(store) as conn:
        for level, payload, n in _recall_parts(conn, lot, "csv"):
            if isinstance(payload, str):  # packed units, already formatted by SQLite
                out.write(payload)
                out.write("\n")
                _count(counts, level, "commissioned", n)
            else:
                w.writerow(payload)
                _count(counts, level, payload[4])
    return counts


def _recall_header(store: EngineStore, lot: str, conn: sqlite3.Connection) -> dict[str, Any]:
    b = conn.execute("SELECT lot, gtin, expiry, state FROM batches WHERE lot=?", (lot,)).fetchone()
    return {
        "lot": lot,
        "found": b is not None,
        "gtin": b[1] if b else None,
        "expiry": b[2] if b else None,
        "batch_state": b[3] if b else None,
        "recalled": is_recalled(store, lot, conn),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _recall_item(level: str, sscc: str, gtin: str, serial: str, status: str, parent: str, pallet: str) -> dict[str, Any]:
    if level == "unit":
        return {"gtin": gtin, "serial": serial, "status": status, "parent": parent or None, "pallet": pallet or None}
    item = {"sscc": sscc, "level": level, "gtin": gtin or None, "status": status, "parent": parent or None}
    if level != "pallet":
        item["pallet"] = pallet or None
    return item


_SECTIONS = ("pallets", "cases", "units")


def _section(level: str) -> int:
    return 2 if level == "unit" else (0 if level == "pallet" else 1)


def write_recall_json(store: EngineStore, lot: str, out: IO[str]) -> dict[str, dict[str, int]]:
    """Stream the recall as one JSON document: header, pallets, cases, units, then counts (built on the way)."""
    counts: dict[str, dict[str, int]] = {}
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    with snapshot(store) as conn:
        out.write(dumps(_recall_header(store, lot, conn))[:-1])
        section = -1
        first = True
        for level, payload, n in _recall_parts(conn, lot, "json"):
            sec = _section(level)
            while section < sec:
                out.write(("]" if section >= 0 else "") + f',"{_SECTIONS[section + 1]}":[')
                section += 1
                first = True
            if isinstance(payload, str):
                _count(counts, level, "commissioned", n)
            else:
                _count(counts, level, payload[4])
                payload = dumps(_recall_item(*payload))
            out.write(payload if first else "," + payload)
            first = False
        while section < len(_SECTIONS) - 1:
            out.write(("]" if section >= 0 else "") + f',"{_SECTIONS[section + 1]}":[')
            section += 1
        out.write('],"counts":' + dumps(counts) + "}")
    return counts


def recall(store: EngineStore, lot: str) -> dict[str, Any]:
    """The recall list in memory (tests, MQTT replies for small lots); use the writers for big batches."""
    with snapshot(store) as conn:
        out = _recall_header(store, lot, conn)
        lists: tuple[list[dict[str, Any]], ...] = ([], [], [])
        counts: dict[str, dict[str, int]] = {}
        for row in recall_rows(store, lot, conn):
            _count(counts, row[0], row[4])
            lists[_section(row[0])].append(_recall_item(*row))
    out.update(zip(_SECTIONS, lists))
    out["counts"] = counts
    return out


# --------------------------------------------------------------------------- recall flag


@dataclass
class _RecallCache:
    last_seq: int = 0
    lots: dict[str, dict[str, Any]] | None = None


_RECALLS: weakref.WeakKeyDictionary[Any, _RecallCache] = weakref.WeakKeyDictionary()


def recalled_lots(store: EngineStore, conn: sqlite3.Connection | None = None) -> dict[str, dict[str, Any]]:
    """lot -> the audit detail of its recall. Reads only audit rows newer than the last call (seq range)."""
    if conn is None:
        with snapshot(store) as c:
            return recalled_lots(store, c)
    cache = _RECALLS.get(store)
    if cache is None:
        cache = _RecallCache(0, {})
        _RECALLS[store] = cache
    assert cache.lots is not None
    for seq, ts, actor, detail in conn.execute(
        "SELECT seq, ts, actor, detail FROM audit WHERE seq > ? AND action = ? ORDER BY seq", (cache.last_seq, RECALL_ACTION)
    ):
        d = json.loads(detail)
        if d.get("lot"):
            cache.lots[d["lot"]] = {**d, "at": ts, "by": actor, "audit_seq": seq}
    r = conn.execute("SELECT max(seq) FROM audit").fetchone()
    cache.last_seq = max(cache.last_seq, int(r[0] or 0))
    return dict(cache.lots)


def is_recalled(store: EngineStore, lot: str | None, conn: sqlite3.Connection | None = None) -> bool:
    return bool(lot) and lot in recalled_lots(store, conn)


async def mark_recalled(store: EngineStore, lot: str, actor: str, reason: str = "", origin: str = "cli", *,
                        signature: Any = None) -> dict[str, Any]:
    """Flag a batch as recalled; from then on verify_code answers "recalled" for its units and containers.

    `signature` (identity.SignatureSpec): the recall's e-signature, written with its record (the offline CLI)."""
    if store.batch(lot) is None:
        raise TraceError(f"no batch {lot} in this store")
    if is_recalled(store, lot):
        return {"lot": lot, "recalled": True, "already": True}
    seq = await store.audit(actor, origin, RECALL_ACTION, {"lot": lot, **change({"recalled": False}, {"recalled": True}, reason)},
                            signature=signature)
    log.warning("batch_recalled", lot=lot, actor=actor, reason=reason, audit_seq=seq)
    return {"lot": lot, "recalled": True, "already": False, "audit_seq": seq}


# --------------------------------------------------------------------------- verification


def verify_code(store: EngineStore, code: str, *, where: str | None = None, raise_alarm: bool = False) -> dict[str, Any]:
    """Verdict for one scan: genuine | decommissioned | recalled | unknown | suspicious.

    `where`: the SSCC (any code form) of the case or pallet the code was
    scanned in, if the caller knows; a unit recorded in another parent is then
    suspicious (diversion, or a cloned code). With `raise_alarm=True`, a
    suspicious or unknown verdict is also recorded as an AlarmRaised event —
    scheduled on the running loop; use `verify_code_async` to await it.
    """
    result = _verify(store, code, where)
    if raise_alarm and result["verdict"] in ("suspicious", "unknown"):
        import asyncio

        ev = alarm_event(result)
        result["alarm_id"] = ev.alarm_id
        try:
            asyncio.get_running_loop().create_task(store.append(ev))
        except RuntimeError:
            log.warning("verify_alarm_not_recorded", reason="no running event loop", code=code[:80])
    return result


async def verify_code_async(store: EngineStore, code: str, *, where: str | None = None, raise_alarm: bool = True, station: str | None = None) -> dict[str, Any]:
    """verify_code for the daemon: the alarm for a suspicious scan is durable before the answer goes out."""
    result = _verify(store, code, where)
    if raise_alarm and result["verdict"] in ("suspicious", "unknown"):
        ev = alarm_event(result, station)
        await store.append(ev)
        result["alarm_id"] = ev.alarm_id
    return result


def alarm_event(result: dict[str, Any], station: str | None = None) -> Any:
    from linectl.events import AlarmRaised, Severity

    code = "suspicious_code" if result["verdict"] == "suspicious" else "unknown_code"
    what = result.get("identity") or {}
    name = what.get("sscc") or (f"{what.get('gtin')}/{what.get('serial')}" if what.get("gtin") else str(result.get("code", ""))[:60])
    return AlarmRaised(code=code, severity=Severity.WARNING, message=f"{name}: {result['reason']}"[:500], lot=result.get("lot"), station=station)


def _verify(store: EngineStore, code: str, where: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"code": code, "verdict": "unknown", "reason": "", "identity": None, "status": "unknown", "lot": None, "parent": None}
    where_sscc = None
    if where:  # a caller error, unlike a bad code (which is what a counterfeit may look like)
        try:
            w = identify_code(where)
        except TraceError:
            w = {"kind": "?"}
        if w.get("kind") != "sscc":
            raise TraceError(f"where={where!r} is not an SSCC (case or pallet)")
        where_sscc = w["sscc"]
        out["where"] = where_sscc
    try:
        ident = identify_code(code)
    except TraceError as exc:
        out["reason"] = f"not a GS1 unit or SSCC code ({exc}): possible counterfeit"
        return out
    with snapshot(store) as conn:
        if ident["kind"] == "sscc":
            return _verify_container(store, conn, ident, out, where_sscc)
        return _verify_unit(store, conn, ident, out, where_sscc)


def _verdict(out: dict[str, Any], verdict: str, reason: str) -> dict[str, Any]:
    out["verdict"], out["reason"] = verdict, reason
    return out


def _verify_unit(store: EngineStore, conn: sqlite3.Connection, ident: dict[str, Any], out: dict[str, Any], where: str | None) -> dict[str, Any]:
    gtin, serial = ident["gtin"], ident["serial"]
    out["identity"] = {"gtin": gtin, "serial": serial}
    r = conn.execute("SELECT id, state, lot FROM serials WHERE gtin=? AND serial=?", (gtin, serial)).fetchone()
    if r is None:
        return _verdict(out, "unknown", "serial never issued for this GTIN: possible counterfeit")
    sid, state, lot = r
    parent = _parent_of(conn, "unit", unit_key(gtin, serial))
    b = conn.execute("SELECT expiry FROM batches WHERE lot=?", (lot,)).fetchone() if lot else None
    out.update(status=state, lot=lot, parent=parent, expiry=b[0] if b else None)
    if ident.get("symbology") == "]d1":
        return _verdict(out, "suspicious", "code is a plain DataMatrix (]d1); this line prints GS1 DataMatrix only: possible counterfeit")
    if state in ("provisioned", "allocated", "voided"):
        return _verdict(out, "suspicious", f"serial was never printed (state {state}): possible counterfeit with a guessed or leaked serial")
    if ident.get("lot") and lot and ident["lot"] != lot:
        return _verdict(out, "suspicious", f"lot on the pack {ident['lot']} differs from the record {lot}: possible counterfeit")
    if ident.get("expiry") and b and ident["expiry"] != b[0]:
        return _verdict(out, "suspicious", f"expiry on the pack {ident['expiry']} differs from the record {b[0]}: possible counterfeit")
    if ident.get("dates") and lot:
        m = conn.execute("SELECT value FROM meta WHERE key=?", (BATCH_DATES_KEY + lot,)).fetchone()
        recorded = json.loads(m[0]) if m else {}
        for name, value in ident["dates"].items():
            if recorded.get(name) != value:
                return _verdict(out, "suspicious", f"{name} on the pack {value} differs from the record {recorded.get(name) or '(none)'}: possible counterfeit")
    if state == "sent":
        return _verdict(out, "suspicious", "code was sent to the printer but never verified and commissioned")
    if state == "decommissioned":
        why = _last_decommission(conn, sid)
        if why.get("destroyed"):
            return _verdict(out, "suspicious", f"unit was decommissioned as destroyed ({why.get('reason')}) and is seen again: possible diversion or clone")
        if where is not None:
            return _verdict(out, "suspicious", f"decommissioned unit ({why.get('reason')}) seen again in {where}: possible diversion or clone")
        return _verdict(out, "decommissioned", f"decommissioned: {why.get('reason') or 'no reason recorded'}")
    if where is not None:
        chain = [p["sscc"] for p in _chain(conn, parent)]
        if parent is not None and where not in chain:
            return _verdict(out, "suspicious", f"unit is packed in {parent}, scanned in {where}: possible diversion or clone")
    if is_recalled(store, lot, conn):
        return _verdict(out, "recalled", f"batch {lot} is recalled")
    return _verdict(out, "genuine", "commissioned by this line")


def _last_decommission(conn: sqlite3.Connection, serial_id: int) -> dict[str, Any]:
    r = conn.execute(
        "SELECT body FROM outbox WHERE serial_id=? AND kind='unit_decommissioned' ORDER BY seq DESC LIMIT 1", (serial_id,)
    ).fetchone()
    return json.loads(r[0]) if r else {}


def _verify_container(store: EngineStore, conn: sqlite3.Connection, ident: dict[str, Any], out: dict[str, Any], where: str | None) -> dict[str, Any]:
    sscc = ident["sscc"]
    out["identity"] = {"sscc": sscc}
    c = conn.execute("SELECT level, state, lot FROM containers WHERE sscc=?", (sscc,)).fetchone()
    if c is None:
        return _verdict(out, "unknown", "SSCC never commissioned by this line: possible counterfeit label")
    level, state, lot = c
    parent = _parent_of(conn, "container", sscc)
    out.update(status=state, lot=lot, parent=parent, level=level)
    if state == "decommissioned":
        if where is not None:
            return _verdict(out, "suspicious", f"decommissioned SSCC seen again in {where}: possible diversion or clone")
        return _verdict(out, "decommissioned", "SSCC was voided or dissolved")
    if where is not None and where != sscc:
        chain = [p["sscc"] for p in _chain(conn, parent)]
        if parent is not None and where not in chain:
            return _verdict(out, "suspicious", f"{level} is on {parent}, scanned in {where}: possible diversion or clone")
    if is_recalled(store, lot, conn):
        return _verdict(out, "recalled", f"batch {lot} is recalled")
    return _verdict(out, "genuine", f"{level} commissioned by this line")
