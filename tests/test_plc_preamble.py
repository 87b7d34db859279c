"""A linectl restarted within the PLC's heartbeat timeout must not revive the dead controller's running mode.

The PLC cannot tell two controllers apart: it sees heartbeat_ctl change. A controller killed with the line in
challenge or production, and a new one whose first heartbeat arrives before the PLC's watchdog expired, would
keep the line feeding in the dead one's mode until the new one gets round to writing idle. The packs fed in that
moment are nobody's (a re-run challenge then expects its packs shifted by one). The new session writes idle
before its first heartbeat (Plc.set_preamble); the Line keeps that preamble while it wants the line idle.

Observed at the PLC: pymodbus' own server (the PLC simulator's) calls its action hook for every request it
serves, in order; the simulator's scan says whether the infeed would feed product.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from linectl.drivers.modbus import ModbusTcpConfig, ModbusTcpPlc
from linectl.simulators import plc as plcsim
from linectl.simulators.plc import DEFAULT_MODBUS_TAGS, MODE_CHALLENGE, MODE_IDLE, PlcSim, free_tcp_port
from tests.engine_helpers import simulated_line, wait_for, wait_stopped

FAST = {
    "heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 3.0, "reply_timeout_s": 0.5, "connect_timeout_s": 1.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.3,
}
WRITES = {5: "coil", 15: "coil", 6: "holding", 16: "holding"}


def _tag_at(table: str, address: int) -> str | None:
    for name, spec in DEFAULT_MODBUS_TAGS.items():
        if spec["table"] == table and spec["address"] == address:
            return name
    return None


@pytest.fixture
async def recorded_plc(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The PLC simulator on pymodbus' server, with every write request it serves noted in arrival order."""
    writes: list[tuple[str | None, Any]] = []
    served = plcsim.ModbusServerHost._action

    async def action(self: Any, fc: int, start: int, address: int, count: int, regs: list[int], values: Any) -> Any:
        if fc in WRITES and values is not None:
            writes.append((_tag_at(WRITES[fc], address), list(values)))
        return await served(self, fc, start, address, count, regs, values)

    monkeypatch.setattr(plcsim.ModbusServerHost, "_action", action)
    cfg = ModbusTcpConfig(driver="modbus_tcp", host="127.0.0.1", port=free_tcp_port(), tags=DEFAULT_MODBUS_TAGS, **FAST)
    sim = PlcSim("plc1", cfg, heartbeat_period_s=0.1)
    await sim.start()
    try:
        yield sim, cfg, writes
    finally:
        await sim.stop()


async def _until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("preamble", [True, False], ids=["idle-before-heartbeat", "without-preamble"])
async def test_restarted_controller_idles_the_plc_before_its_first_heartbeat(recorded_plc: Any, preamble: bool) -> None:
    sim, cfg, writes = recorded_plc
    # controller A runs the challenge, then dies (no goodbye: its session just ends)
    a = ModbusTcpPlc("plc1", cfg)
    await a.start()
    assert await a.wait_connected(5.0), a.health
    await a.write_tag("line_mode", MODE_CHALLENGE)
    await a.write_tag("line_running", 1)
    await _until(lambda: sim.controller_alive and sim.feed_mode() == MODE_CHALLENGE, 5.0, "the PLC never ran A's challenge")
    await a.stop()
    # controller B starts within the PLC's watchdog (3 s): the PLC still feeds in A's mode
    assert sim.controller_alive and sim.feed_mode() == MODE_CHALLENGE
    writes.clear()
    b = ModbusTcpPlc("plc1", cfg)
    if preamble:
        b.set_preamble({"line_mode": MODE_IDLE, "line_running": 0})
    await b.start()
    try:
        assert await b.wait_connected(5.0), b.health
        first_beat = next(i for i, (tag, _) in enumerate(writes) if tag == "heartbeat_ctl")
        before = dict(writes[:first_beat])
        if preamble:
            assert before == {"line_mode": [MODE_IDLE], "line_running": [0]}, writes[: first_beat + 1]
            assert sim.feed_mode() == MODE_IDLE
        else:
            # what the preamble prevents: B's heartbeat keeps the PLC feeding challenge packs under A's mode
            assert before == {}, writes[: first_beat + 1]
            assert sim.controller_alive and sim.feed_mode() == MODE_CHALLENGE
    finally:
        await b.stop()


async def test_preamble_refused_breaks_the_session_without_a_heartbeat(recorded_plc: Any) -> None:
    """A PLC that refuses the idle gets no heartbeat from this controller: its own watchdog stops the line."""
    sim, cfg, writes = recorded_plc
    # line_mode mapped where this PLC has no register (a tag map out of step with the PLC program): exception reply
    tags = {**DEFAULT_MODBUS_TAGS, "line_mode": {"table": "holding", "address": 9000, "type": "uint16"}}
    b = ModbusTcpPlc("plc1", ModbusTcpConfig(**{**cfg.model_dump(), "tags": tags}))
    b.set_preamble({"line_mode": MODE_IDLE, "line_running": 0})
    await b.start()
    try:
        await asyncio.sleep(1.0)
        assert not b.health.state.value == "connected"
        assert "before the first heartbeat" in b.health.reason and "line_mode" in b.health.reason, b.health.reason
        assert not any(tag == "heartbeat_ctl" for tag, _ in writes), writes
    finally:
        await b.stop()


async def test_line_keeps_the_idle_preamble_while_it_wants_the_line_idle(tmp_path: Path) -> None:
    async with simulated_line(tmp_path, rate=600) as sl:
        plcs = sl.line.plcs
        assert plcs and all(p.preamble == {"line_mode": 0, "line_running": False} for p in plcs), [p.preamble for p in plcs]
        await sl.create_batch(30)
        await sl.start_batch()
        await wait_for(lambda: sl.line.batch is not None and sl.line.batch.state.value == "running", 30, "batch running")
        # producing: a reconnect must not idle a running line behind the operator's back
        assert all(p.preamble == {} for p in plcs), [p.preamble for p in plcs]
        await wait_stopped(sl, 60)
        assert all(p.preamble == {"line_mode": 0, "line_running": False} for p in plcs), [p.preamble for p in plcs]
