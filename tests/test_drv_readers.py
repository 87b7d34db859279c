"""Smart-reader driver against ReaderSim over TCP and a pty: exact parsing, no false reads from garbage or silence."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from typing import Any

import pytest
from engine_helpers import wait_for

from linectl import gs1
from linectl.drivers.base import HealthState, Read
from linectl.drivers.reader import LineReader, ReaderConfig, compile_line_format
from linectl.drivers.transport import LineSplitter
from linectl.simulators.model import SimUnit
from linectl.simulators.reader import ReaderSim

GTIN = "09501101530003"
FAST = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "reply_timeout_s": 0.5, "connect_timeout_s": 1.0}
GS = "\x1d"


def code(serial: str, lot: str = "LOT;1,2") -> str:
    return gs1.compose_unit(GTIN, serial, lot=lot, expiry="301231").element_string


def reader(**kw: Any) -> LineReader:
    where = kw.pop("where", {"host": "127.0.0.1", "port": 1})
    return LineReader("r1", ReaderConfig(driver="reader", **where, **{**FAST, **kw}))


def parse(drv: LineReader, line: str) -> Read:
    return drv.parse_line(line, line.encode("latin-1"), 1.0)


async def take(drv: Any, n: int, timeout: float = 3.0) -> list[Read]:
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


# --------------------------------------------------------------------------- parsing


def test_default_format_exact_fields() -> None:
    drv = reader()
    data = code("A;B,C") + GS + "91x;4.0"  # ';' and a fake grade inside the data
    r = parse(drv, f"12;]d2{data};3.5")
    assert r.seq == 12 and len(r.codes) == 1
    d = r.codes[0]
    assert d.data == data and d.symbology == "]d2" and d.grade == 3.5
    assert r.raw == f"12;]d2{data};3.5".encode()

    r = parse(drv, "13;NOREAD;0.0")
    assert r.seq == 13 and r.codes == ()
    assert parse(drv, "NOREAD").codes == () and parse(drv, "NOREAD").seq is None

    r = parse(drv, f"14;{data};B")  # reader without symbology identifiers, letter grade
    assert r.codes[0].symbology is None and r.codes[0].data == data and r.codes[0].grade == 3.0
    for letter, g in zip("ABCDEF", (4.0, 3.0, 2.0, 1.0, 0.0, 0.0)):
        assert parse(drv, f"1;]d2X;{letter}").codes[0].grade == g
    assert parse(drv, "1;]d1plain;").codes[0].grade is None
    assert parse(drv, "1;]d1plain;").codes[0].symbology == "]d1"


@pytest.mark.parametrize(
    "line, why",
    [
        ("x12;]d2ABC;4.0", "does not match"),
        ("12;]d2ABC;5.0", "grade out of range"),
        ("12;]d2;4.0", "empty data"),
        ("12]d2ABC4.0", "does not match"),
    ],
)
def test_malformed_lines_are_garbage(line: str, why: str) -> None:
    from linectl.drivers.reader import Garbage

    with pytest.raises(Garbage, match=why):
        parse(reader(), line)


def test_custom_format_with_time_and_no_seq() -> None:
    drv = reader(line_format="{sym}{data},{grade},{time}", no_read="NR")
    data = code("Q,1")
    r = parse(drv, f"]d2{data},2.5,134")
    assert r.seq is None and r.codes[0].data == data and r.codes[0].grade == 2.5
    assert r.codes[0].grade_detail == {"read_time": "134"}
    assert parse(drv, "NR,0.0,5").codes == ()
    assert compile_line_format("{data}").match("anything;goes")


@pytest.mark.parametrize("fmt", ["{seq}{data}", "{seq};{data};{seq}", "{seq};{grade}", "{data};{foo}", "{data:10}"])
def test_bad_formats_refused(fmt: str) -> None:
    with pytest.raises(ValueError):
        ReaderConfig(driver="reader", host="h", port=1, line_format=fmt)


def test_line_splitter_overlong_and_split_terminator() -> None:
    sp = LineSplitter(b"\r\n", 16)
    assert sp.feed(b"abc\r") == []
    assert sp.feed(b"\nxyz") == [(b"abc", None)]
    out = sp.feed(b"0" * 40)
    assert out and out[0][0] is None and "without a terminator" in (out[0][1] or "")
    assert sp.feed(b"tail\r\nok\r\n") == [(b"ok", None)]  # the rest of the noise is dropped with it


# --------------------------------------------------------------------------- over sockets / ptys


async def pair(serial: bool = False, **kw: Any) -> tuple[ReaderSim, LineReader]:
    drv_kw = kw.pop("drv", {})
    link = os.path.join(tempfile.mkdtemp(prefix="linectl-test-"), "reader") if serial else None
    sim = ReaderSim(port=0, serial_link=link, **kw)
    await sim.start()
    where = {"serial_port": link} if serial else {"host": "127.0.0.1", "port": sim.port}
    drv = reader(where=where, **drv_kw)
    await drv.start()
    assert await drv.wait_connected(3)
    return sim, drv


def printed(seq: int, serial: str, quality: float = 3.7, sym: str = "]d2") -> SimUnit:
    return SimUnit(seq=seq, content=code(serial), quality=quality, symbology=sym)


async def test_reads_over_tcp_match_the_units() -> None:
    sim, drv = await pair()
    try:
        units = [printed(i, f"S;{i},x") for i in range(1, 51)]
        units[10].content = None  # nothing printed
        units[11].extras["unreadable"] = True
        units[12].symbology = "]d1"
        for u in units:
            sim.present(u)
        reads = await take(drv, 50)
        assert [r.seq for r in reads] == list(range(1, 51))
        for u, r in zip(units, reads):
            if u.content is None or u.extras.get("unreadable"):
                assert r.codes == ()
            else:
                assert r.codes[0].data == u.content and r.codes[0].symbology == u.symbology
                assert r.codes[0].grade == pytest.approx(u.quality)
        assert drv.garbage_count == 0 and drv.health.state == HealthState.CONNECTED
    finally:
        await drv.stop()
        await sim.stop()


async def test_garbage_on_pty_degrades_without_false_reads() -> None:
    sim, drv = await pair(serial=True, drv={"garbage_hold_s": 0.2})
    seen: list[tuple[HealthState, str]] = []
    drv.on_health(lambda d, h: seen.append((h.state, h.reason)))
    try:
        sim.present(printed(1, "A1"))
        assert [r.seq for r in await take(drv, 1)] == [1]
        sim.send(bytes(range(0x80, 0xC0)) + b"\r\n")  # not ASCII
        sim.send(b"\x00\x01\x07binary\r\n")  # control characters
        sim.send(b"7;]d2" + b"9" * 5000)  # babble without terminator
        sim.send(b"\r\n")
        sim.send(b"nonsense line\r\n")
        await wait_for(lambda: drv.garbage_count >= 4, timeout=3.0, what="garbage counted", interval=0.01)
        assert drv.health.state == HealthState.DEGRADED
        assert drv.health.reason.startswith("garbage from reader")
        assert await take(drv, 1, timeout=0.2) == []  # nothing of it became a read
        await asyncio.sleep(0.25)
        sim.present(printed(2, "B2"))
        reads = await take(drv, 1)
        assert [r.seq for r in reads] == [2] and reads[0].codes[0].data == code("B2")
        assert drv.health.state == HealthState.CONNECTED  # garbage hold passed, good line read
        assert any(s == HealthState.DEGRADED for s, _ in seen)
    finally:
        await drv.stop()
        await sim.stop()


async def test_silent_reader_yields_nothing() -> None:
    sim, drv = await pair()
    try:
        sim.inject("silence", count=3)
        for i in range(1, 4):
            sim.present(printed(i, f"S{i}"))
        assert await take(drv, 1, timeout=0.3) == []
        assert drv.health.state == HealthState.CONNECTED and sim.lines_dropped == 3
        sim.present(printed(4, "S4"))
        assert [r.seq for r in await take(drv, 1)] == [4]
    finally:
        await drv.stop()
        await sim.stop()


async def test_software_trigger_over_pty() -> None:
    sim, drv = await pair(serial=True, mode="software", grade_format="letter")
    try:
        sim.present(printed(5, "T5", quality=2.7))
        await drv.trigger(seq=77)
        r = (await take(drv, 1))[0]
        assert r.seq == 77 and r.codes[0].data == code("T5") and r.codes[0].grade == 3.0  # 2.7 -> B
        await drv.trigger(seq=78)  # nothing at the read point
        r = (await take(drv, 1))[0]
        assert r.seq == 78 and r.codes == ()
        await drv.trigger()
        assert (await take(drv, 1))[0].seq == 1
    finally:
        await drv.stop()
        await sim.stop()


async def test_keyence_style_trigger_and_format() -> None:
    sim, drv = await pair(
        line_format="{data}:{grade}", no_read="ERROR", trigger_command="LON\r", terminator="\r", mode="software",
        drv={"line_format": "{data}:{grade}", "no_read": "ERROR", "trigger_command": "LON\r", "terminator": "\r"},
    )
    try:
        sim.present(printed(1, "K:1"))
        await drv.trigger()
        r = (await take(drv, 1))[0]
        assert r.seq is None and r.codes[0].data == code("K:1")
        await drv.trigger()
        assert (await take(drv, 1))[0].codes == ()
    finally:
        await drv.stop()
        await sim.stop()


async def test_reader_reconnects_after_reset() -> None:
    sim, drv = await pair()
    states: list[HealthState] = []
    drv.on_health(lambda d, h: states.append(h.state))
    try:
        sim.reset_connection()
        await wait_for(lambda: HealthState.DISCONNECTED in states, timeout=3.0, what="disconnect", interval=0.01)
        await wait_for(lambda: drv.health.state == HealthState.CONNECTED and sim.connected, timeout=3.0, what="reconnect", interval=0.01)
        sim.present(printed(9, "R9"))
        assert [r.seq for r in await take(drv, 1)] == [9]
    finally:
        await drv.stop()
        await sim.stop()


async def test_reader_sim_keeps_up_with_100_units_per_second() -> None:
    sim, drv = await pair()
    try:
        n = 500
        units = [printed(i, f"P{i}") for i in range(1, n + 1)]
        t0 = time.perf_counter()
        for u in units:
            sim.present(u)
        reads = await take(drv, n)
        elapsed = time.perf_counter() - t0
        assert len(reads) == n and elapsed < n / 100
    finally:
        await drv.stop()
        await sim.stop()
