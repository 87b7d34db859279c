"""OPC UA under access control: a session logs in as a user of the line's store (its password, lockout and
deactivation: one login for every channel), and each method is checked again against that user's roles; otherwise
BadUserAccessDenied (an independent asyncua client)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from asyncua import ua

from linectl.config import parse_config
from linectl.yamlsource import ConfigFileError
from tests.engine_helpers import TEST_PASSWORDS, db_query, password_env, simulated_line, variant_raw, wait_for
from tests.test_packml_opcua import MACHINE, PASSWORD, Scada, call, free_port, line_object, refused, ua_overrides

pytestmark = pytest.mark.timeout(180)


def user_row(db: Path, name: str) -> tuple[int, str | None, int]:
    """(failed_attempts, locked_until, active) of a store user, read from the database file itself."""
    rows = db_query(db, "SELECT failed_attempts, locked_until, active FROM users WHERE username=?", (name,))
    assert len(rows) == 1, rows
    return rows[0][0], rows[0][1], rows[0][2]


async def test_store_users_log_in_and_methods_need_their_roles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in password_env().items():
        monkeypatch.setenv(k, v)
    port = free_port()
    scada = Scada(tmp_path / "clients", f"opc.tcp://127.0.0.1:{port}/linectl", tmp_path / "pki" / "server.der")
    (tmp_path / "pki" / "trusted").mkdir(parents=True)
    shutil.copy(scada.cert, tmp_path / "pki" / "trusted" / "scada.der")
    db = tmp_path / "line.db"
    async with simulated_line(tmp_path, rate=1200.0, access=True, overrides=ua_overrides(tmp_path, port, users=[])) as sl:
        # a name that is no user of the store cannot log in, whatever its password
        assert (await refused(await scada.client(user="ghost", password=PASSWORD))).startswith("BadUserAccessDenied")
        # qa logs in with its store password, but its roles do not include packml_command
        async with await scada.client(user="qa", password=TEST_PASSWORDS["qa"]) as c:
            obj, ns = await line_object(c)
            assert await call(obj, ns, MACHINE, "Reset") == "BadUserAccessDenied"
        async with await scada.client(user="operator", password=TEST_PASSWORDS["operator"]) as c:
            obj, ns = await line_object(c)
            assert await call(obj, ns, MACHINE, "Reset") == "Good"
            # operators do not change the unit mode (set_unit_mode)
            m = await obj.get_child(f"{ns}:SetUnitMode")
            with pytest.raises(ua.UaStatusCodeError) as info:
                await obj.call_method(m, ua.Variant(2, ua.VariantType.Int32))
            assert ua.StatusCode(info.value.code).name == "BadUserAccessDenied"
        # a wrong password counts towards the store's lockout (access.lockout.attempts), as on MQTT and the CLI
        assert user_row(db, "operator")[0] == 0
        assert (await refused(await scada.client(user="operator", password="Wrong-password-1"))).startswith("BadUserAccessDenied")
        await wait_for(lambda: user_row(db, "operator")[0] == 1, 10, "the failed attempt recorded")
        attempts = sl.cfg.access.lockout.attempts
        for _ in range(attempts - 1):
            assert (await refused(await scada.client(user="operator", password="Wrong-password-1"))).startswith("BadUserAccessDenied")
        await wait_for(lambda: user_row(db, "operator")[1] is not None, 10, "operator locked")
        # locked: the right password no longer opens a session
        assert (await refused(await scada.client(user="operator", password=TEST_PASSWORDS["operator"]))).startswith("BadUserAccessDenied")
        # a deactivated store user loses OPC UA too: refused at login, and an open session's next call refused
        async with await scada.client(user="qa", password=TEST_PASSWORDS["qa"]) as c:
            await sl.daemon.store.change_user("qa", {"active": False}, "user_deactivated", actor="admin", origin="test", reason="left")
            obj, ns = await line_object(c)
            assert await call(obj, ns, MACHINE, "Stop") == "BadUserAccessDenied"
        assert (await refused(await scada.client(user="qa", password=TEST_PASSWORDS["qa"]))).startswith("BadUserAccessDenied")
    rows = db_query(db, "SELECT actor, origin, detail FROM audit WHERE action='packml_command'")
    assert [(a, o) for a, o, _ in rows] == [("operator", "opcua")] and '"channel":"opcua"' in rows[0][2]
    failed, locked_until, _active = user_row(db, "operator")
    assert failed >= attempts and locked_until is not None


def test_opcua_users_and_access_are_one_or_the_other() -> None:
    """With access: on the store's users log in; opcua_server.users beside it would be a second, weaker door."""
    from linectl.opcua_server import hash_password

    users = [{"name": "op", "password_hash": hash_password(PASSWORD), "role": "operator"}]
    raw = variant_raw(access=True)
    raw["opcua_server"] = {"enabled": True, "users": users}
    with pytest.raises(ConfigFileError) as info:
        parse_config(raw)
    assert "remove opcua_server.users" in str(info.value.problems[0].message)
    raw["opcua_server"] = {"enabled": True}
    assert parse_config(raw).opcua_server.enabled  # the store's users: nothing more to give
    raw = variant_raw(access=False)
    raw["opcua_server"] = {"enabled": True}
    with pytest.raises(ConfigFileError) as info:
        parse_config(raw)
    assert "nobody could connect" in str(info.value.problems[0].message)
    raw["opcua_server"] = {"enabled": True, "users": users}
    assert parse_config(raw).opcua_server.users[0].name == "op"
