"""Scanner driver against ScannerSim over a pty and TCP."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from typing import Any

import pytest

from linectl import gs1
from linectl.drivers.base import HealthState, Read
from linectl.drivers.scanner import Scanner, ScannerConfig
from linectl.simulators.scanner import ScannerSim

FAST = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "reply_timeout_s": 0.5, "connect_timeout_s": 1.0}
CODE = gs1.compose_unit("09501101530003", "SC;1", lot="L,1", expiry="301231").element_string


async def take(drv: Any, n: int, timeout: float = 2.0) -> list[Read]:
    out: list[Read] = []

    async def run() -> None:
        async for r in drv.reads():
            out.append(r)
            if len(out) >= n:
                return

    try:
        await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        pass
    return out


async def pair(serial: bool, sim_kw: dict[str, Any] | None = None, **kw: Any) -> tuple[ScannerSim, Scanner]:
    link = os.path.join(tempfile.mkdtemp(prefix="linectl-test-"), "scanner") if serial else None
    sim = ScannerSim(port=0, serial_link=link, **(sim_kw or {}))
    await sim.start()
    where = {"serial_port": link} if serial else {"host": "127.0.0.1", "port": sim.port}
    drv = Scanner("sc1", ScannerConfig(driver="scanner", **where, **{**FAST, **kw}))
    await drv.start()
    assert await drv.wait_connected(3)
    return sim, drv


@pytest.mark.parametrize("serial", [True, False], ids=["pty", "tcp"])
async def test_scans_with_aim_prefix(serial: bool) -> None:
    sim, drv = await pair(serial)
    try:
        sim.scan(CODE, "]d2")
        sim.scan(CODE, "]d1")
        sim.scan("0109501101530003", None)
        reads = await take(drv, 3)
        assert [(r.seq, r.codes[0].symbology, r.codes[0].data) for r in reads] == [
            (None, "]d2", CODE),
            (None, "]d1", CODE),
            (None, None, "0109501101530003"),
        ]
    finally:
        await drv.stop()
        await sim.stop()


async def test_required_prefix_gs_replacement_and_garbage() -> None:
    sim, drv = await pair(True, sim_kw={"gs_replacement": "<GS>"}, aim_prefix="required", gs_replacement="<GS>")
    try:
        sim.scan(CODE, "]d2")
        sim.scan(CODE, None)  # no identifier: cannot prove GS1, refused
        sim.send(b"\xde\xad\xbe\xef\r\n")
        sim.scan(CODE, "]d2")
        reads = await take(drv, 2)
        assert [r.codes[0].data for r in reads] == [CODE, CODE]
        assert drv.garbage_count == 2 and drv.health.state == HealthState.DEGRADED
        assert "garbage from scanner" in drv.health.reason
        assert await take(drv, 1, timeout=0.2) == []
    finally:
        await drv.stop()
        await sim.stop()


async def test_scanner_reconnects_after_reset() -> None:
    sim, drv = await pair(False)
    try:
        sim.reset_connection()
        deadline = time.monotonic() + 3
        while not (sim.connected and drv.health.state == HealthState.CONNECTED) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        sim.scan(CODE)
        assert [r.codes[0].data for r in await take(drv, 1)] == [CODE]
    finally:
        await drv.stop()
        await sim.stop()


async def test_open_stream_pyserial_urls() -> None:
    from linectl.drivers.transport import TransportConfig, open_stream

    class C(TransportConfig):
        pass

    r, w = await open_stream(C(serial_port="loop://"))  # no file descriptor: reader-thread path
    try:
        w.write(b"ping\r\n")
        await w.drain()
        assert await asyncio.wait_for(r.readuntil(b"\r\n"), 2) == b"ping\r\n"
    finally:
        w.close()
    sim = ScannerSim(port=0)
    await sim.start()
    try:
        drv = Scanner("sc", ScannerConfig(driver="scanner", serial_port=f"socket://127.0.0.1:{sim.port}", **FAST))
        await drv.start()
        assert await drv.wait_connected(3)
        for _ in range(100):
            if sim.connected:
                break
            await asyncio.sleep(0.01)
        sim.scan(CODE)
        assert [x.codes[0].data for x in await take(drv, 1)] == [CODE]
        await drv.stop()
    finally:
        await sim.stop()
