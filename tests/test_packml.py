"""The line as a PackML unit: numbers from the official OPC 30050 nodeset, commands over MQTT on a real broker.

The state, command and unit-mode numbers, and which command each state accepts, are checked against the
nodeset file nobody here wrote (standards/opcua/Opc.Ua.PackML.NodeSet2.xml). The behaviour is driven through the
public MQTT command topics of a simulated line (simulators, drivers, store, bridge) and read back from the retained
`<root>/packml/status` and `<root>/packml/admin` topics, which must show the numbers `line.packtags()` gives (what the
OPC UA server and the PLC handshake read). Bad input: commands in a state that forbids them, and a client firing
commands faster than the line can act.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from datetime import date, timedelta
from pathlib import Path
from subprocess import PIPE
from typing import Any

import aiomqtt
import pytest
from engine_helpers import belt_empty, db_query, lot_events_from_db, sim, simulated_line, state_of, unique_root, wait_for, wait_good
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from linectl import control as C
from linectl.engine.packml import ALLOWED, PackmlCommand, PackmlState, UnitMode, parse_command
from linectl.mqtt_bridge import MqttBridge

pytestmark = pytest.mark.timeout(240)
V5 = aiomqtt.ProtocolVersion.V5
UA = "{http://opcfoundation.org/UA/2011/03/UANodeSet.xsd}"


def nodeset_path() -> Path:
    for base in (Path("/work/shared"), Path(__file__).resolve().parent.parent.parent / "shared"):
        p = base / "standards" / "opcua" / "Opc.Ua.PackML.NodeSet2.xml"
        if p.exists():
            return p
    pytest.skip("the official PackML nodeset (shared/standards/opcua) is not beside the checkout")


def nodeset() -> tuple[dict[str, str], list[Any]]:
    root = ET.parse(nodeset_path()).getroot()
    names = {el.get("NodeId", ""): (el.get("BrowseName") or "").split(":")[-1] for el in root}
    return names, list(root)


# --------------------------------------------------------------------------- numbers against the nodeset


def test_state_numbers_unit_modes_and_methods_are_the_nodesets() -> None:
    names, nodes = nodeset()
    numbers: dict[str, int] = {}
    for el in nodes:
        if el.tag == f"{UA}UAVariable" and el.get("BrowseName") == "StateNumber":
            value = el.find(f"{UA}Value")
            assert value is not None
            numbers[names[el.get("ParentNodeId", "")]] = int("".join(value.itertext()).strip())
    for state in PackmlState:
        if state is PackmlState.Undefined:
            continue
        if state.name in numbers:
            assert numbers[state.name] == state.value, state
    # every state the nodeset numbers that is a PackML state (not its composites Running/Cleared) is ours
    composites = {"Running", "Cleared"}
    assert {n for n in numbers if n not in composites} <= {s.name for s in PackmlState}
    assert len({n for n in numbers if n not in composites}) >= 15
    enum = next(el for el in nodes if el.get("BrowseName") == "1:ProductionMaintenanceModeEnum")
    fields = {f.get("Name"): int(f.get("Value", "-1")) for f in enum.iter(f"{UA}Field")}
    assert fields == {"Invalid": 0, "Produce": UnitMode.Production, "Maintenance": UnitMode.Maintenance, "Manual": UnitMode.Manual}
    methods = {names[el.get("NodeId", "")] for el in nodes if el.tag == f"{UA}UAMethod"}
    for cmd in PackmlCommand:
        if cmd is not PackmlCommand.Undefined:
            assert ("ToComplete" if cmd is PackmlCommand.Complete else cmd.name) in methods, cmd


def test_allowed_commands_are_the_nodesets_transitions() -> None:
    names, nodes = nodeset()
    caused: set[tuple[str, str]] = set()
    for el in nodes:
        refs = el.find(f"{UA}References")
        if el.tag != f"{UA}UAObject" or refs is None:
            continue
        kinds: dict[str, list[str]] = {}
        for r in refs:
            kinds.setdefault(r.get("ReferenceType", ""), []).append(names.get(r.text or "", ""))
        for frm in kinds.get("FromState", []):
            for cause in kinds.get("HasCause", []):
                caused.add((frm, "Complete" if cause == "ToComplete" else cause))
    running = {"Idle", "Starting", "Execute", "Completing", "Complete", "Resetting", "Holding", "Held", "Unholding",
               "Suspending", "Suspended", "Unsuspending"}
    cleared = running | {"Stopped", "Stopping", "Clearing"}
    expected: set[tuple[str, str]] = set()
    for frm, cause in caused:
        if frm == "Running":
            expected |= {(s, cause) for s in running}
        elif frm == "Cleared":
            expected |= {(s, cause) for s in cleared}
        else:
            expected.add((frm, cause))
    ours = {(s.name, c.name) for s, cmds in ALLOWED.items() for c in cmds}
    assert ours == expected, f"missing {sorted(expected - ours)}, extra {sorted(ours - expected)}"


def test_command_models_parse_names_and_numbers_and_refuse_the_rest() -> None:
    assert parse_command("start") is PackmlCommand.Start
    assert parse_command(" UNHOLD ") is PackmlCommand.Unhold
    assert parse_command(10) is PackmlCommand.Complete
    assert parse_command("8") is PackmlCommand.Abort
    ok = C.COMMAND_ADAPTER.validate_python({"name": "packml_command", "command": 4})
    assert isinstance(ok, C.PackmlCmd) and ok.command == "Hold" and ok.cmd is PackmlCommand.Hold
    for bad in ("launch", 0, 11, -1, True, None, 2.5, ["Start"]):
        with pytest.raises(ValidationError) as exc:
            C.COMMAND_ADAPTER.validate_python({"name": "packml_command", "command": bad})
        assert "command" in str(exc.value)
    mode = C.COMMAND_ADAPTER.validate_python({"name": "set_unit_mode", "mode": "produce"})
    assert isinstance(mode, C.SetUnitMode) and mode.mode == "Production"
    assert C.COMMAND_ADAPTER.validate_python({"name": "set_unit_mode", "mode": 2}).mode == "Maintenance"  # type: ignore[union-attr]
    for bad in ("invalid", 0, 9, "sleep"):
        with pytest.raises(ValidationError, match="unit mode"):
            C.COMMAND_ADAPTER.validate_python({"name": "set_unit_mode", "mode": bad})
    assert {"packml_command", "set_unit_mode"} <= set(C.COMMAND_NAMES)


# --------------------------------------------------------------------------- MQTT, a simulated line


class Client:
    """An MQTT 5 operator: commands with a response topic; keeps the last retained PackTags of each group."""

    def __init__(self, port: int, root: str) -> None:
        self.root = root
        self.reply_topic = f"replies/{uuid.uuid4().hex[:8]}"
        self.client = aiomqtt.Client("127.0.0.1", port, protocol=V5, identifier=f"pml-{uuid.uuid4().hex[:8]}")
        self.replies: dict[bytes, dict[str, Any]] = {}
        self.packml: dict[str, dict[str, Any]] = {}
        #: the last `<root>/state` (the operators' view), to compare its stop_reason with packml/admin's StopReason
        self.state: dict[str, Any] | None = None
        self.retained_seen: dict[str, bool] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Client:
        await self.client.__aenter__()
        await self.client.subscribe(self.reply_topic, qos=1)
        await self.client.subscribe(f"{self.root}/packml/+", qos=1)
        await self.client.subscribe(f"{self.root}/state", qos=1)
        self._task = asyncio.create_task(self._listen())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        await self.client.__aexit__(None, None, None)

    async def _listen(self) -> None:
        async for m in self.client.messages:
            topic = str(m.topic)
            if topic == self.reply_topic:
                corr = m.properties.CorrelationData if m.properties is not None else b""
                self.replies[bytes(corr)] = json.loads(m.payload)
            elif topic == f"{self.root}/state":
                self.state = json.loads(m.payload)
            else:
                group = topic.rsplit("/", 1)[1]
                self.packml[group] = json.loads(m.payload)
                self.retained_seen[group] = self.retained_seen.get(group, False) or bool(m.retain)

    async def publish(self, name: str, payload: dict[str, Any]) -> bytes:
        corr = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = corr
        await self.client.publish(f"{self.root}/cmd/{name}", json.dumps(payload).encode(), qos=1, properties=props)
        return corr

    async def reply(self, corr: bytes, timeout: float = 30.0) -> dict[str, Any]:
        reply: dict[str, Any] = await wait_for(lambda: self.replies.get(corr), timeout, "a command reply")
        return reply

    async def send(self, name: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.reply(await self.publish(name, {"actor": "mes", **(payload or {})}))

    async def packml_cmd(self, command: str | int) -> dict[str, Any]:
        return await self.send("packml_command", {"command": command})

    async def stop_reasons_agree(self, code: str | None, timeout: float = 30.0) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Wait until packml/admin's StopReason and `<root>/state`'s stop_reason both name `code` (None: both null);
        -> (StopReason, stop_reason)."""

        def seen() -> tuple[Any, Any] | None:
            admin, state = self.packml.get("admin"), self.state
            if admin is None or state is None:
                return None
            pk, op = admin["StopReason"], state["stop_reason"]
            if (pk["Code"] if pk else None) == code and (op["code"] if op else None) == code:
                return pk, op
            return None

        try:
            return await wait_for(seen, timeout, f"StopReason {code} on packml/admin and state")  # type: ignore[no-any-return]
        except AssertionError:
            admin, state = self.packml.get("admin") or {}, self.state or {}
            raise AssertionError(f"packml/admin StopReason {admin.get('StopReason')}, state stop_reason {state.get('stop_reason')}; "
                                 f"want {code}") from None

    async def state_is(self, state: PackmlState, timeout: float = 30.0) -> dict[str, Any]:
        def seen() -> dict[str, Any] | None:
            st = self.packml.get("status")
            return st if st is not None and st["StateCurrent"] == int(state) else None

        try:
            return await wait_for(seen, timeout, f"packml/status StateCurrent {int(state)} ({state.name})")  # type: ignore[no-any-return]
        except AssertionError:
            raise AssertionError(f"packml/status is {self.packml.get('status')}, want {state.name}") from None


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, reply
    result: dict[str, Any] = reply["result"]
    return result


