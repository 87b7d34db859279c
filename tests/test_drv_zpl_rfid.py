"""RFID label printers (ZPL): each job's EPC encoded and read back on its own label, every outcome checked
against what the simulated label physically carries. Driver and simulator over real TCP sockets."""

from __future__ import annotations

import re
from typing import Any

import pytest
from engine_helpers import wait_for
from epcpy.epc_schemes.sgtin import SGTIN, SGTINFilterValue
from test_drv_printers import collect

from linectl import gs1
from linectl.drivers.base import DeviceError, HealthState, PrintConfirm, PrintJob
from linectl.drivers.zpl import ZplConfig, ZplPrinter, default_template
from linectl.drivers.zpl_rfid import check_epc_hex, judge, pc_word
from linectl.simulators.model import SimUnit
from linectl.simulators.printer import (
    HostVerification,
    RfidLabelTruth,
    RfidRead,
    RfidSetup,
    RfidWrite,
    ZplPrinterSim,
    parse_zpl_format,
)

GTIN = "09501101530003"
FAST = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "reply_timeout_s": 0.5, "connect_timeout_s": 1.0}


def sgtin96(serial: int) -> str:
    """SGTIN-96 hex from an independent encoder (epcpy), company prefix 0614141 as in the EPC TDS examples."""
    return SGTIN(f"urn:epc:id:sgtin:0614141.812345.{serial}").hex(
        binary_coding_scheme=SGTIN.BinaryCodingScheme.SGTIN_96, filter_value=SGTINFilterValue.POS_ITEM
    )


def sgtin198(serial: str) -> str:
    return SGTIN(f"urn:epc:id:sgtin:0614141.812345.{serial}").hex(
        binary_coding_scheme=SGTIN.BinaryCodingScheme.SGTIN_198, filter_value=SGTINFilterValue.POS_ITEM
    )


def rjob(i: int, epc: str | None = None) -> PrintJob:
    code = gs1.compose_unit(GTIN, f"S{i:06d}", lot="L1", expiry="301231")
    return PrintJob(i, code.element_string, code.hri, {}, epc_hex=sgtin96(1000 + i) if epc is None else epc)


def rfid_cfg(**kw: Any) -> dict[str, Any]:
    return {"verify_timeout_s": 0.5, **kw}


async def pair(rfid: dict[str, Any] | None = None, **sim_kw: Any) -> tuple[ZplPrinterSim, ZplPrinter]:
    sim = ZplPrinterSim(port=0, **{"print_time_s": 0.01, **sim_kw})
    await sim.start()
    cfg = ZplConfig(
        driver="zpl", host="127.0.0.1", port=sim.port, status_interval_s=0.05, settle_s=0.1, rfid=rfid_cfg(**(rfid or {})), **FAST
    )
    drv = ZplPrinter("rfid1", cfg)
    await drv.start()
    assert await drv.wait_connected(3)
    await wait_for(lambda: drv.last_status is not None, timeout=3.0, what="first ~HS", interval=0.01)
    return sim, drv


async def close(sim: ZplPrinterSim, drv: ZplPrinter) -> None:
    await drv.stop()
    await sim.stop()


def truth_for(sim: ZplPrinterSim, epc: str) -> list[RfidLabelTruth]:
    return [t for t in sim.rfid_labels if t.epc_sent == epc]


def assert_matches_truth(sim: ZplPrinterSim, c: PrintConfirm, epc: str) -> None:
    """A confirmation against the labels the simulator really produced for that EPC."""
    labels = truth_for(sim, epc)
    assert labels, f"job {c.seq}: no label was printed for it"
    last = labels[-1]
    assert c.rfid_void_labels == sum(t.void for t in labels)
    if c.rfid_status == "ok":
        assert not last.void and last.tag_epc == epc and last.tag_pc == pc_word(epc) and last.verification is not None
        assert c.epc_read == epc
    elif c.rfid_status == "void":
        assert all(t.void for t in labels)
    elif c.rfid_status == "mismatch":
        assert not last.void and last.tag_epc != epc and c.epc_read == last.tag_epc
    elif c.rfid_status == "no_answer":
        assert last.verification is None
    else:
        raise AssertionError(f"job {c.seq}: RFID job confirmed without an RFID outcome: {c}")


# --------------------------------------------------------------------------- the format


