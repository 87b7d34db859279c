"""LLRP RFID reader: the driver (llrpkit encoding) against the reader simulator (our encoding) over real TCP.

Each side proves the other: the driver encodes and decodes with llrpkit, the simulator with
simulators/llrp_wire.py, whose type numbers are checked here against the LLRP Toolkit's own definition
file. llrpkit's client and emulator stand in as the independent client and reader nobody here wrote.
What the driver decides for a window is compared with the simulator's ground truth of what was in the field.
"""

from __future__ import annotations

import asyncio
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import wait_for
from epcpy.epc_schemes import SGTIN
from epcpy.epc_schemes.sgtin import SGTINFilterValue
from llrpkit.client import LLRPClient, check_status
from llrpkit.emulator.core import EmulatedTag, LLRPEmulator
from llrpkit.inventory import build_rospec
from llrpkit.protocol import messages
from llrpkit.reader import Reader
from pydantic import ValidationError

from linectl.drivers.base import DeviceError, Health, HealthState
from linectl.drivers.llrp import LlrpConfig, LlrpReader
from linectl.simulators import llrp_wire as w
from linectl.simulators.llrp_reader import LlrpReaderSim, demo_epcs

DEF_XML = Path(__file__).parent / "data" / "llrp" / "llrp-1x0-def.xml"
FAST: dict[str, Any] = {
    "backoff_initial_s": 0.05, "backoff_max_s": 0.2, "reply_timeout_s": 0.5, "connect_timeout_s": 3.0,
    "keepalive_s": 0.1, "keepalive_timeout_s": 0.4,
}
SGTIN198_URN = "urn:epc:id:sgtin:0614141.812345.ABC-12%2F3"


def sgtin198_hex() -> str:
    """A SGTIN-198 as epcpy (not us) encodes it: 198 bits padded to 13 words, as the tag's EPC bank holds it."""
    kw: Any = {"binary_coding_scheme": SGTIN.BinaryCodingScheme.SGTIN_198, "filter_value": SGTINFilterValue.POS_ITEM}
    return str(SGTIN(SGTIN198_URN).hex(**kw)).lower()


@pytest.fixture
async def sim() -> AsyncIterator[LlrpReaderSim]:
    s = LlrpReaderSim(seed=7)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


class Recorder:
    def __init__(self) -> None:
        self.seen: list[Health] = []

    def __call__(self, _drv: Any, h: Health) -> None:
        self.seen.append(h)

    def reasons(self, state: HealthState) -> list[str]:
        return [h.reason for h in self.seen if h.state == state]


async def until(pred: Any, timeout: float = 3.0, what: str | None = None) -> None:
    """engine_helpers.wait_for, saying which condition timed out (the lambda's source line)."""
    import inspect

    await wait_for(pred, timeout, what or inspect.getsource(pred).strip())


def make(port: int, **kw: Any) -> LlrpReader:
    return LlrpReader("tunnel", LlrpConfig(driver="llrp", host="127.0.0.1", port=port, **{**FAST, **kw}))


async def connected(drv: LlrpReader, timeout: float = 5.0) -> LlrpReader:
    await drv.start()
    assert await drv.wait_connected(timeout), drv.health
    return drv


# --------------------------------------------------------------------------- our encoding vs the LLRP Toolkit definitions


def test_wire_numbers_match_the_llrp_toolkit_definitions() -> None:
    root = ET.parse(DEF_XML).getroot()
    ns = {"d": "http://www.llrp.org/ltk/schema/core/encoding/binary/1.0"}
    msgs = {e.get("name"): int(e.get("typeNum", "-1")) for e in root.findall("d:messageDefinition", ns)}
    prms = {e.get("name"): e for e in root.findall("d:parameterDefinition", ns)}
    for m in w.Msg:
        assert msgs[m.name] == m.value, m
    sizes = {"u8": 1, "s8": 1, "u16": 2, "s16": 2, "u32": 4, "u64": 8, "u96": 12}
    for p in w.Param:
        definition = prms["Custom" if p is w.Param.Custom else p.name]
        assert int(definition.get("typeNum", "-1")) == p.value, p
        if p.value < 128:  # TV: the fixed size is the sum of its fields
            assert w.TV_SIZES[p] == sum(sizes[f.get("type", "")] for f in definition.findall("d:field", ns)), p
    assert set(w.TV_SIZES) == {p.value for p in w.Param if p.value < 128}

    def enum(name: str) -> dict[str, int]:
        e = root.find(f"d:enumerationDefinition[@name='{name}']", ns)
        assert e is not None, name
        return {x.get("name", ""): int(x.get("value", "-1")) for x in e.findall("d:entry", ns)}

    status = enum("StatusCode")
    assert all(status[s.name] == s.value for s in w.Status)
    assert {s.name: s.value for s in w.ConnectionAttempt} == enum("ConnectionAttemptStatusType")
    assert {s.name: s.value for s in w.StartTrigger} == enum("ROSpecStartTriggerType")
    assert {s.name: s.value for s in w.StopTrigger} == enum("ROSpecStopTriggerType")
    assert {s.name.rstrip("_"): s.value for s in w.ReportTrigger} == enum("ROReportTriggerType")
    assert {s.name: s.value for s in w.RoSpecEventType} == enum("ROSpecEventType")
    assert enum("NotificationEventType")["ROSpec_Event"] == w.NOTIFY_ROSPEC_EVENT
    assert enum("KeepaliveTriggerType")["Periodic"] == w.KEEPALIVE_PERIODIC
    assert enum("AirProtocols")["EPCGlobalClass1Gen2"] == w.AIR_PROTOCOL_C1G2


