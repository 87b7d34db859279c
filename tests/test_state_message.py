"""The operators' view: the retained `<root>/state` message is right and self-describing.

Real daemon (linectl.demo.SimulatedLine: simulator process, drivers, store, bridge, sinks) on the real broker; every
assertion is on what a dashboard receives over MQTT: stamps and interval, a rate that falls to 0 when the line does not
run, sink backlogs that reach 0 once delivered, counters by reject reason against the simulator's ground truth, the
first-out stop reason (e-stop first, its consequences after it), active alarms with who acknowledged them (also for a
dashboard that subscribes late), device health when the printer drops its link, and the PackML summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from engine_helpers import belt_empty, create_and_start, db_query, lot_events_from_db, sim, simulated_line, unique_root, wait_for, wait_good
from pydantic import ValidationError

from linectl.config import ShiftConfig, parse_config
from linectl.engine.line import RATE_WINDOW_S, current_shift, zone_info
from linectl.events import UnitDecommissioned
from linectl.yamlsource import ConfigFileError

pytestmark = pytest.mark.timeout(240)
PORT = 1883
INTERVAL_S = 0.5
RELAXED = {"consecutive_reject_limit": 1000, "no_read_limit": 1000}


class StateWatcher:
    """A dashboard: subscribes to <root>/state and keeps every message it receives."""

    def __init__(self, root: str) -> None:
        self.topic = f"{root}/state"
        self.client = aiomqtt.Client("127.0.0.1", PORT, identifier=f"dash-{uuid.uuid4().hex[:8]}")
        self.messages: list[dict[str, Any]] = []
        self.retained: list[bool] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StateWatcher:
        await self.client.__aenter__()
        await self.client.subscribe(self.topic, qos=1)
        self._task = asyncio.create_task(self._listen())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        await self.client.__aexit__(None, None, None)

    async def _listen(self) -> None:
        async for m in self.client.messages:
            self.messages.append(json.loads(bytes(m.payload)))
            self.retained.append(bool(m.retain))

    async def until(self, pred: Callable[[dict[str, Any]], Any], what: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first message from now on (or the latest one) for which pred holds."""
        start = max(0, len(self.messages) - 1)

        def found() -> dict[str, Any] | None:
            return next((m for m in self.messages[start:] if pred(m)), None)

        msg: dict[str, Any] = await wait_for(found, timeout, what)
        return msg


@contextlib.asynccontextmanager
async def line(tmp_path: Path, upstream: dict[str, Any] | None = None, **kw: Any) -> AsyncIterator[Any]:
    root = unique_root()
    ov: dict[str, Any] = {"mqtt": {"topic_root": root, "port": PORT, "state_interval_s": INTERVAL_S}}
    if upstream is not None:
        ov["upstream"] = upstream
    async with simulated_line(tmp_path, rate=900.0, rules=RELAXED, overrides=ov, **kw) as sl:
        yield sl


async def ack(root: str, actor: str, alarm_id: str | None = None) -> dict[str, Any]:
    async with aiomqtt.Client("127.0.0.1", PORT, identifier=f"op-{uuid.uuid4().hex[:8]}") as c:
        await c.subscribe(f"{root}/cmd/ack_alarm/reply", qos=1)
        cid = uuid.uuid4().hex
        body: dict[str, Any] = {"command_id": cid, "actor": actor}
        if alarm_id is not None:
            body["alarm_id"] = alarm_id
        await c.publish(f"{root}/cmd/ack_alarm", json.dumps(body), qos=1)
        async with asyncio.timeout(15):
            async for m in c.messages:
                reply: dict[str, Any] = json.loads(bytes(m.payload))
                if reply.get("command_id") == cid:
                    return reply
    raise AssertionError("no reply")


def stamp_ok(msg: dict[str, Any]) -> None:
    ts = datetime.fromisoformat(msg["ts"])
    assert ts.utcoffset() is not None and ts.utcoffset().total_seconds() == 0, msg["ts"]
    assert abs((datetime.now(UTC) - ts).total_seconds()) < 30
    assert msg["interval_s"] == INTERVAL_S
    assert isinstance(msg["seq"], int) and msg["seq"] >= 1