RFID_BLOCK = re.compile(
    r"\^XA\n"
    r"\^RS8,,(?P<v>\d*),(?P<n>\d+),(?P<e>[NE])\n"
    r"\^RFW,H,1,2,1\^FD(?P<pc>[0-9A-F]{4})\^FS\n"
    r"\^RFW,H,2,(?P<wbytes>\d+),1\^FD(?P<epc>[0-9A-F]+)\^FS\n"
    r"\^RFR,H,1,(?P<rbytes>\d+),1\^FN(?P<fn>\d+)\^FS\n"
    r"\^FH_\^HV(?P<hvfn>\d+),(?P<hvn>\d+),EPC#(?P<seq>\d+)\[,\]_0D_0A,L\^FS\n"
)


@pytest.mark.parametrize("kind", ["sgtin96", "sgtin198"])
def test_rfid_format_follows_the_manual_syntax(kind: str) -> None:
    epc = sgtin96(6789) if kind == "sgtin96" else sgtin198("6789AB")
    drv = ZplPrinter("p", ZplConfig(driver="zpl", host="h", rfid={"enabled": True}))
    job = rjob(7, epc)
    label = drv.render(job).decode()
    # independent check of the command sequence (ZPL II / RFID Programming Guide syntax)
    m = RFID_BLOCK.match(label)
    assert m is not None, label
    assert m["epc"] == epc and int(m["wbytes"]) * 2 == len(epc)
    assert int(m["rbytes"]) == int(m["wbytes"]) + 2  # PC word + EPC read back
    assert m["fn"] == m["hvfn"] and int(m["hvn"]) == 2 * int(m["rbytes"]) and m["seq"] == "7"
    assert (m["n"], m["e"], m["v"]) == ("1", "N", "")
    # PC word: EPC length in words in bits 15-11 (Gen 2); Zebra's own examples write 3000 for 96 bits
    assert m["pc"] == ("3000" if kind == "sgtin96" else "6800")
    assert label.count("^XA") == 1 and label.rstrip().endswith("^XZ") and label.count("^PQ1") == 1
    # the rest of the label is the plain label, unchanged
    plain = ZplPrinter("q", ZplConfig(driver="zpl", host="h")).render(PrintJob(7, job.element_string, job.hri)).decode()
    assert label.replace(m.group(0), "^XA\n", 1) == plain
    # parsed back by the simulator's parser
    parsed = parse_zpl_format(label.encode())
    assert parsed.errors == []
    assert parsed.rfid_setup == RfidSetup("8", "", None, 1, "N")
    nb = len(epc) // 2
    assert parsed.rfid_writes == [RfidWrite("H", 1, 2, "1", m["pc"]), RfidWrite("H", 2, nb, "1", epc)]
    assert parsed.rfid_reads == [RfidRead("H", 1, nb + 2, "1", 99)]
    assert parsed.host_verifications == [HostVerification(99, 2 * (nb + 2), "EPC#7[", "]\r\n", "L")]
    assert parsed.epc_sent == epc and parsed.dm == ("]d2", job.element_string)


def test_pc_word_and_epc_checks() -> None:
    assert pc_word("0" * 24) == "3000"  # 96 bits
    assert pc_word("0" * 60) == "7800"  # 240 bits: Zebra's example "^RFW,H,1,2,1^FD7800^FS"
    assert pc_word(sgtin198("ABC")) == "6800"  # 198 bits padded to 13 words
    assert check_epc_hex(sgtin96(1).lower()) == sgtin96(1)
    for bad in ["", "XYZ0", "30342", "30" * 63, "3034 257B"]:
        with pytest.raises(DeviceError):
            check_epc_hex(bad)
    epc = sgtin96(5)
    assert judge(epc, ("3000" + epc).encode()) == ("ok", epc, "")
    assert judge(epc, b"")[0] == "void" and judge(epc, b"??")[0] == "void"
    assert judge(epc, ("3000" + sgtin96(6)).encode())[:2] == ("mismatch", sgtin96(6))
    assert judge(epc, ("6800" + epc).encode())[0] == "mismatch"  # right EPC, wrong length: a reader sees more


def test_rfid_config_and_job_refusals() -> None:
    with pytest.raises(ValueError):
        ZplConfig(driver="zpl", host="h", rfid={"error_handling": "P"})
    with pytest.raises(ValueError):
        ZplConfig(driver="zpl", host="h", rfid={"labels_per_format": 11})
    with pytest.raises(ValueError):
        ZplConfig(driver="zpl", host="h", rfid={"retries": 2})
    plain = ZplPrinter("p", ZplConfig(driver="zpl", host="h"))
    with pytest.raises(DeviceError, match="rfid"):
        plain.render(rjob(1))
    rf = ZplPrinter("r", ZplConfig(driver="zpl", host="h", rfid={}))
    with pytest.raises(DeviceError, match="no EPC"):
        rf.render(PrintJob(1, rjob(1).element_string, "x"))
    with pytest.raises(DeviceError, match="hexadecimal"):
        rf.render(rjob(1, "NOTHEX00"))
    off = ZplPrinter("o", ZplConfig(driver="zpl", host="h", rfid={"enabled": False}))
    assert off.rfid is None and "^RS" not in off.render(PrintJob(1, rjob(1).element_string, "x")).decode()
    lenient = ZplPrinter("l", ZplConfig(driver="zpl", host="h", rfid={"require_epc": False}))
    assert "^RFW" not in lenient.render(PrintJob(1, rjob(1).element_string, "x")).decode()


