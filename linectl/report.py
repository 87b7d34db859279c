"""Batch reconciliation: every serial given to a batch is accounted for, or the report says which are not.

provisioned to the batch = commissioned + decommissioned + returned + voided.
Anything still `allocated` or `sent` at close is listed by name: an inspector
must be able to see exactly which serials break the balance and why.

Packs are reconciled too, against the counters the PLC keeps (when its tag map
has them): triggered = passed + rejected at the gate; passed against the
serials commissioned; rejected against the serials decommissioned on a pack,
the challenge units, the blank packs (no serial of the batch on them) and the
units whose fate a PLC restart made unknown. Units of unknown fate keep the
report open until an operator reconciles them.

Built from what the store never purges (serial states, the batch row with its
challenge results, the audit trail, the per-batch tallies): retention deletes
forwarded outbox rows, and a report must read the same after it as before.
"""

from __future__ import annotations

from typing import Any

from linectl.engine.verdict import challenge_status
from linectl.events import SerialsReturned, UnitDecommissioned
from linectl.store import Batch
from linectl.store.plc_records import UnitFate
from linectl.store.ports import StoreReads


def batch_report(store: StoreReads, lot: str) -> dict[str, Any]:
    b = store.batch(lot)
    if b is None:
        raise KeyError(f"no batch {lot}")
    counts: dict[str, int] = store.lot_counts(lot)
    tallies = store.lot_tallies(lot)
    if tallies is not None:
        reasons, returned = dict(tallies.rejects), tallies.returned
    else:  # a batch created before the store kept its tallies: only the outbox (while retention keeps it) has them
        reasons, returned = _outbox_tallies(store, lot)
    history: list[dict[str, Any]] = [
        {"time": h.time, "state": h.state, "previous": h.previous, "by": h.by, "reason": h.reason} for h in store.batch_history(lot)
    ]
    challenge = _challenge(b)
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
    fates = store.unit_fates(lot)
    open_fates = [f for f in fates if f.state == "fate_unknown"]
    if open_fates:
        problems.append(
            f"{len(open_fates)} unit(s) of unknown fate after a PLC restart, not reconciled (in the reject bin or passed?): "
            f"{[f.serial for f in open_fates][:20]}"
        )
    packs = pack_reconciliation(store, lot, reasons, challenge, commissioned, open_fates, b.state)
    balanced = provisioned == accounted and not problems
    starts = [h for h in history if h["state"] in ("challenge", "running")]
    stops = [h for h in history if h["state"] in ("stopped", "closed")]
    return {
        "lot": lot,
        "gtin": b.gtin,
        "expiry": b.expiry,
        "dates": store.batch_dates(lot),  # production_date, packaging_date, best_before, sell_by as printed
        # the config the batch was created under: file and resolved-config sha256 (linectl.config_hash); None before they were recorded
        "config": store.batch_config(lot),
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
        "fate_unknown": len(open_fates),
        "fate_unknown_serials": [f.serial for f in open_fates],
        "fates_reconciled": [{"serial": f.serial, "outcome": f.outcome, "by": f.resolved_by, "at": f.resolved_at} for f in fates if f.state != "fate_unknown"],
        "packs": packs,
        "balanced_packs": packs["balanced"],
        "challenge": challenge,
        # required kinds that passed / failed / never ran (a crash mid-challenge, a batch stopped before it)
        "challenge_status": challenge_status(b.challenge_required, challenge),
        "started": starts[0] if starts else None,
        "stopped": stops[-1] if stops else None,
        "history": history,
    }


#: reject reasons that mean the serial was on a physical pack that went to the reject bin
ON_PACK_REASONS = frozenset({
    "no_read", "wrong_content", "not_gs1", "duplicate", "low_grade", "data_mismatch", "missing_unit", "unexpected_unit", "plc_failsafe",
    "rfid_void", "rfid_mismatch", "rfid_no_answer",  # an RFID label (VOID or with a wrong / unverified tag) on the pack
})
#: decommissioned after passing the gate (a rework bench destroyed the pack): counted among the passed packs
AFTER_GATE_REASONS = frozenset({"damaged"})
#: in flight at a crash: printed or not, nobody knows (never commissioned, so never passed): rejected or no pack
UNSURE_REASONS = frozenset({"crash_recovery"})