def refused(reply: dict[str, Any], code: str) -> str:
    assert reply.get("ok") is False, reply
    assert reply["error"]["code"] == code, reply
    assert "Traceback" not in json.dumps(reply)
    return str(reply["error"]["message"])


@contextlib.asynccontextmanager
async def line(tmp_path: Path, *, products: list[dict[str, Any]] | None = None, defect_rate: float = 0.0,
               **packml: Any) -> AsyncIterator[tuple[Any, Client]]:
    overrides: dict[str, Any] = {"mqtt": {"topic_root": unique_root(), "protocol": "5"}}
    if products is not None:
        overrides["products"] = products
    if packml:
        overrides["packml"] = packml
    async with simulated_line(tmp_path, rate=600.0, defect_rate=defect_rate, overrides=overrides) as sl:
        b = sl.daemon.upstream[0]
        assert isinstance(b, MqttBridge)
        await wait_for(lambda: b.status()["connected"], 15, "the bridge to connect")
        async with Client(b.cfg.mqtt.port, sl.cfg.topic_root) as client:
            yield sl, client


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "linectl", *args, stdout=PIPE, stderr=PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def create_payload(sl: Any, units: int) -> dict[str, Any]:
    product = sl.cfg.products[0]
    expiry = (date.today() + timedelta(days=730)).strftime("%y%m%d")
    from linectl.demo import demo_batch_dates

    return {"lot": f"PML{int(time.time() * 1000) % 10**9}", "gtin": product.gtin, "expiry": expiry, "planned_qty": units,
            "challenge": False, **demo_batch_dates(product.template, expiry)}


