"""The OPC UA server (linectl/opcua_server.py) seen by an independent asyncua Client, as a SCADA tool sees it.

The client knows nothing of linectl: it browses from Objects by browse names, checks each object's
HasTypeDefinition against the official PackML.NodeIds.csv (the copy in /work/shared or beside the checkout, not
the package's), reads Status and Admin and calls the state-machine methods over a secured channel with a trusted
client certificate. The line behind is the demo line on the simulators (tests/engine_helpers.simulated_line).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from linectl import opcua_server
from linectl.config import OpcuaServerConfig
from linectl.opcua_server import OpcuaServerError, ensure_certificate, hash_password
from tests.engine_helpers import simulated_line, wait_async

REPO = Path(__file__).resolve().parent.parent
PACKML_URI = "http://opcfoundation.org/UA/PackML/"
PASSWORD = "line-operator-1"
CLIENT_URI = "urn:example:scada"


def official_csv() -> Path:
    for p in (Path("/work/shared/standards/opcua/PackML.NodeIds.csv"), REPO.parent / "shared" / "standards" / "opcua" / "PackML.NodeIds.csv"):
        if p.exists():
            return p
    return REPO / "linectl" / "standards" / "opcua" / "PackML.NodeIds.csv"


def official_ids() -> dict[str, int]:
    with open(official_csv(), encoding="utf-8") as fh:
        return {row[0]: int(row[1]) for row in csv.reader(fh) if len(row) >= 2 and row[1].isdigit()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_cert(directory: Path, name: str, days: int = 365) -> tuple[Path, Path]:
    """A SCADA client's own application certificate (not made by the server's code)."""
    from asyncua.crypto.cert_gen import dump_private_key_as_pem, generate_private_key, generate_self_signed_app_certificate
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = generate_private_key()
    cert = generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(CLIENT_URI), x509.DNSName("localhost")], extended=[ExtendedKeyUsageOID.CLIENT_AUTH],
        days=days,
    )
    directory.mkdir(parents=True, exist_ok=True)
    cp, kp = directory / f"{name}.der", directory / f"{name}.pem"
    cp.write_bytes(cert.public_bytes(Encoding.DER))
    kp.write_bytes(dump_private_key_as_pem(key))
    return cp, kp


class Scada:
    """Connection settings of the test's SCADA client."""

    def __init__(self, tmp: Path, url: str, server_cert: Path) -> None:
        self.url = url
        self.server_cert = server_cert
        self.cert, self.key = client_cert(tmp / "scada", "scada")
        self.untrusted_cert, self.untrusted_key = client_cert(tmp / "rogue", "rogue")
        self.expired_cert, self.expired_key = client_cert(tmp / "old", "old", days=0)  # not valid after its creation

    async def client(self, user: str | None = "op", password: str = PASSWORD, *, untrusted: bool = False, expired: bool = False,
                     secure: bool = True) -> Client:
        c = Client(self.url, timeout=20)
        c.application_uri = CLIENT_URI
        if secure:
            cert, key = (self.untrusted_cert, self.untrusted_key) if untrusted else (self.cert, self.key)
            cert, key = (self.expired_cert, self.expired_key) if expired else (cert, key)
            await c.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key), server_certificate=str(self.server_cert),
                                 mode=ua.MessageSecurityMode.SignAndEncrypt)
        if user is not None:
            c.set_user(user)
            c.set_password(password)
        return c


def ua_overrides(tmp: Path, port: int, **extra: Any) -> dict[str, Any]:
    h = hash_password(PASSWORD)
    return {"opcua_server": {
        "enabled": True,
        "endpoint": f"opc.tcp://127.0.0.1:{port}/linectl",
        "users": [{"name": "op", "password_hash": h, "role": "operator"}, {"name": "watcher", "password_hash": h, "role": "viewer"}],
        "certificate": str(tmp / "pki" / "server.der"),
        "private_key": str(tmp / "pki" / "private" / "server.pem"),
        "trusted_clients_dir": str(tmp / "pki" / "trusted"),
        **extra,
    }}


