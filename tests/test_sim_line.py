"""Conveyor + reject gate of the PLC simulator, driven by a tiny controller through the real Modbus driver.

The point: the gate is fail-safe (only a (seq, GOOD) slot lets a unit pass),
rejects are confirmed in reject_ring, and a dead controller stops the belt.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from linectl.drivers.modbus import ModbusTcpConfig, ModbusTcpPlc
from linectl.drivers.plc_tags import VERDICT_GOOD, VERDICT_REJECT
from linectl.simulators.config import SimulationConfig
from linectl.simulators.control import request
from linectl.simulators.conveyor import Conveyor
from linectl.simulators.defects import DefectPlan
from linectl.simulators.line import LineSim
from linectl.simulators.model import CHALLENGE_KINDS, UNIT_DEFECTS, Truth
from linectl.simulators.plc import DEFAULT_MODBUS_TAGS, PlcSim, free_tcp_port

R = 64
FAST = {
    "heartbeat_interval_s": 0.2,
    "heartbeat_timeout_s": 2.0,  # generous: a controller declared dead stops the feed, which these tests must not hit
    "reply_timeout_s": 0.4,
    "connect_timeout_s": 1.0,
    "backoff_initial_s": 0.05,
    "backoff_max_s": 0.3,
}


class Stamp:
    """Stand-in print head: prints a distinct good code on every unit (the printer simulator is tested elsewhere)."""

    def on_trigger(self, unit):
        unit.content = f"0109506000134352\x1d21S{unit.seq:08d}"
        unit.job_seq = unit.seq


async def wait_for(cond, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(step)
    return bool(cond())


@pytest.fixture
async def rig():
    cfg = ModbusTcpConfig(driver="modbus_tcp", host="127.0.0.1", port=free_tcp_port(), tags=DEFAULT_MODBUS_TAGS, **FAST)
    plc = PlcSim("plc1", cfg, heartbeat_period_s=0.2)
    await plc.start()
    drv = ModbusTcpPlc("plc1", cfg)
    await drv.start()
    assert await drv.wait_connected(3.0), drv.health
    truth = Truth()
    conveyors: list[Conveyor] = []

    def make_conveyor(units: int, rate_upm: float = 1200, **kw) -> Conveyor:
        c = Conveyor("line", plc, truth, rate_upm=rate_upm, camera_distance=2, gate_distance=6, printer=Stamp(),
                     units=units, **kw)
        conveyors.append(c)
        return c

    yield SimpleNamespace(plc=plc, drv=drv, truth=truth, conveyor=make_conveyor)
    for c in conveyors:
        await c.stop()
    await drv.stop()
    await plc.stop()


async def run_controller(drv, verdict, stop: asyncio.Event, mode: int = 2) -> None:
    """The tiny controller: start the line, then answer every new trigger with verdict(seq) (None = say nothing)."""
    await drv.write_tag("line_mode", mode)
    await drv.write_tag("line_running", 1)
    done = 0
    while not stop.is_set():
        tc = drv.latest().get("trigger_count", 0)
        for seq in range(done + 1, tc + 1):
            v = verdict(seq)
            if v:
                await drv.write_tag("verdict_ring", [seq, v], index=2 * (seq % R))
        done = max(done, tc)
        await asyncio.sleep(0.01)


async def test_gate_follows_verdicts_and_confirms_rejects(rig):
    conv = rig.conveyor(units=40)
    stop = asyncio.Event()
    ctl = asyncio.create_task(run_controller(rig.drv, lambda s: VERDICT_GOOD if s % 2 == 0 else VERDICT_REJECT, stop))
    conv.start()
    await asyncio.wait_for(conv.done.wait(), 15)
    stop.set()
    await ctl
    t = rig.truth
    odd = list(range(1, 41, 2))
    assert (t.passed, t.rejected, t.missed_rejects) == (20, 20, 0)
    assert t.false == odd  # good units (nothing was wrong with them) rejected on the controller's word: exactly the odd ones
    vals = await rig.drv.read_tags(["reject_ring", "reject_total", "pass_total", "trigger_count"])
    assert vals["reject_total"] == 20 and vals["pass_total"] == 20 and vals["trigger_count"] == 40
    ring = vals["reject_ring"]
    assert all(ring[s % R] == s for s in odd)
    assert all(ring[s % R] == 0 for s in range(2, 41, 2))
    assert [u["outcome"] for u in conv.recent] == ["rejected" if s % 2 else "passed" for s in range(1, 41)]


async def test_no_verdict_means_reject(rig):
    conv = rig.conveyor(units=12, rate_upm=2400)
    stop = asyncio.Event()
    ctl = asyncio.create_task(run_controller(rig.drv, lambda s: None, stop))
    conv.start()
    await asyncio.wait_for(conv.done.wait(), 15)
    stop.set()
    await ctl
    assert (rig.truth.passed, rig.truth.rejected) == (0, 12)
    # a stale slot (an older seq's GOOD in the same slot) does not let a unit through either
    rig.plc.set("verdict_ring", [13, VERDICT_GOOD], index=2 * (13 % R))
    from linectl.simulators.model import SimUnit

    assert rig.plc.gate(SimUnit(seq=13 + R)) == "rejected"
    assert rig.plc.gate(SimUnit(seq=13)) == "passed"


async def test_dead_controller_stops_the_belt(rig):
    conv = rig.conveyor(units=0, rate_upm=1200)
    stop = asyncio.Event()
    ctl = asyncio.create_task(run_controller(rig.drv, lambda s: VERDICT_GOOD, stop))
    conv.start()
    assert await wait_for(lambda: rig.plc.trigger_count >= 5, 5.0)
    stop.set()
    await ctl
    await rig.drv.stop()  # heartbeat_ctl stops toggling
    assert await wait_for(lambda: not rig.plc.controller_alive, 4.0)
    assert rig.plc.get("line_running") == 0  # the PLC dropped the run permission
    n = rig.plc.trigger_count
    await asyncio.sleep(0.5)
    assert rig.plc.trigger_count == n and not conv.status()["belt_running"]
    assert conv.in_flight > 0 or rig.truth.passed + rig.truth.rejected == n  # units on the belt stay where they are


async def test_challenge_units_all_rejected_without_verdict(rig):
    conv = rig.conveyor(units=0, rate_upm=2400)
    conv.queue_challenge(list(CHALLENGE_KINDS) + ["duplicate"])
    stop = asyncio.Event()
    ctl = asyncio.create_task(run_controller(rig.drv, lambda s: None, stop, mode=1))
    conv.start()
    assert await wait_for(lambda: rig.truth.challenge_units == 6, 8.0), conv.status()
    stop.set()
    await ctl
    assert rig.truth.challenge_passed == 0 and rig.truth.rejected == 6
    recent = list(conv.recent)
    assert [u["challenge"] for u in recent] == list(CHALLENGE_KINDS) + ["duplicate"]
    # the infeed stops once the challenge queue is empty
    n = rig.plc.trigger_count
    await asyncio.sleep(0.3)
    assert rig.plc.trigger_count == n == 6


def test_challenge_contents():
    from linectl.simulators.conveyor import ChallengeFactory

    f = ChallengeFactory("09506000134352", seed=3)
    wrong = f.make("wrong_code", 1)
    dup = f.make("duplicate", 2)
    assert dup.content == wrong.content and wrong.content.startswith("0109506000134352")
    f.last_printed = "0109506000134352\x1d21REAL"
    assert f.make("duplicate", 3).content == "0109506000134352\x1d21REAL"
    assert f.make("not_gs1", 4).symbology == "]d1"
    assert f.make("low_grade", 5).quality < 1.0
    assert f.make("no_code", 6).content is None


def test_defect_plan_is_seeded_and_mixed():
    a = DefectPlan(0.2, {"no_print": 1, "wrong_code": 3}, seed=7, variation_rate=0.1)
    b = DefectPlan(0.2, {"no_print": 1, "wrong_code": 3}, seed=7, variation_rate=0.1)
    seq = list(range(1, 5001))
    da = [a.defect_for(s) for s in seq]
    assert da == [b.defect_for(s) for s in reversed(seq)][::-1]  # order of calls does not matter
    n_def = sum(d in UNIT_DEFECTS for d in da)
    assert 850 < n_def < 1150
    assert {d for d in da if d in UNIT_DEFECTS} == {"no_print", "wrong_code"}
    assert da.count("wrong_code") > 2 * da.count("no_print")
    assert 300 < da.count("smudge_mild") < 500
    assert da != [DefectPlan(0.2, None, seed=8).defect_for(s) for s in seq]
    with pytest.raises(ValueError):
        DefectPlan(0.1, {"bogus": 1.0})


def test_simulation_config_validation():
    with pytest.raises(ValueError, match="gate_distance"):
        SimulationConfig(camera_distance=5, gate_distance=4)
    with pytest.raises(ValueError, match="unknown defect"):
        SimulationConfig(defect_mix={"smudge": 1})
    assert SimulationConfig.from_line(SimpleNamespace(simulation={"rate_upm": 900})).rate_upm == 900


async def test_line_sim_control_server():
    port = free_tcp_port()
    plc_cfg = ModbusTcpConfig(driver="modbus_tcp", host="127.0.0.1", port=port, tags=DEFAULT_MODBUS_TAGS, **FAST)
    line_cfg = SimpleNamespace(
        devices={"plc1": plc_cfg},
        stations=[SimpleNamespace(type="verify", name="v1", reader="none", plc="plc1")],
        products=[],
    )
    sim = SimulationConfig(rate_upm=3000, free_run=True, control_port=0, units=25, seed=5)
    line = LineSim(line_cfg, sim)
    await line.start()
    try:
        host, cport = line.control_address
        assert line.listening["plc1"] == f"modbus_tcp 127.0.0.1:{port}"
        await asyncio.wait_for(line.wait_done(), 10)
        truth = await request(host, cport, {"cmd": "truth"})
        assert truth["ok"] and truth["rejected"] == 25 and truth["passed"] == 0  # free run, nobody answers: fail-safe
        status = await request(host, cport, {"cmd": "status"})
        assert status["devices"]["plc1"]["reject_total"] == 25
        units = await request(host, cport, {"cmd": "units", "last": 3})
        assert [u["seq"] for u in units["units"]] == [23, 24, 25]
        assert (await request(host, cport, {"cmd": "set", "defect_rate": 0.5}))["ok"]
        assert line.plan.rate == 0.5
        r = await request(host, cport, {"cmd": "set", "device": "plc1", "tags": {"estop": True}})
        assert r["ok"] and line.devices["plc1"].estop
        r = await request(host, cport, {"cmd": "inject", "device": "plc1", "fault": "gate_jam", "units": 1})
        assert r["ok"]
        assert not (await request(host, cport, {"cmd": "inject", "device": "plc1", "fault": "melt"}))["ok"]
        assert not (await request(host, cport, {"cmd": "nope"}))["ok"]
        assert not (await request(host, cport, {"cmd": "challenge", "kinds": ["bogus"]}))["ok"]
        assert (await request(host, cport, {"cmd": "challenge", "kinds": ["no_code"]}))["queued"] == 1
    finally:
        await line.stop()


def test_linectl_simulate_command(tmp_path):
    """The CLI end to end: prints where devices listen, answers on the control port, writes the truth at SIGTERM."""
    from linectl import gs1

    mport, cport = free_tcp_port(), free_tcp_port()
    gln = "950600000000" + gs1.gtin_check_digit("950600000000")
    tags = "\n".join(f"      {k}: {json.dumps(v)}" for k, v in DEFAULT_MODBUS_TAGS.items())
    (tmp_path / "line.yaml").write_text(
        f"""
line: {{enterprise: acme, site: s1, area: pack, name: l1, gln: "{gln}", company_prefix_length: 7}}
products:
  - {{gtin: "09506000134352", name: Demo, company_prefix_length: 7, serials: {{scheme: random, length: 12}}}}
devices:
  plc1:
    driver: modbus_tcp
    host: 127.0.0.1
    port: {mport}
    tags:
{tags}
simulation: {{rate_upm: 1200, control_port: {cport}}}
"""
    )
    truth_path = tmp_path / "truth.json"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "linectl", "simulate", "-c", str(tmp_path / "line.yaml"), "--truth", str(truth_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith(f"plc1: modbus_tcp 127.0.0.1:{mport}"), lines
        assert lines[1].startswith(f"control: tcp 127.0.0.1:{cport}"), lines
        reply = asyncio.run(request("127.0.0.1", cport, {"cmd": "truth"}))
        assert reply["ok"] and reply["passed"] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads(truth_path.read_text())["rejected"] == 0