def test_job_without_epc_renders_exactly_as_before() -> None:
    cfg = ZplConfig(driver="zpl", host="h", gs1_128=True, text_fields=["lot"])
    j = rjob(3)
    plain = PrintJob(3, j.element_string, j.hri, {"lot": "L1"})
    expected = default_template(cfg).format_map(
        {
            "dm": "_1" + j.element_string.replace("\x1d", "_1"),
            "esc": "_",
            "gs1_128": ZplPrinter("x", cfg).render(plain).decode().split("^BCN,100,N,N,N^FD")[1].split("^FS")[0],
            "hri": j.hri,
            "seq": "3",
            "f": {"lot": "L1"},
        }
    )
    assert ZplPrinter("x", cfg).render(plain).decode() == expected


# --------------------------------------------------------------------------- over TCP


async def test_rfid_ok_labels_confirmed_with_their_epc() -> None:
    sim, drv = await pair()
    try:
        jobs = [rjob(i) for i in range(1, 9)]
        for j in jobs:
            await drv.send(j)
        confirms = await collect(drv, 8)
        assert [c.seq for c in confirms] == list(range(1, 9))
        for c, j in zip(confirms, jobs, strict=True):
            assert c.rfid_status == "ok" and c.rfid_void_labels == 0
            assert j.epc_hex is not None
            assert_matches_truth(sim, c, j.epc_hex)
        assert [u.rfid_epc for u in sim.units] == [j.epc_hex for j in jobs]
        assert all(u.rfid_pc == "3000" and not u.rfid_void for u in sim.units)
        assert [u.content for u in sim.units] == [j.element_string for j in jobs]
        assert list(drv.unconfirmed) == [] and drv.rfid_strays == 0
    finally:
        await close(sim, drv)


async def test_rfid_void_is_a_reject_never_ok() -> None:
    sim, drv = await pair()
    try:
        await drv.send(rjob(1))
        assert (await collect(drv, 1))[0].rfid_status == "ok"
        sim.inject("void")
        for i in (2, 3):
            await drv.send(rjob(i))
        confirms = await collect(drv, 2)
        by = {c.seq: c for c in confirms}
        assert by[2].rfid_status == "void" and by[2].epc_read is None and "VOID" in by[2].rfid_reason
        assert by[2].rfid_void_labels == 1 and by[3].rfid_status == "ok"
        for c in confirms:
            epc = rjob(c.seq).epc_hex
            assert epc is not None
            assert_matches_truth(sim, c, epc)
        void_unit = next(u for u in sim.units if u.rfid_void)
        assert void_unit.defect == "rfid_void" and void_unit.content is None and void_unit.rfid_epc is None
        assert drv.rfid_rejects == 1
    finally:
        await close(sim, drv)


async def test_rfid_void_run_rejects_each_job() -> None:
    sim, drv = await pair()
    try:
        sim.inject("void_run", count=3)
        for i in range(1, 5):
            await drv.send(rjob(i))
        confirms = await collect(drv, 4)
        assert sorted((c.seq, c.rfid_status) for c in confirms) == [(1, "void"), (2, "void"), (3, "void"), (4, "ok")]
        for c in confirms:
            epc = rjob(c.seq).epc_hex
            assert epc is not None
            assert_matches_truth(sim, c, epc)
        assert sum(t.void for t in sim.rfid_labels) == 3 and drv.rfid_rejects == 3
    finally:
        await close(sim, drv)


async def test_rfid_void_run_health_while_it_lasts() -> None:
    sim, drv = await pair(rfid={"void_run_limit": 2})
    seen: list[str] = []
    drv.on_health(lambda d, h: seen.append(h.reason))
    try:
        sim.inject("void_run", count=2)
        for i in (1, 2):
            await drv.send(rjob(i))
        assert [c.rfid_status for c in await collect(drv, 2)] == ["void", "void"]
        await wait_for(lambda: "VOID in a row" in drv.health.reason, timeout=3.0, what="void run health", interval=0.01)
        assert drv.health.state == HealthState.DEGRADED
        await drv.send(rjob(3))
        assert (await collect(drv, 1))[0].rfid_status == "ok"
        await wait_for(lambda: drv.health.state == HealthState.CONNECTED, timeout=3.0, what="run over", interval=0.01)
    finally:
        await close(sim, drv)