@pytest.fixture
async def ua_line(tmp_path: Path) -> AsyncIterator[tuple[Any, Scada]]:
    port = free_port()
    scada_tmp = tmp_path / "clients"
    scada = Scada(scada_tmp, f"opc.tcp://127.0.0.1:{port}/linectl", tmp_path / "pki" / "server.der")
    # the operator trusts the SCADA client by putting its certificate in the trust directory (before start: read once)
    (tmp_path / "pki" / "trusted").mkdir(parents=True)
    shutil.copy(scada.cert, tmp_path / "pki" / "trusted" / "scada.der")
    shutil.copy(scada.expired_cert, tmp_path / "pki" / "trusted" / "old.der")  # trusted, but out of its validity
    async with simulated_line(tmp_path, rate=1200.0, overrides=ua_overrides(tmp_path, port)) as sl:
        yield sl, scada


async def line_object(c: Client) -> tuple[Any, int]:
    """Objects -> PackMLObjects -> the line, by browse names only, as a SCADA tool finds a PackML unit."""
    ns = await c.get_namespace_index(PACKML_URI)
    folder = await c.nodes.objects.get_child([f"{ns}:PackMLObjects"])
    units = []
    for child in await folder.get_children():
        if await type_of(child) == ua.NodeId(official_ids()["PackMLBaseObjectType"], ns):
            units.append(child)
    assert len(units) == 1, units
    return units[0], ns


async def type_of(node: Any) -> Any:
    refs = await node.get_references(refs=ua.ObjectIds.HasTypeDefinition)
    assert len(refs) == 1
    return refs[0].NodeId


async def path(obj: Any, ns: int, *names: str) -> Any:
    return await obj.get_child([n if ":" in n else f"{ns}:{n}" for n in names])


async def call(obj: Any, ns: int, machine: tuple[str, ...], method: str, *args: Any) -> str:
    """Call a method on its state machine; the status code's name ("Good" or the Bad... name)."""
    holder = await path(obj, ns, *machine) if machine else obj
    m = await holder.get_child(f"{ns}:{method}")
    try:
        await holder.call_method(m, *args)
    except ua.UaStatusCodeError as exc:
        return ua.StatusCode(exc.code).name
    return "Good"


BASE = ("BaseStateMachine",)
MACHINE = ("BaseStateMachine", "MachineState")
EXECUTE = ("BaseStateMachine", "MachineState", "ExecuteState")


async def state_of(obj: Any, ns: int) -> tuple[str, str, str]:
    out = []
    for m in (BASE, MACHINE, EXECUTE):
        cs = await path(obj, ns, *m, "0:CurrentState")
        out.append((await cs.read_value()).Text or "")
    return out[0], out[1], out[2]


async def wait_state(obj: Any, ns: int, execute: str, timeout: float = 60.0) -> None:
    async def there() -> bool:
        return (await state_of(obj, ns))[2] == execute

    await wait_async(there, timeout, f"ExecuteState {execute}")


# --------------------------------------------------------------------------- browse, types, values