async def test_lifecycle_over_mqtt_with_retained_packtags(tmp_path: Path) -> None:
    async with line(tmp_path) as (sl, op):
        st = await op.state_is(PackmlState.Stopped)
        assert st["State"] == "Stopped" and st["UnitModeCurrent"] == 1 and st["Allowed"] == ["Reset", "Abort"]
        await wait_for(lambda: op.retained_seen.get("status") is not None, 10, "packml/status")

        # a command the state forbids: refused, named, nothing changed
        msg = refused(await op.packml_cmd("Start"), "invalid_state")
        assert "Start" in msg and "Stopped" in msg and "Reset" in msg
        refused(await op.packml_cmd("Unhold"), "invalid_state")
        refused(await op.packml_cmd("launch"), "invalid")
        assert sl.line.packtags().state is PackmlState.Stopped

        assert ok(await op.packml_cmd("reset"))["state"] == "Idle"
        await op.state_is(PackmlState.Idle)
        refused(await op.packml_cmd("Start"), "no_batch")  # Idle, but no work order
        ok(await op.send("create_batch", create_payload(sl, 100_000)))
        await op.state_is(PackmlState.Idle)  # a new batch does not undo the Reset

        assert ok(await op.packml_cmd(2))["state"] == "Execute"
        await op.state_is(PackmlState.Execute)
        assert state_of(sl) == "running"
        await wait_good(sl, 10)
        refused(await op.packml_cmd("Start"), "invalid_state")
        refused(await op.packml_cmd("Unhold"), "invalid_state")
        refused(await op.packml_cmd("Reset"), "invalid_state")

        assert ok(await op.packml_cmd("Hold"))["state"] == "Held"
        st = await op.state_is(PackmlState.Held)
        assert state_of(sl) == "paused" and "Unhold" in st["Allowed"]
        admin = await wait_for(lambda: (a := op.packml.get("admin")) and a["StopReason"] and a["StopReason"]["Code"] == "pause" and a, 10,
                               "StopReason pause")
        assert admin["StopReason"]["ID"] == 0
        refused(await op.packml_cmd("Suspend"), "invalid_state")
        ok(await op.packml_cmd("Unhold"))
        await op.state_is(PackmlState.Execute)
        assert state_of(sl) == "running"

        ok(await op.packml_cmd("Suspend"))
        await op.state_is(PackmlState.Suspended)
        assert state_of(sl) == "paused"
        ok(await op.packml_cmd("Unsuspend"))
        await op.state_is(PackmlState.Execute)
        await wait_good(sl, sl.line.batch.good_total() + 5)

        # Complete ends the batch at its count (drained, not closed): Complete until Reset
        assert ok(await op.packml_cmd("Complete"))["state"] == "Complete"
        await op.state_is(PackmlState.Complete)
        assert state_of(sl) == "stopped"
        refused(await op.packml_cmd("Start"), "invalid_state")

        # the dashboard reads what packtags() (OPC UA, PLC) reads
        tags = sl.line.packtags()
        admin = await wait_for(lambda: (a := op.packml.get("admin")) and a["ProdProcessedCount"] == tags.admin.processed and a, 10,
                               "packml/admin to show the counts")
        b = sl.line.batch
        assert admin["Lot"] == b.lot and admin["PlannedCount"] == 100_000
        assert admin["GoodCount"] == b.good_total() == tags.admin.good > 0
        assert admin["ProdDefectiveCount"] == sum(admin["DefectiveByReason"].values())
        assert admin["ProdProcessedCount"] == admin["GoodCount"] + admin["ProdDefectiveCount"]
        assert admin["ProdConsumedCount"] == tags.admin.consumed_serials >= admin["GoodCount"]

        ok(await op.packml_cmd("Reset"))
        await op.state_is(PackmlState.Idle)

        # unit mode: changes only outside production; Maintenance refuses a start
        ok(await op.send("set_unit_mode", {"mode": "Maintenance"}))
        st = await wait_for(lambda: (s := op.packml.get("status")) and s["UnitModeCurrent"] == 2 and s, 10, "UnitModeCurrent 2")
        assert st["UnitMode"] == "Maintenance"
        refused(await op.packml_cmd("Start"), "unit_mode")
        refused(await op.send("start_batch"), "unit_mode")
        assert state_of(sl) == "stopped"
        ok(await op.send("set_unit_mode", {"mode": 1}))
        ok(await op.packml_cmd("Start"))
        await op.state_is(PackmlState.Execute)
        refused(await op.send("set_unit_mode", {"mode": "Manual"}), "invalid_state")
        ok(await op.packml_cmd("Stop"))
        await op.state_is(PackmlState.Stopped)

        # a late subscriber (a dashboard started now) gets both groups retained
        root = sl.cfg.topic_root
        port = sl.daemon.upstream[0].cfg.mqtt.port
        async with Client(port, root) as late:
            await wait_for(lambda: late.retained_seen.get("status") and late.retained_seen.get("admin"), 10, "retained packml topics")
            assert late.packml["status"]["StateCurrent"] == int(PackmlState.Stopped)


