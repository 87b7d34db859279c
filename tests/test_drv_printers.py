"""Printer drivers against their simulators over real sockets and ptys: prints confirmed only when they happened."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from typing import Any

import pytest
import zxingcpp
from engine_helpers import wait_for

from linectl import gs1
from linectl.drivers.base import DeviceError, HealthState, PrintConfirm, PrintJob
from linectl.drivers.coder import (
    CoderConfig,
    CoderPrinter,
    Frame,
    FrameDecoder,
    encode_frame,
    escape_field,
    unescape_field,
)
from linectl.drivers.transport import TransportConfig
from linectl.drivers.zpl import (
    HostStatus,
    ZplConfig,
    ZplPrinter,
    datamatrix_field_data,
    gs1_128_field_data,
    text_field_data,
)
from linectl.simulators.model import SimUnit
from linectl.simulators.printer import (
    CoderPrinterSim,
    ZplPrinterSim,
    apply_print,
    decode_bc_data,
    decode_bx_data,
    parse_zpl_format,
)

GTIN = "09501101530003"
FAST = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "reply_timeout_s": 0.5, "connect_timeout_s": 1.0}


def job(i: int, serial: str | None = None, lot: str = "L0T;1") -> PrintJob:
    code = gs1.compose_unit(GTIN, serial or f"S{i:06d}", lot=lot, expiry="301231")
    return PrintJob(i, code.element_string, code.hri, {"lot": lot})


async def collect(drv: Any, n: int, timeout: float = 5.0) -> list[PrintConfirm]:
    out: list[PrintConfirm] = []

    async def run() -> None:
        async for c in drv.confirmations():
            out.append(c)
            if len(out) >= n:
                return

    try:
        await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        pass
    return out


def health_log(drv: Any) -> list[tuple[HealthState, str]]:
    seen: list[tuple[HealthState, str]] = []
    drv.on_health(lambda d, h: seen.append((h.state, h.reason)))
    return seen


# --------------------------------------------------------------------------- LCP/1 codec


def test_lcp1_field_escaping_roundtrip() -> None:
    for s in ["01095011015300031730123110L0T;1\x1d21ABC", "back\\slash", "\\G literal", "é ünïcode", "=|,;"]:
        raw = escape_field(s)
        assert all(0x20 <= b <= 0x7E for b in raw), raw
        assert unescape_field(raw) == s
    assert escape_field("A\x1dB") == b"A\\GB"


def test_lcp1_frames_and_bad_bcc() -> None:
    fr = encode_frame("DAT", "7", "42", "DM=0109501101530003\x1d10X")
    assert fr[0] == 0x02 and fr[-3] == 0x03
    dec = FrameDecoder()
    out = dec.feed(fr[:5]) + dec.feed(fr[5:])
    assert out == [Frame("DAT", ["7", "42", "DM=0109501101530003\x1d10X"])]
    bad = bytearray(fr)
    bad[-1] = ord("0") if bad[-1] != ord("0") else ord("1")
    assert dec.feed(bytes(bad)) == ["bad BCC"]
    assert dec.feed(b"\xff\xfe" + fr) == ["bytes outside a frame", Frame("DAT", ["7", "42", "DM=0109501101530003\x1d10X"])]


def test_transport_config_exactly_one() -> None:
    class C(TransportConfig):
        pass

    C(host="h", port=1)
    C(serial_port="/dev/ttyUSB0")
    with pytest.raises(ValueError):
        C()
    with pytest.raises(ValueError):
        C(host="h", port=1, serial_port="/dev/ttyUSB0")
    with pytest.raises(ValueError):
        C(host="h")
    with pytest.raises(ValueError):
        C(serial_port="/dev/x", port=5)


def test_coder_config_validation() -> None:
    with pytest.raises(ValueError, match="element_string"):
        CoderConfig(driver="coder", host="h", port=1, message="M", fields={"HRI": "hri"})
    with pytest.raises(ValueError, match="source"):
        CoderConfig(driver="coder", host="h", port=1, message="M", fields={"DM": "element_string", "X": "nope"})


# --------------------------------------------------------------------------- coder fixtures


async def coder_pair(**sim_kw: Any) -> tuple[CoderPrinterSim, CoderPrinter]:
    serial = sim_kw.pop("serial", False)
    drv_kw = sim_kw.pop("drv", {})
    link = None
    if serial:
        link = os.path.join(tempfile.mkdtemp(prefix="linectl-test-"), "coder")
    sim = CoderPrinterSim(port=0, serial_link=link, messages={"UNIT"}, **sim_kw)
    await sim.start()
    where = {"serial_port": link} if serial else {"host": "127.0.0.1", "port": sim.port}
    cfg = CoderConfig(
        driver="coder", message="UNIT", fields={"DM": "element_string", "HRI": "hri", "LOT": "fields.lot"},
        status_interval_s=0.2, **where, **{**FAST, **drv_kw},
    )
    drv = CoderPrinter("coder1", cfg)
    drv.garbage_hold_s = 0.3
    await drv.start()
    assert await drv.wait_connected(3)
    return sim, drv


async def close(sim: Any, drv: Any) -> None:
    await drv.stop()
    await sim.stop()


# --------------------------------------------------------------------------- coder


async def test_coder_200_jobs_200_confirmations_in_order() -> None:
    sim, drv = await coder_pair()
    try:
        units = []
        jobs = [job(i) for i in range(1, 201)]
        for j in jobs[:8]:  # the engine keeps a small queue ahead of the trigger
            await drv.send(j)
        for n, j in enumerate(jobs[8:], start=1):
            u = SimUnit(seq=1000 + n)
            sim.on_trigger(u)
            units.append(u)
            await drv.send(j)
        for n in range(len(units) + 1, 201):
            u = SimUnit(seq=1000 + n)
            sim.on_trigger(u)
            units.append(u)
        confirms = await collect(drv, 200)
        assert [c.seq for c in confirms] == list(range(1, 201))
        assert [c.product_count for c in confirms] == [u.seq for u in units]
        assert [u.content for u in units] == [j.element_string for j in jobs]
        assert all(u.defect is None and u.job_seq == j.seq for u, j in zip(units, jobs))
        assert drv.pending() == [] and drv.garbage_count == 0
        st = await drv.status()
        assert st["cnt"] == "200" and st["flt"] == "000"
    finally:
        await close(sim, drv)


async def test_coder_over_pty() -> None:
    sim, drv = await coder_pair(serial=True)
    try:
        assert os.path.islink(sim.serial_path or "")
        for i in range(1, 31):
            await drv.send(job(i))
        for i in range(1, 31):
            sim.on_trigger(SimUnit(seq=i))
        confirms = await collect(drv, 30)
        assert [c.seq for c in confirms] == list(range(1, 31))
        assert sim.queue == type(sim.queue)()
        # the LOT field travelled with its ';' intact through the escaping
        assert sim.printed[0][1] == job(1).element_string
    finally:
        await close(sim, drv)


async def test_coder_nak_raises_with_code_and_reason() -> None:
    sim, drv = await coder_pair(capacity=2)
    try:
        await drv.send(job(1))
        await drv.send(job(2))
        with pytest.raises(DeviceError) as ei:
            await drv.send(job(3))
        assert ei.value.code == "06" and "buffer full" in ei.value.reason and "job 3" in ei.value.reason
        assert 3 not in drv.pending()
        sim.inject("nak", code="03", text="field DM too long")
        with pytest.raises(DeviceError, match="field DM too long"):
            await drv.send(job(4))
        sim.on_trigger(SimUnit(seq=1))
        assert [c.seq for c in await collect(drv, 1)] == [1]
    finally:
        await close(sim, drv)


async def test_coder_no_answer_is_a_timeout_error_and_late_ack_is_ignored() -> None:
    sim, drv = await coder_pair(drv={"reply_timeout_s": 0.2})
    try:
        sim.inject("slow", seconds=0.4)
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as ei:
            await drv.send(job(1))
        assert ei.value.code == "timeout" and time.monotonic() - t0 < 0.35
        # The printer did take it (late ACK): when it prints, that print is real and is reported.
        await asyncio.sleep(0.3)
        await drv.send(job(2))
        sim.on_trigger(SimUnit(seq=1))
        sim.on_trigger(SimUnit(seq=2))
        assert [c.seq for c in await collect(drv, 2)] == [1, 2]
        sim.inject("silence")
        with pytest.raises(DeviceError, match="no answer"):
            await drv.send(job(3))
    finally:
        await close(sim, drv)


async def test_coder_fault_changes_health_and_recovers() -> None:
    sim, drv = await coder_pair()
    seen = health_log(drv)
    try:
        sim.inject("fault", code="202")
        await wait_for(lambda: drv.health.state == HealthState.DISCONNECTED, timeout=3.0, what="head fault", interval=0.01)
        assert "202" in drv.health.reason and "head" in drv.health.reason
        with pytest.raises(DeviceError) as ei:
            await drv.send(job(1))
        assert ei.value.code == "07"
        u = SimUnit(seq=1)
        sim.on_trigger(u)
        assert u.content is None and u.defect == "no_print"
        sim.inject("clear_fault")
        await wait_for(lambda: drv.health.state == HealthState.CONNECTED, timeout=3.0, what="recovery", interval=0.01)
        sim.inject("fault", code="101")
        await wait_for(lambda: drv.health.state == HealthState.DEGRADED, timeout=3.0, what="ink low", interval=0.01)
        assert "ink low" in drv.health.reason
        await drv.send(job(2))  # a warning does not stop printing
        sim.on_trigger(SimUnit(seq=2))
        assert [c.seq for c in await collect(drv, 1)] == [2]
        assert [s for s, _ in seen].count(HealthState.DISCONNECTED) == 1
    finally:
        await close(sim, drv)


async def test_coder_fault_is_surfaced_to_a_waiting_send() -> None:
    sim, drv = await coder_pair(drv={"reply_timeout_s": 2.0})
    try:
        sim.inject("slow", seconds=1.0)
        task = asyncio.create_task(drv.send(job(1)))
        await asyncio.sleep(0.1)
        sim.raise_fault("201")
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as ei:
            await task
        assert ei.value.code == "201" and time.monotonic() - t0 < 0.5
    finally:
        await close(sim, drv)


async def test_coder_buffer_underrun_prints_nothing_and_degrades() -> None:
    sim, drv = await coder_pair()
    try:
        u = SimUnit(seq=5)
        sim.on_trigger(u)
        assert u.content is None and u.defect == "no_print" and u.extras["cause"] == "buffer underrun"
        await wait_for(lambda: "103" in drv.health.reason, timeout=3.0, what="underrun fault", interval=0.01)
        assert drv.health.state == HealthState.DEGRADED
        assert await collect(drv, 1, timeout=0.2) == []
        await drv.send(job(1))
        sim.on_trigger(SimUnit(seq=6))
        c = await collect(drv, 1)
        assert [(x.seq, x.product_count) for x in c] == [(1, 6)]
        await wait_for(lambda: drv.health.state == HealthState.CONNECTED, timeout=3.0, what="underrun cleared", interval=0.01)
    finally:
        await close(sim, drv)


async def test_coder_tcp_reset_reconnects_and_never_reports_unprinted_jobs() -> None:
    sim, drv = await coder_pair()
    seen = health_log(drv)
    try:
        for i in range(1, 11):
            await drv.send(job(i))
        for i in range(1, 4):
            sim.on_trigger(SimUnit(seq=i))
        first = await collect(drv, 3)
        assert [c.seq for c in first] == [1, 2, 3]
        assert sim.reset_connection()
        await wait_for(lambda: drv.health.state == HealthState.DISCONNECTED, timeout=3.0, what="disconnect", interval=0.01)
        # prints while nobody listens: real, but their PRN is lost
        sim.on_trigger(SimUnit(seq=4))
        with pytest.raises(DeviceError):
            await drv.send(job(11))
        await wait_for(lambda: drv.health.state == HealthState.CONNECTED, timeout=3.0, what="reconnect", interval=0.01)
        for i in range(5, 11):
            sim.on_trigger(SimUnit(seq=i))
        rest = await collect(drv, 6)
        printed = {s for s, _ in sim.printed}
        assert [c.seq for c in rest] == [5, 6, 7, 8, 9, 10]
        assert all(c.seq in printed for c in first + rest)
        assert 4 not in [c.seq for c in rest] and drv.lost_prints == 1
        states = [s for s, _ in seen]
        assert HealthState.DISCONNECTED in states and states[-1] == HealthState.CONNECTED
        assert sim.connections == 2
    finally:
        await close(sim, drv)


async def test_coder_garbage_from_printer_degrades_but_keeps_working() -> None:
    sim, drv = await coder_pair()
    try:
        sim.inject("garbage", nbytes=40)
        await wait_for(lambda: drv.health.state == HealthState.DEGRADED, timeout=3.0, what="garbage", interval=0.01)
        assert drv.health.reason.startswith("garbage from printer")
        await drv.send(job(1))
        sim.on_trigger(SimUnit(seq=1))
        assert [c.seq for c in await collect(drv, 1)] == [1]
        await asyncio.sleep(0.5)
        await wait_for(lambda: drv.health.state == HealthState.CONNECTED, timeout=3.0, what="garbage hold over", interval=0.01)
    finally:
        await close(sim, drv)


async def test_coder_random_faults_never_confirm_unprinted() -> None:
    """Seeded NAKs, slow answers, garbage and resets: every confirmation is a print the simulator made."""
    sim, drv = await coder_pair(seed=3, nak_rate=0.05, slow_rate=0.02, slow_s=0.6, garbage_rate=0.05, reset_rate=0.01)
    try:
        errors = 0
        for n in range(1, 151):
            try:
                await drv.send(job(n))
            except DeviceError:
                errors += 1
                await wait_for(lambda: drv.connected, timeout=3.0, what="link back", interval=0.01)
            if sim.queue:
                sim.on_trigger(SimUnit(seq=n))
        await asyncio.sleep(0.3)
        confirms = await collect(drv, 10_000, timeout=0.5)
        printed = [s for s, _ in sim.printed]
        assert errors and len(confirms) > 100, (errors, len(confirms))
        assert sim.connections >= 2 and drv.garbage_count > 0  # the seed does produce resets and garbage
        assert all(c.seq in printed for c in confirms)
        idx = [printed.index(c.seq) for c in confirms]
        assert idx == sorted(idx), "confirmations must follow print order"
    finally:
        await close(sim, drv)


def test_defects_applied_to_the_unit() -> None:
    import random

    rng = random.Random(1)
    a, b = job(1).element_string, job(2).element_string
    cases = {
        "no_print": lambda u: u.content is None,
        "smudge_heavy": lambda u: u.content == a and u.quality < 1.5,
        "low_contrast": lambda u: u.content == a and u.quality < 1.5,
        "partial": lambda u: u.extras.get("unreadable"),
        "wrong_code": lambda u: u.content != a and gs1.parse(u.content).gtin == GTIN,
        "duplicate": lambda u: u.content == b,
        "not_gs1": lambda u: u.symbology == "]d1" and u.content == a,
        "data_mismatch": lambda u: gs1.parse(u.content).lot != "L0T;1" and gs1.parse(u.content).serial == "S000001",
    }
    for kind, ok in cases.items():
        u = SimUnit(seq=1)
        apply_print(u, a, "]d2", kind, rng, previous=b)
        assert u.defect == kind and ok(u), kind
    u = SimUnit(seq=1)
    apply_print(u, a, "]d2", "smudge_mild", rng, previous=b)
    assert u.variation == "smudge_mild" and u.defect is None and u.quality >= 1.5
    u = SimUnit(seq=1)
    apply_print(u, a, "]d2", "duplicate", rng, previous=None)
    assert u.defect is None and u.content == a  # not applicable: truth must not claim it


async def test_coder_sim_sustains_100_units_per_second() -> None:
    sim, drv = await coder_pair(capacity=64)
    try:
        n = 600
        t0 = time.perf_counter()
        for i in range(1, 17):
            await drv.send(job(i))
        nxt = 17
        for k in range(1, n + 1):
            sim.on_trigger(SimUnit(seq=k))
            if nxt <= n:
                await drv.send(job(nxt))
                nxt += 1
        confirms = await collect(drv, n)
        elapsed = time.perf_counter() - t0
        assert len(confirms) == n
        assert elapsed < n / 100, f"{n} units took {elapsed:.2f}s: slower than 100 units/s"
    finally:
        await close(sim, drv)


# --------------------------------------------------------------------------- ZPL encoding


def test_zpl_datamatrix_fnc1_escapes() -> None:
    es = "010950110153000317301231" + "10LOT_1\x1d" + "21A_B"
    assert datamatrix_field_data(es) == "_1010950110153000317301231" + "10LOT__1_1" + "21A__B"
    assert decode_bx_data(datamatrix_field_data(es), "_") == ("]d2", es)
    assert datamatrix_field_data(es, "#") == "#1010950110153000317301231" + "10LOT_1#1" + "21A_B"
    with pytest.raises(DeviceError):
        datamatrix_field_data("01095011015300032^1")
    with pytest.raises(DeviceError):
        datamatrix_field_data("\x1d0109501101530003")


def test_zpl_gs1_128_invocation_codes() -> None:
    for es in [
        "00095011010000000017",
        "0109501101530003" + "21123456\x1d" + "10ABC123",
        "0109501101530003" + "10A>B\x1d" + "2112345678",
        "0109501101530003" + "105",
    ]:
        data = gs1_128_field_data(es)
        assert data.startswith(">;>8")
        assert decode_bc_data(data) == es
    # Zebra's own example: >;>8011234567890123421123456>810>6ABC123
    assert gs1_128_field_data("0112345678901234" + "21123456\x1d" + "10ABC123") == ">;>80112345678901234" + "21123456>810>6ABC123"
    assert gs1_128_field_data("00095011010000000017") == ">;>800095011010000000017"
    with pytest.raises(DeviceError, match="48"):
        gs1_128_field_data("01" + "0" * 14 + "21" + "X" * 40)


def test_zpl_label_content() -> None:
    cfg = ZplConfig(driver="zpl", host="127.0.0.1", gs1_128=True, text_fields=["lot"])
    assert cfg.port == 9100
    drv = ZplPrinter("zpl1", cfg)
    with pytest.raises(DeviceError):
        drv.render(PrintJob(3, "0109501101530003" + "10L^1", "(01)x"))
    label = drv.render(PrintJob(4, gs1.compose_unit(GTIN, "AB_C1", lot="L1").element_string, "(01)09501101530003(10)L1(21)AB_C1", {"lot": "é\\^"})).decode()
    assert "^BXN,8,200,,,,_^FD_1010950110153000310L1_121AB__C1^FS" in label
    assert "^BCN,100,N,N,N^FD>;>80109501101530003" in label
    assert "^FH\\^FD(01)09501101530003(10)L1(21)AB_C1^FS" in label
    assert "^FH\\^FD\\C3\\A9\\5C\\5E^FS" in label
    assert label.startswith("^XA") and label.rstrip().endswith("^XZ") and label.count("^PQ1") == 1
    parsed = parse_zpl_format(label.encode())
    assert parsed.dm == ("]d2", gs1.compose_unit(GTIN, "AB_C1", lot="L1").element_string)
    assert parsed.gs1_128 == gs1.compose_unit(GTIN, "AB_C1", lot="L1").element_string
    assert text_field_data("a~b") == "a\\7Eb"


def test_zpl_template_validation() -> None:
    ZplConfig(driver="zpl", host="h", template="^XA^FO1,1^BXN,5,200,,,,{esc}^FD{dm}^FS^FO1,200^FH\\^FD{f[lot]}^FS^XZ")
    for bad in ["^XA^FDx^FS^XZ", "^XA^FD{dm}^FS^PQ10^XZ", "^XA^FD{dm}{nope}^FS^XZ", "^FD{dm}^FS"]:
        with pytest.raises(ValueError):
            ZplConfig(driver="zpl", host="h", template=bad)


def test_zpl_host_status_parse() -> None:
    raw = [b"030,1,0,1218,002,0,0,0,000,0,0,0", b"001,0,1,0,1,2,6,0,00000001,1,000", b"1234,0"]
    st = HostStatus.parse(raw)
    assert st.paper_out and st.head_up and not st.pause
    assert st.formats_in_buffer == 2 and st.labels_remaining == 1 and st.outstanding == 3
    assert st.print_faults == ["paper out", "head open"]
    with pytest.raises(ValueError):
        HostStatus.parse(raw[:2])


# --------------------------------------------------------------------------- ZPL over TCP


async def zpl_pair(**sim_kw: Any) -> tuple[ZplPrinterSim, ZplPrinter]:
    drv_kw = sim_kw.pop("drv", {})
    sim = ZplPrinterSim(port=0, **sim_kw)
    await sim.start()
    cfg = ZplConfig(driver="zpl", host="127.0.0.1", port=sim.port, status_interval_s=0.05, settle_s=0.1, **{**FAST, **drv_kw})
    drv = ZplPrinter("zpl1", cfg)
    await drv.start()
    assert await drv.wait_connected(3)
    await wait_for(lambda: drv.last_status is not None, timeout=3.0, what="first ~HS", interval=0.01)
    return sim, drv


async def test_zpl_prints_confirmed_in_order_and_image_decodes_as_gs1() -> None:
    sim, drv = await zpl_pair(render_images=True, print_time_s=0.01)
    try:
        jobs = [job(i, lot="L_1;x") for i in range(1, 21)]
        for j in jobs:
            await drv.send(j)
        confirms = await collect(drv, 20)
        assert [c.seq for c in confirms] == list(range(1, 21))
        assert list(drv.unconfirmed) == []
        assert [u.content for u in sim.units] == [j.element_string for j in jobs]
        img = sim.units[0].image
        res = zxingcpp.read_barcodes(img, formats=zxingcpp.BarcodeFormat.DataMatrix)
        assert len(res) == 1
        assert res[0].symbology_identifier == "]d2"
        assert res[0].text == jobs[0].hri
        assert gs1.parse("]d2" + res[0].bytes.decode("latin-1")).element_string == jobs[0].element_string
    finally:
        await close(sim, drv)


async def test_zpl_paper_out_surfaced_and_no_false_confirmation() -> None:
    sim, drv = await zpl_pair(print_time_s=0.05)
    seen = health_log(drv)
    try:
        sim.inject("paper_out")
        await wait_for(lambda: drv.health.state == HealthState.DISCONNECTED, timeout=3.0, what="paper out", interval=0.01)
        assert "paper out" in drv.health.reason
        with pytest.raises(DeviceError, match="paper out"):
            await drv.send(job(1))
        assert drv.pending() == [] and sim.formats_received == 0  # nothing was sent
        sim.inject("clear_fault")
        await wait_for(lambda: drv.health.state == HealthState.CONNECTED, timeout=3.0, what="paper back", interval=0.01)
        for i in range(2, 6):
            await drv.send(job(i))
        await asyncio.sleep(0.02)
        sim.inject("head_open")  # mid-batch: whatever leaves around it cannot be confirmed
        await wait_for(lambda: drv.health.state == HealthState.DISCONNECTED, timeout=3.0, what="head open", interval=0.01)
        await asyncio.sleep(0.2)
        sim.inject("clear_fault")
        await wait_for(lambda: not drv.pending(), timeout=3, what="all jobs accounted", interval=0.01)
        confirmed = [c.seq for c in await collect(drv, 10, timeout=0.3)]
        printed_count = len(sim.printed)
        assert printed_count == 4
        assert sorted(confirmed + [s for s, _ in drv.unconfirmed]) == [2, 3, 4, 5]
        assert confirmed == sorted(confirmed)
        assert any(s == HealthState.DISCONNECTED and "head open" in r for s, r in seen)
    finally:
        await close(sim, drv)


async def test_zpl_paused_printer_confirms_nothing_until_it_prints() -> None:
    sim, drv = await zpl_pair(print_time_s=0.01)
    try:
        sim.inject("pause")
        await wait_for(lambda: drv.health.state == HealthState.DEGRADED, timeout=3.0, what="paused", interval=0.01)
        for i in range(1, 4):
            await drv.send(job(i))
        assert await collect(drv, 1, timeout=0.5) == []  # many polls, nothing printed, nothing confirmed
        assert len(sim.printed) == 0 and drv.pending() == [1, 2, 3]
        sim.inject("pause", on=False)
        confirms = await collect(drv, 3)
        assert [c.seq for c in confirms] == [1, 2, 3] and len(sim.printed) == 3
    finally:
        await close(sim, drv)


async def test_zpl_no_hs_answer_and_reset_reconnect() -> None:
    sim, drv = await zpl_pair(silent_on_error=True, drv={"reply_timeout_s": 0.1})
    seen = health_log(drv)
    try:
        sim.inject("paper_out")  # newer firmware: no ~HS answer at all in media out
        await wait_for(
            lambda: "no answer to ~HS" in drv.health.reason or drv.health.state == HealthState.DISCONNECTED, timeout=3.0, what="silence noticed", interval=0.01
        )
        sim.inject("clear_fault")
        await wait_for(lambda: drv.health.state == HealthState.CONNECTED, timeout=3.0, what="back", interval=0.01)
        sim.reset_connection()
        await wait_for(lambda: any(s == HealthState.DISCONNECTED for s, _ in seen), timeout=3.0, what="reset seen", interval=0.01)
        await wait_for(lambda: drv.health.state == HealthState.CONNECTED, timeout=3.0, what="reconnected", interval=0.01)
        await drv.send(job(1))
        assert [c.seq for c in await collect(drv, 1)] == [1]
    finally:
        await close(sim, drv)


async def test_zpl_clear_cancels_and_never_confirms() -> None:
    sim, drv = await zpl_pair(print_time_s=0.01)
    try:
        sim.inject("pause")
        await drv.send(job(1))
        await drv.send(job(2))
        await drv.clear()
        sim.inject("pause", on=False)
        assert await collect(drv, 1, timeout=0.3) == []
        assert [s for s, _ in drv.unconfirmed] == [1, 2] and sim.cancelled == 2
    finally:
        await close(sim, drv)


async def test_coder_unknown_message_keeps_reconnecting_with_reason() -> None:
    sim = CoderPrinterSim(port=0, messages={"OTHER"})
    await sim.start()
    drv = CoderPrinter("c", CoderConfig(driver="coder", host="127.0.0.1", port=sim.port, message="UNIT", **FAST))
    try:
        await drv.start()
        await wait_for(lambda: "refused message 'UNIT'" in drv.health.reason, timeout=3.0, what="refusal reason", interval=0.01)
        assert drv.health.state == HealthState.DISCONNECTED and "NAK 04" in drv.health.reason
        with pytest.raises(DeviceError):
            await drv.send(job(1))
    finally:
        await close(sim, drv)


async def test_zpl_sim_trigger_mode_prints_on_the_unit() -> None:
    sim, drv = await zpl_pair(print_time_s=10.0)  # free-running head would take 10 s per label
    try:
        await drv.send(job(1))
        await drv.send(job(2))
        u1, u2, u3 = SimUnit(seq=1), SimUnit(seq=2), SimUnit(seq=3)
        sim.on_trigger(u1)  # the conveyor drives it now: the label in progress goes back to the buffer
        sim.on_trigger(u2)
        sim.on_trigger(u3)
        assert (u1.content, u2.content) == (job(1).element_string, job(2).element_string)
        assert u3.content is None and u3.defect == "no_print"
        assert [c.seq for c in await collect(drv, 2)] == [1, 2]
    finally:
        await close(sim, drv)


async def test_zpl_slow_status_and_garbage() -> None:
    sim, drv = await zpl_pair(print_time_s=0.01, drv={"reply_timeout_s": 0.15})
    drv.garbage_hold_s = 0.3
    try:
        sim.inject("slow", seconds=0.3)
        with pytest.raises(DeviceError, match="no answer to ~HS"):
            await drv.send(job(1))
        assert drv.pending() == [1]  # written: it may print, so it is tracked, not forgotten
        sim.slow_s = 0.0
        await wait_for(lambda: not drv.pending(), timeout=3.0, what="job 1 accounted", interval=0.01)
        confirmed = [c.seq for c in await collect(drv, 1, timeout=0.3)]
        assert confirmed + [s for s, _ in drv.unconfirmed] == [1] and len(sim.printed) == 1
        sim.inject("garbage", nbytes=20)
        await wait_for(lambda: drv.health.reason.startswith("garbage from printer"), timeout=3.0, what="garbage noticed", interval=0.01)
        await drv.send(job(2))
        assert [c.seq for c in await collect(drv, 1)] == [2]
        await wait_for(lambda: drv.health.state == HealthState.CONNECTED, timeout=3.0, what="garbage hold over", interval=0.01)
    finally:
        await close(sim, drv)


@pytest.mark.parametrize("seed", range(20))
def test_zpl_accounting_never_confirms_an_unprinted_label(seed: int) -> None:
    """Model printer: formats parse up to 0.5 s late (~HS overtakes them), foreign formats, random printing."""
    import random

    from linectl.drivers.zpl import _Job

    rng = random.Random(seed)
    drv = ZplPrinter("m", ZplConfig(driver="zpl", host="h", settle_s=1.0))
    drv._window_fault = False
    t = 0.0
    written: dict[int, float] = {}
    parse_at: dict[int, float] = {}
    printed: set[int] = set()
    queue: list[int] = []  # parsed, not printed, FIFO (negative = foreign)
    foreign = 0
    nxt = 1
    for _ in range(400):
        t += rng.uniform(0.01, 0.3)
        if rng.random() < 0.4:
            written[nxt] = t
            parse_at[nxt] = t + rng.uniform(0.0, 0.5)
            drv._jobs.append(_Job(nxt, t))
            nxt += 1
        if rng.random() < 0.05:
            foreign -= 1
            queue.append(foreign)
        for s, at in sorted(parse_at.items(), key=lambda kv: kv[0]):
            if at <= t and s not in queue and s not in printed:
                queue.append(s)
        for s in [s for s in parse_at if s in queue or s in printed]:
            parse_at.pop(s, None)
        if queue and rng.random() < 0.5:
            printed.add(queue.pop(0))
        current = 1 if queue and rng.random() < 0.3 else 0
        st = HostStatus(False, False, 0, len(queue) - current, False, False, False, False, False, False, False, current)
        drv._account(st, t)
    confirmed = []
    while not drv._confirms.empty():
        confirmed.append(drv._confirms.get_nowait().seq)
    assert confirmed == sorted(confirmed)
    assert set(confirmed) <= printed
    assert len(confirmed) > len(printed) // 2  # and it does confirm, not just stay silent