async def test_scada_browses_a_packml_unit_typed_by_the_official_nodeset(ua_line: tuple[Any, Scada]) -> None:
    sl, scada = ua_line
    ids = official_ids()
    assert (REPO / "linectl" / "standards" / "opcua" / "PackML.NodeIds.csv").read_bytes() == official_csv().read_bytes()
    async with await scada.client() as c:
        await c.load_data_type_definitions()
        obj, ns = await line_object(c)
        assert (await obj.read_browse_name()).Name == sl.cfg.line.name
        for rel, tname in [(("Admin",), "PackMLAdminObjectType"), (("Status",), "PackMLStatusObjectType"),
                           (BASE, "PackMLBaseStateMachineType"), (MACHINE, "PackMLMachineStateMachineType"),
                           (EXECUTE, "PackMLExecuteStateMachineType")]:
            assert await type_of(await path(obj, ns, *rel)) == ua.NodeId(ids[tname], ns), rel
        # the methods asyncua does not instantiate from the nested types, each under the machine it changes
        for rel, methods in [(BASE, ["Abort", "Clear"]), (MACHINE, ["Stop", "Reset"]),
                             (EXECUTE, ["Start", "Hold", "Unhold", "Suspend", "Unsuspend", "Reset", "ToComplete"]), ((), ["SetUnitMode"])]:
            holder = await path(obj, ns, *rel) if rel else obj
            for m in methods:
                node = await holder.get_child(f"{ns}:{m}")
                assert await node.read_node_class() == ua.NodeClass.Method
        # Start keeps the nodeset's optional input argument
        args = await (await path(obj, ns, *EXECUTE, "Start", "0:InputArguments")).read_value()
        assert [a.Name for a in args] == ["Parameter"] and args[0].DataType == ua.NodeId(ids["PackMLDescriptorDataType"], ns)
        # Status and Admin as the line gives them
        tags = sl.line.packtags()
        assert await (await path(obj, ns, "Status", "UnitModeCurrent")).read_value() == int(tags.unit_mode)
        assert await (await path(obj, ns, "Status", "MachSpeed")).read_value() == pytest.approx(tags.mach_speed)
        assert await (await path(obj, ns, "Status", "EquipmentBlocked")).read_value() is tags.blocked
        assert await (await path(obj, ns, "Status", "UnitSupportedModes")).read_value() == ua.NodeId(ids["ProductionMaintenanceModeEnum"], ns)
        for counter in ("ProdProcessedCount", "ProdDefectiveCount", "ProdConsumedCount", "StopReason"):
            node = await path(obj, ns, "Admin", counter)
            dt = await node.read_data_type()
            assert dt == ua.NodeId(ids["PackMLAlarmDataType" if counter == "StopReason" else "PackMLCountDataType"], ns)
        # the state: CurrentState.Id is the state object of the type, whose StateNumber is the PackTags StateCurrent
        base, machine, execute = await state_of(obj, ns)
        assert (base, machine) == ("Cleared", tags.state.name) and execute == "", (base, machine, execute, tags.state)
        sid = await (await path(obj, ns, *MACHINE, "0:CurrentState", "0:Id")).read_value()
        number = await c.get_node(sid).get_child("0:StateNumber")
        assert await number.read_value() == int(tags.state)
        # nothing the nodeset marks optional and this server does not fill is pretended
        assert not [d for d in await obj.get_children_descriptions() if d.BrowseName.Name in ("RemoteCommand", "SetInterlock")]