async def test_rate_counters_backlog_devices_and_stamps(tmp_path):
    # a file sink beside MQTT: each sink's backlog is its own and each must reach 0
    (tmp_path / "epcis-out").mkdir()
    async with line(tmp_path, defect_rate=0.15, seed=7, upstream={"file": {"dir": str(tmp_path / "epcis-out"), "max_age_s": 0.5}}) as sl:
        root = sl.cfg.topic_root
        async with StateWatcher(root) as dash:
            first = await dash.until(lambda m: True, "a state message")
            stamp_ok(first)
            assert first["rate_upm"] == 0.0 and first["rate_window_s"] == RATE_WINDOW_S
            assert first["stop_reason"] is None and first["alarms"] == []
            assert first["shift"]["name"] == "00:00" and first["shift"]["good"] == 0
            assert set(first["packml"]) == {"State", "StateCurrent", "UnitMode", "StopReason"}
            coder = first["devices"]["coder1"]
            assert coder["role"] == "printer" and coder["state"] == "connected" and coder["driver"], coder
            datetime.fromisoformat(coder["since"])

            lot = await create_and_start(sl, 100_000, challenge=False)
            await wait_good(sl, 40)
            running = await dash.until(lambda m: m["state"] == "running" and m["rate_upm"] > 0, "a running rate")
            assert 100 < running["rate_upm"] < 2000, running["rate_upm"]  # the simulator feeds 900/min
            assert running["packml"]["State"] == "Execute" and running["stop_reason"] is None

            # pause: the rate falls to 0 (not the last value), the first-out is the pause
            await sl.line.execute({"name": "pause_batch", "actor": "op"}, origin="test")
            paused = await dash.until(lambda m: m["state"] == "paused", "paused")
            assert paused["rate_upm"] == 0.0
            assert paused["stop_reason"]["code"] == "pause" and paused["stop_reason"]["consequences"] == []
            await sl.line.execute({"name": "resume_batch", "actor": "op"}, origin="test")
            await dash.until(lambda m: m["state"] == "running" and m["rate_upm"] > 0 and m["stop_reason"] is None, "running again")
            await wait_good(sl, 120)

            # a clean stop: rate 0, first-out "stop", and every sink's backlog reaches 0
            await sl.line.execute({"name": "stop_batch", "actor": "op"}, origin="test")
            await belt_empty(sl)
            stopped = await dash.until(
                lambda m: m["state"] == "stopped" and all(s["backlog_rows"] == 0 for s in m["upstream_sinks"].values()),
                "stopped with every sink's backlog at 0",
            )
            assert stopped["rate_upm"] == 0.0 and stopped["stop_reason"]["code"] == "stop"
            assert {"mqtt", "file"} <= set(stopped["upstream_sinks"]), stopped["upstream_sinks"]

            # counters by reason: the simulator's ground truth and the store agree with the message
            truth = await sl.truth()
            await asyncio.sleep(3 * INTERVAL_S)
            msg = await dash.until(lambda m: m["batch"]["good"] == sl.line.batch.good_total(), "the final counts")
            b = msg["batch"]
            by_reason = b["rejected_by_reason"]
            assert sum(by_reason.values()) > 5, by_reason  # defect_rate 0.15: there are rejects to count
            assert b["good"] == truth["passed"], (b, truth)
            assert sum(by_reason.values()) == truth["rejected"], (by_reason, truth)
            # serials never printed (line_stopped) are decommissioned too, but were no unit at the gate
            stored = Counter(e.reason.value for e in lot_events_from_db(sl.db, lot) if isinstance(e, UnitDecommissioned) and e.reason.value != "line_stopped")
            assert by_reason == dict(stored), (by_reason, stored)
            defects = truth["defects"]
            assert defects.get("no_print", 0) + defects.get("partial", 0) <= b["no_reads"] == by_reason.get("no_read", 0)
            assert b["challenge"] is None  # a batch created without a challenge
            assert msg["shift"]["good"] == b["good"] and msg["shift"]["rejected_by_reason"] == by_reason
            assert msg["shift"]["no_reads"] == b["no_reads"]

            # the printer reports a stop fault (print head): the state shows it, then its clearing
            seen = len(dash.messages)
            await sim(sl, cmd="inject", device="coder1", fault="fault", code="202")
            await wait_for(lambda: any(m["devices"]["coder1"]["state"] != "connected" for m in dash.messages[seen:]), 20, "printer fault in the state")
            down = next(m for m in dash.messages[seen:] if m["devices"]["coder1"]["state"] != "connected")
            assert down["devices"]["coder1"]["reason"], down["devices"]["coder1"]
            await sim(sl, cmd="inject", device="coder1", fault="clear_fault")
            await dash.until(lambda m: m["devices"]["coder1"]["state"] == "connected", "printer back in the state")

            # stamps: seq counts messages, the interval is kept while nothing happens
            seqs = [m["seq"] for m in dash.messages]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
            t0, n0 = time.monotonic(), len(dash.messages)
            await wait_for(lambda: len(dash.messages) >= n0 + 3, 20, "periodic state messages")
            assert (time.monotonic() - t0) < 3 * 20 * INTERVAL_S  # generous: only proves they keep coming, unprompted
            stamp_ok(dash.messages[-1])

            # a clean stop of the daemon right after production: the last retained state shows what is really left
            await sl.line.execute({"name": "start_batch", "actor": "op"}, origin="test")
            await wait_good(sl, sl.line.batch.good_total() + 20)
            await sl.daemon.shutdown("test: clean stop")
        async with StateWatcher(root) as late:
            last = await late.until(lambda m: True, "the retained state after the clean stop", timeout=10)
            assert last["state"] == "stopped" and last["rate_upm"] == 0.0, last["state"]
            # the figure is the real one: the rows after each sink's durable cursor (a clean stop sends nothing new,
            # it only waits for the acknowledgements of what was in flight; the rest goes after the restart)
            real = {
                sink: int(db_query(sl.db, "SELECT count(*) FROM outbox WHERE seq > ?", (seq,))[0][0])
                for sink, seq in db_query(sl.db, "SELECT sink, seq FROM sink_cursors")
            }
            assert {n: s["backlog_rows"] for n, s in last["upstream_sinks"].items()} == {n: real[n] for n in last["upstream_sinks"]}, real
            assert last["upstream"]["backlog_rows"] == real["mqtt"]


