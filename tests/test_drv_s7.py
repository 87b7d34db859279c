"""S7 driver against the PLC simulator on python-snap7's own server (real ISO-on-TCP on a high port, no root)."""

from __future__ import annotations

import asyncio
import time

import pytest

from linectl.drivers.base import DeviceError, HealthState, TagError
from linectl.drivers.s7 import S7Config, S7Plc
from linectl.simulators.plc import DEFAULT_S7_TAGS, PlcSim, free_tcp_port

EXTRA_TAGS = {
    "b_neighbour": {"db": 1, "offset": "1.1", "type": "BOOL"},
    "b_mine": {"db": 1, "offset": "1.2", "type": "BOOL"},
    "b_arr": {"db": 2, "offset": "0.5", "type": "BOOL", "count": 10},
    "i_val": {"db": 2, "offset": "4", "type": "INT"},
    "di_val": {"db": 2, "offset": "6", "type": "DINT"},
    "ud_val": {"db": 2, "offset": "10", "type": "UDINT"},
    "r_val": {"db": 2, "offset": "14", "type": "REAL"},
    "s_val": {"db": 2, "offset": "18", "type": "STRING", "length": 20},
    "i_arr": {"db": 2, "offset": "40", "type": "INT", "count": 5},
    "r_arr": {"db": 2, "offset": "50", "type": "REAL", "count": 3},
    "s_arr": {"db": 3, "offset": "0", "type": "STRING", "length": 6, "count": 3},
}
TAGS = {**DEFAULT_S7_TAGS, **EXTRA_TAGS}
FAST = {
    "heartbeat_interval_s": 0.2,
    "heartbeat_timeout_s": 1.0,
    "reply_timeout_s": 0.4,
    "connect_timeout_s": 1.0,
    "backoff_initial_s": 0.05,
    "backoff_max_s": 0.3,
}


