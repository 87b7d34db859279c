"""The batch review document a QA reviewer signs before release (EU GMP Annex 11 §9, 21 CFR 11.10(e)).

`build_review(store, lot)` gathers, from what the store never purges, one
document: the batch's identity, the config it ran under (hashes), the clock
its records rest on, its whole audit trail (every record naming the lot, and
the line-level records between its creation and its close: who, when in UTC
and local time, action, old -> new, reason, origin), the e-signatures kept
beside the trail, the challenge results, the reconciliation (the batch
report), the alarms raised during the batch with their acknowledgements, and
the hash chain's verification (its head, and whether every record shown
lies in the verified part). The JSON is the canonical content; the HTML and
PDF (linectl.review_render) render it.

`review_digest(doc)` is what an e-signature of the review signs: sha256 over
the document's canonical JSON (sorted keys, no whitespace, UTF-8) without the
keys that say when, where and in which time zone the document was made
(DIGEST_EXCLUDED) rather than what the batch's records say, so the digest
printed in a document can be recomputed from the JSON file alone, and the same
records give the same digest when the line builds the review again at signing
time (`linectl audit review --sign`, command sign_review): a changed record
gives another digest and the signing is refused (record_changed).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Any

from linectl import __version__
from linectl.report import batch_report
from linectl.store.model import AuditRecord
from linectl.store.review_reads import (
    alarm_acks,
    audit_window,
    last_audit_before,
    lot_audit_records,
    product_name,
    signature_rows,
)

if TYPE_CHECKING:
    from linectl.store import Store

FORMAT_VERSION = 1
DIGEST_KEY = "review_digest"


class UnknownLot(KeyError):
    """No batch of that lot in the store (exit 2)."""


def canonical(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


#: not signed: the document's own digest, when / where it was made, the local rendering of times (their UTC value is
#: signed), and the head of the whole line's chain, which moves with every later record of other batches
DIGEST_EXCLUDED = {"": ("review_digest", "generated_at", "store", "local_zone"),
                   "chain": ("records_in_chain", "records_verified", "head_seq", "head_hash", "verified_head_hash"),
                   "audit_trail.records": ("ts_local",)}


def digest_body(doc: dict[str, Any]) -> dict[str, Any]:
    """The part of a review its digest covers (the document without DIGEST_EXCLUDED)."""
    body = {k: v for k, v in doc.items() if k not in DIGEST_EXCLUDED[""]}
    if isinstance(body.get("chain"), dict):
        body["chain"] = {k: v for k, v in body["chain"].items() if k not in DIGEST_EXCLUDED["chain"]}
    trail = body.get("audit_trail")
    if isinstance(trail, dict) and isinstance(trail.get("records"), list):
        body["audit_trail"] = {**trail, "records": [{k: v for k, v in r.items() if k not in DIGEST_EXCLUDED["audit_trail.records"]}
                                                    for r in trail["records"]]}
    return body


def review_digest(doc: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of `digest_body(doc)`: what a signature of the review signs."""
    return hashlib.sha256(canonical(digest_body(doc)).encode("utf-8")).hexdigest()


def _names_lot(detail: dict[str, Any]) -> str | None:
    """The lot a record is about: its `lot`, or the `result.lot` of a command that named none (close_batch)."""
    lot = detail.get("lot")
    if lot is None and isinstance(detail.get("result"), dict):
        lot = detail["result"].get("lot")
    return lot if isinstance(lot, str) else None


def _change(r: AuditRecord) -> tuple[Any, Any, Any, bool]:
    """(old, new, reason, recorded): from the record's own keys, else what an older record holds (batch_state)."""
    d = r.detail
    if "old" in d or "new" in d:
        return d.get("old"), d.get("new"), d.get("reason"), True
    if r.action == "batch_state":
        return d.get("previous"), d.get("state"), d.get("reason") or None, False
    return None, None, d.get("reason") or None, False


def _local(ts: str, zone: tzinfo) -> str:
    try:
        return datetime.fromisoformat(ts).astimezone(zone).isoformat()
    except ValueError:
        return ts