async def test_estop_first_out_alarms_acknowledged_and_late_dashboard(tmp_path):
    async with line(tmp_path, defect_rate=0.0, seed=3) as sl:
        root = sl.cfg.topic_root
        async with StateWatcher(root) as dash:
            await create_and_start(sl, 100_000, challenge=False)
            await wait_good(sl, 30)
            await sim(sl, cmd="set", device="plc1", tags={"estop": True})
            msg = await dash.until(lambda m: m["state"] == "stopped" and m["fault"] is not None, "the e-stop stop", timeout=60)
            await asyncio.sleep(2.0)  # consequences (unconfirmed rejects, failsafe) arrive during and after the drain
            msg = await dash.until(lambda m: True, "the latest state")
            assert msg["fault"] == "estop", msg["fault"]
            sr = msg["stop_reason"]
            assert sr["code"] == "estop" and "e" in sr["message"], sr
            assert all(c["code"] != "estop" for c in sr["consequences"]), sr
            for c in sr["consequences"]:
                assert c["at"] >= sr["at"] or c["code"] in {"reject_not_confirmed", "reader_silent", "plc_write_failed"}, sr
            assert msg["packml"]["StopReason"]["Code"] == "estop"
            est = [a for a in msg["alarms"] if a["code"] == "estop"]
            assert len(est) == 1 and est[0]["severity"] == "critical" and not est[0]["acknowledged"], msg["alarms"]
            assert est[0]["id"] and est[0]["since"] and est[0]["acknowledged_by"] is None

            # acknowledged by whom: still listed (the cause is not reset), with the operator
            reply = await ack(root, "alice", est[0]["id"])
            assert reply["ok"], reply
            acked = await dash.until(lambda m: any(a["code"] == "estop" and a["acknowledged"] for a in m["alarms"]), "the acknowledgement")
            a = next(a for a in acked["alarms"] if a["code"] == "estop")
            assert a["acknowledged_by"].startswith("alice@mqtt"), a
            datetime.fromisoformat(a["acknowledged_at"])
            assert all(x["code"] and x["id"] and x["since"] for x in acked["alarms"]), acked["alarms"]  # no blank rows

        # a dashboard that starts late gets the active alarms from the retained state
        async with StateWatcher(root) as late:
            m = await late.until(lambda m: True, "the retained state", timeout=10)
            assert late.retained[0] is True
            assert any(x["code"] == "estop" and x["acknowledged_by"].startswith("alice") for x in m["alarms"]), m["alarms"]
            assert m["stop_reason"]["code"] == "estop"

            # release the e-stop, reset, acknowledge everything: the list empties, the stop reason stays until it runs
            await sim(sl, cmd="set", device="plc1", tags={"estop": False})
            await asyncio.sleep(1.0)
            await sl.line.execute({"name": "reset", "actor": "bob"}, origin="test")
            assert (await ack(root, "bob"))["ok"]
            done = await late.until(lambda m: m["alarms"] == [] and m["fault"] is None, "alarms gone after reset and acknowledgement")
            assert done["stop_reason"]["code"] == "estop"