async def wait_for(cond, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(step)
    return bool(cond())


@pytest.fixture
async def s7():
    cfg = S7Config(driver="s7", host="127.0.0.1", port=free_tcp_port(), tags=TAGS, **FAST)
    sim = PlcSim("plc_s7", cfg, heartbeat_period_s=0.2)
    await sim.start()
    drv = S7Plc("plc_s7", cfg)
    await drv.start()
    assert await drv.wait_connected(3.0), drv.health
    yield sim, drv
    await drv.stop()
    await sim.stop()


def test_offset_validation():
    with pytest.raises(ValueError, match="BOOL offset needs a bit"):
        S7Config(driver="s7", host="h", heartbeat=False, tags={"x": {"db": 1, "offset": "3", "type": "BOOL"}})
    with pytest.raises(ValueError, match="only BOOL offsets take a bit"):
        S7Config(driver="s7", host="h", heartbeat=False, tags={"x": {"db": 1, "offset": "3.1", "type": "DINT"}})
    with pytest.raises(ValueError, match="needs length"):
        S7Config(driver="s7", host="h", heartbeat=False, tags={"x": {"db": 1, "offset": "3", "type": "STRING"}})
    with pytest.raises(ValueError, match="overlap"):
        S7Config(driver="s7", host="h", heartbeat=False, tags={
            "a": {"db": 1, "offset": "0", "type": "DINT"}, "b": {"db": 1, "offset": "2.0", "type": "BOOL"}})
    # YAML gives 12.3 as a float and 12 as an int: both are taken
    cfg = S7Config(driver="s7", host="h", heartbeat=False, tags={"x": {"db": 1, "offset": 12.3, "type": "bool"}})
    assert cfg.tags["x"].offset == "12.3" and cfg.tags["x"].type == "BOOL"


async def test_scalars_both_ways(s7):
    sim, drv = s7
    await drv.write_tag("i_val", -1234)
    await drv.write_tag("di_val", -70000)
    await drv.write_tag("ud_val", 4_000_000_000)
    await drv.write_tag("r_val", 2.5)
    await drv.write_tag("s_val", "LOT-42/A")
    assert [sim.get(n) for n in ("i_val", "di_val", "ud_val", "r_val", "s_val")] == [
        -1234, -70000, 4_000_000_000, 2.5, "LOT-42/A"]
    assert bytes(sim.host.dbs[2][18:28]) == b"\x14\x08LOT-42/A"  # S7 STRING header: max 20, actual 8
    sim.set("i_val", 321)
    sim.set("r_val", -0.125)
    sim.set("s_val", "xyz")
    vals = await drv.read_tags(["i_val", "r_val", "s_val", "ud_val"])
    assert vals == {"i_val": 321, "r_val": -0.125, "s_val": "xyz", "ud_val": 4_000_000_000}
    with pytest.raises(TagError):
        await drv.write_tag("s_val", "x" * 21)
    with pytest.raises(TagError):
        await drv.write_tag("i_val", 40000)


async def test_bool_bit_write_leaves_neighbours(s7):
    sim, drv = s7
    sim.set("b_neighbour", True)  # the PLC owns this bit in the same byte
    await drv.write_tag("b_mine", True)
    assert sim.get("b_neighbour") is True and sim.get("b_mine") is True
    sim.set("b_neighbour", False)
    await drv.write_tag("b_mine", False)
    assert sim.get("b_neighbour") is False and sim.get("b_mine") is False
    assert sim.host.dbs[1][1] == 0
    # heartbeat_plc (0.0) toggles while the driver writes heartbeat_ctl (0.1): the toggles survive
    seen = set()
    for _ in range(30):
        seen.add(sim.get("heartbeat_plc"))
        await asyncio.sleep(0.02)
    assert seen == {True, False}


async def test_arrays(s7):
    sim, drv = s7
    await drv.write_tag("i_arr", [1, 2, 3, 4, 5])
    await drv.write_tag("i_arr", [-7, -8], index=3)
    assert sim.get("i_arr") == [1, 2, 3, -7, -8]
    await drv.write_tag("r_arr", [0.25], index=2)
    assert sim.get("r_arr") == [0.0, 0.0, 0.25]
    await drv.write_tag("s_arr", ["AB", "CDEFGH"], index=1)
    assert sim.get("s_arr") == ["", "AB", "CDEFGH"]
    await drv.write_tag("b_arr", [True, True], index=2)  # bits 0.7 and 1.0: across a byte boundary
    sim.set("b_arr", True, index=9)
    got = (await drv.read_tags(["b_arr", "i_arr", "r_arr", "s_arr"]))
    assert got["b_arr"] == [False, False, True, True, False, False, False, False, False, True]
    assert got["i_arr"] == [1, 2, 3, -7, -8] and got["s_arr"] == ["", "AB", "CDEFGH"]
    await drv.write_tag("verdict_ring", [200, 1], index=2 * (200 % 64))
    assert sim.verdict_of(200) == (200, 1)
    assert (await drv.read_tags(["verdict_ring"]))["verdict_ring"][2 * 8 : 2 * 8 + 2] == [200, 1]


async def test_heartbeat_lost_and_back(s7):
    sim, drv = s7
    assert await wait_for(lambda: sim.controller_alive, 2.0)
    sim.inject("heartbeat_stop", duration_s=1.8)
    assert await wait_for(lambda: drv.health.reason == "PLC heartbeat lost", 2.5), drv.health
    assert drv.health.state == HealthState.DISCONNECTED
    assert await wait_for(lambda: drv.health.state == HealthState.CONNECTED, 3.0), drv.health


async def test_disconnect_reconnect(s7):
    sim, drv = s7
    sim.inject("disconnect", duration_s=1.0)
    assert await wait_for(lambda: drv.health.state == HealthState.DISCONNECTED, 2.0)
    assert drv.health.reason != "PLC heartbeat lost"
    with pytest.raises(DeviceError):
        await drv.write_tag("line_mode", 2)
    assert await wait_for(lambda: drv.health.state == HealthState.CONNECTED, 5.0), drv.health
    await drv.write_tag("line_mode", 2)
    assert sim.get("line_mode") == 2


async def test_slow_replies(s7):
    sim, drv = s7
    sim.inject("slow", duration_s=1.0, delay_s=0.7)  # beyond reply_timeout_s
    assert await wait_for(lambda: drv.health.state == HealthState.DISCONNECTED, 2.0)
    assert drv._task is not None and not drv._task.done()
    assert await wait_for(lambda: drv.health.state == HealthState.CONNECTED, 5.0), drv.health
    await drv.write_tag("alarm_code", 3)
    assert sim.get("alarm_code") == 3