def _segments(snaps: list[dict[str, Any]], state: str) -> tuple[dict[str, int], list[str]]:
    """Sum counter deltas between consecutive snapshots of the batch, per PLC, never across a PLC restart.

    An epoch_start snapshot holds where the new epoch's counters started (0
    for a counter the restart reset), so units still on the belt at the
    restart are counted at the gate of the new epoch and the sums still close.
    """
    keys = ("trigger_count", "pass_total", "reject_total", "gate_reject_total")
    total = {k: 0 for k in keys}
    gaps: list[str] = []
    by_plc: dict[str, list[dict[str, Any]]] = {}
    for s in snaps:
        by_plc.setdefault(s["plc"], []).append(s)
    for plc, rows in by_plc.items():
        for a, b in zip(rows, rows[1:]):
            if a["epoch"] == b["epoch"]:
                _add(total, a, b, keys)
            elif a["point"] == "epoch_end" and b["point"] == "epoch_start":
                if b.get("trigger_count") == 0 and (a.get("trigger_count") or 0) > 0:
                    gaps.append(f"PLC {plc}: counters reset by a cold restart at {b['ts']}: packs the PLC counted after linectl's "
                                f"last poll before the reset ({a['ts']}) are not in these sums")
            else:
                gaps.append(f"PLC {plc}: counters between {a['ts']} (epoch {a['epoch']}) and {b['ts']} (epoch {b['epoch']}) are lost: "
                            "the PLC restarted while linectl was down")
        if rows[-1]["point"] != "stop" and state not in ("created", "challenge", "running", "paused"):
            gaps.append(f"PLC {plc}: no counters at the last stop (last snapshot: {rows[-1]['point']} at {rows[-1]['ts']})")
    return total, gaps


def _add(total: dict[str, int], a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...]) -> None:
    for k in keys:
        if a.get(k) is not None and b.get(k) is not None:
            total[k] += int(b[k]) - int(a[k])


def pack_reconciliation(store: StoreReads, lot: str, reasons: dict[str, int], challenge: list[dict[str, Any]], commissioned: int,
                        open_fates: list[UnitFate], state: str) -> dict[str, Any]:
    """Physical packs (PLC counters) against serial states; names every count that disagrees."""
    snaps = store.plc_counters(lot)
    blank = store.pack_counts(lot).get("blank", 0)
    on_pack = sum(n for r, n in reasons.items() if r in ON_PACK_REASONS)
    after_gate = sum(n for r, n in reasons.items() if r in AFTER_GATE_REASONS)
    unsure = sum(n for r, n in reasons.items() if r in UNSURE_REASONS)
    ch_rejected = sum(1 for c in challenge if c["rejected"])
    ch_passed = len(challenge) - ch_rejected
    unknown = len(open_fates)
    out: dict[str, Any] = {
        "plc_counters": bool(snaps),
        "blank_packs": blank,
        "challenge_units": len(challenge),
        "decommissioned_on_pack": on_pack,
        "decommissioned_after_gate": after_gate,
        "crash_recovery": unsure,
        "fate_unknown": unknown,
        "problems": [],
        "balanced": None,  # None: no PLC pack counters to reconcile against
    }
    if not snaps:
        return out
    total, gaps = _segments(snaps, state)
    triggered, passed, confirmed = total["trigger_count"], total["pass_total"], total["reject_total"]
    has_gate = any(s.get("gate_reject_total") is not None for s in snaps)
    rejected = total["gate_reject_total"] if has_gate else confirmed
    passed_expected = commissioned - unknown + after_gate + ch_passed
    rejected_expected = on_pack + ch_rejected + blank
    out.update({"triggered": triggered, "passed": passed, "rejected": rejected, "reject_confirmed": confirmed,
                "passed_expected": passed_expected, "rejected_expected": rejected_expected, "gaps": gaps})
    probs: list[str] = out["problems"]
    probs.extend(gaps)
    out["balanced"] = False
    if any("are lost" in g or "no counters" in g for g in gaps):
        return out  # sums over an incomplete record would only mislead
    if state in ("created", "challenge", "running", "paused"):
        probs.append(f"batch is {state}: packs are still in transit")
        return out
    if triggered != passed + rejected:
        probs.append(f"packs: {triggered} triggered but {passed} passed + {rejected} rejected = {passed + rejected} at the gate "
                     f"({triggered - passed - rejected} not accounted at the gate)")
    if has_gate and confirmed != rejected:
        probs.append(f"packs: {rejected} pushed out by the gate but {confirmed} confirmed in the reject bin ({rejected - confirmed} unconfirmed)")
    # units of unknown fate are either passed or rejected: the counts must agree for some split of them
    extra_passed = passed - passed_expected
    if not 0 <= extra_passed <= unknown:
        probs.append(f"packs: {passed} passed the gate but {passed_expected} expected "
                     f"(commissioned {commissioned} - unknown fate {unknown} + destroyed after the gate {after_gate} + challenge passed {ch_passed})"
                     + (f"; {unknown} of unknown fate" if unknown else ""))
    extra_rejected = rejected - rejected_expected - (unknown - max(0, min(unknown, extra_passed)))
    if not 0 <= extra_rejected <= unsure:
        probs.append(f"packs: {rejected} rejected at the gate but {rejected_expected} expected "
                     f"(decommissioned on a pack {on_pack} + challenge units {ch_rejected} + blank packs {blank})"
                     + (f" + up to {unsure} crash-recovery serial(s)" if unsure else "")
                     + (f" + unknown fate {unknown}" if unknown else ""))
    if unknown:
        probs.append(f"packs: {unknown} unit(s) of unknown fate not reconciled")
    out["balanced"] = not probs
    return out


