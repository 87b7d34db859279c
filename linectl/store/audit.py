"""Hash-chained audit trail (21 CFR Part 11 / EU GMP Annex 11: records that cannot be altered silently).

Each row's hash covers the canonical JSON of the whole row including the
previous row's hash, so editing any row breaks its own hash and deleting one
breaks the next row's link. Deleting the *last* rows leaves a valid shorter
chain, so the head (hash and count) is also kept in `meta`, written in the
same transaction as the rows; a truncated tail then disagrees with it.
Someone able to rewrite both the rows and meta can still forge a chain:
publish the head elsewhere (MQTT state, batch report) for an external anchor.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from linectl.store.model import AuditCheck

GENESIS = "0" * 64
META_COUNT = "audit_count"
META_HEAD = "audit_head"


def change(old: Any, new: Any, reason: str | None) -> dict[str, Any]:
    """The `old`, `new` and `reason` keys every audit record of a GMP-relevant change carries (EU GMP Annex 11 §9).

    They live in the record's detail JSON (no schema change, hashed like the rest). `reason` is what the person
    gave, or what the system says caused it; None when nobody gave one. An empty reason is recorded as None.
    """
    return {"old": old, "new": new, "reason": reason or None}


def canonical_detail(detail: dict[str, Any] | None) -> str:
    """The stored text of `detail`; anything not JSON-native is stringified so a record can always be written."""
    return json.dumps(detail or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str, allow_nan=False)


def row_hash(seq: int, ts: str, actor: str, origin: str, action: str, detail_text: str, prev_hash: str) -> str:
    # detail is hashed as the exact stored text: a reformatted-but-equivalent detail is still an alteration.
    payload = json.dumps(
        {"seq": seq, "ts": ts, "actor": actor, "origin": origin, "action": action, "detail": detail_text, "prev_hash": prev_hash},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class AuditHead:
    """The chain head as the writer sees it inside one transaction."""

    __slots__ = ("count", "hash")

    def __init__(self, count: int, hash_: str) -> None:
        self.count = count
        self.hash = hash_

    @classmethod
    def load(cls, cur: sqlite3.Cursor) -> AuditHead:
        rows = dict(cur.execute("SELECT key, value FROM meta WHERE key IN (?, ?)", (META_COUNT, META_HEAD)).fetchall())
        return cls(int(rows.get(META_COUNT, 0)), rows.get(META_HEAD, GENESIS))

    def append(self, cur: sqlite3.Cursor, ts: str, actor: str, origin: str, action: str, detail: dict[str, Any] | None) -> int:
        seq = self.count + 1
        text = canonical_detail(detail)
        h = row_hash(seq, ts, actor, origin, action, text, self.hash)
        cur.execute(
            "INSERT INTO audit(seq, ts, actor, origin, action, detail, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?)",
            (seq, ts, actor, origin, action, text, self.hash, h),
        )
        self.count, self.hash = seq, h
        return seq

    def save(self, cur: sqlite3.Cursor) -> None:
        cur.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            ((META_COUNT, str(self.count)), (META_HEAD, self.hash)),
        )


def origin_of(actor: str, default: str = "line") -> str:
    """Actors are written "<channel>:<who>" (plc:plc1, mqtt:client, cli:user); the channel is the origin."""
    if ":" in actor:
        return actor.split(":", 1)[0] or default
    return default


def verify_rows(rows: Iterable[tuple[int, str, str, str, str, str, str, str]], meta_count: int, meta_head: str) -> AuditCheck:
    """Walk (seq, ts, actor, origin, action, detail, prev_hash, hash) rows in seq order; name the first bad one."""
    expected = 1
    prev = GENESIS
    for seq, ts, actor, origin, action, detail, prev_hash, stored in rows:
        if seq != expected:
            return AuditCheck(False, expected - 1, expected, f"record {expected} is missing (next record present is {seq})")
        if prev_hash != prev:
            return AuditCheck(False, expected - 1, seq, f"record {seq}: prev_hash does not match the hash of record {seq - 1}")
        if row_hash(seq, ts, actor, origin, action, detail, prev_hash) != stored:
            return AuditCheck(False, expected - 1, seq, f"record {seq} was altered: its content does not match its hash")
        prev = stored
        expected += 1
    found = expected - 1
    if found < meta_count:
        return AuditCheck(
            False, found, found + 1,
            f"audit trail truncated: meta records {meta_count} records but only {found} are present "
            f"(records {found + 1}..{meta_count} deleted)",
        )
    if found > meta_count:
        return AuditCheck(False, found, meta_count + 1, f"record {meta_count + 1}..{found} were added outside linectl (meta head is at {meta_count})")
    if prev != meta_head:
        return AuditCheck(False, found, found if found else None, f"last record {found} does not match the head hash kept in meta")
    return AuditCheck(True, found)
