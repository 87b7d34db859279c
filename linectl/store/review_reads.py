"""Reads for the batch review (linectl.review): which audit records name a lot, the last record of an action,
and the e-signatures kept beside the trail. SQL stays under linectl/store/; each function is one read snapshot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from linectl.store.model import AuditRecord

if TYPE_CHECKING:
    from linectl.store import Store

SIGNATURES_TABLE = "signatures"


@dataclass(frozen=True, slots=True)
class SignatureRows:
    """The signatures table as found: `present` False when this store has none (a store before e-signatures)."""

    present: bool
    columns: list[str]
    rows: list[dict[str, Any]]


def _record(r: Any) -> AuditRecord:
    try:
        detail = json.loads(r[5])
    except ValueError:  # an altered row may not even be JSON: shown as found (the chain check names it)
        detail = {"unparsable_detail": r[5]}
    if not isinstance(detail, dict):
        detail = {"unparsable_detail": r[5]}
    return AuditRecord(r[0], r[1], r[2], r[3], r[4], detail, r[6], r[7])


_COLS = "seq, ts, actor, origin, action, detail, prev_hash, hash"


def lot_audit_records(store: Store, lot: str) -> list[AuditRecord]:
    """Every audit record whose detail names the lot (`lot`, or the `result.lot` of a command that named none)."""
    with store.read_snapshot() as c:
        rows = c.exec_driver_sql(
            f"SELECT {_COLS} FROM audit "
            "WHERE CASE WHEN json_valid(detail) THEN json_extract(detail, '$.lot') = ? OR json_extract(detail, '$.result.lot') = ? END "
            "ORDER BY seq",
            (lot, lot),
        ).fetchall()
    return [_record(r) for r in rows]


def audit_window(store: Store, first_seq: int, last_seq: int) -> list[AuditRecord]:
    """Records first_seq..last_seq (inclusive) in seq order."""
    with store.read_snapshot() as c:
        rows = c.exec_driver_sql(
            f"SELECT {_COLS} FROM audit WHERE seq BETWEEN ? AND ? ORDER BY seq",
            (first_seq, last_seq),
        ).fetchall()
    return [_record(r) for r in rows]


def last_audit_of(store: Store, action: str) -> AuditRecord | None:
    with store.read_snapshot() as c:
        r = c.exec_driver_sql(f"SELECT {_COLS} FROM audit WHERE action = ? ORDER BY seq DESC LIMIT 1", (action,)).fetchone()
    return _record(r) if r is not None else None


def last_audit_before(store: Store, action: str, seq: int) -> AuditRecord | None:
    """The last record of `action` before record `seq` (the daemon start a batch was created under)."""
    with store.read_snapshot() as c:
        r = c.exec_driver_sql(f"SELECT {_COLS} FROM audit WHERE action = ? AND seq < ? ORDER BY seq DESC LIMIT 1", (action, seq)).fetchone()
    return _record(r) if r is not None else None


def alarm_acks(store: Store, alarm_ids: list[str]) -> list[AuditRecord]:
    """The alarm_ack records of these alarms, in seq order."""
    if not alarm_ids:
        return []
    with store.read_snapshot() as c:
        rows = c.exec_driver_sql(
            f"SELECT {_COLS} FROM audit WHERE action = 'alarm_ack' AND CASE WHEN json_valid(detail) "
            "THEN json_extract(detail, '$.alarm_id') IN (SELECT value FROM json_each(?)) END "
            "ORDER BY seq", (json.dumps(alarm_ids),),
        ).fetchall()
    return [_record(r) for r in rows]


def product_name(store: Store, gtin: str) -> str | None:
    with store.read_snapshot() as c:
        r = c.exec_driver_sql("SELECT name FROM products WHERE gtin = ?", (gtin,)).fetchone()
    return str(r[0]) if r is not None else None


#: the columns a review shows of each signature (schema v10 `signatures`, linectl.store.identity), then what it signs
SIGNATURE_COLUMNS = ("id", "record_ref", "signed_action", "signer", "signer_name", "meaning", "signed_at", "second_signer",
                     "second_signer_name", "second_meaning", "second_signed_at", "record_digest", "digest_matches", "audit_seq")


def signature_rows(store: Store, seqs: list[int]) -> SignatureRows:
    """The signatures of audit records `seqs` (record_ref 'audit:<seq>'), with the action of the signed record and
    whether its hash is still the digest that was signed; present=False for a store older than schema v10."""
    with store.read_snapshot() as c:
        exists = c.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (SIGNATURES_TABLE,)).fetchone()
        if exists is None:
            return SignatureRows(False, [], [])
        cur = c.exec_driver_sql(
            "SELECT s.id, s.record_ref, a.action, s.signer, s.signer_name, s.meaning, s.signed_at, s.second_signer, s.second_signer_name, "
            "s.second_meaning, s.second_signed_at, s.record_digest, a.hash = s.record_digest, s.audit_seq "
            f"FROM {SIGNATURES_TABLE} s LEFT JOIN audit a ON s.record_ref = 'audit:' || a.seq "
            "WHERE s.record_ref IN (SELECT 'audit:' || value FROM json_each(?)) ORDER BY s.id",
            (json.dumps(seqs),),
        )
        rows = [dict(zip(SIGNATURE_COLUMNS, r)) for r in cur.fetchall()]
    for r in rows:
        r["digest_matches"] = bool(r["digest_matches"])
    return SignatureRows(True, list(SIGNATURE_COLUMNS), rows)