def _row(r: AuditRecord, scope: str, zone: tzinfo, verified_upto: int) -> dict[str, Any]:
    old, new, reason, recorded = _change(r)
    return {
        "seq": r.seq, "ts_utc": r.ts, "ts_local": _local(r.ts, zone), "actor": r.actor, "origin": r.origin, "action": r.action,
        "old": old, "new": new, "reason": reason, "change_recorded": recorded, "scope": scope,
        "verified": r.seq <= verified_upto, "hash": r.hash, "prev_hash": r.prev_hash, "detail": r.detail,
    }


def _window_end(records: list[AuditRecord], lot: str) -> int | None:
    """The seq of the batch's close: its closing batch_state, or the close command recorded right after it."""
    closed = [r.seq for r in records if r.action == "batch_state" and r.detail.get("state") == "closed"]
    if not closed:
        return None
    after = [r.seq for r in records if r.seq > closed[-1] and r.action == "close_batch"]
    return after[0] if after else closed[-1]


def build_review(store: Store, lot: str, *, zone: tzinfo | None = None, now: datetime | None = None) -> dict[str, Any]:
    """The review of batch `lot` as a JSON-able dict (see the module doc); UnknownLot when the store has no such batch."""
    b = store.batch(lot)
    if b is None:
        raise UnknownLot(f"no batch {lot} in {store.path}")
    local = zone or datetime.now().astimezone().tzinfo or UTC
    check = store.verify_audit()  # the whole chain, in one snapshot; the records shown are read after it
    stats = store.stats()
    verified_upto = check.checked  # the verified prefix: the whole chain when it verified
    head_rec = audit_window(store, check.checked, check.checked) if check.checked else []
    lot_records = lot_audit_records(store, lot)
    created = next((r.seq for r in lot_records if r.action == "batch_created"), lot_records[0].seq if lot_records else None)
    end = _window_end(lot_records, lot)
    window_last = end if end is not None else int(stats["audit_records"])
    window = audit_window(store, created, window_last) if created is not None else []
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()
    for r in window:
        named = _names_lot(r.detail)
        if named is not None and named != lot:
            continue  # another batch's record (two lots never overlap on a line; kept out all the same)
        rows.append(_row(r, "batch" if named == lot else "line", local, verified_upto))
        seen.add(r.seq)
    for r in lot_records:
        if r.seq not in seen:
            rows.append(_row(r, "after_close" if end is not None and r.seq > end else "before_create", local, verified_upto))
    rows.sort(key=lambda x: x["seq"])
    report = batch_report(store, lot)
    cfg_rec = next((r for r in lot_records if r.action == "batch_created"), None)
    start = last_audit_before(store, "daemon_started", created) if created is not None else None
    shown_bad = [x["seq"] for x in rows if not x["verified"]]
    doc: dict[str, Any] = {
        "document": "batch audit trail review",
        "format_version": FORMAT_VERSION,
        "generated_at": (now or datetime.now(UTC)).isoformat(),
        "generated_by": f"linectl {__version__}",
        "store": store.path,
        "local_zone": str(local),
        "batch": {
            "lot": b.lot, "gtin": b.gtin, "product": product_name(store, b.gtin), "expiry": b.expiry, "dates": store.batch_dates(lot),
            "planned_qty": b.planned_qty, "achieved_qty": report["commissioned"], "state": b.state,
            "created_at": b.created_at, "created_by": b.created_by, "started_at": b.started_at, "stopped_at": b.stopped_at,
            "closed_at": b.closed_at,
        },
        "config": (cfg_rec.detail.get("config") if cfg_rec is not None else None),
        "clock": start.detail.get("clock") if start is not None else None,
        "audit_trail": {
            "first_seq": created, "last_seq": window_last, "closed": end is not None,
            "rule": "every record naming the lot, and the line-level records (naming no lot) from its creation to its close",
            "records": rows,
        },
        "chain": {
            "verified": check.ok,
            "records_in_chain": int(stats["audit_records"]),
            "records_verified": check.checked,
            "head_seq": int(stats["audit_records"]),
            "head_hash": stats["audit_head"],
            "verified_head_hash": head_rec[0].hash if head_rec else None,
            "first_bad_seq": check.first_bad_seq,
            "problem": check.reason or None,
            "shown_records_verified": not shown_bad,
            "shown_records_not_verified": shown_bad,
        },
        "signatures": _signatures(store, {x["seq"] for x in rows}),
        "challenge": {"results": report["challenge"], "status": report["challenge_status"]},
        "reconciliation": {k: report[k] for k in (
            "provisioned", "commissioned", "decommissioned", "returned", "voided", "still_allocated", "still_sent", "balanced",
            "problems", "rejects_by_reason", "fate_unknown", "fates_reconciled", "packs", "balanced_packs")},
        "alarms": _alarms(store, rows),
        "review": {"reviewed_by": None, "meaning": None, "date": None,
                   "note": "to be signed (linectl audit review --sign): the signature covers review_digest (sha256 of this "
                           "document's canonical JSON without the keys linectl.review.DIGEST_EXCLUDED names)",
                   "earlier_signatures": _review_signatures(rows)},
    }
    doc[DIGEST_KEY] = review_digest(doc)
    return doc