async def test_a_line_driven_through_the_methods(ua_line: tuple[Any, Scada], monkeypatch: pytest.MonkeyPatch) -> None:
    sl, scada = ua_line
    lot = await sl.create_batch(300, challenge=False)
    async with await scada.client() as c:
        await c.load_data_type_definitions()
        obj, ns = await line_object(c)
        assert (await state_of(obj, ns))[1] == "Stopped"
        # forbidden where PackML forbids: Start from Stopped, Unhold without Held, Clear without Aborted
        assert await call(obj, ns, EXECUTE, "Start") == "BadInvalidState"
        assert await call(obj, ns, EXECUTE, "Unhold") == "BadInvalidState"
        assert await call(obj, ns, BASE, "Clear") == "BadInvalidState"
        assert await call(obj, ns, MACHINE, "Reset") == "Good"
        assert await state_of(obj, ns) == ("Cleared", "Running", "Idle")
        assert await call(obj, ns, EXECUTE, "Start") == "Good"
        await wait_state(obj, ns, "Execute")
        assert await call(obj, ns, EXECUTE, "Start") == "BadInvalidState"

        processed = await path(obj, ns, "Admin", "ProdProcessedCount")

        async def produced() -> bool:
            v = await processed.read_value()
            return bool(v) and v[0].Count >= 20

        await wait_async(produced, 60, "20 units processed, seen over OPC UA")
        assert await call(obj, ns, EXECUTE, "Hold") == "Good"
        await wait_state(obj, ns, "Held")
        assert await call(obj, ns, EXECUTE, "Suspend") == "BadInvalidState"
        assert await call(obj, ns, EXECUTE, "Unhold") == "Good"
        await wait_state(obj, ns, "Execute")
        # a client that stops waiting (here: the server's call timeout cut to 1 ms) gets BadTimeout, and the stop,
        # shielded from it, still drains the belt to Stopped (a cancelled stop would leave the line half-stopped)
        monkeypatch.setattr(opcua_server, "CALL_TIMEOUT_S", 0.001)
        assert await call(obj, ns, MACHINE, "Stop") == "BadTimeout"
        monkeypatch.setattr(opcua_server, "CALL_TIMEOUT_S", 30.0)

        async def stopped() -> bool:
            return (await state_of(obj, ns))[1] == "Stopped"

        await wait_async(stopped, 60, "Stopped")
        # the counters a SCADA reads are the line's
        tags = sl.line.packtags()
        v = await processed.read_value()
        assert v[0].Name == lot and v[0].Count == tags.admin.processed
        consumed = await (await path(obj, ns, "Admin", "ProdConsumedCount")).read_value()
        assert consumed[0].Count == tags.admin.consumed_serials
        defective = await (await path(obj, ns, "Admin", "ProdDefectiveCount")).read_value()
        assert {d.Name: d.Count for d in defective} == tags.admin.defective
        assert await (await path(obj, ns, "Status", f"{await c.get_namespace_index('urn:linectl:packml')}:StateCurrent")).read_value() == int(tags.state)
        # what MES reads on MQTT (packml/status, packml/admin) is what SCADA reads on OPC UA, once both have published
        async with mqtt_packtags(sl) as mqtt:

            async def opcua_view() -> dict[str, Any]:
                sid = await (await path(obj, ns, *MACHINE, "0:CurrentState", "0:Id")).read_value()
                return {
                    "StateCurrent": await (await c.get_node(sid).get_child("0:StateNumber")).read_value(),
                    "UnitModeCurrent": await (await path(obj, ns, "Status", "UnitModeCurrent")).read_value(),
                    "ProdProcessedCount": (await processed.read_value())[0].Count,
                    "ProdConsumedCount": (await (await path(obj, ns, "Admin", "ProdConsumedCount")).read_value())[0].Count,
                    "DefectiveByReason": {d.Name: d.Count for d in await (await path(obj, ns, "Admin", "ProdDefectiveCount")).read_value()},
                }

            def mqtt_view() -> dict[str, Any] | None:
                if not {"status", "admin"} <= set(mqtt):
                    return None
                st, ad = mqtt["status"], mqtt["admin"]
                return {"StateCurrent": st["StateCurrent"], "UnitModeCurrent": st["UnitModeCurrent"], **{
                    k: ad[k] for k in ("ProdProcessedCount", "ProdConsumedCount", "DefectiveByReason")}}

            views: list[Any] = []

            async def same() -> bool:
                views[:] = [await opcua_view(), mqtt_view()]
                return views[0] == views[1]

            try:
                await wait_async(same, 30, "MQTT PackTags equal to the OPC UA values")
            except AssertionError:
                raise AssertionError(f"OPC UA {views[0]} != MQTT {views[1]}") from None
            assert views[0]["StateCurrent"] == 2 and views[0]["ProdProcessedCount"] >= 20
    # each method in the audit trail, with the OPC UA user as actor
    audit = [r for r in sl.daemon.store.audit_log(limit=100_000) if r.origin == "opcua"]
    assert [(r.actor, r.action, r.detail["command"]) for r in audit] == [
        ("op", "packml_command", c) for c in ("Reset", "Start", "Hold", "Unhold", "Stop")
    ]