def test_demo_epcs_are_sgtin96_of_the_tds_example_gtin() -> None:
    for epc in demo_epcs(5, seed=3):
        uri = SGTIN.from_hex(epc.upper()).epc_uri
        assert re.fullmatch(r"urn:epc:id:sgtin:0614141\.812345\.\d+", uri), uri


# --------------------------------------------------------------------------- config


def test_config_refuses_what_cannot_work() -> None:
    base = {"driver": "llrp", "host": "10.0.0.5"}
    assert LlrpConfig(**base).port == 5084
    with pytest.raises(ValidationError, match="keepalive_timeout_s must be longer"):
        LlrpConfig(**base, keepalive_s=2.0, keepalive_timeout_s=2.0)
    with pytest.raises(ValidationError, match="antenna ID 0"):
        LlrpConfig(**base, antennas=[0, 1])
    with pytest.raises(ValidationError, match="listed twice"):
        LlrpConfig(**base, antennas=[1, 1])
    with pytest.raises(ValidationError):
        LlrpConfig(**base, session=4)
    with pytest.raises(ValidationError, match="extra"):
        LlrpConfig(**base, window=3)


async def test_antenna_the_reader_lacks_is_the_health_reason(sim: LlrpReaderSim) -> None:
    drv = make(sim.port, antennas=[1, 5])
    await drv.start()
    try:
        await until(lambda: "antennas [5] configured but the reader has 4" in drv.health.reason, timeout=5)
        assert drv.health.state == HealthState.DISCONNECTED
    finally:
        await drv.stop()


# --------------------------------------------------------------------------- connect, set-up, previous client's ROSpec


async def test_connect_handshake_sets_up_the_reader(sim: LlrpReaderSim) -> None:
    drv = await connected(make(sim.port, session=2, tag_population=150, antennas=[1, 3]))
    try:
        assert [r for r in sim.requests if r != "KEEPALIVE_ACK"][:5] == [
            "GET_READER_CAPABILITIES", "SET_READER_CONFIG", "GET_ROSPECS", "ADD_ROSPEC", "ENABLE_ROSPEC",
        ]
        assert drv.max_antennas == 4
        spec = sim.rospecs[drv.config.rospec_id]
        assert spec.state == "Inactive"  # enabled, waiting for a window
        ai = spec.spec.ai_specs[0]
        assert (ai.antenna_ids, ai.session, ai.tag_population) == ((1, 3), 2, 150)
        assert sim.keepalive_ms == 100 and sim.notifications[w.NOTIFY_ROSPEC_EVENT] is True
        await until(lambda: sim.keepalive_acks >= 2, timeout=2)  # the driver answers KEEPALIVEs
        assert drv.health.state == HealthState.CONNECTED and sim.connections == 1
    finally:
        await drv.stop()
    await until(lambda: not sim.connected, timeout=2)
    assert drv.config.rospec_id not in sim.rospecs  # stop() leaves the reader idle
    assert sim.requests[-2:] == ["DELETE_ROSPEC", "CLOSE_CONNECTION"]


