"""The print-and-verify unit state machine (UnitTracker): one record per unit number, explicit states, and memory
windows whose bounds each keep their own meaning. Pure: no line, no devices."""

from __future__ import annotations

from linectl import gs1
from linectl.engine.print_verify import ChallengeUnit, Job, TrackedUnit, TrackingBounds, UnitKind, UnitState, UnitTracker
from linectl.engine.verdict import Expected, Verdict
from linectl.events import RejectReason

GTIN = "09501101530003"


def state(u: TrackedUnit) -> UnitState:
    """The unit's state now (a call, so the type checker does not keep an earlier comparison's narrowing)."""
    return u.state


def job(n: int) -> Job:
    serial = f"S{n:06d}"
    es = f"01{GTIN}21{serial}"
    return Job(n, serial, gs1.ParsedCode(None, (("01", GTIN), ("21", serial))), Expected(GTIN, serial, None, None, es), 0.0)


def tracker(decided: int = 4, good_watch: int = 3, early: int = 2) -> UnitTracker:
    return UnitTracker(TrackingBounds(decided=decided, good_watch=good_watch, early=early))


def decide_good(t: UnitTracker, seq: int) -> None:
    t.print_confirmed(seq, job(seq), float(seq))
    u = t.take_printed(seq, holds_issue=True)
    assert u is not None and state(u) is UnitState.DECIDING
    t.remember(u)
    t.good(u)
    t.decision_done(u)


def decide_reject(t: UnitTracker, seq: int, at: float = 0.0) -> None:
    t.print_confirmed(seq, job(seq), float(seq))
    u = t.take_printed(seq, holds_issue=False)
    assert u is not None
    t.remember(u)
    t.reject_ordered(u, RejectReason.NO_READ.value, None, at)
    t.decision_done(u)


def test_bounds_for_ring_are_four_turns_each() -> None:
    assert TrackingBounds.for_ring(8) == TrackingBounds(decided=32, good_watch=32, early=32)


def test_good_path_states_and_what_is_awaited() -> None:
    t = tracker()
    u = t.print_confirmed(1, job(1), 10.0)
    assert u is not None and state(u) is UnitState.PRINTED and u.awaiting == "read" and u.printed_at == 10.0
    assert t.is_printed(1) and t.first_printed() is u and t.count(UnitState.PRINTED) == 1
    taken = t.take_printed(1, holds_issue=True)
    assert taken is u and state(u) is UnitState.DECIDING and u.awaiting == "verdict" and t.issue_holds() == 1
    assert not t.is_printed(1) and not t.remembered(1)  # deciding: unknown to the reject-ring check
    t.remember(u)
    t.good(u)
    assert state(u) is UnitState.GOOD_AWAITING_GATE and u.awaiting == "gate passage" and t.remembered(1)
    assert t.issue_holds() == 1  # held until the read loop is done, not until the state changes
    t.decision_done(u)
    assert t.issue_holds() == 0 and t.good_awaiting_gate() == [u]


def test_take_printed_only_takes_a_printed_unit() -> None:
    t = tracker()
    assert t.take_printed(5, holds_issue=True) is None
    decide_good(t, 5)
    assert t.take_printed(5, holds_issue=True) is None
    assert t.issue_holds() == 0


def test_a_gate_reject_while_deciding_is_noted_and_found_by_the_verdict() -> None:
    t = tracker()
    t.print_confirmed(7, job(7), 0.0)
    u = t.take_printed(7, holds_issue=True)
    assert u is not None
    t.note_early_reject(7)  # what the ring check does for a unit it does not know
    assert u.gate_rejected_early and state(u) is UnitState.DECIDING
    t.remember(u)
    t.good(u)
    assert t.take_early_reject(u) is True and t.take_early_reject(u) is False  # used up
    t.gate_rejected(u)
    t.decision_done(u)
    assert state(u) is UnitState.GATE_REJECTED and t.good_awaiting_gate() == [] and t.remembered(7)


def test_early_reject_before_any_record_then_a_reject_order_confirms_at_once() -> None:
    t = tracker()
    t.note_early_reject(9)
    rec = t.get(9)
    assert rec is not None and rec.state is UnitState.UNSEEN and rec.awaiting is None
    u = t.deciding(9, None, UnitKind.CHALLENGE)
    assert u is rec and u.kind is UnitKind.CHALLENGE
    assert t.take_early_reject(u)
    u.challenge = ChallengeUnit("wrong_code", Verdict(False, RejectReason.WRONG_CONTENT, "x"))
    t.remember(u)
    t.reject_confirmed(u)
    assert state(u) is UnitState.REJECT_CONFIRMED and u.label == "challenge:wrong_code"


def test_the_good_watch_window_counts_good_units_only() -> None:
    t = tracker(decided=100, good_watch=3)
    for seq in (1, 2, 3):
        decide_good(t, seq)
    for seq in (4, 5, 6, 7):
        decide_reject(t, seq)  # rejects do not push good units out of the watch
    assert [u.seq for u in t.good_awaiting_gate()] == [1, 2, 3]
    decide_good(t, 8)
    assert [u.seq for u in t.good_awaiting_gate()] == [2, 3, 8]
    one = t.get(1)
    assert one is not None and state(one) is UnitState.GOOD_UNWATCHED and one.remembered


def test_the_decided_window_counts_every_decision_and_drops_idle_records() -> None:
    t = tracker(decided=4, good_watch=10)
    decide_good(t, 1)
    for seq in (2, 3, 4, 5):
        decide_reject(t, seq)
    # unit 1 left the decided window (4 later decisions) but is still watched at the gate
    one = t.get(1)
    assert one is not None and not one.remembered and state(one) is UnitState.GOOD_AWAITING_GATE
    two = t.get(2)
    assert two is not None and two.remembered  # and awaiting its confirm
    t.reject_confirmed(two)
    for seq in (6, 7, 8, 9):
        decide_reject(t, seq)
    assert t.get(2) is None  # confirmed and forgotten: nothing refers to it any more
    assert not t.remembered(2)