@contextlib.asynccontextmanager
async def mqtt_packtags(sl: Any) -> AsyncIterator[dict[str, dict[str, Any]]]:
    """The PackTags groups the MQTT bridge publishes (retained, then as they change), as an MES subscriber has them."""
    import aiomqtt

    latest: dict[str, dict[str, Any]] = {}
    async with aiomqtt.Client(sl.cfg.mqtt.host, sl.cfg.mqtt.port) as client:
        await client.subscribe(f"{sl.cfg.topic_root}/packml/+", qos=1)

        async def collect() -> None:
            async for m in client.messages:
                latest[str(m.topic).rsplit("/", 1)[1]] = json.loads(m.payload)

        task = asyncio.create_task(collect())
        try:
            yield latest
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_malformed_calls_are_refused_by_status(ua_line: tuple[Any, Scada]) -> None:
    sl, scada = ua_line
    async with await scada.client() as c:
        await c.load_data_type_definitions()
        obj, ns = await line_object(c)
        esm = await path(obj, ns, *EXECUTE)
        start = await esm.get_child(f"{ns}:Start")
        # a string where PackMLDescriptorDataType[] is declared; a parameter the line would ignore; an argument too many
        with pytest.raises(ua.UaStatusCodeError) as e1:
            await esm.call_method(start, ua.Variant("fast", ua.VariantType.String))
        assert ua.StatusCode(e1.value.code).name == "BadInvalidArgument"
        desc = ua.PackMLDescriptorDataType(ID=1, Name="speed", Value=1.0)
        with pytest.raises(ua.UaStatusCodeError) as e2:
            await esm.call_method(start, ua.Variant([desc], ua.VariantType.ExtensionObject))
        assert ua.StatusCode(e2.value.code).name == "BadInvalidArgument"
        assert await call(obj, ns, MACHINE, "Stop", ua.Variant(1, ua.VariantType.Int32)) == "BadTooManyArguments"
        # a method called on an object it does not belong to (Start with the line as object)
        with pytest.raises(ua.UaStatusCodeError) as e3:
            await obj.call_method(start)
        assert ua.StatusCode(e3.value.code).name == "BadMethodInvalid"
        # SetUnitMode: wrong type, unknown mode, no argument; then a valid change and back
        assert await call(obj, ns, (), "SetUnitMode", ua.Variant("Manual", ua.VariantType.String)) == "BadInvalidArgument"
        assert await call(obj, ns, (), "SetUnitMode", ua.Variant(7, ua.VariantType.Int32)) == "BadInvalidArgument"
        assert await call(obj, ns, (), "SetUnitMode") == "BadArgumentsMissing"
        assert await call(obj, ns, (), "SetUnitMode", ua.Variant(3, ua.VariantType.Int32)) == "Good"
        assert await (await path(obj, ns, "Status", "UnitModeCurrent")).read_value() == 3
        assert await call(obj, ns, (), "SetUnitMode", ua.Variant(1, ua.VariantType.Int32)) == "Good"
        # the values are the line's: a client cannot write them
        for rel in (("Status", "MachSpeed"), ("Status", f"{await c.get_namespace_index('urn:linectl:packml')}:StateCurrent")):
            with pytest.raises(ua.UaStatusCodeError) as e4:
                await (await path(obj, ns, *rel)).write_value(ua.Variant(6, ua.VariantType.Int32 if "StateCurrent" in rel[1] else ua.VariantType.Float))
            assert ua.StatusCode(e4.value.code).name in ("BadNotWritable", "BadUserAccessDenied"), rel
        # the methods the line has no engine command for say so, rather than succeed doing nothing
        assert await call(obj, ns, (), "SetMachSpeed", ua.Variant(100.0, ua.VariantType.Float)) == "BadNotSupported"
        assert sl.line.packtags().state.name == "Stopped"


