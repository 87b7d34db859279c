"""Directory login against a real OpenLDAP slapd (started here on a free port with its own config and data).

slapd comes from the Debian package `slapd` (tests/run.sh installs it when missing); without it these tests skip
saying so. The directory is filled over LDAP itself (ldap3 as the root DN): people, and groupOfNames groups that
access.ldap.group_roles maps to roles.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ldap3 import MODIFY_ADD, MODIFY_DELETE, Connection, Server

from linectl.access.gate import Access, AccessDenied
from linectl.access.passwords import hash_password
from linectl.access.settings import AccessConfig
from linectl.store import Store

SLAPD = shutil.which("slapd") or ("/usr/sbin/slapd" if Path("/usr/sbin/slapd").exists() else None)
pytestmark = pytest.mark.skipif(SLAPD is None, reason="OpenLDAP slapd is not installed (apt-get install slapd; tests/run.sh does it)")
BASE = "dc=example,dc=org"
ROOT = f"cn=admin,{BASE}"
CONF = """include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {d}/slapd.pid
database mdb
maxsize 10485760
suffix "{base}"
rootdn "{root}"
rootpw rootsecret
directory {d}/db
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Slapd:
    def __init__(self, d: Path) -> None:
        self.dir = d
        (d / "db").mkdir(parents=True)
        (d / "slapd.conf").write_text(CONF.format(d=d, base=BASE, root=ROOT))
        self.port = _free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Slapd:
        assert SLAPD is not None
        self.proc = subprocess.Popen([SLAPD, "-f", str(self.dir / "slapd.conf"), "-h", f"{self.url}/", "-d", "0"],
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "slapd.log", "wb"))  # noqa: SIM115
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                assert self.proc.poll() is None, (self.dir / "slapd.log").read_text()
                assert time.monotonic() < deadline, "slapd did not listen"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def admin(self) -> Connection:
        return Connection(Server(self.url), ROOT, "rootsecret", auto_bind=True)


def person(c: Connection, uid: str, name: str, password: str) -> str:
    dn = f"uid={uid},ou=people,{BASE}"
    assert c.add(dn, ["inetOrgPerson"], {"cn": name, "sn": name.split()[-1], "displayName": name, "userPassword": password}), c.result
    return dn


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Slapd]:
    srv = Slapd(tmp_path / "slapd").start()
    try:
        c = srv.admin()
        assert c.add(BASE, ["dcObject", "organization"], {"o": "Example", "dc": "example"}), c.result
        for ou in ("people", "groups"):
            assert c.add(f"ou={ou},{BASE}", ["organizationalUnit"], {"ou": ou}), c.result
        alice = person(c, "alice", "Alice Directory", "Al1ce-dir-pw")
        bob = person(c, "bob", "Bob Nogroup", "B0b-dir-pw")
        carol = person(c, "carol", "Carol Both", "C4rol-dir-pw")
        assert c.add(f"cn=line-operators,ou=groups,{BASE}", ["groupOfNames"], {"cn": "line-operators", "member": [alice, carol]}), c.result
        assert c.add(f"cn=quality,ou=groups,{BASE}", ["groupOfNames"], {"cn": "quality", "member": [carol]}), c.result
        assert c.add(f"cn=unmapped,ou=groups,{BASE}", ["groupOfNames"], {"cn": "unmapped", "member": [bob]}), c.result
        c.unbind()
        yield srv
    finally:
        srv.stop()


def access_cfg(url: str, **ldap: Any) -> AccessConfig:
    return AccessConfig.model_validate({"ldap": {
        "url": url, "bind_dn_template": f"uid={{username}},ou=people,{BASE}", "group_search_base": f"ou=groups,{BASE}",
        "group_roles": {f"cn=line-operators,ou=groups,{BASE}": "operator", f"cn=quality,ou=groups,{BASE}": "qa"}, "timeout_s": 2, **ldap}})