async def test_previous_clients_rospec_is_deleted_and_llrpkit_client_is_refused_meanwhile(sim: LlrpReaderSim) -> None:
    """llrpkit's own client (not the driver's code) holds the reader with an active ROSpec, then leaves it behind."""
    sim.field_enter(demo_epcs(1, seed=1)[0])
    other = LLRPClient("127.0.0.1", sim.port, response_timeout=2.0)
    await other.connect()
    check_status(await other.transact(messages.ADD_ROSPEC(ro_spec=build_rospec(ro_spec_id=7, report_every_n=1))))
    check_status(await other.transact(messages.ENABLE_ROSPEC(ro_spec_id=7)))
    check_status(await other.transact(messages.START_ROSPEC(ro_spec_id=7)))
    report = await asyncio.wait_for(other.reports.get(), 2)
    assert report.tag_report_datas[0].antenna_id is not None

    rec = Recorder()
    drv = make(sim.port)
    drv.on_health(rec)
    await drv.start()
    try:
        await until(lambda: sim.refused >= 1, timeout=3)
        await until(lambda: drv.health.reason.endswith("reader refused the connection: another client is connected"), timeout=3)
        assert drv.health.state == HealthState.DISCONNECTED
        await other.close()  # CLOSE_CONNECTION, ROSpec 7 left active on the reader
        assert sim.rospecs[7].state == "Active"
        assert await drv.wait_connected(5)
        assert set(sim.rospecs) == {drv.config.rospec_id} and drv.deleted_rospecs == 1
        assert [wt.ro_spec_id for wt in sim.windows] == [7]  # the old ROSpec ended when it was deleted
        window = await drv.read_window(0.1)
        assert window.epcs == sim.windows[-1].readable == set(sim.field)
        assert not any("driver error" in r for r in rec.reasons(HealthState.DISCONNECTED))
    finally:
        await drv.stop()
        await other.close()


async def test_llrpkit_reader_inventories_the_simulator(sim: LlrpReaderSim) -> None:
    """llrpkit's high-level Reader, an independent client, gets every tag with antenna and RSSI."""
    epcs = demo_epcs(12, seed=5)
    for i, e in enumerate(epcs):
        sim.field_enter(e, antenna=1 + i % 2, rssi=-40 - i)
    async with Reader("127.0.0.1", sim.port, response_timeout=2.0) as reader:
        assert reader.max_antennas == 4 and not reader.is_impinj
        seen = {}
        async for tag in reader.inventory(antennas=[1, 2], session=1, duration=0.3):
            seen[tag.epc_hex] = tag
    assert set(seen) == set(epcs)
    for i, e in enumerate(epcs):
        assert seen[e].antenna == 1 + i % 2
        assert seen[e].rssi_dbm is not None and abs(seen[e].rssi_dbm - (-40 - i)) <= sim.rssi_jitter
        assert seen[e].first_seen_us is not None and seen[e].seen_count == 1
    assert sim.rospecs == {}  # llrpkit deleted its ROSpec on the way out


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("every_n", [None, 10])
async def test_window_of_120_tags_is_complete_with_antenna_and_rssi(sim: LlrpReaderSim, every_n: int | None) -> None:
    sgtin198 = sgtin198_hex()
    epcs = [*demo_epcs(119, seed=11), sgtin198]
    want: dict[str, tuple[int, int]] = {}
    for i, e in enumerate(epcs):
        want[e] = (1 + i % 4, -45 - i % 20)
        sim.field_enter(e, antenna=want[e][0], rssi=want[e][1])
    drv = await connected(make(sim.port, report_every_n_tags=every_n))
    try:
        window = await drv.read_window(0.25)
    finally:
        await drv.stop()
    truth = sim.windows[-1]
    assert window.complete and window.epcs == truth.readable == set(epcs) == truth.reported
    assert len(window.tags) == 120
    assert window.reports == 120  # session 1: each tag answers once per window, whether reported in one go or every 10
    if every_n is not None:
        assert sim.reports_sent >= 12
    for t in window.tags:
        antenna, rssi = want[t.epc_hex]
        assert t.antenna == antenna
        assert t.peak_rssi is not None and abs(t.peak_rssi - rssi) <= sim.rssi_jitter
        assert t.first_seen_us is not None and t.last_seen_us is not None
        assert window.started_at * 1e6 - 5e5 <= t.first_seen_us <= t.last_seen_us <= window.ended_at * 1e6
        assert t.epc_bits == (208 if t.epc_hex == sgtin198 else 96)
    by_epc = {t.epc_hex: t for t in window.tags}
    assert SGTIN.from_hex(by_epc[sgtin198].epc_hex.upper()).epc_uri == SGTIN198_URN  # EPCData bits, decoded by epcpy


async def test_session_0_reads_repeatedly_and_merges_counts(sim: LlrpReaderSim) -> None:
    epcs = demo_epcs(3, seed=2)
    for e in epcs:
        sim.field_enter(e, rssi=-60)
    drv = await connected(make(sim.port, session=0))
    try:
        window = await drv.read_window(0.2)
    finally:
        await drv.stop()
    assert window.epcs == set(epcs)
    assert all(t.seen_count > 3 for t in window.tags)  # merged by the reader (TagSeenCount) over the window
    assert window.reports == 3  # N=0: one TagReportData per tag at the end of the window