def test_the_early_window_keeps_the_last_notes() -> None:
    t = tracker(early=2)
    for seq in (20, 21, 22):
        t.note_early_reject(seq)
    assert t.get(20) is None
    assert [s for s in (21, 22) if (u := t.get(s)) is not None and u.gate_rejected_early] == [21, 22]
    t.note_early_reject(21)  # noted again: keeps its place
    t.note_early_reject(23)
    assert t.get(21) is None and t.get(22) is not None


def test_printed_units_keep_print_order_and_a_reprint_keeps_its_place() -> None:
    t = tracker()
    for seq in (3, 1, 2):
        t.print_confirmed(seq, job(seq), float(seq))
    assert [u.seq for u in t.printed()] == [3, 1, 2]
    u = t.print_confirmed(3, job(33), 99.0)  # the same number printed again: newer job, same place
    assert u is not None and u.job is not None and u.job.job_seq == 33 and u.printed_at == 99.0
    assert [u.seq for u in t.printed()] == [3, 1, 2]


def test_a_remembered_number_printed_again_joins_the_end_of_the_print_order() -> None:
    t = tracker()
    decide_good(t, 1)
    g = t.get(1)
    assert g is not None
    t.gate_rejected(g)
    t.print_confirmed(2, job(2), 2.0)
    again = t.print_confirmed(1, job(11), 3.0)
    assert again is g and state(g) is UnitState.PRINTED and g.remembered  # the memory stays with the number
    assert [u.seq for u in t.printed()] == [2, 1]


def test_a_late_print_on_a_unit_being_decided_or_awaiting_the_gate_is_refused() -> None:
    t = tracker()
    d = t.deciding(4, None)
    assert t.print_confirmed(4, job(4), 0.0) is None and state(d) is UnitState.DECIDING
    decide_reject(t, 5)
    assert t.print_confirmed(5, job(55), 0.0) is None
    decide_good(t, 6)
    assert t.print_confirmed(6, job(66), 0.0) is None


def test_rejects_awaiting_confirm_come_oldest_order_first() -> None:
    t = tracker()
    decide_reject(t, 12, at=1.0)
    decide_reject(t, 10, at=2.0)
    decide_reject(t, 11, at=3.0)
    assert [u.seq for u in t.awaiting_confirm()] == [12, 10, 11]
    assert all(u.awaiting == "reject confirm" for u in t.awaiting_confirm())


def test_a_failed_decision_is_closed_and_releases_the_feeder() -> None:
    t = tracker()
    t.print_confirmed(1, job(1), 0.0)
    u = t.take_printed(1, holds_issue=True)
    assert u is not None and t.issue_holds() == 1
    t.decision_done(u)  # e.g. the store refused the commissioning
    assert t.issue_holds() == 0 and state(u) is UnitState.CLOSED and t.get(1) is None


def test_a_held_unit_outlives_its_state_until_the_read_loop_is_done() -> None:
    t = tracker()
    t.print_confirmed(1, job(1), 0.0)
    u = t.take_printed(1, holds_issue=True)
    assert u is not None
    t.remember(u)
    t.good(u)
    t.forget_epoch()  # the PLC restarted while "good" was being written
    assert state(u) is UnitState.CLOSED and t.issue_holds() == 1 and t.get(1) is u
    t.decision_done(u)
    assert t.issue_holds() == 0 and t.get(1) is None


def test_a_new_epoch_forgets_memories_closes_good_units_and_keeps_what_the_caller_settles() -> None:
    t = tracker(decided=10, good_watch=10, early=10)
    decide_good(t, 1)
    decide_reject(t, 2)
    t.print_confirmed(3, job(3), 3.0)
    deciding = t.deciding(4, None)
    t.note_early_reject(4)
    t.note_early_reject(5)
    t.commissioned_before_start({6: (GTIN, "OLD6", "LOT")})
    t.forget_epoch()
    assert t.get(1) is None and t.get(5) is None and t.get(6) is None
    assert state(deciding) is UnitState.DECIDING and not deciding.gate_rejected_early and t.get(4) is deciding
    assert [u.seq for u in t.printed()] == [3] and [u.seq for u in t.awaiting_confirm()] == [2]
    two = t.get(2)
    assert two is not None and not two.remembered
    assert [u.seq for u in t.close_all(UnitState.PRINTED)] == [3] and t.get(3) is None
    assert [u.seq for u in t.close_all(UnitState.REJECT_AWAITING_CONFIRM)] == [2] and t.get(2) is None


def test_commissioned_before_start_is_a_memory_beside_a_unit_of_this_run() -> None:
    t = tracker()
    t.commissioned_before_start({1: (GTIN, "OLD1", "LOT"), 2: (GTIN, "OLD2", "LOT")})
    t.print_confirmed(1, job(1), 0.0)  # inferred numbers: this run's unit 1
    one = t.get(1)
    assert one is not None and state(one) is UnitState.PRINTED and one.before_start == (GTIN, "OLD1", "LOT")
    assert sorted(u.seq for u in t.before_start()) == [1, 2]
    assert t.take_before_start(2) == (GTIN, "OLD2", "LOT") and t.get(2) is None
    assert t.take_before_start(2) is None
    t.forget_before_start()
    assert t.get(1) is one and not t.before_start() and t.is_printed(1)
