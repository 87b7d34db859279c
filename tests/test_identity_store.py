"""Users, sessions and signatures in the store: audited changes with old/new value, digests that `audit verify` checks."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from linectl.store import SCHEMA_VERSION, Store, StoreError

HASH = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
HASH2 = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$b3RoZXJvdGhlcm90aGVyb3Ro"


async def _store(tmp_path: Path) -> Store:
    return await Store.open(tmp_path / "line.db")


def _audit(path: Path, action: str) -> list[dict[str, object]]:
    with sqlite3.connect(path) as c:
        return [json.loads(d) for (d,) in c.execute("SELECT detail FROM audit WHERE action=? ORDER BY seq", (action,))]


def _verify_cli(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linectl", "audit", "verify", "--db", str(path)], capture_output=True, text=True, timeout=60)


async def test_user_changes_are_audited_with_old_and_new_value_never_the_hash(tmp_path):
    s = await _store(tmp_path)
    try:
        seq = await s.add_user("alice", "Alice A.", ["operator"], HASH, "local", actor="admin", origin="cli:offline", reason="new hire")
        await s.change_user("alice", {"roles": ["operator", "qa"]}, "user_roles_changed", actor="admin", origin="cli:offline", reason="trained QA")
        await s.change_user("alice", {"password_hash": HASH2}, "user_password_changed", actor="alice", origin="mqtt:x", reason="expired", history_n=3)
        with pytest.raises(StoreError, match="nothing to change"):
            await s.change_user("alice", {"roles": ["qa", "operator"]}, "user_roles_changed", actor="admin", origin="cli", reason="again")
        with pytest.raises(StoreError, match="exists"):
            await s.add_user("alice", "Other", ["qa"], None, "local", actor="admin", origin="cli", reason="dup")
        u = s.user("alice")
        assert u is not None and u.roles == ("operator", "qa") and u.password_hash == HASH2 and u.password_history == (HASH,)
        assert u.audit_seq > seq and s.verify_audit().ok
    finally:
        await s.close()
    added, roles, pw = _audit(tmp_path / "line.db", "user_added"), _audit(tmp_path / "line.db", "user_roles_changed"), \
        _audit(tmp_path / "line.db", "user_password_changed")
    assert added[0]["new"]["roles"] == ["operator"] and added[0]["reason"] == "new hire"  # type: ignore[index]
    assert roles[0]["old"] == {"roles": ["operator"]} and roles[0]["new"] == {"roles": ["operator", "qa"]} and roles[0]["reason"] == "trained QA"
    assert set(pw[0]["old"]) == {"password_changed_at"}  # type: ignore[arg-type]
    with sqlite3.connect(tmp_path / "line.db") as c:
        text = " ".join(d for (d,) in c.execute("SELECT detail FROM audit"))
    assert "argon2" not in text  # never a hash in the trail


@pytest.mark.parametrize("tamper, why", [
    ("UPDATE users SET roles='[\"administrator\",\"operator\"]' WHERE username='bob'", "altered outside linectl"),
    ("UPDATE users SET active=1 WHERE username='bob'", "altered outside linectl"),
    ("UPDATE users SET password_hash='" + HASH2 + "' WHERE username='bob'", "altered outside linectl"),
])
async def test_a_users_row_changed_outside_linectl_breaks_audit_verify(tmp_path, tamper, why):
    s = await _store(tmp_path)
    try:
        await s.add_user("bob", "Bob", ["operator"], HASH, "local", actor="admin", origin="cli", reason="r")
        await s.change_user("bob", {"active": False}, "user_deactivated", actor="admin", origin="cli", reason="left")
        assert s.verify_audit().ok
    finally:
        await s.close()
    db = tmp_path / "line.db"
    with sqlite3.connect(db) as c:
        c.execute(tamper)
    res = _verify_cli(db)
    assert res.returncode == 1 and "users row 'bob'" in res.stdout and why in res.stdout, res.stdout + res.stderr


async def test_an_older_version_of_a_users_row_put_back_is_named(tmp_path):
    s = await _store(tmp_path)
    try:
        await s.add_user("carol", "Carol", ["operator", "supervisor"], HASH, "local", actor="admin", origin="cli", reason="r")
        db = tmp_path / "line.db"
        with sqlite3.connect(db) as c:
            old = c.execute("SELECT roles, changed_at, audit_seq, digest FROM users WHERE username='carol'").fetchone()
        await s.change_user("carol", {"roles": ["operator"]}, "user_roles_changed", actor="admin", origin="cli", reason="demoted")
    finally:
        await s.close()
    with sqlite3.connect(db) as c:  # a valid earlier version of the row (its own digest is right)
        c.execute("UPDATE users SET roles=?, changed_at=?, audit_seq=?, digest=? WHERE username='carol'", old)
    res = _verify_cli(db)
    assert res.returncode == 1 and "users row 'carol' is not the version its last audit record" in res.stdout, res.stdout


async def test_a_deleted_user_is_named_and_deletion_is_refused_by_the_store(tmp_path):
    s = await _store(tmp_path)
    try:
        await s.add_user("dave", "Dave", ["qa"], HASH, "local", actor="admin", origin="cli", reason="r")
    finally:
        await s.close()
    db = tmp_path / "line.db"
    with sqlite3.connect(db) as c, pytest.raises(sqlite3.IntegrityError, match="never deleted"):
        c.execute("DELETE FROM users")
    with sqlite3.connect(db) as c:
        c.execute("DROP TRIGGER users_never_deleted")
        c.execute("DELETE FROM users")
    res = _verify_cli(db)
    assert res.returncode == 1 and "users row 'dave' was deleted outside linectl" in res.stdout, res.stdout


async def test_failed_logins_lock_the_user_in_one_audited_change(tmp_path):
    s = await _store(tmp_path)
    try:
        await s.add_user("eve", "Eve", ["operator"], HASH, "local", actor="admin", origin="cli", reason="r")
        until = "2999-01-01T00:00:00.000000+00:00"
        for i in range(1, 3):
            assert await s.login_result("eve", False, attempts=3, lock_until=until, origin="mqtt:x") == {"failed_attempts": i, "locked": False}
        assert (await s.login_result("eve", False, attempts=3, lock_until=until, origin="mqtt:x"))["locked"]
        u = s.user("eve")
        assert u is not None and u.locked_until == until and u.failed_attempts == 3 and s.verify_audit().ok
        await s.change_user("eve", {"locked_until": None, "lock_reason": None}, "user_unlocked", actor="admin", origin="cli", reason="called")
        u = s.user("eve")
        assert u is not None and u.locked_until is None and u.failed_attempts == 0 and s.verify_audit().ok
    finally:
        await s.close()
    locked = _audit(tmp_path / "line.db", "user_locked")
    assert locked[0]["new"]["locked_until"] == until and "3 failed logins" in str(locked[0]["reason"])  # type: ignore[index]


async def test_sessions_open_and_revoke_once(tmp_path):
    s = await _store(tmp_path)
    try:
        th = hashlib.sha256(b"tok").hexdigest()
        sid = await s.open_session(th, "alice", "mqtt", "hmi-1", "2999-01-01T00:00:00+00:00", origin="mqtt:hmi-1")
        got = s.session(th)
        assert got is not None and got.id == sid and got.client_id == "hmi-1" and got.revoked_at is None
        assert await s.revoke_session(th, actor="alice", origin="mqtt:hmi-1", reason="logout") == sid
        assert await s.revoke_session(th, actor="alice", origin="mqtt:hmi-1", reason="logout") is None
        assert s.session(hashlib.sha256(b"other").hexdigest()) is None
    finally:
        await s.close()


async def test_signatures_are_written_read_and_verified(tmp_path):
    s = await _store(tmp_path)
    try:
        digest = s.audit_log(0, 1)[0].hash  # an audit record is signed as its chain hash
        with pytest.raises(StoreError, match="not that record's hash"):
            await s.add_signature("audit:1", hashlib.sha256(b"record 7").hexdigest(), "qa1", "Q", "approved", origin="x")
        with pytest.raises(StoreError, match="no such audit record"):
            await s.add_signature("audit:99999", digest, "qa1", "Q", "approved", origin="x")
        sig_id, seq = await s.add_signature("audit:1", digest, "qa1", "Q. A. One", "approved", origin="mqtt:x",
                                            second=("sup1", "S. Up", "reviewed"))
        with pytest.raises(StoreError, match="meaning"):
            await s.add_signature("audit:1", digest, "qa1", "Q", "liked", origin="x")
        with pytest.raises(StoreError, match="record_ref"):
            await s.add_signature("batch:1", digest, "qa1", "Q", "approved", origin="x")
        sigs = s.signatures_for("audit:1")
        assert [(x.id, x.signer, x.meaning, x.second_signer, x.second_meaning, x.audit_seq) for x in sigs] == \
            [(sig_id, "qa1", "approved", "sup1", "reviewed", seq)]
        assert s.signatures_for("audit:2") == [] and s.verify_audit().ok
    finally:
        await s.close()
    db = tmp_path / "line.db"
    with sqlite3.connect(db) as c:
        c.execute("UPDATE signatures SET meaning='performed'")
    res = _verify_cli(db)
    assert res.returncode == 1 and "signatures row 1 was altered" in res.stdout


async def test_store_migrates_v9_file(tmp_path):
    p = tmp_path / "v9.db"
    s = await Store.open(p)
    await s.audit("op", "test", "something", {"x": 1})
    await s.close()
    with sqlite3.connect(p) as c:  # the file as linectl with schema v9 left it
        for t in ("users", "sessions", "signatures"):
            c.execute(f"DROP TABLE {t}")
        c.execute("UPDATE meta SET value='9' WHERE key='schema_version'")
    s = await Store.open(p)
    try:
        assert s.opened_from_version == 9 and s.stats()["schema_version"] == SCHEMA_VERSION == 10
        assert s.users() == [] and s.verify_audit().ok
        await s.add_user("alice", "Alice", ["operator"], HASH, "local", actor="admin", origin="cli", reason="r")
        assert s.verify_audit().ok and [u.username for u in s.users()] == ["alice"]
    finally:
        await s.close()
    assert list(tmp_path.glob("v9.db.v9*.bak"))  # the copy made before migrating
