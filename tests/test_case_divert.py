"""Case reject pusher: every case decision reaches the PLC over the real protocol, and a PLC outage loses none.

The case station runs through the aggregation Rig (camera, ZPL labeller and
scanner simulators, the real Line) with a PlcSim behind pymodbus' own server
or snap7's own server. What the PLC holds is read back over the wire with a
separate protocol client, the way a PLC programmer's tool would see it, and
the simulated pusher program reports each change of case_seq it acted on.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import wait_for
from test_aggregation_support import FAST, Rig, commission, config, new_batch, sim_unit

from linectl import gs1
from linectl.drivers.plc_tags import CASE_ACCEPT, CASE_REJECT
from linectl.simulators.plc import DEFAULT_MODBUS_TAGS, DEFAULT_S7_TAGS
from linectl.yamlsource import ConfigFileError

MB_RESULT = DEFAULT_MODBUS_TAGS["case_result"]["address"]  # uint16
MB_SEQ = DEFAULT_MODBUS_TAGS["case_seq"]["address"]  # uint32, two registers, big word order
S7_RESULT = int(DEFAULT_S7_TAGS["case_result"]["offset"])  # INT
S7_SEQ = int(DEFAULT_S7_TAGS["case_seq"]["offset"])  # UDINT


# --------------------------------------------------------------------------- over-the-wire readers


async def modbus_case_tags(port: int) -> tuple[int, int]:
    """(case_result, case_seq) read with a fresh pymodbus client, decoded by hand (not by linectl's tag code)."""
    from pymodbus.client import AsyncModbusTcpClient

    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
    assert await client.connect()
    try:
        rr = await client.read_holding_registers(MB_RESULT, count=MB_SEQ + 2 - MB_RESULT, device_id=1)
        assert not rr.isError(), rr
        regs = list(rr.registers)
    finally:
        client.close()
    return regs[0], (regs[MB_SEQ - MB_RESULT] << 16) | regs[MB_SEQ - MB_RESULT + 1]


def s7_case_tags(port: int) -> tuple[int, int]:
    """(case_result, case_seq) read from DB1 with a fresh snap7 client."""
    import snap7

    client = snap7.Client()
    client.connect("127.0.0.1", 0, 1, tcp_port=port)
    try:
        data = client.db_read(1, S7_RESULT, S7_SEQ + 4 - S7_RESULT)
    finally:
        client.disconnect()
    (result,) = struct.unpack_from(">h", data, 0)
    (seq,) = struct.unpack_from(">I", data, S7_SEQ - S7_RESULT)
    return result, seq


def plc_port(rig: Rig) -> int:
    return rig.cfg.devices["caseplc"].port


async def pusher_saw(rig: Rig, n: int) -> list[tuple[int, int]]:
    """The simulated pusher program's decisions, once it has acted on n of them (it scans every few ms)."""
    await wait_for(lambda: len(rig.plc_sim.case_decisions) >= n, 5.0, f"{n} pusher decisions")
    return list(rig.plc_sim.case_decisions)


def alarm_messages(rig: Rig, code: str) -> list[str]:
    rows = rig.store.outbox(0, 100000, only_unforwarded=False)
    return [r.event.message for r in rows if r.kind == "alarm" and r.event.code == code]


# --------------------------------------------------------------------------- Modbus TCP


async def test_every_case_decision_reaches_the_plc_over_modbus(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, per_case=4, label_reader=True, plc="modbus_tcp").start()
    try:
        await rig.create_batch()
        s = await commission(rig.store, 20)
        await new_batch(rig.store, "LOTB")
        foreign = await commission(rig.store, 1, lot="LOTB")
        port = plc_port(rig)
        assert await modbus_case_tags(port) == (0, 0)

        # accepted case -> 1, seq 1
        res = await rig.frame([sim_unit(i, x) for i, x in enumerate(s[0:4], 1)])
        assert res.ok
        assert await modbus_case_tags(port) == (CASE_ACCEPT, 1)

        # wrong count: rejected before an SSCC exists -> 2, seq 2
        res = await rig.frame([sim_unit(i, x) for i, x in enumerate(s[4:7], 10)])
        assert not res.ok and res.reason == "count_short" and res.sscc is None
        assert await modbus_case_tags(port) == (CASE_REJECT, 2)

        # a unit of another lot, right after: the same result again, but a new seq -> 2, seq 3
        res = await rig.frame([sim_unit(20, foreign[0], lot="LOTB"), *[sim_unit(i, x) for i, x in enumerate(s[7:10], 21)]])
        assert not res.ok and res.reason == "other_batch"
        assert await modbus_case_tags(port) == (CASE_REJECT, 3)

        # rejected after its SSCC was allocated and labelled (label reads back another SSCC) -> 2, seq 4
        rig.label_override = lambda label: "00" + gs1.make_sscc(0, "4012345", 999)
        res = await rig.frame([sim_unit(i, x) for i, x in enumerate(s[10:14], 30)])
        rig.label_override = None
        assert not res.ok and res.reason == "label_mismatch" and res.sscc is not None
        assert await modbus_case_tags(port) == (CASE_REJECT, 4)

        # and an accepted case after the rejects -> 1, seq 5
        res = await rig.frame([sim_unit(i, x) for i, x in enumerate(s[14:18], 40)])
        assert res.ok
        assert await modbus_case_tags(port) == (CASE_ACCEPT, 5)

        # the PLC program acted once per decision, each time on the result written before the seq
        assert await pusher_saw(rig, 5) == [(1, 1), (2, 2), (3, 2), (4, 2), (5, 1)]
        assert (rig.plc_sim.cases_passed, rig.plc_sim.cases_diverted) == (2, 3)
        counters = rig.rt.snapshot()["counters"]
        assert counters["plc_signalled"] == 5 and counters["plc_signal_failed"] == 0
        assert counters["recorded"] == 2 and counters["rejected_total"] == 3
        assert alarm_messages(rig, "case_signal_failed") == []
    finally:
        await rig.stop()


async def test_seq_continues_from_what_the_plc_holds_and_wraps(tmp_path: Path) -> None:
    """A restarted linectl must not write the value the PLC already holds; a 16-bit counter wraps to 0."""
    tags = {**DEFAULT_MODBUS_TAGS, "case_seq": {"table": "holding", "address": MB_SEQ, "type": "uint16"}}
    rig = await Rig(tmp_path, per_case=2, plc="modbus_tcp", plc_tags=tags).start()
    try:
        await rig.create_batch()
        s = await commission(rig.store, 4)
        rig.plc_sim.set("case_seq", 65534)  # what an earlier run left in the PLC
        await pusher_saw(rig, 1)
        res = await rig.frame([sim_unit(1, s[0]), sim_unit(2, s[1])])
        assert res.ok
        res = await rig.frame([sim_unit(3, s[2])])
        assert not res.ok
        res = await rig.frame([sim_unit(4, s[2]), sim_unit(5, s[3])])
        assert res.ok
        decisions = (await pusher_saw(rig, 4))[1:]
        assert decisions == [(65535, CASE_ACCEPT), (0, CASE_REJECT), (1, CASE_ACCEPT)]
    finally:
        await rig.stop()


async def test_result_is_in_place_before_the_seq_moves(tmp_path: Path) -> None:
    """A slow PLC scans between the two writes: the pusher must still never pair a new seq with the old result."""
    rig = await Rig(tmp_path, per_case=2, plc="modbus_tcp").start()
    try:
        await rig.create_batch()
        s = await commission(rig.store, 6)
        rig.plc_sim.inject("slow", delay_s=0.05, duration_s=30)
        assert (await rig.frame([sim_unit(1, s[0]), sim_unit(2, s[1])])).ok
        assert not (await rig.frame([sim_unit(3, s[2])])).ok
        assert (await rig.frame([sim_unit(4, s[2]), sim_unit(5, s[3])])).ok
        assert await pusher_saw(rig, 3) == [(1, CASE_ACCEPT), (2, CASE_REJECT), (3, CASE_ACCEPT)]
    finally:
        await rig.stop()


async def test_plc_outage_loses_no_decision(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, per_case=2, plc="modbus_tcp").start()
    try:
        await rig.create_batch()
        s = await commission(rig.store, 10)
        port = plc_port(rig)
        res = await rig.frame([sim_unit(1, s[0]), sim_unit(2, s[1])])
        assert res.ok and await modbus_case_tags(port) == (CASE_ACCEPT, 1)

        await rig.plc_sim.stop()
        # accepted while the PLC is away: still recorded, with its units packed; an alarm says the PLC was not told
        res = await rig.frame([sim_unit(3, s[2]), sim_unit(4, s[3])])
        assert res.ok and res.sscc is not None
        assert rig.store.container(res.sscc).state == "commissioned"
        msgs = alarm_messages(rig, "case_signal_failed")
        assert len(msgs) == 1 and res.sscc in msgs[0] and "caseplc" in msgs[0]
        # rejected while the PLC is away: still rejected, with its own reason alarm and a second signal alarm
        res = await rig.frame([sim_unit(5, s[4])])
        assert not res.ok and res.reason == "count_short"
        assert len(alarm_messages(rig, "case_signal_failed")) == 2
        assert any("count_short" in m for m in alarm_messages(rig, "case_rejected"))
        counters = rig.rt.snapshot()["counters"]
        assert counters["plc_signalled"] == 1 and counters["plc_signal_failed"] == 2
        assert counters["recorded"] == 2

        # the PLC comes back (same memory): the next decision continues from what it holds
        await rig.plc_sim.start()
        assert await rig.drivers["caseplc"].wait_connected(5)
        res = await rig.frame([sim_unit(6, s[5]), sim_unit(7, s[6])])
        assert res.ok
        assert await modbus_case_tags(port) == (CASE_ACCEPT, 2)
        assert rig.rt.snapshot()["counters"]["plc_signalled"] == 2
    finally:
        await rig.stop()


# --------------------------------------------------------------------------- S7


async def test_case_decisions_reach_an_s7_plc(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, per_case=2, plc="s7").start()
    try:
        await rig.create_batch()
        s = await commission(rig.store, 4)
        port = plc_port(rig)
        assert await asyncio.to_thread(s7_case_tags, port) == (0, 0)
        assert (await rig.frame([sim_unit(1, s[0]), sim_unit(2, s[1])])).ok
        assert await asyncio.to_thread(s7_case_tags, port) == (CASE_ACCEPT, 1)
        assert not (await rig.frame([sim_unit(3, s[2])])).ok
        assert not (await rig.frame([sim_unit(4, s[3])])).ok
        assert await asyncio.to_thread(s7_case_tags, port) == (CASE_REJECT, 3)
        assert await pusher_saw(rig, 3) == [(1, 1), (2, 2), (3, 2)]
    finally:
        await rig.stop()


# --------------------------------------------------------------------------- config


def _case_config(plc: str, devices: dict[str, Any]) -> Any:
    base = {
        "casecam": {"driver": "camera", "source": "/tmp/linectl-test-frames", "max_codes": 8},
        "labeler": {"driver": "zpl", "host": "127.0.0.1", "port": 9100},
        **devices,
    }
    st = {"type": "case", "name": "casepacker", "reader": "casecam", "printer": "labeler", "units_per_case": 4, "plc": plc}
    return config(base, [st])


def _plc(tags: dict[str, Any], driver: str = "modbus_tcp") -> dict[str, Any]:
    return {"driver": driver, "host": "127.0.0.1", "port": 1502, "tags": tags, **FAST}


def _problems(exc: pytest.ExceptionInfo[ConfigFileError]) -> list[tuple[str, str]]:
    return [(p.path, p.message) for p in exc.value.problems]


def test_case_plc_with_both_tags_is_accepted() -> None:
    cfg = _case_config("caseplc", {"caseplc": _plc(DEFAULT_MODBUS_TAGS)})
    assert cfg.stations[0].plc == "caseplc"
    cfg = _case_config("caseplc", {"caseplc": _plc(DEFAULT_S7_TAGS, "s7")})
    assert cfg.stations[0].plc == "caseplc"


def test_case_plc_must_be_a_plc() -> None:
    with pytest.raises(ConfigFileError) as exc:
        _case_config("labeler", {})
    assert _problems(exc) == [("stations.0.plc", "device 'labeler' is a printer, not a plc")]
    with pytest.raises(ConfigFileError) as exc:
        _case_config("nosuchplc", {})
    ((path, msg),) = _problems(exc)
    assert path == "stations.0.plc" and "no device named 'nosuchplc'" in msg


@pytest.mark.parametrize("missing", [("case_seq",), ("case_result",), ("case_result", "case_seq")])
def test_case_plc_without_the_divert_tags_is_refused(missing: tuple[str, ...]) -> None:
    tags = {k: v for k, v in DEFAULT_MODBUS_TAGS.items() if k not in missing}
    with pytest.raises(ConfigFileError) as exc:
        _case_config("caseplc", {"caseplc": _plc(tags)})
    ((path, msg),) = _problems(exc)
    assert path == "stations.0.plc"
    assert "case station 'casepacker'" in msg and "PLC 'caseplc'" in msg
    assert f"no {' / '.join(missing)} tag" in msg


@pytest.mark.parametrize(
    "spec, why",
    [
        ({"table": "holding", "address": 16, "type": "float32"}, "not float32"),
        ({"table": "holding", "address": 16, "type": "uint16", "count": 2}, "not uint16[2]"),
        ({"table": "input", "address": 16, "type": "uint16"}, "read-only table input"),
        ({"table": "coil", "address": 20, "type": "bool"}, "not bool"),
    ],
)
def test_case_seq_must_be_one_writable_integer(spec: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigFileError) as exc:
        _case_config("caseplc", {"caseplc": _plc({**DEFAULT_MODBUS_TAGS, "case_seq": spec})})
    ((path, msg),) = _problems(exc)
    assert path.startswith("devices.caseplc") and "case_seq" in msg and why in msg


def test_plc_on_a_pallet_station_is_not_a_key() -> None:
    st = {"type": "pallet", "name": "pal", "reader": "casecam", "printer": "labeler", "cases_per_pallet": 4, "plc": "caseplc"}
    with pytest.raises(ConfigFileError):
        config({"casecam": {"driver": "camera", "source": "/tmp/x", "max_codes": 8},
                "labeler": {"driver": "zpl", "host": "127.0.0.1", "port": 9100}, "caseplc": _plc(DEFAULT_MODBUS_TAGS)}, [st])