async def test_rfid_wrong_epc_is_a_mismatch_with_what_the_tag_holds() -> None:
    sim, drv = await pair()
    try:
        other = sgtin96(424242)
        sim.inject("wrong_epc", epc=other)  # a tag pre-encoded with another item's EPC, not overwritten
        sim.inject("wrong_epc")  # a tag keeping its converter's random EPC
        for i in (1, 2, 3):
            await drv.send(rjob(i))
        confirms = {c.seq: c for c in await collect(drv, 3)}
        assert confirms[1].rfid_status == "mismatch" and confirms[1].epc_read == other
        assert other in confirms[1].rfid_reason and "sent" in confirms[1].rfid_reason
        assert confirms[2].rfid_status == "mismatch" and confirms[3].rfid_status == "ok"
        for c in confirms.values():
            epc = rjob(c.seq).epc_hex
            assert epc is not None
            assert_matches_truth(sim, c, epc)
        assert [u.defect for u in sim.units] == ["rfid_wrong_epc", "rfid_wrong_epc", None]
    finally:
        await close(sim, drv)


async def test_rfid_no_answer_is_never_confirmed_good() -> None:
    sim, drv = await pair(rfid={"verify_timeout_s": 0.3})
    try:
        sim.inject("no_answer")
        await drv.send(rjob(1))
        await drv.send(rjob(2))
        confirms = {c.seq: c for c in await collect(drv, 2)}
        assert confirms[1].rfid_status == "no_answer" and confirms[1].epc_read is None
        assert confirms[2].rfid_status == "ok"
        assert [s for s, _ in drv.unconfirmed] == [1]
        epc = rjob(1).epc_hex
        assert epc is not None
        assert_matches_truth(sim, confirms[1], epc)
        assert truth_for(sim, epc)[0].tag_epc == epc  # the tag was fine: a false reject, the safe side
    finally:
        await close(sim, drv)


async def test_rfid_sgtin198_writes_the_pc_word() -> None:
    sim, drv = await pair()
    try:
        epc = sgtin198("6789AB")
        await drv.send(rjob(1, epc))
        c = (await collect(drv, 1))[0]
        assert c.rfid_status == "ok" and c.epc_read == epc
        t = truth_for(sim, epc)[0]
        assert t.tag_pc == "6800" and t.tag_epc == epc and sim.units[0].rfid_epc == epc
    finally:
        await close(sim, drv)


async def test_rfid_sgtin198_on_a_128_bit_tag_voids() -> None:
    sim, drv = await pair(tag_epc_bits=128)
    try:
        await drv.send(rjob(1, sgtin198("ABCDEFGHIJKLMNOPQRST")))
        await drv.send(rjob(2))  # a 96-bit EPC fits
        confirms = {c.seq: c for c in await collect(drv, 2)}
        assert confirms[1].rfid_status == "void" and confirms[2].rfid_status == "ok"
        assert truth_for(sim, sgtin198("ABCDEFGHIJKLMNOPQRST"))[0].void
    finally:
        await close(sim, drv)


async def test_rfid_retries_on_the_next_label_then_ok() -> None:
    sim, drv = await pair(rfid={"labels_per_format": 3})
    try:
        sim.inject("void", count=2)
        await drv.send(rjob(1))
        c = (await collect(drv, 1))[0]
        assert c.rfid_status == "ok" and c.rfid_void_labels == 2
        epc = rjob(1).epc_hex
        assert epc is not None
        assert [t.void for t in truth_for(sim, epc)] == [True, True, False]
        assert_matches_truth(sim, c, epc)
        sim.inject("void", count=3)  # all three labels fail: the printer drops the format (N)
        await drv.send(rjob(2))
        c2 = (await collect(drv, 1))[0]
        assert c2.rfid_status == "void" and c2.rfid_void_labels == 3 and "dropped" in c2.rfid_reason
    finally:
        await close(sim, drv)