def _challenge(b: Batch) -> list[dict[str, Any]]:
    """The batch's challenge results, kept on its row in the transaction of each ChallengeResult."""
    return [
        {"time": c.get("at"), "challenge": c["challenge"], "station": c["station"], "rejected": c["rejected"],
         "reason_seen": c.get("reason_seen"), "seq": c.get("seq")}
        for c in b.challenge
    ]


def _outbox_tallies(store: StoreReads, lot: str) -> tuple[dict[str, int], int]:
    reasons: dict[str, int] = {}
    returned = 0
    after = 0
    while rows := store.events_of_lot(lot, after, 10000):
        for r in rows:
            ev = r.event
            if isinstance(ev, UnitDecommissioned):
                reasons[ev.reason.value] = reasons.get(ev.reason.value, 0) + 1
            elif isinstance(ev, SerialsReturned):
                returned += len(ev.serials)
        after = rows[-1].seq
    return dict(sorted(reasons.items())), returned


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"Batch {r['lot']}  GTIN {r['gtin']}  expiry {r['expiry']}"
        + "".join(f"  {k} {v}" for k, v in sorted(r.get("dates", {}).items()))
        + f"  planned {r['planned_qty']}  state {r['state']}",
        "  config          " + (f"sha256 {r['config']['config_sha256']} (resolved)"
                                 + (f", file {r['config']['config_file']} sha256 {r['config']['config_file_sha256']}" if r["config"].get("config_file") else "")
                                 if r.get("config") else "not recorded (batch created before linectl recorded it)"),
        f"  provisioned     {r['provisioned']}",
        f"  commissioned    {r['commissioned']}",
        f"  decommissioned  {r['decommissioned']}",
        f"  returned        {r['returned']}",
        f"  voided          {r['voided']}",
        f"  => {'BALANCED' if r['balanced'] else 'NOT BALANCED'}: {r['provisioned']} = "
        f"{r['commissioned']} + {r['decommissioned']} + {r['returned']} + {r['voided']}",
    ]
    for p in r["problems"]:
        lines.append(f"  problem: {p}")
    lines.append("  rejects by reason: " + (", ".join(f"{k} {v}" for k, v in r["rejects_by_reason"].items()) or "none"))
    if r.get("fate_unknown"):
        lines.append(f"  fate unknown    {r['fate_unknown']} (not reconciled): {', '.join(r['fate_unknown_serials'][:20])}")
    for f in r.get("fates_reconciled", []):
        lines.append(f"  reconciled      {f['serial']}: {f['outcome']} by {f['by']} at {f['at']}")
    p = r.get("packs") or {}
    if p.get("plc_counters"):
        lines.append(f"  packs (PLC)     triggered {p['triggered']} = passed {p['passed']} + rejected {p['rejected']}"
                     f" (confirmed in bin {p['reject_confirmed']})")
        lines.append(f"  packs expected  passed {p['passed_expected']}, rejected {p['rejected_expected']}"
                     f" = decommissioned on a pack {p['decommissioned_on_pack']}"
                     f" + challenge units {p['challenge_units']} + blank packs {p['blank_packs']}"
                     + (f"; unknown fate {p['fate_unknown']}" if p["fate_unknown"] else ""))
        lines.append(f"  => packs {'BALANCED' if p['balanced'] else 'NOT BALANCED'}")
        for prob in p["problems"]:
            lines.append(f"  packs problem: {prob}")
    else:
        lines.append(f"  packs           no PLC pack counters recorded; blank packs {p.get('blank_packs', 0)}, challenge units {p.get('challenge_units', 0)}")
    if r["challenge"]:
        lines.append("  challenge: " + ", ".join(
            f"{c['challenge']}→{'rejected' if c['rejected'] else 'NOT rejected'} ({c['reason_seen']})" for c in r["challenge"]))
    cs = r.get("challenge_status")
    if cs and (cs["failed"] or cs["never_ran"]):
        lines.append(f"  challenge INCOMPLETE: failed {cs['failed'] or 'none'}, never ran {cs['never_ran'] or 'none'}")
    for h in r["history"]:
        lines.append(f"  {h['time']}  {h['previous'] or '-'} -> {h['state']}  by {h['by']}  {h['reason']}")
    return "\n".join(lines)
