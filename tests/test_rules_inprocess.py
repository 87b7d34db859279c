"""The print_verify station's rules, in process: a real Line and Store, fake devices, a clock the test moves.

Each test asserts against what the devices were told (the jobs printed, the
verdicts the PLC got, what the PLC's gate program did with each pack) and what
the store recorded; none needs a process, a socket or a wait on the wall clock.
The same rules end to end, on the simulators: tests/test_engine_e2e.py,
tests/test_engine_faults.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from engine_helpers import DEFECT_REASONS

from linectl.engine.line import LINE_MODE
from linectl.engine.verdict import CHALLENGE_EXPECTED_REASON
from linectl.events import UnitCommissioned

GOOD, REJECT = 1, 2


def decided(record: list[Any]) -> list[tuple[str, str | None]]:
    """A unit's record as (event, reason): ("commissioned", None) / ("decommissioned", "wrong_content")."""
    return [("commissioned", None) if isinstance(e, UnitCommissioned) else ("decommissioned", e.reason.value) for e in record]


async def test_good_unit_commissioned_and_passes_the_gate(fake_line):
    await fake_line.start_batch(10)
    unit = await fake_line.unit()
    assert fake_line.printer.printed[0][0] == unit.seq  # its code was printed on it...
    assert fake_line.plc.verdicts == {unit.seq: GOOD}  # ...the PLC got "good" for it...
    assert fake_line.plc.outcomes == {unit.seq: "passed"}  # ...and its gate let it through
    assert decided(fake_line.record_of(unit)) == [("commissioned", None)]
    assert fake_line.store.serial(fake_line.line.batch.gtin, fake_line.serial_on(unit)).state == "commissioned"
    assert fake_line.line.fault is None and fake_line.state == "running"


@pytest.mark.parametrize("defect", sorted(DEFECT_REASONS))
async def test_bad_print_rejected_and_decommissioned_for_its_reason(fake_line, defect):
    await fake_line.start_batch(10)
    good = await fake_line.unit()  # a code printed before: what a duplicate copies
    bad = await fake_line.unit(defect)
    assert bad.defect == defect, "the printer simulator could not apply the defect"
    assert fake_line.plc.verdicts == {good.seq: GOOD, bad.seq: REJECT}
    assert fake_line.plc.outcomes == {good.seq: "passed", bad.seq: "rejected"}
    [(event, reason)] = decided(fake_line.record_of(bad))
    assert event == "decommissioned" and reason in DEFECT_REASONS[defect], (event, reason)
    assert decided(fake_line.record_of(good)) == [("commissioned", None)]  # a copy of it rejected: it stays on the market
    assert fake_line.station.counters.reject_confirmed == 1 and fake_line.station.snapshot()["in_flight"]["rejects_unconfirmed"] == 0
    assert fake_line.line.fault is None


async def test_unit_never_read_is_rejected_fail_safe_at_the_gate(fake_line):
    await fake_line.start_batch(10)
    unit = await fake_line.printed()  # the read never comes: no verdict is written for it
    assert await fake_line.gate(unit) == "rejected"  # the PLC program rejects a unit without a good verdict
    assert unit.seq not in fake_line.plc.verdicts
    assert decided(fake_line.record_of(unit)) == [("decommissioned", "plc_failsafe")]
    assert fake_line.station.counters.failsafe_rejects == 1


