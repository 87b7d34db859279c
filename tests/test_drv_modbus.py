"""Modbus TCP/RTU driver against the PLC simulator on pymodbus' own server (real sockets and a real pty, no mocks)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from linectl.drivers.base import DeviceError, HealthState, TagError
from linectl.drivers.modbus import ModbusRtuConfig, ModbusRtuPlc, ModbusTcpConfig, ModbusTcpPlc
from linectl.drivers.plc_tags import polled
from linectl.simulators.plc import DEFAULT_MODBUS_TAGS, PlcSim, free_tcp_port

EXTRA_TAGS = {
    "t_i32_bb": {"table": "holding", "address": 20, "type": "int32"},
    "t_u32_bl": {"table": "holding", "address": 22, "type": "uint32", "word_order": "little"},
    "t_u32_lb": {"table": "holding", "address": 24, "type": "uint32", "byte_order": "little"},
    "t_i32_ll": {"table": "holding", "address": 26, "type": "int32", "byte_order": "little", "word_order": "little"},
    "t_f32": {"table": "holding", "address": 28, "type": "float32"},
    "t_f32_ll": {"table": "holding", "address": 30, "type": "float32", "byte_order": "little", "word_order": "little"},
    "t_i16": {"table": "holding", "address": 32, "type": "int16"},
    "t_arr16": {"table": "holding", "address": 40, "type": "int16", "count": 10},
    "t_arrf": {"table": "holding", "address": 50, "type": "float32", "count": 3},
    "t_in": {"table": "input", "address": 0, "type": "uint16"},
    "t_di": {"table": "discrete", "address": 3, "type": "bool"},
    "t_coils": {"table": "coil", "address": 10, "type": "bool", "count": 5},
    **{f"m{i}": {"table": "holding", "address": 600 + 3 * i, "type": "uint16"} for i in range(30)},
}
TAGS = {**DEFAULT_MODBUS_TAGS, **EXTRA_TAGS}
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
async def tcp():
    port = free_tcp_port()
    cfg = ModbusTcpConfig(driver="modbus_tcp", host="127.0.0.1", port=port, tags=TAGS, **FAST)
    sim = PlcSim("plc1", cfg, heartbeat_period_s=0.2)
    await sim.start()
    drv = ModbusTcpPlc("plc1", cfg)
    await drv.start()
    assert await drv.wait_connected(3.0), drv.health
    yield sim, drv
    await drv.stop()
    await sim.stop()


def count_requests(drv):
    """Requests issued by the calling task (the background poll loop's own requests are left out)."""
    calls: list[str] = []
    orig = drv._call
    me = asyncio.current_task()

    async def counting(what, *a, **kw):
        if asyncio.current_task() is me:
            calls.append(what)
        return await orig(what, *a, **kw)

    drv._call = counting
    return calls


async def test_read_batching_many_tags(tcp):
    sim, drv = tcp
    for i in range(30):
        sim.set(f"m{i}", 1000 + i)
    sim.set("t_in", 77)
    sim.set("t_di", True)
    calls = count_requests(drv)
    names = [f"m{i}" for i in range(30)] + ["t_in", "t_di", "t_i16", "trigger_count", "estop"]
    values = await drv.read_tags(names)
    assert [values[f"m{i}"] for i in range(30)] == [1000 + i for i in range(30)]
    assert values["t_in"] == 77 and values["t_di"] is True and values["estop"] is False
    # 30 tags 3 registers apart + 2 other holding tags: 3 holding reads at most, 1 input, 1 discrete, 1 coil
    assert len(calls) <= 6, calls
    # the poll set (no write-only tags): verdict_ring is not polled, so a poll cycle is a few requests
    calls.clear()
    polled_values = await drv.read_tags()
    assert len(calls) <= 8, calls
    assert "verdict_ring" in drv.config.tags and set(polled_values) == {n for n, s in drv.config.tags.items() if polled(n, s)}
    # neither this read nor the background poll loop ever reads the engine-written ring
    assert "verdict_ring" not in polled_values and "verdict_ring" not in drv.latest()


@pytest.mark.parametrize(
    "tag,value,regs",
    [
        ("t_i32_bb", 0x01020304, [0x0102, 0x0304]),
        ("t_u32_bl", 0x01020304, [0x0304, 0x0102]),
        ("t_u32_lb", 0x01020304, [0x0201, 0x0403]),
        ("t_i32_ll", 0x01020304, [0x0403, 0x0201]),
        ("t_i32_bb", -2, [0xFFFF, 0xFFFE]),
    ],
)
async def test_32bit_byte_and_word_order(tcp, tag, value, regs):
    sim, drv = tcp
    await drv.write_tag(tag, value)
    spec = TAGS[tag]
    start, _, raw, _ = sim.mem._blocks["holding"]
    assert raw[spec["address"] - start : spec["address"] - start + 2] == regs
    assert sim.get(tag) == value
    sim.set(tag, value ^ 0x00FF00FF if value > 0 else value - 5)
    got = (await drv.read_tags([tag]))[tag]
    assert got == sim.get(tag)


async def test_float32_and_arrays(tcp):
    sim, drv = tcp
    await drv.write_tag("t_f32", 3.25)
    await drv.write_tag("t_f32_ll", -1.5e7)
    vals = await drv.read_tags(["t_f32", "t_f32_ll"])
    assert vals == {"t_f32": 3.25, "t_f32_ll": -1.5e7}
    start, _, raw, _ = sim.mem._blocks["holding"]
    assert raw[28 - start : 30 - start] == [0x4050, 0x0000]  # 3.25 big-endian
    # arrays: a full write, an indexed slice in ONE request, reads return lists
    await drv.write_tag("t_arr16", list(range(-5, 5)))
    calls = count_requests(drv)
    await drv.write_tag("t_arr16", [100, 101, 102], index=4)
    assert len(calls) == 1
    assert sim.get("t_arr16") == [-5, -4, -3, -2, 100, 101, 102, 2, 3, 4]
    assert (await drv.read_tags(["t_arr16"]))["t_arr16"] == sim.get("t_arr16")
    await drv.write_tag("t_arrf", [0.5, 1.5], index=1)
    assert sim.get("t_arrf") == [0.0, 0.5, 1.5]
    await drv.write_tag("t_coils", [True, False, True], index=2)
    assert sim.get("t_coils") == [False, False, True, False, True]
    # verdict slot: [seq, verdict] in one request
    calls.clear()
    await drv.write_tag("verdict_ring", [70, 1], index=2 * (70 % 64))
    assert len(calls) == 1 and sim.verdict_of(70) == (70, 1)


async def test_write_validation(tcp):
    sim, drv = tcp
    with pytest.raises(TagError):
        await drv.write_tag("t_in", 1)  # input register: read-only
    with pytest.raises(TagError):
        await drv.write_tag("t_arr16", [1, 2], index=9)  # past the end
    with pytest.raises(TagError):
        await drv.write_tag("t_i16", 40000)  # out of range
    with pytest.raises(TagError):
        await drv.write_tag("no_such_tag", 1)
    with pytest.raises(TagError):
        await drv.write_tag("t_arr16", [1, 2])  # partial array without index


async def test_write_confirm_readback():
    port = free_tcp_port()
    cfg = ModbusTcpConfig(driver="modbus_tcp", host="127.0.0.1", port=port, tags=TAGS, confirm="readback", **FAST)
    sim = PlcSim("plc1", cfg, heartbeat_period_s=0.2)
    await sim.start()
    drv = ModbusTcpPlc("plc1", cfg)
    await drv.start()
    try:
        assert await drv.wait_connected(3.0)
        calls = count_requests(drv)
        await drv.write_tag("good_count", 123456)
        assert calls == ["write good_count (holding 4+2)", "read back good_count"]
        assert sim.get("good_count") == 123456
        await drv.write_tag("cmd_start", False)
        assert sim.get("cmd_start") is False
    finally:
        await drv.stop()
        await sim.stop()


async def test_heartbeat_both_ways(tcp):
    sim, drv = tcp
    # controller -> PLC: the driver toggles heartbeat_ctl, the PLC sees a live controller
    assert await wait_for(lambda: sim.controller_alive, 2.0)
    # PLC -> controller: the PLC program stops toggling while comms stay fine
    sim.inject("heartbeat_stop", duration_s=2.0)
    assert await wait_for(lambda: drv.health.state == HealthState.DISCONNECTED, 2.5)
    assert drv.health.reason == "PLC heartbeat lost"
    await drv.read_tags(["trigger_count"])  # the socket itself still works
    assert await wait_for(lambda: drv.health.state == HealthState.CONNECTED, 3.0), drv.health
    # controller death: stop the driver, the PLC declares it dead after heartbeat_timeout_s and stops the line
    sim.set("line_running", 1)
    sim.scan()
    await drv.stop()
    assert await wait_for(lambda: not sim.controller_alive, 2.0)
    assert sim.get("line_running") == 0 and not sim.belt_running()


async def test_disconnect_then_reconnect(tcp):
    sim, drv = tcp
    sessions = drv.stats["sessions"]
    sim.inject("disconnect", duration_s=1.2)
    assert await wait_for(lambda: drv.health.state == HealthState.DISCONNECTED, 2.0)
    assert drv.health.reason and drv.health.reason != "PLC heartbeat lost"
    with pytest.raises(DeviceError):
        await drv.write_tag("line_mode", 2)
    assert await wait_for(lambda: drv.health.state == HealthState.CONNECTED, 4.0), drv.health
    assert drv.stats["sessions"] > sessions
    await drv.write_tag("line_mode", 2)
    assert sim.get("line_mode") == 2


async def test_slow_responses_do_not_crash(tcp):
    sim, drv = tcp
    sim.inject("slow", duration_s=0.6, delay_s=0.1)  # slower than usual, within the reply timeout
    t0 = time.monotonic()
    await drv.write_tag("alarm_code", 7)
    assert time.monotonic() - t0 >= 0.09
    assert sim.get("alarm_code") == 7
    await asyncio.sleep(0.7)
    sim.inject("slow", duration_s=1.0, delay_s=0.8)  # beyond reply_timeout_s: requests fail, the driver survives
    assert await wait_for(lambda: drv.health.state == HealthState.DISCONNECTED, 2.0)
    assert "no reply" in drv.health.reason or "connect" in drv.health.reason
    assert drv._task is not None and not drv._task.done()
    assert await wait_for(lambda: drv.health.state == HealthState.CONNECTED, 5.0), drv.health
    await drv.write_tag("alarm_code", 8)
    assert sim.get("alarm_code") == 8


async def test_rtu_over_pty(tmp_path):
    link = str(tmp_path / "plc-rtu")
    cfg = ModbusRtuConfig(
        driver="modbus_rtu", serial_port=link, baudrate=115200, parity="N", device_id=5, tags=DEFAULT_MODBUS_TAGS, **FAST
    )
    sim = PlcSim("plc_rtu", cfg, heartbeat_period_s=0.2)
    await sim.start()
    assert os.path.islink(link)
    drv = ModbusRtuPlc("plc_rtu", cfg)
    await drv.start()
    try:
        assert await drv.wait_connected(3.0), drv.health
        assert await wait_for(lambda: sim.controller_alive, 2.0)
        await drv.write_tag("verdict_ring", [9, 2], index=18)
        assert sim.verdict_of(9) == (9, 2)
        sim.set("reject_total", 123456789)
        assert (await drv.read_tags(["reject_total"]))["reject_total"] == 123456789
        # a cut cable: the port stays open, replies vanish; the driver reports it and keeps the port
        sim.inject("disconnect", duration_s=1.0)
        assert await wait_for(lambda: drv.health.state == HealthState.DISCONNECTED, 2.0)
        assert "no reply" in drv.health.reason
        assert await wait_for(lambda: drv.health.state == HealthState.CONNECTED, 4.0), drv.health
        await drv.write_tag("line_mode", 1)
        assert sim.get("line_mode") == 1
    finally:
        await drv.stop()
        await sim.stop()
    assert not os.path.lexists(link)