def review_to_sign(store: Store, lot: str, digest: str, *, zone: tzinfo | None = None) -> dict[str, Any]:
    """The review of `lot` built again at signing time: the result of a sign_review whose signer read the document with
    `digest`; CommandRejected record_changed when the batch's records changed since (another digest), unknown_lot."""
    from linectl.control import CommandRejected

    try:
        doc = build_review(store, lot, zone=zone)
    except UnknownLot:
        raise CommandRejected(f"no batch {lot}", "unknown_lot") from None
    now = str(doc[DIGEST_KEY])
    if now != digest:
        raise CommandRejected(f"the review of batch {lot} changed since the document was built (its digest is now {now}, not {digest}): "
                              "build it again, read it, then sign", "record_changed")
    return {"lot": lot, "review_digest": now, "chain_verified": bool(doc["chain"]["verified"]), "records": len(doc["audit_trail"]["records"])}


def _signatures(store: Store, seqs: set[int]) -> dict[str, Any]:
    """The signatures of the records shown here (rows of the signatures table whose record_ref is audit:<seq> of one),
    each with the action it signs and whether the signed record's hash is still the digest it signed."""
    sig = signature_rows(store, sorted(seqs))
    if not sig.present:
        return {"table_present": False, "note": "no signatures table in this store", "columns": [], "rows": []}
    return {"table_present": True, "note": None if sig.rows else "no signature names a record of this batch",
            "columns": sig.columns, "rows": sig.rows}


def _review_signatures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Signatures this batch's review already got (sign_review records among those shown, with their signers)."""
    out = []
    for x in rows:
        if x["action"] == "sign_review":
            signed = x["detail"].get("signature") or {}
            out.append({"seq": x["seq"], "signed_at": x["ts_utc"], "review_digest": x["detail"].get("review_digest"), **signed})
    return out


def _alarms(store: Store, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Alarms raised among the records shown, each with every acknowledgement of it (also one after the close)."""
    raised = [x for x in rows if x["action"] == "alarm"]
    acks = alarm_acks(store, [str(x["detail"].get("alarm_id")) for x in raised])
    out = []
    for x in raised:
        d = x["detail"]
        aid = str(d.get("alarm_id"))
        out.append({
            "alarm_id": aid, "code": d.get("code"), "severity": d.get("severity"), "message": d.get("message"), "station": d.get("station"),
            "raised_seq": x["seq"], "raised_at": x["ts_utc"],
            "acknowledgements": [{"seq": a.seq, "by": a.detail.get("actor") or a.actor, "at": a.ts, "origin": a.origin}
                                 for a in acks if a.detail.get("alarm_id") == aid],
        })
    return out