async def test_commands_faster_than_the_line_acts(tmp_path: Path) -> None:
    async with line(tmp_path) as (sl, op):
        ok(await op.send("create_batch", create_payload(sl, 100_000)))
        ok(await op.packml_cmd("Reset"))
        # a client that sends ten Starts at once: one starts the line, the others are refused, nothing runs twice
        corrs = [await op.publish("packml_command", {"command": "Start", "actor": "mes"}) for _ in range(10)]
        replies = [await op.reply(c) for c in corrs]
        assert sum(1 for r in replies if r.get("ok")) == 1, replies
        for r in replies:
            if not r.get("ok"):
                refused(r, "invalid_state")
        await op.state_is(PackmlState.Execute)
        await wait_good(sl, 5)

        # Hold/Unhold hammered without waiting: each reply is a success or a named refusal, the end state is one
        # the line really is in, and every accepted command left its audit record
        corrs = [await op.publish("packml_command", {"command": c, "actor": "mes"}) for c in ["Hold", "Unhold"] * 8]
        replies = [await op.reply(c) for c in corrs]
        accepted = [r for r in replies if r.get("ok")]
        assert accepted and all(r.get("ok") or r["error"]["code"] == "invalid_state" for r in replies), replies
        final = PackmlState[accepted[-1]["result"]["state"]]
        assert final in (PackmlState.Held, PackmlState.Execute)
        assert sl.line.packtags().state is final
        assert state_of(sl) == ("paused" if final is PackmlState.Held else "running")
        await op.state_is(final)
        rows = db_query(sl.db, "SELECT count(*) FROM audit WHERE action = 'packml_command'")
        assert int(rows[0][0]) == len(accepted) + 2  # + the Reset and the one Start above


