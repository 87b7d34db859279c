"""Typed reads about cases and pallets for the engine (label rebuild, label-intent recovery, hierarchy check).

The SQL lives here, next to the schema, so the engine asks the store questions in its own words instead of
running queries on the store's read connection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from linectl.store.reads import Reader


@dataclass(frozen=True, slots=True)
class LabelFacts:
    """What a case/pallet label shows, as the record says now."""

    level: str
    lot: str
    gtin: str
    expiry: str
    product: str
    children: int


@dataclass(frozen=True, slots=True)
class LabelIntents:
    """Label intents (audit `intent_action`) with no container row, after the last recovery watermark."""

    checked_through: int  # the watermark: intents up to this audit seq were examined by an earlier recovery
    orphans: list[tuple[int, str, dict[str, Any]]]  # (audit seq, ts, detail) of intents with no container
    top: int  # the newest intent's audit seq after the watermark (0 when none)


def read_label_facts(reader: Reader, sscc: str) -> LabelFacts:
    with reader.snapshot() as conn:
        c = conn.exec_driver_sql("SELECT level, lot, gtin FROM containers WHERE sscc=?", (sscc,)).fetchone()
        b = conn.exec_driver_sql("SELECT expiry, gtin FROM batches WHERE lot=?", (c[1],)).fetchone() if c and c[1] else None
        gtin = (c[2] if c else None) or (b[1] if b else "")
        p = conn.exec_driver_sql("SELECT name FROM products WHERE gtin=?", (gtin,)).fetchone()
        n = conn.exec_driver_sql("SELECT count(*) FROM aggregation WHERE parent=? AND removed_seq IS NULL", (sscc,)).scalar_one()
    return LabelFacts(level=(c[0] if c else "") or "", lot=(c[1] if c else "") or "", gtin=gtin or "",
                      expiry=b[0] if b else "", product=p[0] if p else "", children=int(n))


def read_label_intents(reader: Reader, intent_action: str, recovery_action: str) -> LabelIntents:
    with reader.snapshot() as conn:
        r = conn.exec_driver_sql("SELECT detail FROM audit WHERE action = ? ORDER BY seq DESC LIMIT 1", (recovery_action,)).fetchone()
        upto = int(json.loads(r[0]).get("checked_through_seq", 0)) if r else 0
        rows = conn.exec_driver_sql(
            "SELECT a.seq, a.ts, a.detail FROM audit a WHERE a.seq > ? AND a.action = ? "
            "AND NOT EXISTS (SELECT 1 FROM containers c WHERE c.sscc = json_extract(a.detail, '$.sscc')) ORDER BY a.seq",
            (upto, intent_action),
        ).fetchall()
        top = conn.exec_driver_sql("SELECT coalesce(max(seq), 0) FROM audit WHERE seq > ? AND action = ?", (upto, intent_action)).scalar_one()
    return LabelIntents(upto, [(int(s), str(ts), json.loads(d)) for s, ts, d in rows], int(top))


def read_hierarchy_problems(reader: Reader) -> list[str]:
    """Every violation of the aggregation invariants, in words; [] when consistent. Full scans: a check, not a hot path."""
    problems: list[str] = []
    with reader.snapshot() as conn:
        q = conn.exec_driver_sql
        for kind, key, n in q(
            "SELECT child_kind, child_key, count(*) FROM aggregation WHERE removed_seq IS NULL GROUP BY child_kind, child_key HAVING count(*) > 1"
        ):
            problems.append(f"{kind} {key} has {n} parents")
        for parent, g, s, state in q(
            "SELECT a.parent, a.child_gtin, a.child_serial, s.state FROM aggregation a "
            "LEFT JOIN serials s ON s.gtin = a.child_gtin AND s.serial = a.child_serial "
            "WHERE a.removed_seq IS NULL AND a.child_kind = 'unit' AND coalesce(s.state, '') != 'commissioned'"
        ):
            problems.append(f"{parent} holds unit {g}/{s} which is {state or 'unknown'}")
        for parent, key, state, level, plevel in q(
            "SELECT a.parent, a.child_key, c.state, c.level, p.level FROM aggregation a "
            "LEFT JOIN containers c ON c.sscc = a.child_key LEFT JOIN containers p ON p.sscc = a.parent "
            "WHERE a.removed_seq IS NULL AND a.child_kind = 'container' "
            "AND (coalesce(c.state, '') != 'commissioned' OR NOT (c.level = 'case' AND p.level = 'pallet'))"
        ):
            problems.append(f"{parent} ({plevel}) holds {level} {key} which is {state or 'unknown'}")
        for parent, state, n in q(
            "SELECT a.parent, c.state, count(*) FROM aggregation a LEFT JOIN containers c ON c.sscc = a.parent "
            "WHERE a.removed_seq IS NULL GROUP BY a.parent HAVING coalesce(c.state, '') != 'commissioned'"
        ):
            problems.append(f"{parent} is {state or 'unknown'} but holds {n} children")
        for parent, plot, g, s, ulot in q(
            "SELECT a.parent, p.lot, a.child_gtin, a.child_serial, s.lot FROM aggregation a "
            "JOIN containers p ON p.sscc = a.parent JOIN serials s ON s.gtin = a.child_gtin AND s.serial = a.child_serial "
            "WHERE a.removed_seq IS NULL AND a.child_kind = 'unit' AND coalesce(p.lot, '') != coalesce(s.lot, '')"
        ):
            problems.append(f"{parent} (lot {plot}) holds unit {g}/{s} of lot {ulot}")
    return problems


def read_packing_counts(reader: Reader, lot: str) -> dict[str, int]:
    """Commissioned cases and pallets of a lot and its units packed in a container (one snapshot)."""
    with reader.snapshot() as conn:
        lv: dict[str, int] = dict(
            conn.exec_driver_sql(
                "SELECT level, count(*) FROM containers WHERE lot = ? AND state = 'commissioned' GROUP BY level", (lot,)
            ).fetchall()
        )
        packed = conn.exec_driver_sql(
            "SELECT count(*) FROM aggregation a JOIN serials s ON s.gtin = a.child_gtin AND s.serial = a.child_serial "
            "WHERE a.removed_seq IS NULL AND a.child_kind = 'unit' AND s.lot = ?",
            (lot,),
        ).scalar_one()
    return {"cases": int(lv.get("case", 0)), "pallets": int(lv.get("pallet", 0)), "units_aggregated": int(packed)}