async def test_a_reject_polled_ahead_of_a_stale_trigger_count_is_still_judged(fake_line):
    """Campaign seed 12: the PC froze between reading trigger_count and the reject ring of one poll; the ring then
    showed this epoch's units above the count, their fail-safe rejects were taken for an earlier PLC epoch's units and
    packs in the reject bin stayed commissioned. The slot waits for a fresher count instead."""
    await fake_line.start_batch(10)
    await fake_line.unit()
    unit = await fake_line.unit(gate=False)  # commissioned, "good" written, on its way to the gate
    assert decided(fake_line.record_of(unit)) == [("commissioned", None)]
    plc = fake_line.plc
    fresh = plc.latest
    stale_polls = [3]

    def split_poll() -> dict[str, Any]:  # the count as read before the freeze, the ring as read after it
        values = fresh()
        if stale_polls[0] > 0:
            stale_polls[0] -= 1
            values["trigger_count"] = unit.seq - 1
        return values

    plc.latest = split_poll  # type: ignore[method-assign]
    # the gate rejects the pack fail-safe after all (its good verdict came too late for the PLC program)
    slots = len(plc.tag("reject_ring"))
    plc.sim.set("reject_ring", unit.seq, index=unit.seq % slots)
    await plc.polled(6)
    assert stale_polls == [0], "the split poll was not seen"
    assert decided(fake_line.record_of(unit)) == [("commissioned", None), ("decommissioned", "plc_failsafe")]
    assert fake_line.station.counters.failsafe_rejects == 1


async def test_read_of_a_serial_printed_on_another_unit_is_a_duplicate(fake_line):
    await fake_line.start_batch(10)
    first = await fake_line.unit()
    copy = next(j for seq, j in fake_line.printer.printed if seq == first.seq).element_string
    second = await fake_line.bad_read(copy)  # the reader sees the first unit's code on the second
    assert fake_line.plc.outcomes == {first.seq: "passed", second.seq: "rejected"}
    assert decided(fake_line.record_of(second)) == [("decommissioned", "duplicate")]
    assert decided(fake_line.record_of(first)) == [("commissioned", None)]


async def test_consecutive_rejects_stop_the_line_at_the_limit(fake_line):
    limit = fake_line.station.rules.consecutive_reject_limit
    await fake_line.start_batch(50)
    for _ in range(limit - 1):
        await fake_line.unit("wrong_code")
    await fake_line.unit()  # a good unit in between: the count starts again
    bad = [await fake_line.unit("wrong_code") for _ in range(limit - 1)]
    assert fake_line.line.fault is None and fake_line.state == "running", "stopped before the limit"
    bad.append(await fake_line.unit("wrong_code"))
    await fake_line.wait_stopped()
    assert fake_line.line.fault == "consecutive_rejects"
    assert "consecutive_rejects" in fake_line.alarm_codes()
    assert fake_line.plc.tag("line_mode") == LINE_MODE["idle"]  # the infeed is closed
    assert all(fake_line.plc.outcomes[u.seq] == "rejected" for u in bad)
    assert all(decided(fake_line.record_of(u)) == [("decommissioned", "wrong_content")] for u in bad)


async def test_consecutive_no_reads_stop_the_line(make_fake_line):
    fake_line = await make_fake_line(rules={"consecutive_reject_limit": 20})  # only the no-read rule can stop it here
    limit = fake_line.station.rules.no_read_limit
    await fake_line.start_batch(50)
    for _ in range(limit - 1):
        await fake_line.no_read()
    await fake_line.unit("wrong_code")  # a reject that is not a no-read: the no-read count starts again
    assert fake_line.line.fault is None
    units = [await fake_line.unit("partial") for _ in range(limit - 1)]  # unreadable print
    units.append(await fake_line.no_read())  # a good print the reader did not decode
    await fake_line.wait_stopped()
    assert fake_line.line.fault == "no_read_limit"
    assert fake_line.plc.tag("line_mode") == LINE_MODE["idle"]
    assert [fake_line.plc.outcomes[u.seq] for u in units] == ["rejected"] * limit
    assert all(decided(fake_line.record_of(u)) == [("decommissioned", "no_read")] for u in units)


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        ("confirm_lost", "rejected"),  # the pack goes to the bin, its confirm never comes
        ("gate_jam", "passed"),  # the pusher does not move: the pack escapes (the line must stop)
    ],
)
async def test_reject_not_confirmed_within_the_timeout_stops_the_line(fake_line, fault, outcome):
    await fake_line.start_batch(10)
    fake_line.plc.sim.faults.set(fault, None, units=1)
    unit = await fake_line.unit("wrong_code")
    assert fake_line.plc.outcomes[unit.seq] == outcome
    wait = fake_line.station.confirm_timeout_s()
    await fake_line.advance(wait * 0.9)
    assert fake_line.line.fault is None, "stopped before the confirm timeout"
    await fake_line.advance(wait * 0.2)
    await fake_line.wait_stopped()
    assert fake_line.line.fault == "reject_not_confirmed"
    assert fake_line.plc.tag("line_mode") == LINE_MODE["idle"]
    assert decided(fake_line.record_of(unit)) == [("decommissioned", "wrong_content")]