async def test_calls_faster_than_the_line_acts(ua_line: tuple[Any, Scada]) -> None:
    """Two SCADA sessions hammer Start while the line starts: exactly one Start is taken, every other call gets a
    status (BadInvalidState), none is lost or run twice, and the line ends in Execute."""
    sl, scada = ua_line
    await sl.create_batch(200, challenge=False)
    async with await scada.client() as c1, await scada.client() as c2:
        o1, ns = await line_object(c1)
        o2, _ = await line_object(c2)
        assert await call(o1, ns, MACHINE, "Reset") == "Good"
        results = await asyncio.gather(*[call(o, ns, EXECUTE, "Start") for _ in range(10) for o in (o1, o2)])
        assert sorted(set(results)) == ["BadInvalidState", "Good"] and results.count("Good") == 1, results
        await wait_state(o1, ns, "Execute")
        # Hold and Stop racing: whichever the engine takes first, the other is judged in the state that left
        r = await asyncio.gather(call(o1, ns, EXECUTE, "Hold"), call(o2, ns, MACHINE, "Stop"))
        assert "Good" in r and set(r) <= {"Good", "BadInvalidState"}, r

        async def stopped() -> bool:
            if (await state_of(o1, ns))[1] == "Stopped":
                return True
            await call(o1, ns, MACHINE, "Stop")  # a Hold that won goes on to Held: stop from there
            return False

        await wait_async(stopped, 60, "Stopped")
    audit = [r.detail["command"] for r in sl.daemon.store.audit_log(limit=100_000) if r.origin == "opcua"]
    assert audit.count("Start") == 1


# --------------------------------------------------------------------------- security


async def refused_stage(aw: Any) -> str:
    try:
        await aw
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return ""


async def refused(c: Client) -> str:
    """Why the connection was refused ("" when it was not)."""
    try:
        await c.connect()
    except Exception as exc:  # noqa: BLE001 - each refusal comes as asyncua's error of its stage
        with contextlib.suppress(Exception):
            await c.disconnect()
        return f"{type(exc).__name__}: {exc}"
    await c.disconnect()
    return ""


async def test_secure_by_default(ua_line: tuple[Any, Scada], tmp_path: Path) -> None:
    sl, scada = ua_line
    # no endpoint without security, no anonymous token on any endpoint
    probe = Client(scada.url, timeout=20)
    endpoints = await probe.connect_and_get_server_endpoints()
    assert endpoints and all(e.SecurityMode == ua.MessageSecurityMode.SignAndEncrypt for e in endpoints)
    assert all(t.TokenType != ua.UserTokenType.Anonymous for e in endpoints for t in e.UserIdentityTokens)
    # the certificate generated on first start, its key for the service user alone
    key = tmp_path / "pki" / "private" / "server.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and (tmp_path / "pki" / "server.der").stat().st_size > 500
    refusals = {}
    for what, kwargs in {"no security": {"secure": False}, "anonymous": {"user": None}, "wrong password": {"password": "wrong-password"},
                         "unknown user": {"user": "nobody"}, "untrusted certificate": {"untrusted": True},
                         "expired certificate": {"expired": True}}.items():
        refusals[what] = await refused(await scada.client(**kwargs))
    assert refusals["no security"].startswith("UaError: No matching endpoints"), refusals  # the client finds none
    assert refusals["anonymous"].startswith("BadIdentityTokenRejected"), refusals
    assert refusals["wrong password"].startswith("BadUserAccessDenied") and refusals["unknown user"].startswith("BadUserAccessDenied"), refusals
    assert refusals["untrusted certificate"].startswith("BadCertificateUntrusted"), refusals
    assert refusals["expired certificate"].startswith("BadCertificateTimeInvalid"), refusals
    # and a client that skips the endpoint list and opens an unsecured channel anyway is refused by the server
    raw = Client(scada.url, timeout=20)
    await raw.connect_socket()
    try:
        await raw.send_hello()
        await raw.open_secure_channel()  # the server opens it: GetEndpoints needs an unsecured channel
        # the session is created server-side (the client then finds no matching endpoint: its own check), but
        # never activated on this channel, so nothing of the line can be read over it
        assert (await refused_stage(raw.create_session())).startswith("UaError: No matching endpoints")
        assert (await refused_stage(raw.activate_session("op", PASSWORD))).startswith("BadUserAccessDenied")
        read = await refused_stage(raw.get_node(ua.ObjectIds.Server_ServerStatus_State).read_value())
        assert read.startswith("BadSessionNotActivated"), read
    finally:
        raw.disconnect_socket()
    # a viewer reads, but may not call a method
    async with await scada.client(user="watcher") as c:
        obj, ns = await line_object(c)
        assert await (await path(obj, ns, "Status", "EquipmentStarved")).read_value() is False
        assert await call(obj, ns, MACHINE, "Reset") == "BadUserAccessDenied"
    assert sl.line.packtags().state.name == "Stopped"


