"""PackTags on the PLC, end to end: a simulated PLC programmed to PackML drives a batch through CntrlCmd /
CmdChangeRequest over Modbus TCP, S7 and OPC UA (the protocol servers of pymodbus, python-snap7 and asyncua), and
reads StateCurrent back; refusals, an unknown command, a command changed mid-handshake and a PLC restart
mid-handshake, all judged from what the PLC program saw.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from linectl import control as C
from linectl.drivers.modbus import ModbusTcpConfig
from linectl.drivers.plc_tags import (
    PACKML_RESULT_CHANGED,
    PACKML_RESULT_DONE,
    PACKML_RESULT_INVALID_STATE,
    PACKML_RESULT_REFUSED,
    PACKML_RESULT_UNKNOWN_COMMAND,
)
from linectl.engine.packml import PackmlCommand as K
from linectl.engine.packml import PackmlState as S
from linectl.engine.packml import UnitMode
from linectl.simulators.plc import DEFAULT_S7_TAGS, PACKML_TAGS, free_tcp_port
from linectl.yamlsource import load_yaml, to_plain
from tests.engine_helpers import DEFAULT_CONFIG, db_query, sim, simulated_line, state_of, wait_async, wait_for, wait_good

PACKML_EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "packml-line.yaml"


def packml_line(tmp_path: Path, driver: str) -> Path:
    """The demo line with its gate PLC on `driver`, its tag map extended by the simulator's PackTags; for OPC UA the
    example config/packml-line.yaml as shipped (only its port made free)."""
    if driver == "opcua":
        raw = to_plain(load_yaml(PACKML_EXAMPLE))
        raw["devices"]["plc1"]["url"] = f"opc.tcp://127.0.0.1:{free_tcp_port()}"
        path = tmp_path / "packml-opcua.yaml"
        with open(path, "w", encoding="utf-8") as fh:
            YAML(typ="safe").dump(raw, fh)
        return path
    raw = to_plain(load_yaml(DEFAULT_CONFIG))
    plc = raw["devices"]["plc1"]
    if driver == "modbus_tcp":
        plc["port"] = free_tcp_port()
        plc["tags"] = {**plc["tags"], **PACKML_TAGS[driver]}
    elif driver == "s7":
        raw["devices"]["plc1"] = {"driver": "s7", "host": "127.0.0.1", "port": free_tcp_port(), "tags": {**DEFAULT_S7_TAGS, **PACKML_TAGS[driver]}}
    else:
        raise AssertionError(driver)
    path = tmp_path / f"packml-{driver}.yaml"
    with open(path, "w", encoding="utf-8") as fh:
        YAML(typ="safe").dump(raw, fh)
    return path


async def plc_packml(sl: Any) -> dict[str, Any]:
    st = await sim(sl, cmd="status")
    out: dict[str, Any] = st["devices"]["plc1"]["packml"]
    return out


async def send(sl: Any, command: str | int, timeout: float = 60.0, kind: str = "command") -> dict[str, Any]:
    """The PLC program sends one command (or unit mode) and waits for linectl's acknowledge; returns what it saw then."""
    before = len((await plc_packml(sl))["done"])
    await sim(sl, cmd="packml", device="plc1", **{kind: command})

    async def finished() -> Any:
        done = (await plc_packml(sl))["done"]
        return done[before] if len(done) > before else None

    got: dict[str, Any] = await wait_async(finished, timeout, f"the acknowledge of PackML {command}")
    return got


async def plc_state(sl: Any, want: S, timeout: float = 30.0) -> None:
    async def there() -> bool:
        return (await plc_packml(sl)).get("packml_state_current") == int(want)

    await wait_async(there, timeout, f"StateCurrent {want.name} on the PLC")


def packml_audit(sl: Any) -> list[tuple[str, str]]:
    rows = db_query(sl.db, "SELECT origin, detail FROM audit WHERE action = 'packml_command' ORDER BY seq")
    return [(origin, json.loads(detail)["command"]) for origin, detail in rows]