async def test_confirmed_reject_does_not_time_out(fake_line):
    await fake_line.start_batch(10)
    await fake_line.unit("wrong_code")
    await fake_line.advance(fake_line.station.confirm_timeout_s() * 10)
    assert fake_line.line.fault is None and fake_line.state == "running"


async def test_silent_reader_stops_the_line(make_fake_line):
    # a short confirm wait and drain: the stop drains the unread pack on the wall clock
    fl = await make_fake_line(rules={"reject_confirm_timeout_s": 0.05, "read_to_gate_units": None, "drain_timeout_s": 0.05})
    await fl.start_batch(10)
    await fl.unit()
    unread = await fl.printed()  # printed, and the reader says nothing
    await fl.advance(fl.station.rules.read_timeout_s * 0.9)
    assert fl.line.fault is None, "stopped before read_timeout_s"
    await fl.advance(fl.station.rules.read_timeout_s * 0.2)
    await fl.wait_stopped()
    assert fl.line.fault == "reader_silent"
    assert decided(fl.record_of(unread)) == [("decommissioned", "missing_unit")]


async def test_challenge_passes_when_each_kind_is_rejected_for_its_own_reason(fake_line):
    kinds = list(fake_line.line.cfg.batch.challenge)
    assert set(kinds) == set(CHALLENGE_EXPECTED_REASON)
    await fake_line.start_batch(10, challenge=True)
    assert fake_line.state == "challenge"
    units = [await fake_line.challenge_unit(k) for k in kinds]
    await fake_line.line.challenge_done.wait()
    assert fake_line.line.challenge_passed is True and fake_line.state == "running"
    assert [fake_line.plc.outcomes[u.seq] for u in units] == ["rejected"] * len(kinds)
    seen = {r["challenge"]: r["reason_seen"] for r in fake_line.station.snapshot()["challenge"]}
    assert seen == {k: CHALLENGE_EXPECTED_REASON[k].value for k in kinds}
    assert not fake_line.printer.printed  # challenge packs carry their own codes: no serial was used on them


async def test_challenge_fails_when_a_pack_is_rejected_for_another_kinds_reason(fake_line):
    kinds = list(fake_line.line.cfg.batch.challenge)
    await fake_line.start_batch(10, challenge=True)
    # QA feeds the packs in the wrong order: each is rejected, but for the next kind's reason
    for k in [*kinds[1:], kinds[0]]:
        await fake_line.challenge_unit(k)
    await fake_line.line.challenge_done.wait()
    await fake_line.wait_stopped()
    assert fake_line.line.challenge_passed is False
    assert fake_line.line.fault == "challenge_failed"
    assert all(not r["passed"] and r["rejected"] for r in fake_line.station.snapshot()["challenge"])
    assert fake_line.plc.tag("line_mode") == LINE_MODE["idle"]


# --------------------------------------------------------------------------- the verify station downstream


@pytest.fixture
async def verify_line(make_fake_line):
    """config/verify-line.yaml: print_verify pv1, then verify station check1 with its own reader and gate (plc2)."""
    from linectl.demo import DEFAULT_CONFIG

    fl = await make_fake_line(base=DEFAULT_CONFIG.parent / "verify-line.yaml")
    assert fl.verify is not None and fl.verify.cfg.plc is not None
    return fl