async def test_estop_aborts_and_clear_needs_the_fault_gone(tmp_path: Path) -> None:
    async with line(tmp_path) as (sl, op):
        ok(await op.send("create_batch", create_payload(sl, 100_000)))
        ok(await op.packml_cmd("Reset"))
        ok(await op.packml_cmd("Start"))
        await wait_good(sl, 5)
        await sim(sl, cmd="set", device="plc1", tags={"estop": True})
        st = await op.state_is(PackmlState.Aborted)
        assert st["Allowed"] == ["Clear"]
        admin = await wait_for(lambda: (a := op.packml.get("admin")) and a["StopReason"] and a, 10, "a StopReason")
        assert admin["StopReason"]["Code"] == "estop" and admin["StopReason"]["ID"] == 31, admin  # first-out alarm code
        refused(await op.packml_cmd("Reset"), "invalid_state")
        refused(await op.packml_cmd("Start"), "invalid_state")
        await sim(sl, cmd="set", device="plc1", tags={"estop": False})
        # the CLI sends the same command (over MQTT, audited with its origin)
        rc, out, err = await cli("batch", "packml", "-c", str(sl.run_cfg_path), "--packml-command", "clear", "--actor", "shift-lead")
        assert rc == 0, (out, err)
        assert json.loads(out)["result"]["state"] == "Stopped"
        await op.state_is(PackmlState.Stopped)
        rc, out, err = await cli("batch", "packml", "-c", str(sl.run_cfg_path), "--packml-command", "launch")
        assert rc == 2 and "launch" in err and "Traceback" not in err, (rc, err)
        assert sl.line.fault is None
        ok(await op.packml_cmd("Reset"))
        ok(await op.packml_cmd("Start"))
        await op.state_is(PackmlState.Execute)
        # a PackML Abort: the infeed closes at once, Aborted until Clear
        ok(await op.packml_cmd("Abort"))
        await op.state_is(PackmlState.Aborted)
        assert state_of(sl) == "stopped"
        admin = await wait_for(lambda: (a := op.packml.get("admin")) and a["StopReason"] and a["StopReason"]["Code"] == "abort" and a, 10,
                               "StopReason abort")
        refused(await op.packml_cmd("Abort"), "invalid_state")
        ok(await op.packml_cmd("Clear"))
        await op.state_is(PackmlState.Stopped)