def gate_plc_commands(line: Any, after: Callable[[], Awaitable[None]] | None = None) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold PackML commands from a PLC just before the engine runs them (the real engine, paused), so the test can
    act on the PLC while a command is in progress; `after` runs once the engine has run it, before the surface
    acknowledges it."""
    entered, release = asyncio.Event(), asyncio.Event()
    real = line.execute

    async def gated(command: Any, origin: str, principal: Any = None) -> dict[str, Any]:
        plc = isinstance(command, C.PackmlCmd) and origin.startswith("plc:")
        if plc:
            entered.set()
            await release.wait()
        result: dict[str, Any] = await real(command, origin, principal)
        if plc and after is not None:
            await after()
        return result

    line.execute = gated
    return entered, release


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["modbus_tcp", "s7", "opcua"])
async def test_batch_driven_through_packtags(tmp_path: Path, driver: str) -> None:
    async with simulated_line(tmp_path, base=packml_line(tmp_path, driver), rate=900) as sl:
        await sl.create_batch(2000, challenge=False)
        await plc_state(sl, S.Stopped)
        assert (await plc_packml(sl))["packml_unit_mode_current"] == int(UnitMode.Production)
        # the unit mode through its own handshake (UnitMode + UnitModeChangeRequest): in Maintenance the state model
        # lets Start through but the line refuses to produce (4); an unknown mode (7) changes nothing (3)
        d = await send(sl, "Maintenance", kind="unit_mode")
        assert (d["result"], d["unit_mode_current"]) == (PACKML_RESULT_DONE, int(UnitMode.Maintenance)), d
        d = await send(sl, 7, kind="unit_mode")
        assert (d["result"], d["unit_mode_current"]) == (PACKML_RESULT_UNKNOWN_COMMAND, int(UnitMode.Maintenance)), d
        d = await send(sl, "Reset")
        assert (d["result"], d["state_current"]) == (PACKML_RESULT_DONE, int(S.Idle)), d
        d = await send(sl, "Start")
        assert (d["result"], d["state_current"]) == (PACKML_RESULT_REFUSED, int(S.Idle)), d
        assert state_of(sl) == "created"
        d = await send(sl, "Production", kind="unit_mode")
        assert (d["result"], d["unit_mode_current"]) == (PACKML_RESULT_DONE, int(UnitMode.Production)), d
        d = await send(sl, "Start")
        assert (d["result"], d["state_current"]) == (PACKML_RESULT_DONE, int(S.Execute)), d
        assert state_of(sl) == "running"
        d = await send(sl, "Manual", kind="unit_mode")  # not while producing: the state model refuses (2)
        assert (d["result"], d["unit_mode_current"], d["state_current"]) == (PACKML_RESULT_INVALID_STATE, int(UnitMode.Production), int(S.Execute)), d
        await wait_good(sl, 30)
        # the Admin counters reach the PLC while the batch runs
        async def counted() -> bool:
            return int((await plc_packml(sl))["packml_prod_processed_count"]) >= 30

        await wait_async(counted, 30, "ProdProcessedCount on the PLC")
        for cmd, want, engine in ((K.Hold, S.Held, "paused"), (K.Unhold, S.Execute, "running"), (K.Stop, S.Stopped, "stopped")):
            d = await send(sl, cmd.name)
            assert (d["result"], d["state_current"]) == (PACKML_RESULT_DONE, int(want)), (cmd, d)
            assert state_of(sl) == engine
        # refused: Hold in Stopped (the state model), an unknown number, and 0 (Undefined is no command)
        for bad, code in (("Hold", PACKML_RESULT_INVALID_STATE), ("Unhold", PACKML_RESULT_INVALID_STATE), (42, PACKML_RESULT_UNKNOWN_COMMAND),
                          (0, PACKML_RESULT_UNKNOWN_COMMAND), (-1, PACKML_RESULT_UNKNOWN_COMMAND)):
            d = await send(sl, bad)
            assert (d["result"], d["state_current"]) == (code, int(S.Stopped)), (bad, d)
            assert state_of(sl) == "stopped"
        pm = await plc_packml(sl)
        assert pm["packml_cmd_change_request"] is False
        pt = sl.line.packtags()
        assert pm["packml_state_current"] == int(pt.state) == int(S.Stopped)
        assert pm["packml_prod_processed_count"] == pt.admin.processed > 0
        # every command that ran came from the PLC, audited as such, once
        assert packml_audit(sl) == [("plc:plc1", n) for n in ("Reset", "Start", "Hold", "Unhold", "Stop")]
        modes = db_query(sl.db, "SELECT origin, detail FROM audit WHERE action = 'set_unit_mode' ORDER BY seq")
        assert [(o, json.loads(dt)["mode"]) for o, dt in modes] == [("plc:plc1", "Maintenance"), ("plc:plc1", "Production")]


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["modbus_tcp", "s7", "opcua"])
async def test_cntrl_cmd_changed_during_a_command(tmp_path: Path, driver: str) -> None:
    async with simulated_line(tmp_path, base=packml_line(tmp_path, driver), rate=900) as sl:
        await sl.create_batch(2000, challenge=False)
        await plc_state(sl, S.Stopped)  # linectl has looked at the PLC (a request up before that is refused as stale)
        assert (await send(sl, "Reset"))["state_current"] == int(S.Idle)
        entered, release = gate_plc_commands(sl.line)
        await sim(sl, cmd="packml", device="plc1", command="Start")
        await asyncio.wait_for(entered.wait(), 30)
        # a PLC program that overwrites CntrlCmd while its Start is being handled
        await sim(sl, cmd="set", device="plc1", tags={"packml_cntrl_cmd": int(K.Stop)})
        plc = sl.line.plcs[0]
        await wait_for(lambda: plc.latest().get("packml_cntrl_cmd") == int(K.Stop), 20, "linectl's poll to carry the new CntrlCmd")
        release.set()

        async def finished() -> Any:
            done = (await plc_packml(sl))["done"]
            return done[-1] if len(done) == 2 else None

        d = await wait_async(finished, 60, "the acknowledge of the Start")
        # Start ran (what was there at the request), the Stop written over it did not; the PLC is told so
        assert d["result"] == PACKML_RESULT_CHANGED and d["state_current"] == int(S.Execute), d
        assert state_of(sl) == "running"
        assert packml_audit(sl) == [("plc:plc1", "Reset"), ("plc:plc1", "Start")]
        # the handshake is free again: a proper Stop request works
        d = await send(sl, "Stop")
        assert (d["result"], d["state_current"]) == (PACKML_RESULT_DONE, int(S.Stopped)), d


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["modbus_tcp", "s7", "opcua"])
async def test_plc_restart_mid_handshake(tmp_path: Path, driver: str) -> None:
    async with simulated_line(tmp_path, base=packml_line(tmp_path, driver), rate=900) as sl:
        await sl.create_batch(2000, challenge=False)
        await plc_state(sl, S.Stopped)  # linectl has looked at the PLC (a request up before that is refused as stale)
        assert (await send(sl, "Reset"))["state_current"] == int(S.Idle)
        entered, release = gate_plc_commands(sl.line)
        await sim(sl, cmd="packml", device="plc1", command="Start")
        await asyncio.wait_for(entered.wait(), 30)
        await sim(sl, cmd="inject", device="plc1", fault="plc_restart", duration_s=3.0)
        # the restarted program has forgotten its request; linectl's acknowledge cannot reach it while it is down
        done = (await plc_packml(sl))["done"]
        assert done[-1].get("lost") == "plc_restart", done
        await wait_for(lambda: sl.line.plcs[0].health.state.value == "disconnected", 20, "linectl to see the PLC gone")
        release.set()
        # back: the request is down (cleared by the restart, never re-run), StateCurrent is the line's again
        async def agreed() -> bool:
            pm = await plc_packml(sl)
            return pm["packml_cmd_change_request"] is False and pm["packml_state_current"] == int(sl.line.packtags().state) != 0

        await wait_async(agreed, 30, "StateCurrent rewritten to the restarted PLC")
        starts = [c for _, c in packml_audit(sl) if c == "Start"]
        assert len(starts) <= 1, packml_audit(sl)
        assert state_of(sl) != "running", "a PLC restart mid-Start must not leave the line producing"
        await asyncio.sleep(1.0)  # several surface cycles: nothing is replayed to the restarted PLC
        assert len((await plc_packml(sl))["done"]) == len(done)
        assert [c for _, c in packml_audit(sl) if c == "Start"] == starts
        # the PLC drives the line again through the handshake
        state = S((await plc_packml(sl))["packml_state_current"])
        if state is S.Aborted:
            d = await send(sl, "Clear")
            assert (d["result"], d["state_current"]) == (PACKML_RESULT_DONE, int(S.Stopped)), d
        d = await send(sl, "Reset")
        assert (d["result"], d["state_current"]) == (PACKML_RESULT_DONE, int(S.Idle)), d


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["modbus_tcp", "s7", "opcua"])
async def test_link_lost_before_the_acknowledge(tmp_path: Path, driver: str) -> None:
    """The command ran, the link dropped before the acknowledge; the PLC kept its memory and still waits. linectl
    acknowledges it when the link is back, with the result it had, and does not run it a second time."""
    async with simulated_line(tmp_path, base=packml_line(tmp_path, driver), rate=900) as sl:
        await sl.create_batch(2000, challenge=False)
        await plc_state(sl, S.Stopped)

        async def cut() -> None:
            await sim(sl, cmd="inject", device="plc1", fault="disconnect", duration_s=2.0)
            await wait_for(lambda: sl.line.plcs[0].health.state.value == "disconnected", 20, "linectl to see the link down")

        entered, release = gate_plc_commands(sl.line, after=cut)
        release.set()
        d = await send(sl, "Reset")
        assert entered.is_set()
        # the acknowledge came after the outage, with Reset's own result; the PLC saw it as an ordinary handshake
        assert d["result"] == PACKML_RESULT_DONE and "lost" not in d, d
        assert d["took_s"] >= 1.5, f"acknowledged before the outage ended? {d}"
        assert packml_audit(sl) == [("plc:plc1", "Reset")]
        await asyncio.sleep(1.0)
        assert packml_audit(sl) == [("plc:plc1", "Reset")], "a command whose acknowledge was lost ran twice"


@pytest.mark.slow
async def test_estop_seen_while_a_packml_command_runs(tmp_path: Path) -> None:
    """A PackML command in progress (a Stop draining the belt, here a Start held) does not delay the e-stop."""
    async with simulated_line(tmp_path, base=packml_line(tmp_path, "modbus_tcp"), rate=900) as sl:
        await sl.create_batch(2000, challenge=False)
        await plc_state(sl, S.Stopped)
        assert (await send(sl, "Reset"))["state_current"] == int(S.Idle)
        entered, release = gate_plc_commands(sl.line)
        await sim(sl, cmd="packml", device="plc1", command="Start")
        await asyncio.wait_for(entered.wait(), 30)
        await sim(sl, cmd="set", device="plc1", tags={"estop": True})
        await wait_for(lambda: sl.line.fault == "estop", 20, "the e-stop fault while the Start is still in progress")
        assert not release.is_set()
        release.set()

        async def finished() -> Any:
            done = (await plc_packml(sl))["done"]
            return done[-1] if len(done) == 2 else None

        d = await wait_async(finished, 60, "the acknowledge of the Start")
        # the Start came after the e-stop: refused by the state model (Aborted takes only Clear), as the PLC reads
        assert (d["result"], d["state_current"]) == (PACKML_RESULT_INVALID_STATE, int(S.Aborted)), d
        assert state_of(sl) != "running"


def test_tag_map_refuses_a_half_handshake_and_wrong_types() -> None:
    base = {"heartbeat_plc": {"table": "coil", "address": 0, "type": "bool"}, "heartbeat_ctl": {"table": "coil", "address": 1, "type": "bool"}}

    def cfg(tags: dict[str, Any]) -> ModbusTcpConfig:
        return ModbusTcpConfig(driver="modbus_tcp", host="127.0.0.1", port=1502, tags={**base, **tags})

    ok = cfg(PACKML_TAGS["modbus_tcp"])
    assert "packml_cntrl_cmd" in ok.tags
    with pytest.raises(ValueError, match="handshake incomplete.*packml_cmd_result missing"):
        cfg({k: v for k, v in PACKML_TAGS["modbus_tcp"].items() if k != "packml_cmd_result"})
    mode = {k: v for k, v in PACKML_TAGS["modbus_tcp"].items() if k not in ("packml_cntrl_cmd", "packml_cmd_change_request")}
    assert "packml_unit_mode" in cfg(mode).tags  # the unit mode handshake alone is complete
    with pytest.raises(ValueError, match="handshake incomplete.*packml_unit_mode_change_request missing"):
        cfg({k: v for k, v in mode.items() if k != "packml_unit_mode_change_request"})
    with pytest.raises(ValueError, match="packml_cmd_result without"):
        cfg({"packml_cmd_result": mode["packml_cmd_result"]})
    with pytest.raises(ValueError, match="packml_state_current must be a single integer"):
        cfg({"packml_state_current": {"table": "holding", "address": 10, "type": "float32"}})
    with pytest.raises(ValueError, match="packml_cntrl_cmd must be a single integer"):
        cfg({**PACKML_TAGS["modbus_tcp"], "packml_cntrl_cmd": {"table": "coil", "address": 30, "type": "bool"}})
    with pytest.raises(ValueError, match="linectl writes it.*read-only"):
        cfg({**PACKML_TAGS["modbus_tcp"], "packml_cmd_change_request": {"table": "discrete", "address": 0, "type": "bool"}})
    with pytest.raises(ValueError, match="cannot be poll: false"):
        cfg({**PACKML_TAGS["modbus_tcp"], "packml_cntrl_cmd": {"table": "holding", "address": 40, "type": "int32", "poll": False}})
    # the equipment inputs: optional, each alone; a bool or an integer the PLC writes, polled
    assert "downstream_blocked" in cfg({"downstream_blocked": {"table": "discrete", "address": 3, "type": "bool"}}).tags
    assert "infeed_starved" in cfg({"infeed_starved": {"table": "input", "address": 3, "type": "uint16"}}).tags
    with pytest.raises(ValueError, match="infeed_starved must be a bool or a single integer"):
        cfg({"infeed_starved": {"table": "holding", "address": 10, "type": "float32"}})
    with pytest.raises(ValueError, match="downstream_blocked is written by the PLC.*poll: false"):
        cfg({"downstream_blocked": {"table": "coil", "address": 30, "type": "bool", "poll": False}})


async def test_request_up_before_linectl_looked_is_not_run(fake_line: Any) -> None:
    """A request already up when linectl first sees the PLC was raised for a linectl that is gone (maybe long ago):
    refused as stale and acknowledged, never executed; the next request runs. The real engine (on the fake line's
    devices) behind the real PLC surface, talking Modbus TCP to the simulated PLC."""
    from datetime import date, timedelta

    from linectl.drivers.modbus import ModbusTcpPlc
    from linectl.drivers.plc_tags import PACKML_RESULT_STALE
    from linectl.engine.plc_surface import PlcSurface
    from linectl.simulators.plc import DEFAULT_MODBUS_TAGS, PlcSim

    line = fake_line.line
    product = line.cfg.products[0]
    expiry = (date.today() + timedelta(days=400)).strftime("%y%m%d")
    await line.execute(C.CreateBatch(lot="L1", gtin=product.gtin, expiry=expiry, planned_qty=100, actor="test"), origin="test")
    cfg = ModbusTcpConfig(driver="modbus_tcp", host="127.0.0.1", port=free_tcp_port(), tags={**DEFAULT_MODBUS_TAGS, **PACKML_TAGS["modbus_tcp"]})
    plc = PlcSim("plc9", cfg)
    await plc.start()
    drv = ModbusTcpPlc("plc9", cfg)
    task: asyncio.Task[None] | None = None
    try:
        # a request left up from before (the simulated program itself waits for StateCurrent != 0: set by hand)
        plc.set("packml_cntrl_cmd", int(K.Reset))
        plc.set("packml_cmd_change_request", True)
        await drv.start()
        await wait_for(lambda: drv.health.state.value == "connected", 20, "the driver connected, heartbeat seen")
        task = asyncio.create_task(PlcSurface(line, drv).run())
        await wait_for(lambda: plc.get("packml_cmd_change_request") is False, 20, "the stale request acknowledged")
        assert (plc.get("packml_cmd_result"), plc.get("packml_state_current")) == (PACKML_RESULT_STALE, int(S.Stopped))
        assert line.packtags().state is S.Stopped
        assert len(plc.packml_done) == 0
        plc.packml_command("Reset")
        await wait_for(lambda: len(plc.packml_done) == 1, 20, "the new request acknowledged")
        d = plc.packml_done[0]
        assert (d["result"], d["state_current"]) == (PACKML_RESULT_DONE, int(S.Idle)), d
        assert line.packtags().state is S.Idle
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await drv.stop()
        await plc.stop()


@pytest.mark.parametrize("driver", ["modbus_tcp", "s7", "opcua"])
async def test_blocked_and_starved_from_the_plc(tmp_path: Path, driver: str) -> None:
    """The simulated PLC's downstream machine blocks, then its infeed runs empty (faults downstream_blocked,
    infeed_empty: the PLC holds the infeed and sets its input tag): the running line is Suspended with
    EquipmentBlocked / EquipmentStarved on MQTT packml/status and on the PLC's own PackTags, and produces again by
    itself when the fault clears. linectl's starved timer is off here, so Starved can only have come from the PLC."""
    from tests.engine_helpers import unique_root
    from tests.test_packml import Client, create_payload, ok, refused

    overrides = {"mqtt": {"topic_root": unique_root(), "protocol": "5"}, "packml": {"starved_after_s": 0}}
    async with simulated_line(tmp_path, base=packml_line(tmp_path, driver), rate=900, overrides=overrides) as sl:
        async with Client(sl.cfg.mqtt.port, sl.cfg.topic_root) as op:
            ok(await op.send("create_batch", create_payload(sl, 100_000)))
            ok(await op.packml_cmd("Reset"))
            ok(await op.packml_cmd("Start"))
            st = await op.state_is(S.Execute)
            assert st["EquipmentBlocked"] is False and st["EquipmentStarved"] is False
            await wait_good(sl, 10)

            for fault, flag, other in (("downstream_blocked", "EquipmentBlocked", "EquipmentStarved"),
                                       ("infeed_empty", "EquipmentStarved", "EquipmentBlocked")):
                await sim(sl, cmd="inject", device="plc1", fault=fault, duration_s=60)
                st = await op.state_is(S.Suspended)
                assert st[flag] is True and st[other] is False, st
                assert state_of(sl) == "running" and sl.line.fault is None  # no fault: material, not the machine
                # the PLC program reads the same on its PackTags
                tag = "packml_blocked" if flag == "EquipmentBlocked" else "packml_starved"
                await wait_async(lambda tag=tag: _plc_tag(sl, tag, True), 10, f"{tag} on the PLC")  # type: ignore[misc]
                await plc_state(sl, S.Suspended)
                refused(await op.packml_cmd("Unsuspend"), "starved")  # it produces again by itself
                # the simulator's truth: no product entered while the PLC held the infeed
                fed = {k: c["fed"] for k, c in (await sim(sl, cmd="status"))["conveyors"].items()}
                await asyncio.sleep(1.0)
                assert {k: c["fed"] for k, c in (await sim(sl, cmd="status"))["conveyors"].items()} == fed
                good = sl.line.batch.good_total()
                await sim(sl, cmd="inject", device="plc1", fault="clear")
                st = await op.state_is(S.Execute)
                assert st["EquipmentBlocked"] is False and st["EquipmentStarved"] is False
                await wait_good(sl, good + 10)
                await plc_state(sl, S.Execute)
                await wait_async(lambda tag=tag: _plc_tag(sl, tag, False), 10, f"{tag} cleared on the PLC")  # type: ignore[misc]
            ok(await op.packml_cmd("Stop"))
            await op.state_is(S.Stopped)


async def _plc_tag(sl: Any, tag: str, want: Any) -> bool:
    return bool((await plc_packml(sl)).get(tag) == want)
