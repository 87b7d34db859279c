"""The access gate over a real store with real argon2: logins, tokens, lockout, ageing, user administration, roles.

The clock is the gate's own (`Access(clock=...)`): a token's expiry and a password's age are judged on it, so
the tests move it instead of waiting hours.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from linectl.access.gate import Access, AccessDenied
from linectl.access.passwords import check_policy, hash_password
from linectl.access.principal import Principal, device_principal, permits
from linectl.access.settings import AccessConfig, PasswordPolicy
from linectl.control import AUTHENTICATED, COMMAND_ADAPTER, CommandRejected, UsersAdmin
from linectl.store import Store

PW = {"admin": "Adm1n-Secret-pw", "alice": "Al1ce-Secret-pw", "bob": "B0b-Secret-pw!"}


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)  # the store stamps its rows with the real time

    def __call__(self) -> datetime:
        return self.now


async def make(tmp_path: Path, **cfg: Any) -> tuple[Store, Access, Clock]:
    store = await Store.open(tmp_path / "line.db")
    clock = Clock()
    access = Access(AccessConfig.model_validate({"lockout": {"attempts": 3, "lock_minutes": 30}, **cfg}), store, clock=clock)
    for name, roles in (("admin", ["administrator"]), ("alice", ["operator"]), ("bob", ["qa"])):
        await store.add_user(name, name.title(), roles, hash_password(PW[name]), "local", actor="test", origin="test", reason="setup")
    return store, access, clock


def admin_cmd(**kw: Any) -> UsersAdmin:
    return UsersAdmin.model_validate({"name": "users_admin", "reason": "test", **kw}, context=AUTHENTICATED)


async def denied(coro: Any, code: str) -> str:
    with pytest.raises(AccessDenied) as info:
        await coro
    assert info.value.code == code, (info.value.code, info.value.reason)
    return info.value.reason


async def test_login_gives_a_token_bound_to_its_client_that_expires_and_dies_at_logout(tmp_path):
    store, access, clock = await make(tmp_path, session_ttl_s=600)
    try:
        got = await access.login("alice", PW["alice"], channel="mqtt", client_id="hmi-1", origin="mqtt:hmi-1")
        tok = got["token"]
        assert got["roles"] == ["operator"] and store.session(tok) is None  # only the hash is stored
        p = await access.verify_token(tok, client_id="hmi-1", origin="mqtt:hmi-1")
        assert (p.name, p.kind, p.session) == ("alice", "user", got["session"]) and "start_batch" in p.permissions
        await denied(access.verify_token(tok, client_id="hmi-2", origin="mqtt:hmi-2"), "token_client_mismatch")
        await denied(access.verify_token("not-a-token", client_id="hmi-1", origin="x"), "unauthenticated")
        clock.now += timedelta(seconds=601)
        await denied(access.verify_token(tok, client_id="hmi-1", origin="x"), "token_expired")
        clock.now -= timedelta(seconds=601)
        assert (await access.logout(tok, client_id="hmi-1", origin="mqtt:hmi-1"))["closed"]
        await denied(access.verify_token(tok, client_id="hmi-1", origin="x"), "token_revoked")  # replayed after logout
        await denied(access.logout(tok, client_id="hmi-1", origin="x"), "token_revoked")
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "line.db") as c:
        actions = [a for (a,) in c.execute("SELECT action FROM audit WHERE action LIKE 'session_%' ORDER BY seq")]
        text = " ".join(d for (d,) in c.execute("SELECT detail FROM audit"))
    assert actions == ["session_opened", "session_closed"] and tok not in text and PW["alice"] not in text


async def test_wrong_passwords_lock_the_user_then_only_an_unlock_helps(tmp_path):
    store, access, clock = await make(tmp_path, password={"max_age_days": 0})
    try:
        await denied(access.login("nobody", "whatever-pw", channel="mqtt", client_id="c", origin="x"), "wrong_password")
        for _ in range(2):
            await denied(access.login("alice", "wrong", channel="mqtt", client_id="c", origin="x"), "wrong_password")
        why = await denied(access.login("alice", "wrong", channel="mqtt", client_id="c", origin="x"), "wrong_password")
        assert "now locked" in why
        await denied(access.login("alice", PW["alice"], channel="mqtt", client_id="c", origin="x"), "locked")  # the right one, too late
        clock.now += timedelta(minutes=31)  # lock_minutes passed: the right password works again and clears the count
        assert (await access.login("alice", PW["alice"], channel="mqtt", client_id="c", origin="x"))["username"] == "alice"
        u = store.user("alice")
        assert u is not None and u.failed_attempts == 0
        await access.admin(admin_cmd(action="lock", username="alice"), "admin", "test")
        clock.now += timedelta(days=400)
        await denied(access.login("alice", PW["alice"], channel="mqtt", client_id="c", origin="x"), "locked")  # until unlocked
        await access.admin(admin_cmd(action="unlock", username="alice"), "admin", "test")
        await access.login("alice", PW["alice"], channel="mqtt", client_id="c", origin="x")
    finally:
        await access.refusals.flush()
        await store.close()
    with sqlite3.connect(tmp_path / "line.db") as c:
        locks = [json.loads(d) for (d,) in c.execute("SELECT detail FROM audit WHERE action='user_locked'")]
        refused = [json.loads(d) for (d,) in c.execute("SELECT detail FROM audit WHERE action='access_refused'")]
    assert len(locks) == 2 and "3 failed logins" in locks[0]["reason"]
    assert refused and refused[0]["counts"]["wrong_password"] == 4 and refused[0]["counts"]["locked"] == 2  # one record, counted


async def test_a_deactivated_user_cannot_log_in_nor_use_an_earlier_token(tmp_path):
    store, access, _ = await make(tmp_path)
    try:
        tok = (await access.login("bob", PW["bob"], channel="mqtt", client_id="c", origin="x"))["token"]
        await access.admin(admin_cmd(action="deactivate", username="bob"), "admin", "test")
        await denied(access.verify_token(tok, client_id="c", origin="x"), "deactivated")
        await denied(access.login("bob", PW["bob"], channel="mqtt", client_id="c", origin="x"), "deactivated")
        await access.admin(admin_cmd(action="reactivate", username="bob"), "admin", "test")
        assert (await access.verify_token(tok, client_id="c", origin="x")).name == "bob"
        assert store.verify_audit().ok
    finally:
        await store.close()


async def test_an_aged_password_is_refused_at_login_but_may_change_itself(tmp_path):
    store, access, clock = await make(tmp_path, password={"max_age_days": 90, "history": 2})
    try:
        clock.now = datetime.now(UTC) + timedelta(days=91)
        await denied(access.login("alice", PW["alice"], channel="mqtt", client_id="c", origin="x"), "password_expired")
        change = admin_cmd(action="passwd", username="alice", new_password=PW["alice"])
        # a one-shot credential for one's own passwd is taken with the expired password...
        p = await access.credential({"username": "alice", "password": PW["alice"]}, channel="cli", client_id="c", origin="x", command=change)
        assert permits(p, change) is None  # ... and anyone may change their own password
        with pytest.raises(CommandRejected, match="differ from the current one") as info:
            await access.admin(change, "alice", "x")
        assert info.value.code == "password_policy"
        await access.admin(admin_cmd(action="passwd", username="alice", new_password="N3w-Secret-pw"), "alice", "x")
        clock.now = datetime.now(UTC) + timedelta(days=1)
        assert (await access.login("alice", "N3w-Secret-pw", channel="mqtt", client_id="c", origin="x"))["username"] == "alice"
        with pytest.raises(CommandRejected, match="last 2"):  # the history
            await access.admin(admin_cmd(action="passwd", username="alice", new_password=PW["alice"]), "alice", "x")
        # but not for another user's passwd, nor for another command
        other = admin_cmd(action="passwd", username="bob", new_password="X-Other-pw-1")
        clock.now = datetime.now(UTC) + timedelta(days=200)
        await denied(access.credential({"username": "alice", "password": "N3w-Secret-pw"}, channel="cli", client_id="c", origin="x",
                                       command=other), "password_expired")
    finally:
        await store.close()


async def test_user_administration_checks_roles_policy_and_keeps_an_administrator(tmp_path):
    store, access, _ = await make(tmp_path)
    try:
        with pytest.raises(CommandRejected) as info:
            await access.admin(admin_cmd(action="add", username="carol", display_name="Carol", roles=["wizard"], new_password="C4rol-Secret-pw"),
                               "admin", "t")
        assert info.value.code == "invalid_role"
        with pytest.raises(CommandRejected) as info:
            await access.admin(admin_cmd(action="add", username="carol", display_name="Carol", roles=["qa"], new_password="short"), "admin", "t")
        assert info.value.code == "password_policy"
        res = await access.admin(admin_cmd(action="add", username="carol", display_name="Carol C.", roles=["qa", "supervisor"],
                                           new_password="C4rol-Secret-pw"), "admin", "t")
        assert res["user"]["roles"] == ["qa", "supervisor"] and "password_hash" not in res["user"]
        for action in ("deactivate", "lock"):
            with pytest.raises(CommandRejected) as info:
                await access.admin(admin_cmd(action=action, username="admin"), "admin", "t")
            assert info.value.code == "last_administrator"
        with pytest.raises(CommandRejected) as info:
            await access.admin(admin_cmd(action="roles", username="admin", roles=["operator"]), "admin", "t")
        assert info.value.code == "last_administrator"
        await access.admin(admin_cmd(action="roles", username="carol", roles=["administrator"]), "admin", "t")
        await access.admin(admin_cmd(action="deactivate", username="admin"), "carol", "t")  # another administrator exists now
        assert store.verify_audit().ok
    finally:
        await store.close()


def test_roles_devices_and_the_permission_check():
    cfg = AccessConfig.model_validate({"roles": {"operator": ["start_batch", "request_state"], "line_lead": ["close_batch"]},
                                       "devices": {"plc:plc1": ["start_batch", "stop_batch"]}})
    assert cfg.permissions(["operator"]) == {"start_batch", "request_state"}  # replaced, not merged
    assert "close_batch" in cfg.permissions(["operator", "line_lead"]) and "users_admin" in cfg.permissions(["administrator"])
    op = Principal("alice", "user", ("operator",), cfg.permissions(["operator"]))
    cmd = COMMAND_ADAPTER.validate_python({"name": "close_batch"})
    assert "alice (roles: operator) may not send close_batch" in str(permits(op, cmd))
    plc = device_principal(cfg, "plc:plc1")
    assert permits(plc, COMMAND_ADAPTER.validate_python({"name": "start_batch"})) is None
    assert "device plc:plc1 may not send close_batch" in str(permits(plc, cmd))
    other = device_principal(cfg, "plc:plc9")  # not listed: the default device set, which never closes a batch
    assert permits(other, COMMAND_ADAPTER.validate_python({"name": "pause_batch"})) is None and permits(other, cmd) is not None
    for bad, msg in (({"roles": {"operator": ["fly"]}}, "unknown command 'fly'"), ({"devices": {"opc:x": ["start_batch"]}}, "plc:<device name>"),
                     ({"devices": {"plc:p": ["users_admin"]}}, "never administers users"), ({"session_ttl": 5}, "Extra inputs")):
        with pytest.raises(ValueError, match=msg):
            AccessConfig.model_validate(bad)


def test_password_policy_names_the_rule():
    pol = PasswordPolicy(min_length=10, classes=3, history=1)
    for pw, rule in (("Ab1-short", "at least 10"), ("alllowercase1", "at least 3 of"), ("Xalice-Secret1", "user name")):
        with pytest.raises(ValueError, match=rule):
            check_policy(pw, pol, "alice")
    check_policy("Good-Enough-1", pol, "alice")