async def test_planned_quantity_completes_and_starved_suspends(tmp_path: Path) -> None:
    async with line(tmp_path, starved_after_s=1.5, mach_speed_upm=600.0) as (sl, op):
        ok(await op.send("create_batch", create_payload(sl, 40)))
        ok(await op.packml_cmd("Reset"))
        ok(await op.packml_cmd("Start"))
        st = await op.state_is(PackmlState.Complete, timeout=90)
        assert st["MachSpeed"] == 600.0
        admin = await wait_for(lambda: (a := op.packml.get("admin")) and a["StopReason"] and a, 10, "a StopReason")
        assert admin["StopReason"]["Code"] == "planned_quantity" and admin["GoodCount"] >= 40

    (tmp_path / "b").mkdir()
    async with line(tmp_path / "b", starved_after_s=1.5) as (sl, op):
        ok(await op.send("create_batch", create_payload(sl, 100_000)))
        ok(await op.packml_cmd("Reset"))
        ok(await op.packml_cmd("Start"))
        await wait_good(sl, 5)
        await sim(sl, cmd="set", rate_upm=6.0)  # one pack every 10 s: the infeed is starved
        st = await op.state_is(PackmlState.Suspended, timeout=60)
        assert st["EquipmentStarved"] is True and state_of(sl) == "running"
        refused(await op.packml_cmd("Unsuspend"), "starved")  # it resumes by itself when product comes
        await sim(sl, cmd="set", rate_upm=600.0)
        st = await op.state_is(PackmlState.Execute, timeout=60)
        assert st["EquipmentStarved"] is False
        ok(await op.packml_cmd("Stop"))
        await op.state_is(PackmlState.Stopped)


async def test_empty_serial_pool_holds_and_unhold_resumes(tmp_path: Path) -> None:
    from linectl.demo import DEFAULT_CONFIG
    from linectl.yamlsource import load_yaml, to_plain

    product = to_plain(load_yaml(DEFAULT_CONFIG))["products"][0]
    product["serials"] = {"scheme": "pool", "low_water": 0}
    async with line(tmp_path, products=[product]) as (sl, op):
        gtin = sl.cfg.products[0].gtin
        assert ok(await op.send("provision_pool", {"gtin": gtin, "range_start": 5_000_000, "range_count": 300}))["accepted"] == 300
        ok(await op.send("create_batch", create_payload(sl, 100_000)))
        ok(await op.packml_cmd("Reset"))
        ok(await op.packml_cmd("Start"))
        st = await op.state_is(PackmlState.Held, timeout=90)  # the pool ran dry: material missing, not a machine fault
        assert set(st["Allowed"]) == {"Stop", "Unhold", "Abort"}
        admin = await wait_for(lambda: (a := op.packml.get("admin")) and a["StopReason"] and a, 10, "a StopReason")
        assert admin["StopReason"]["Code"] == "no_serials" and admin["StopReason"]["ID"] == 50
        assert admin["ProdConsumedCount"] <= 300 and admin["GoodCount"] > 0
        assert sl.line.fault == "no_serials"
        refused(await op.packml_cmd("Start"), "invalid_state")
        ok(await op.send("provision_pool", {"gtin": gtin, "range_start": 6_000_000, "range_count": 2000}))
        ok(await op.packml_cmd("Unhold"))
        await op.state_is(PackmlState.Execute)
        assert sl.line.fault is None
        good = sl.line.batch.good_total()
        await wait_good(sl, good + 5)
        ok(await op.packml_cmd("Stop"))
        await op.state_is(PackmlState.Stopped)