async def test_root_cause_behind_its_consequence_becomes_first_out(tmp_path):
    """The bug seen: the belt stopped by the e-stop leaves a reject unconfirmed, and that fault came first.
    The batch runs its challenge first: the state's challenge counters are the simulator's challenge units."""
    async with line(tmp_path, defect_rate=0.0, seed=5) as sl:
        async with StateWatcher(sl.cfg.topic_root) as dash:
            await create_and_start(sl, 100_000, challenge=True)
            fed = [u for u in (await sim(sl, cmd="units", last=1000))["units"] if u["challenge"]]
            assert fed and all(u["outcome"] == "rejected" for u in fed), fed  # truth: every challenge pack rejected
            m = await dash.until(lambda m: m["state"] == "running" and m["batch"]["challenge"] is not None, "the challenge counters")
            assert m["batch"]["challenge"] == {"units": len(fed), "passed": True}, (m["batch"]["challenge"], len(fed))
            await wait_good(sl, 20)
            await sl.line.fault_stop("reject_not_confirmed", "reject of unit 12 not confirmed within 2.00s", "pv1")
            await sl.line.fault_stop("estop", "emergency stop on PLC plc1")
            m = await dash.until(lambda m: m["fault"] == "estop" and m["state"] == "stopped", "estop as the first-out", timeout=60)
            sr = m["stop_reason"]
            assert sr["code"] == "estop" and sr["consequences"][0]["code"] == "reject_not_confirmed", sr
            codes = [a["code"] for a in m["alarms"]]
            assert "estop" in codes and "reject_not_confirmed" in codes, codes
            # a later consequence never takes the first-out's place
            await sl.line.fault_stop("printer_error", "printer coder1 link lost", "pv1")
            m = await dash.until(lambda m: any(c["code"] == "printer_error" for c in m["stop_reason"]["consequences"]), "a later consequence")
            assert m["fault"] == "estop" and m["stop_reason"]["code"] == "estop"
            # after a reset the stop reason stays (the line has not run since); a new fault is a new first-out
            await sl.line.execute({"name": "reset", "actor": "op"}, origin="test")
            m = await dash.until(lambda m: m["fault"] is None, "the reset")
            assert m["stop_reason"]["code"] == "estop"
            await sl.line.fault_stop("printer_fault", "printer coder1 reports fault 202", "pv1")
            m = await dash.until(lambda m: m["fault"] == "printer_fault", "a new fault after the reset")
            assert m["stop_reason"]["code"] == "printer_fault" and m["stop_reason"]["consequences"] == [], m["stop_reason"]


def test_shift_windows_and_refused_keys():
    cfg = ShiftConfig(starts=["06:00", "14:00", "22:00"], names=["early", "late", "night"])
    berlin = zone_info("Europe/Berlin")
    name, since = current_shift(cfg, berlin, datetime(2026, 7, 1, 12, 30, tzinfo=UTC))  # 14:30 CEST
    assert (name, since.isoformat()) == ("late", "2026-07-01T14:00:00+02:00")
    name, since = current_shift(cfg, berlin, datetime(2026, 7, 1, 2, 0, tzinfo=UTC))  # 04:00: last night's shift
    assert (name, since.isoformat()) == ("night", "2026-06-30T22:00:00+02:00")
    name, since = current_shift(cfg, zone_info("-05:00"), datetime(2026, 1, 1, 11, 0, tzinfo=UTC))  # 06:00 local
    assert (name, since.isoformat()) == ("early", "2026-01-01T06:00:00-05:00")
    assert current_shift(ShiftConfig(), zone_info("+00:00"), datetime(2026, 1, 1, 23, 59, tzinfo=UTC))[0] == "00:00"
    for bad, match in (
        ({"starts": ["6:00"]}, "HH:MM"),
        ({"starts": ["24:00"]}, "HH:MM"),
        ({"starts": ["14:00", "06:00"]}, "order of the day"),
        ({"starts": ["06:00", "06:00"]}, "order of the day"),
        ({"starts": ["06:00"], "names": ["a", "b"]}, "one per start"),
        ({"starts": ["06:00"], "names": [" "]}, "empty"),
        ({"starts": []}, "at least 1"),
        ({"start": ["06:00"]}, "Extra inputs"),
    ):
        with pytest.raises(ValidationError, match=match):
            ShiftConfig(**bad)


def test_shift_section_in_a_line_config():
    from engine_helpers import variant_raw

    raw = variant_raw()
    raw["shift"] = {"starts": ["06:00", "18:00"], "names": ["day", "night"]}
    assert parse_config(raw).shift.names == ["day", "night"]
    raw["shift"] = {"starts": ["06:00"], "lenght_h": 8}
    with pytest.raises(ConfigFileError, match="shift.lenght_h: Extra inputs are not permitted"):
        parse_config(raw)
