"""Batch reconciliation: every serial given to a batch is accounted for, or the report says which are not.

provisioned to the batch = commissioned + decommissioned + returned + voided.
Anything still `allocated` or `sent` at close is listed by name: an inspector
must be able to see exactly which serials break the balance and why.
"""

from __future__ import annotations

from typing import Any

from linectl.engine.verify import challenge_status
from linectl.events import BatchStateChanged, ChallengeResult, SerialsReturned, UnitDecommissioned


def batch_report(store: Any, lot: str) -> dict[str, Any]:
    b = store.batch(lot)
    if b is None:
        raise KeyError(f"no batch {lot}")
    counts: dict[str, int] = store.lot_counts(lot)
    events = _lot_events(store, lot)
    reasons: dict[str, int] = {}
    returned = 0
    history: list[dict[str, Any]] = []
    challenge: list[dict[str, Any]] = []
    for ev in events:
        if isinstance(ev, UnitDecommissioned):
            reasons[ev.reason.value] = reasons.get(ev.reason.value, 0) + 1
        elif isinstance(ev, SerialsReturned):
            returned += len(ev.serials)
        elif isinstance(ev, BatchStateChanged):
            history.append({"time": ev.event_time.isoformat(), "state": ev.state.value, "previous": ev.previous.value if ev.previous else None, "by": ev.actor, "reason": ev.reason})
        elif isinstance(ev, ChallengeResult):
            challenge.append({"time": ev.event_time.isoformat(), "challenge": ev.challenge, "station": ev.station, "rejected": ev.rejected, "reason_seen": ev.reason_seen, "seq": ev.seq})
    commissioned = counts.get("commissioned", 0)
    decommissioned = counts.get("decommissioned", 0)
    voided = counts.get("voided", 0)
    still_allocated = counts.get("allocated", 0)
    still_sent = counts.get("sent", 0)
    provisioned = sum(counts.values()) + returned
    accounted = commissioned + decommissioned + voided + returned
    problems: list[str] = []
    if still_sent:
        problems.append(f"{still_sent} serial(s) sent to a printer but neither commissioned nor decommissioned: {[s for _, s, _ in store.in_flight(lot)][:20]}")
    if still_allocated and b.state == "closed":
        problems.append(f"{still_allocated} serial(s) still allocated after close: {[s for _, s in store.allocated(lot)][:20]}")
    if provisioned != accounted + still_allocated + still_sent:
        problems.append(f"registry inconsistency: {provisioned} provisioned vs {accounted + still_allocated + still_sent} in known states")
    balanced = provisioned == accounted and not problems
    starts = [h for h in history if h["state"] in ("challenge", "running")]
    stops = [h for h in history if h["state"] in ("stopped", "closed")]
    return {
        "lot": lot,
        "gtin": b.gtin,
        "expiry": b.expiry,
        "planned_qty": b.planned_qty,
        "state": b.state,
        "provisioned": provisioned,
        "commissioned": commissioned,
        "decommissioned": decommissioned,
        "returned": returned,
        "voided": voided,
        "still_allocated": still_allocated,
        "still_sent": still_sent,
        "balanced": balanced,
        "problems": problems,
        "rejects_by_reason": dict(sorted(reasons.items())),
        "challenge": challenge,
        # required kinds that passed / failed / never ran (a crash mid-challenge, a batch stopped before it)
        "challenge_status": challenge_status(b.challenge_required, challenge),
        "started": starts[0] if starts else None,
        "stopped": stops[-1] if stops else None,
        "history": history,
    }


def _lot_events(store: Any, lot: str) -> list[Any]:
    out: list[Any] = []
    after = 0
    while True:
        rows = store.events_of_lot(lot, after, 10000)
        if not rows:
            return out
        out.extend(r.event for r in rows if r.kind in ("unit_decommissioned", "serials_returned", "batch_state", "challenge_result"))
        after = rows[-1].seq


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"Batch {r['lot']}  GTIN {r['gtin']}  expiry {r['expiry']}  planned {r['planned_qty']}  state {r['state']}",
        f"  provisioned     {r['provisioned']}",
        f"  commissioned    {r['commissioned']}",
        f"  decommissioned  {r['decommissioned']}",
        f"  returned        {r['returned']}",
        f"  voided          {r['voided']}",
        f"  => {'BALANCED' if r['balanced'] else 'NOT BALANCED'}: {r['provisioned']} = {r['commissioned']} + {r['decommissioned']} + {r['returned']} + {r['voided']}",
    ]
    for p in r["problems"]:
        lines.append(f"  problem: {p}")
    lines.append("  rejects by reason: " + (", ".join(f"{k} {v}" for k, v in r["rejects_by_reason"].items()) or "none"))
    if r["challenge"]:
        lines.append("  challenge: " + ", ".join(f"{c['challenge']}→{'rejected' if c['rejected'] else 'NOT rejected'} ({c['reason_seen']})" for c in r["challenge"]))
    cs = r.get("challenge_status")
    if cs and (cs["failed"] or cs["never_ran"]):
        lines.append(f"  challenge INCOMPLETE: failed {cs['failed'] or 'none'}, never ran {cs['never_ran'] or 'none'}")
    for h in r["history"]:
        lines.append(f"  {h['time']}  {h['previous'] or '-'} -> {h['state']}  by {h['by']}  {h['reason']}")
    return "\n".join(lines)
