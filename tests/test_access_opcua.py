"""OPC UA methods under access control: the session user must also be an active user of the line's store, and the
PackML command one that user's roles allow; otherwise BadUserAccessDenied (an independent asyncua client)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from asyncua import ua

from linectl.opcua_server import hash_password
from tests.engine_helpers import db_query, password_env, simulated_line
from tests.test_packml_opcua import MACHINE, PASSWORD, Scada, call, free_port, line_object, ua_overrides

pytestmark = pytest.mark.timeout(180)


async def test_a_method_needs_a_store_user_whose_roles_allow_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in password_env().items():
        monkeypatch.setenv(k, v)
    port = free_port()
    scada = Scada(tmp_path / "clients", f"opc.tcp://127.0.0.1:{port}/linectl", tmp_path / "pki" / "server.der")
    (tmp_path / "pki" / "trusted").mkdir(parents=True)
    shutil.copy(scada.cert, tmp_path / "pki" / "trusted" / "scada.der")
    h = hash_password(PASSWORD)
    # OPC UA accounts (the server's own users); operator and qa are also users of the store, ghost is not
    users = [{"name": n, "password_hash": h, "role": "operator"} for n in ("operator", "qa", "ghost")]
    async with simulated_line(tmp_path, rate=1200.0, access=True, overrides=ua_overrides(tmp_path, port, users=users)) as sl:
        for user, expected in (("ghost", "BadUserAccessDenied"), ("qa", "BadUserAccessDenied"), ("operator", "Good")):
            async with await scada.client(user=user) as c:
                obj, ns = await line_object(c)
                assert await call(obj, ns, MACHINE, "Reset") == expected, user
        async with await scada.client(user="operator") as c:  # operators do not change the unit mode (set_unit_mode)
            obj, ns = await line_object(c)
            holder = obj
            m = await holder.get_child(f"{ns}:SetUnitMode")
            with pytest.raises(ua.UaStatusCodeError) as info:
                await holder.call_method(m, ua.Variant(2, ua.VariantType.Int32))
            assert ua.StatusCode(info.value.code).name == "BadUserAccessDenied"
        # a deactivated store user loses OPC UA too
        await sl.daemon.store.change_user("operator", {"active": False}, "user_deactivated", actor="admin", origin="test", reason="left")
        async with await scada.client(user="operator") as c:
            obj, ns = await line_object(c)
            assert await call(obj, ns, MACHINE, "Reset") == "BadUserAccessDenied"
    rows = db_query(tmp_path / "line.db", "SELECT actor, origin, detail FROM audit WHERE action='packml_command'")
    assert [(a, o) for a, o, _ in rows] == [("operator", "opcua")] and '"channel":"opcua"' in rows[0][2]