async def test_stop_reason_is_the_operators_first_out(tmp_path: Path) -> None:
    """PackML StopReason (packml/admin) and `<root>/state`'s stop_reason come from one first-out: an e-stop while Held
    is the cause of the Aborted line (not the Hold), and an e-stop behind the unconfirmed reject it caused takes over
    from it in both."""
    async with line(tmp_path) as (sl, op):
        ok(await op.send("create_batch", create_payload(sl, 100_000)))
        ok(await op.packml_cmd("Reset"))
        ok(await op.packml_cmd("Start"))
        await wait_good(sl, 5)
        await op.stop_reasons_agree(None)
        ok(await op.packml_cmd("Hold"))
        await op.state_is(PackmlState.Held)
        pk, _ = await op.stop_reasons_agree("pause")
        assert pk is not None and pk["ID"] == 0

        # e-stop while Held: Aborted, and the cause both show is the e-stop, ID its alarm code
        await sim(sl, cmd="set", device="plc1", tags={"estop": True})
        await op.state_is(PackmlState.Aborted)
        pk, st = await op.stop_reasons_agree("estop")
        assert pk is not None and st is not None and pk["ID"] == 31 and pk["Message"] == st["message"]
        assert sl.line.packtags().stop_reason is not None and sl.line.packtags().stop_reason.id == 31  # the PLC tag's value
        await sim(sl, cmd="set", device="plc1", tags={"estop": False})
        await asyncio.sleep(0.5)
        ok(await op.packml_cmd("Clear"))
        await op.state_is(PackmlState.Stopped)
        await op.stop_reasons_agree("estop")  # a reset: the line has not run since, the cause stays shown in both

        ok(await op.packml_cmd("Reset"))
        ok(await op.packml_cmd("Start"))
        await op.state_is(PackmlState.Execute)
        await op.stop_reasons_agree(None)
        await wait_good(sl, sl.line.batch.good_total() + 5)
        # an unconfirmed reject stops the line, then the e-stop that caused it is seen: the root cause takes over
        await sl.line.fault_stop("reject_not_confirmed", "reject of unit 12 not confirmed within 2.00s", "pv1")
        await sim(sl, cmd="set", device="plc1", tags={"estop": True})
        pk, st = await op.stop_reasons_agree("estop", timeout=60)
        assert pk is not None and st is not None and pk["ID"] == 31
        assert st["consequences"][0]["code"] == "reject_not_confirmed", st
        await op.state_is(PackmlState.Aborted)
        await sim(sl, cmd="set", device="plc1", tags={"estop": False})


async def test_admin_counters_are_the_stores_and_the_simulators(tmp_path: Path) -> None:
    """After a batch with defects, packml/admin's counters against independent records: GoodCount and
    ProdConsumedCount against the store file's serials of the lot (commissioned; commissioned + decommissioned),
    ProdDefectiveCount and DefectiveByReason against the stored decommissionings by reason (those never printed, reason
    line_stopped, were no unit) and against the simulator's truth of what the gate rejected."""
    from collections import Counter

    from linectl.events import UnitDecommissioned

    async with line(tmp_path, defect_rate=0.15) as (sl, op):
        ok(await op.send("create_batch", create_payload(sl, 100_000)))
        ok(await op.packml_cmd("Reset"))
        ok(await op.packml_cmd("Start"))
        await wait_good(sl, 60)
        ok(await op.packml_cmd("Stop"))
        await op.state_is(PackmlState.Stopped)
        await belt_empty(sl)
        truth = await sl.truth()
        lot = sl.line.batch.lot
        states = dict(db_query(sl.db, "SELECT state, count(*) FROM serials WHERE lot=? GROUP BY state", (lot,)))
        rejected = Counter(e.reason.value for e in lot_events_from_db(sl.db, lot)
                           if isinstance(e, UnitDecommissioned) and e.reason.value != "line_stopped")
        assert sum(rejected.values()) > 5, rejected  # defect_rate 0.15: there are defects to count
        admin = await wait_for(lambda: (a := op.packml.get("admin")) and a["GoodCount"] == states.get("commissioned") and a, 10,
                               "packml/admin with the final counts")
        assert admin["GoodCount"] == states["commissioned"] == truth["passed"], (admin, states, truth)
        assert admin["ProdConsumedCount"] == states["commissioned"] + states.get("decommissioned", 0), (admin, states)
        assert admin["DefectiveByReason"] == dict(rejected), (admin, rejected)
        assert admin["ProdDefectiveCount"] == sum(rejected.values()) == truth["rejected"], (admin, truth)
        assert admin["ProdProcessedCount"] == truth["passed"] + truth["rejected"]