async def test_anonymous_and_unsecured_only_when_configured(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "pki" / "trusted").mkdir(parents=True)
    ov = ua_overrides(tmp_path, port, allow_anonymous=True, allow_unsecured=True,
                      security=["Aes256Sha256RsaPss_SignAndEncrypt", "Basic256Sha256_Sign"])
    async with simulated_line(tmp_path, overrides=ov) as sl:
        url = f"opc.tcp://127.0.0.1:{port}/linectl"
        probe = Client(url, timeout=20)
        endpoints = await probe.connect_and_get_server_endpoints()
        assert {(e.SecurityPolicyUri.rsplit("#", 1)[1], e.SecurityMode) for e in endpoints} == {
            ("Aes256_Sha256_RsaPss", ua.MessageSecurityMode.SignAndEncrypt), ("Basic256Sha256", ua.MessageSecurityMode.Sign),
            ("None", ua.MessageSecurityMode.None_)}
        assert all(any(t.TokenType == ua.UserTokenType.Anonymous for t in e.UserIdentityTokens) for e in endpoints)
        async with Client(url, timeout=20) as c:  # anonymous, no security: reads, never calls
            obj, ns = await line_object(c)
            assert (await state_of(obj, ns))[1] == "Stopped"
            assert await call(obj, ns, MACHINE, "Reset") == "BadUserAccessDenied"
        assert sl.line.packtags().state.name == "Stopped"


# --------------------------------------------------------------------------- certificate files, config, CLI


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.der", tmp_path / "k.pem"
    assert ensure_certificate(cert, key, "urn:x", "localhost") is True
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert ensure_certificate(cert, key, "urn:x", "localhost") is False  # kept, not regenerated
    os.chmod(key, 0o644)
    with pytest.raises(OpcuaServerError, match="chmod 600"):
        ensure_certificate(cert, key, "urn:x", "localhost")


def test_config_refuses_what_would_not_work() -> None:
    h = hash_password(PASSWORD)
    # enabled with nobody who could log in: a check of the whole config (tests/test_access_opcua.py), as the store's
    # users log in when access: is on
    with pytest.raises(ValueError, match="argon2"):
        OpcuaServerConfig.model_validate({"users": [{"name": "op", "password_hash": "plaintext"}]})
    with pytest.raises(ValueError, match="listed twice"):
        OpcuaServerConfig.model_validate({"users": [{"name": "op", "password_hash": h}, {"name": "op", "password_hash": h}]})
    with pytest.raises(ValueError):
        OpcuaServerConfig.model_validate({"security": ["None"]})  # unsecured only through allow_unsecured
    with pytest.raises(ValueError):
        OpcuaServerConfig.model_validate({"endpoint": "http://localhost:4840"})


def test_hash_password_cli() -> None:
    from argon2 import PasswordHasher

    run = [sys.executable, "-m", "linectl", "opcua", "hash-password", "--stdin"]
    p = subprocess.run(run, input="correct horse\n", capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    h = p.stdout.strip()
    assert PasswordHasher().verify(h, "correct horse")
    OpcuaServerConfig.model_validate({"users": [{"name": "op", "password_hash": h}]})
    short = subprocess.run(run, input="short\n", capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "at least 8" in short.stderr and "Traceback" not in short.stderr