async def denied(coro: Any, code: str) -> str:
    with pytest.raises(AccessDenied) as info:
        await coro
    assert info.value.code == code, (info.value.code, info.value.reason)
    return info.value.reason


async def test_directory_login_maps_groups_to_roles_and_records_the_user(tmp_path, directory):
    store = await Store.open(tmp_path / "line.db")
    try:
        access = Access(access_cfg(directory.url), store)
        p = await access.authenticate("alice", "Al1ce-dir-pw", channel="mqtt", origin="mqtt:x")
        assert (p.name, p.roles, p.display_name) == ("alice", ("operator",), "Alice Directory")
        u = store.user("alice")
        assert u is not None and u.source == "ldap" and u.password_hash is None
        p = await access.authenticate("carol", "C4rol-dir-pw", channel="mqtt", origin="mqtt:x")
        assert p.roles == ("operator", "qa") and "close_batch" in p.permissions
        await denied(access.authenticate("alice", "wrong", channel="mqtt", origin="x"), "wrong_password")
        await denied(access.authenticate("nobody", "whatever", channel="mqtt", origin="x"), "wrong_password")
        why = await denied(access.authenticate("bob", "B0b-dir-pw", channel="mqtt", origin="x"), "forbidden")
        assert "no group" in why and store.user("bob") is None
        await denied(access.authenticate("alice", "", channel="mqtt", origin="x"), "unauthenticated")  # never an anonymous bind
        # the directory moves alice to quality: her next login carries the new role, recorded as a change by "ldap"
        c = directory.admin()
        c.modify(f"cn=quality,ou=groups,{BASE}", {"member": [(MODIFY_ADD, [f"uid=alice,ou=people,{BASE}"])]})
        c.modify(f"cn=line-operators,ou=groups,{BASE}", {"member": [(MODIFY_DELETE, [f"uid=alice,ou=people,{BASE}"])]})
        c.unbind()
        p = await access.authenticate("alice", "Al1ce-dir-pw", channel="mqtt", origin="x")
        assert p.roles == ("qa",)
        # a local deactivation wins over the directory
        await store.change_user("carol", {"active": False}, "user_deactivated", actor="admin", origin="t", reason="left")
        await denied(access.authenticate("carol", "C4rol-dir-pw", channel="mqtt", origin="x"), "deactivated")
        assert store.verify_audit().ok
        log = [(r.actor, r.action, r.detail.get("username")) for r in store.audit_log() if r.action.startswith("user_")]
        assert ("ldap", "user_added", "alice") in log and ("ldap", "user_roles_changed", "alice") in log
    finally:
        await store.close()


async def test_directory_down_refuses_unless_local_fallback_and_a_local_password(tmp_path, directory):
    store = await Store.open(tmp_path / "line.db")
    try:
        strict, lenient = Access(access_cfg(directory.url), store), Access(access_cfg(directory.url, fallback_local=True), store)
        await strict.authenticate("alice", "Al1ce-dir-pw", channel="mqtt", origin="x")  # known to the store now (source ldap)
        await strict.authenticate("carol", "C4rol-dir-pw", channel="mqtt", origin="x")
        await store.change_user("alice", {"password_hash": hash_password("Al1ce-local-pw")}, "user_password_changed", actor="admin",
                                origin="t", reason="fallback password")
        directory.stop()
        why = await denied(strict.authenticate("alice", "Al1ce-local-pw", channel="mqtt", origin="x"), "directory_unavailable")
        assert "no local fallback" in why
        p = await lenient.authenticate("alice", "Al1ce-local-pw", channel="mqtt", origin="x")
        assert p.name == "alice" and p.roles == ("operator",)  # the roles the directory gave last time
        await denied(lenient.authenticate("alice", "Al1ce-dir-pw", channel="mqtt", origin="x"), "wrong_password")  # the local one only
        await denied(lenient.authenticate("carol", "C4rol-dir-pw", channel="mqtt", origin="x"), "directory_unavailable")  # no local password
    finally:
        await store.close()
