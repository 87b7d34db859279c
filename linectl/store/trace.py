"""Trace one code: what it is, its state, its batch, where it is packed, and every event about it.

Kept as plain functions over a Store returning JSON-ready dicts so the
aggregation/recall work can extend it (full trees, upward and downward)
without touching the CLI.
"""

from __future__ import annotations

from typing import Any

from linectl.store.model import OutboxRow

MAX_PARENT_DEPTH = 8


class TraceError(ValueError):
    """The code could not be understood as a GS1 identity (unit or SSCC)."""


def identify(code: str) -> dict[str, Any]:
    """Raw scan, HRI, element string, EPC URN or Digital Link -> {kind, gtin, serial, sscc, lot, expiry}."""
    from linectl import gs1

    try:
        ident = gs1.identify(code)
    except gs1.GS1Error as exc:
        raise TraceError(f"cannot identify {code!r}: {exc.reason}") from None
    if ident.kind == "sgtin" and not (ident.gtin and ident.serial):
        raise TraceError(f"{code!r} identifies a GTIN without a serial: nothing to trace")
    return {
        "kind": ident.kind,
        "gtin": ident.gtin,
        "serial": ident.serial,
        "sscc": ident.sscc,
        "lot": getattr(ident, "lot", None),
        "expiry": getattr(ident, "expiry", None),
    }


def events_json(rows: list[OutboxRow]) -> list[dict[str, Any]]:
    return [
        {
            "seq": r.seq,
            "kind": r.kind,
            "event_id": r.event_id,
            "lot": r.lot,
            "stored_at": r.created_at,
            "forwarded_at": r.forwarded_at,
            "event": r.event.model_dump(mode="json"),
        }
        for r in rows
    ]


def parent_chain(store: Any, *, gtin: str | None = None, serial: str | None = None, sscc: str | None = None) -> list[dict[str, Any]]:
    """Current parents from the nearest up (case, then pallet)."""
    out: list[dict[str, Any]] = []
    parent = store.parent_of(gtin=gtin, serial=serial) if sscc is None else store.parent_of(sscc=sscc)
    while parent is not None and len(out) < MAX_PARENT_DEPTH:
        c = store.container(parent)
        out.append({"sscc": parent, "level": c.level if c else None, "state": c.state if c else None})
        parent = store.parent_of(sscc=parent)
    return out


def trace_code(store: Any, code: str) -> dict[str, Any]:
    ident = identify(code)
    if ident["kind"] == "sscc":
        return _trace_container(store, code, ident)
    return _trace_unit(store, code, ident)


def _trace_unit(store: Any, code: str, ident: dict[str, Any]) -> dict[str, Any]:
    gtin, serial = ident["gtin"], ident["serial"]
    rec = store.serial(gtin, serial)
    out: dict[str, Any] = {"code": code, "identity": ident, "found": rec is not None}
    if rec is None:
        out.update(status="unknown", lot=None, events=[])
        return out
    batch = store.batch(rec.lot) if rec.lot else None
    out.update(
        status=rec.state,
        lot=rec.lot,
        source=rec.source,
        updated_at=rec.updated_at,
        sent_at=rec.sent_at,
        batch=None if batch is None else {"lot": batch.lot, "gtin": batch.gtin, "expiry": batch.expiry, "state": batch.state},
        parents=parent_chain(store, gtin=gtin, serial=serial),
        events=events_json(store.serial_history(gtin, serial)),
    )
    return out


def _trace_container(store: Any, code: str, ident: dict[str, Any]) -> dict[str, Any]:
    sscc = ident["sscc"]
    c = store.container(sscc)
    out: dict[str, Any] = {"code": code, "identity": ident, "found": c is not None}
    if c is None:
        out.update(status="unknown", lot=None, events=[])
        return out
    out.update(
        status=c.state,
        level=c.level,
        lot=c.lot,
        gtin=c.gtin,
        updated_at=c.updated_at,
        parents=parent_chain(store, sscc=sscc),
        children=store.children(sscc),
        events=events_json(store.container_history(sscc)),
    )
    return out