async def test_rfid_error_mode_stops_the_printer_until_cleared() -> None:
    sim, drv = await pair(rfid={"error_handling": "E"})
    try:
        sim.inject("void")
        await drv.send(rjob(1))
        await wait_for(lambda: "error mode" in drv.health.reason, timeout=3.0, what="RFID halt", interval=0.01)
        assert drv.health.state == HealthState.DISCONNECTED and sim.rfid_error is not None
        assert await collect(drv, 1, timeout=0.5) == []  # nothing confirmed while the format waits
        with pytest.raises(DeviceError, match="error mode"):
            await drv.send(rjob(2))
        sim.inject("clear_fault")  # the operator clears it: the format is tried again
        c = (await collect(drv, 1))[0]
        assert c.seq == 1 and c.rfid_status == "ok" and c.rfid_void_labels == 1
        await wait_for(lambda: drv.health.state == HealthState.CONNECTED, timeout=3.0, what="back", interval=0.01)
    finally:
        await close(sim, drv)


async def test_rfid_error_mode_cancelled_format_is_unconfirmed() -> None:
    sim, drv = await pair(rfid={"error_handling": "E"})
    try:
        sim.inject("void")
        await drv.send(rjob(1))
        await wait_for(lambda: "error mode" in drv.health.reason, timeout=3.0, what="RFID halt", interval=0.01)
        await drv.clear()
        assert await collect(drv, 1, timeout=0.5) == []
        assert [s for s, _ in drv.unconfirmed] == [1] and sim.rfid_error is None
    finally:
        await close(sim, drv)


@pytest.mark.parametrize("seed", range(4))
async def test_rfid_random_faults_every_outcome_matches_the_truth(seed: int) -> None:
    sim, drv = await pair(
        seed=seed, rfid_void_rate=0.15, rfid_wrong_epc_rate=0.1, rfid_no_answer_rate=0.1, rfid={"verify_timeout_s": 0.3}
    )
    try:
        n = 30
        for i in range(1, n + 1):
            await drv.send(rjob(i))
        confirms = await collect(drv, n, timeout=10.0)
        assert sorted(c.seq for c in confirms) == list(range(1, n + 1))
        for c in confirms:
            epc = rjob(c.seq).epc_hex
            assert epc is not None
            assert_matches_truth(sim, c, epc)
        ok = [c for c in confirms if c.rfid_status == "ok"]
        assert 0 < len(ok) < n
        void_epcs = {t.epc_sent for t in sim.rfid_labels if t.void}
        assert not any(rjob(c.seq).epc_hex in void_epcs for c in ok)  # labels_per_format 1: a VOID job is never ok
    finally:
        await close(sim, drv)


async def test_rfid_trigger_mode_puts_the_tag_on_the_unit() -> None:
    sim, drv = await pair(print_time_s=10.0)
    try:
        sim.inject("void")
        for i in (1, 2):
            await drv.send(rjob(i))
        units = [SimUnit(seq=k) for k in (1, 2, 3)]
        for u in units:
            sim.on_trigger(u)
        assert units[0].rfid_void and units[0].defect == "rfid_void"
        assert units[1].rfid_epc == rjob(2).epc_hex and units[1].content == rjob(2).element_string
        assert units[2].rfid_epc is None and units[2].defect == "no_print"
        confirms = {c.seq: c.rfid_status for c in await collect(drv, 2)}
        assert confirms == {1: "void", 2: "ok"}
    finally:
        await close(sim, drv)


def test_rfid_ok_read_back_is_not_enough_during_a_print_fault() -> None:
    """A tag read back correctly on a label that left the printer during a fault stays unconfirmed."""
    from linectl.drivers.zpl import HostStatus, _Job

    drv = ZplPrinter("m", ZplConfig(driver="zpl", host="h", settle_s=0.0, rfid={}))
    drv._window_fault = False
    clean = HostStatus(False, False, 0, 0, False, False, False, False, False, False, False, 0)
    head_open = HostStatus(False, False, 0, 0, False, False, False, False, False, True, False, 0)
    for seq in (1, 2):
        epc = rjob(seq).epc_hex
        assert epc is not None
        j = _Job(seq, 0.0, epc=epc)
        drv._jobs.append(j)
        drv._rfid_open[seq] = j
        drv._on_verification(seq, ("3000" + epc).encode())
        assert drv._confirms.empty()  # read back, but the format has not been seen leaving the printer yet
        drv._account(head_open if seq == 1 else clean, float(seq))
        drv._account(clean, seq + 0.5)  # the poll after a fault is still uncertain; this one is clean
    got = []
    while not drv._confirms.empty():
        got.append(drv._confirms.get_nowait())
    assert [(c.seq, c.rfid_status) for c in got] == [(2, "ok")]
    assert [s for s, _ in drv.unconfirmed] == [1]