async def test_stray_dead_other_epc_two_tags_and_a_lingering_tag_against_truth(sim: LlrpReaderSim) -> None:
    case_a = demo_epcs(8, seed=21)
    case_b = demo_epcs(4, seed=22)
    wrong = demo_epcs(1, seed=23)[0]
    for i, e in enumerate(case_a[:5]):
        sim.field_enter(e, unit=f"A{i}")
    sim.field_enter(case_a[5], unit="A5", dead=True)  # in the field, never answers
    sim.field_enter(case_a[6], unit="A6", reports_as=wrong)  # encoded with another EPC
    sim.field_enter(case_a[7], unit="A0")  # a second tag on unit A0
    sim.field_enter(case_b[0], unit="B0", stray=True)  # neighbouring case at the edge of the field
    drv = await connected(make(sim.port))
    try:
        first = await drv.read_window(0.1)
        t1 = sim.windows[-1]
        assert first.epcs == t1.readable == t1.reported
        assert case_a[5] in t1.in_field and case_a[5] not in first.epcs and t1.where(dead=True) == {case_a[5]}
        assert wrong in first.epcs and case_a[6] not in first.epcs
        assert {e for e, t in t1.in_field.items() if t.unit == "A0"} == {case_a[0], case_a[7]} <= first.epcs
        stray = {t.epc_hex: t for t in first.tags}[case_b[0]]
        assert t1.where(stray=True) == {case_b[0]} and stray.peak_rssi is not None and stray.peak_rssi <= -70
        assert all(t.peak_rssi is not None and t.peak_rssi >= -52 for t in first.tags if t.epc_hex != case_b[0])

        # case A leaves, but one of its tags lingers into case B's window
        for e in case_a:
            sim.field_leave(e, after_windows=1 if e == case_a[1] else 0)
        sim.field_leave(case_b[0])
        for i, e in enumerate(case_b):
            sim.field_enter(e, unit=f"B{i}")
        second = await drv.read_window(0.1)
        t2 = sim.windows[-1]
        assert second.epcs == t2.readable == set(case_b) | {case_a[1]}
        assert case_a[1] in first.epcs and case_a[1] in second.epcs  # seen in two windows, and truly there in both
        assert case_a[1] not in sim.field  # gone after its extra window
        third = await drv.read_window(0.05)
        assert third.epcs == set(case_b) == sim.windows[-1].readable
    finally:
        await drv.stop()


async def test_empty_window_and_window_api_misuse(sim: LlrpReaderSim) -> None:
    drv = await connected(make(sim.port))
    try:
        window = await drv.read_window(0.05)
        assert window.tags == () and window.complete and window.reports == 0
        with pytest.raises(DeviceError, match="no inventory window is open"):
            await drv.end_window()
        await drv.start_window()
        with pytest.raises(DeviceError, match="already open"):
            await drv.start_window()
        sim.field_enter(demo_epcs(1, seed=9)[0])  # enters while the window is open
        await asyncio.sleep(0.05)
        window = await drv.end_window()
        assert window.epcs == set(sim.field) == sim.windows[-1].readable
        with pytest.raises(DeviceError, match="trigger: continuous"):
            await drv.tags().__anext__()
    finally:
        await drv.stop()


async def test_continuous_mode_streams_tags(sim: LlrpReaderSim) -> None:
    first = demo_epcs(2, seed=31)
    for e in first:
        sim.field_enter(e, antenna=2)
    drv = await connected(make(sim.port, trigger="continuous"))
    late = demo_epcs(1, seed=32)[0]
    seen: set[str] = set()
    try:
        assert sim.rospecs[drv.config.rospec_id].state == "Active"
        with pytest.raises(DeviceError, match="windows need trigger: window"):
            await drv.start_window()

        async def collect() -> None:
            async for t in drv.tags():
                assert t.antenna == 2 and t.epc_hex in sim.field
                seen.add(t.epc_hex)
                if seen == {*first, late}:
                    return
                if seen == set(first):
                    sim.field_enter(late, antenna=2)

        await asyncio.wait_for(collect(), 3)
    finally:
        await drv.stop()
    assert seen == {*first, late}


# --------------------------------------------------------------------------- faults: the link