async def test_verify_station_passes_a_commissioned_unit_and_rejects_a_copy(verify_line):
    fl = verify_line
    plc2 = fl.devices[fl.verify.cfg.plc]
    await fl.start_batch(10)
    unit = await fl.unit()
    assert fl.plc.outcomes == {unit.seq: "passed"}
    there = await fl.downstream(unit)
    copy = await fl.downstream(unit)  # the same code again on another pack
    assert plc2.verdicts == {there.seq: GOOD, copy.seq: REJECT}
    assert plc2.outcomes == {there.seq: "passed", copy.seq: "rejected"}
    assert fl.verify.counters.rejected == {"duplicate": 1}
    assert decided(fl.record_of(unit)) == [("commissioned", None)]  # the copy is not the unit: it stays commissioned
    assert fl.line.fault is None


async def test_verify_reject_not_confirmed_within_the_timeout_stops_the_line(verify_line):
    fl = verify_line
    plc2 = fl.devices[fl.verify.cfg.plc]
    await fl.start_batch(10)
    unit = await fl.unit()
    plc2.sim.faults.set("confirm_lost", None, units=1)
    foreign = await fl.downstream(unit, content=unit.content.replace(fl.serial_on(unit), "X" * len(fl.serial_on(unit))))
    assert plc2.outcomes[foreign.seq] == "rejected" and plc2.verdicts[foreign.seq] == REJECT
    wait = fl.verify.confirm_timeout_s()
    await fl.advance(wait * 0.9)
    assert fl.line.fault is None, "stopped before the confirm timeout"
    await fl.advance(wait * 0.2)
    await fl.wait_stopped()
    assert fl.line.fault == "reject_not_confirmed"
    assert plc2.tag("line_mode") == LINE_MODE["idle"] and fl.plc.tag("line_mode") == LINE_MODE["idle"]


async def test_first_out_a_root_cause_explains_a_stop_under_way_not_one_long_over(fake_line):
    """An e-stop (a root cause) seen while the line stops for one of its consequences is the first-out; one pressed on a line
    that already stood still for another fault is listed after it (README "Operators' view: the state message")."""
    from linectl.engine import line as line_module

    await fake_line.start_batch(50)
    limit = fake_line.station.rules.consecutive_reject_limit
    for _ in range(limit):
        await fake_line.unit("wrong_code")
    await fake_line.wait_stopped()
    line = fake_line.line
    assert line.fault == "consecutive_rejects" and line.first_out is not None
    line.first_out.latched -= line_module.ROOT_CAUSE_WINDOW_S + 1  # the stop is long over when the e-stop comes
    await line.fault_stop("estop", "emergency stop pressed")
    sr = line.first_out.to_json()
    assert line.fault == "consecutive_rejects" and sr["code"] == "consecutive_rejects", sr
    assert [c["code"] for c in sr["consequences"]].count("estop") == 1, sr
    assert all(c["code"] != "stop" for c in sr["consequences"]), sr  # the fault's own stop is no second cause
    # within the window the e-stop explains the stop: it becomes the first-out, the earlier fault its consequence
    line.first_out = line_module.FirstOut("reject_not_confirmed", "reject not confirmed", "t")
    line.fault = "reject_not_confirmed"
    line._fault_codes.discard("plc_lost")  # noqa: SLF001
    await line.fault_stop("plc_lost", "PLC lost")
    sr = line.first_out.to_json()
    assert line.fault == "plc_lost" and sr["code"] == "plc_lost" and sr["consequences"][0]["code"] == "reject_not_confirmed", sr
    # a printer that refused a job is a cause of its own: an e-stop right after it does not replace it
    line.first_out = line_module.FirstOut("printer_error", "printer refused job", "t")
    line.fault = "printer_error"
    line._fault_codes.discard("estop")  # noqa: SLF001
    await line.fault_stop("estop", "emergency stop pressed")
    sr = line.first_out.to_json()
    assert line.fault == "printer_error" and sr["code"] == "printer_error" and [c["code"] for c in sr["consequences"]] == ["estop"], sr