async def test_keepalive_loss_drops_and_reconnects(sim: LlrpReaderSim) -> None:
    rec = Recorder()
    drv = make(sim.port)
    drv.on_health(rec)
    await connected(drv)
    try:
        sim.inject("keepalive_loss")
        await until(lambda: rec.reasons(HealthState.DISCONNECTED), timeout=3)
        assert rec.reasons(HealthState.DISCONNECTED)[0] == "no message from the reader for 0.4s (KEEPALIVE expected every 0.1s)"
        sim.inject("keepalive_loss", on=False)
        assert await drv.wait_connected(3)
        assert sim.connections >= 2
        sim.field_enter(demo_epcs(1, seed=41)[0])
        assert (await drv.read_window(0.05)).epcs == set(sim.field)
    finally:
        await drv.stop()


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ("garbage", "malformed LLRP from the reader: "),
        ("bad_length", "message length 6 is shorter than the 10-byte header"),
        ("huge_length", "message length 2147483632 exceeds max_message_bytes 1048576"),
        ("unknown_type", "unknown message type 999"),
        ("truncated", "truncated message: type 61 announced 210 bytes"),
        ("bad_parameter", "undecodable message type 61"),
    ],
)
async def test_malformed_message_drops_with_a_clear_reason_and_reconnects(sim: LlrpReaderSim, variant: str, reason: str) -> None:
    rec = Recorder()
    drv = make(sim.port)
    drv.on_health(rec)
    await connected(drv)
    try:
        if variant == "truncated":
            sim.inject("keepalive_loss")  # nothing else on the wire to complete the cut message
        sim.inject("malformed", variant=variant)
        await until(lambda: bool(rec.reasons(HealthState.DISCONNECTED)), timeout=3)
        got = rec.reasons(HealthState.DISCONNECTED)[0]
        assert got.startswith("malformed LLRP from the reader: ") and reason in got, got
        assert not any(r.startswith("driver error") for r in rec.reasons(HealthState.DISCONNECTED))  # no exception escaped
        sim.inject("keepalive_loss", on=False)
        await until(lambda: sim.connections >= 2 and drv.health.state == HealthState.CONNECTED, timeout=5)
        sim.field_enter(demo_epcs(1, seed=51)[0])
        assert (await drv.read_window(0.05)).epcs == set(sim.field)
    finally:
        await drv.stop()


async def test_connection_lost_during_a_window_is_never_a_window(sim: LlrpReaderSim) -> None:
    sim.field_enter(demo_epcs(1, seed=61)[0])
    rec = Recorder()
    drv = make(sim.port)
    drv.on_health(rec)
    await connected(drv)
    try:
        await drv.start_window()
        sim.inject("drop")
        await until(lambda: rec.reasons(HealthState.DISCONNECTED), timeout=3)
        with pytest.raises(DeviceError, match="connection lost during the window"):
            await drv.end_window()
        assert await drv.wait_connected(3)
        assert (await drv.read_window(0.05)).epcs == set(sim.field)
    finally:
        await drv.stop()


# --------------------------------------------------------------------------- the driver against a reader nobody here wrote


async def test_driver_against_llrpkit_emulator() -> None:
    """llrpkit's emulator sends no ROSpec events: windows close on the timeout, marked incomplete, tags still right."""
    tags = [EmulatedTag(epc=bytes.fromhex(e), antennas=(1,), rssi_dbm=-50.0) for e in demo_epcs(4, seed=71)]
    async with LLRPEmulator(tags=tags, reads_per_sec=400.0, seed=3) as emu:
        drv = await connected(make(emu.port, reply_timeout_s=0.3))
        try:
            window = await drv.read_window(0.4)
            await asyncio.sleep(0.3)  # keepalives from the emulator keep the link up past keepalive_timeout_s
            assert drv.health.state == HealthState.CONNECTED and emu.keepalive_acks >= 1
        finally:
            await drv.stop()
    assert window.epcs and window.epcs <= {t.epc.hex() for t in tags}
    assert not window.complete and drv.windows_without_end == 1
    assert all(t.antenna == 1 and t.peak_rssi is not None for t in window.tags)


async def test_reader_refusing_delete_all_gets_its_rospecs_deleted_one_by_one() -> None:
    sim = LlrpReaderSim(delete_all=False)
    await sim.start()
    try:
        other = LLRPClient("127.0.0.1", sim.port)
        await other.connect()
        for i in (3, 4):
            check_status(await other.transact(messages.ADD_ROSPEC(ro_spec=build_rospec(ro_spec_id=i))))
        await other.close()
        drv = await connected(make(sim.port))
        try:
            assert drv.deleted_rospecs == 2 and set(sim.rospecs) == {drv.config.rospec_id}
            assert sim.requests.count("DELETE_ROSPEC") == 3  # ID 0 refused, then 3 and 4
        finally:
            await drv.stop()
    finally:
        await sim.stop()
