"""`linectl init` / `linectl users ...` / `linectl batch --user` as an administrator runs them: real processes, a real
store; offline (the CLI owns the store) and through a running daemon over the real broker (the store is the daemon's)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import LINECTL, REPO, TEST_PASSWORDS, db_query, password_env, simulated_line, variant_raw, wait_for
from ruamel.yaml import YAML

from linectl.mqtt_bridge import MqttBridge

pytestmark = pytest.mark.timeout(240)
NEW_PW = "Night-Shift-pw-77"


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LINECTL_")}
    return subprocess.run([*LINECTL, "--log-level", "error", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**clean, **(env or {})})


def line_config(tmp: Path) -> Path:
    raw = variant_raw(access=True)
    raw["store"]["path"] = str(tmp / "line.db")
    raw.pop("simulation", None)
    p = tmp / "line.yaml"
    with open(p, "w", encoding="utf-8") as fh:
        YAML(typ="safe").dump(raw, fh)
    return p


def as_user(name: str, pw: str | None = None, **extra: str) -> dict[str, str]:
    return {"LINECTL_PASSWORD": pw or TEST_PASSWORDS[name], **extra}


def reply(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in r.stderr, r.stderr
    return dict(json.loads(r.stdout))


def test_init_creates_default_users_and_shows_generated_passwords_once(tmp_path):
    cfg = line_config(tmp_path)
    r = cli("init", "-c", str(cfg), env={"LINECTL_PASSWORD_ADMIN": TEST_PASSWORDS["admin"]})
    assert r.returncode == 0, r.stderr
    lines = {ln.split(":")[0]: ln for ln in r.stdout.splitlines() if ln.startswith("user ")}
    assert "password from the environment" in lines["user admin"]
    generated = lines["user operator"].split("initial password ")[1].split(" ")[0]
    assert len(generated) >= 12 and "shown once" in lines["user operator"]
    # the generated password works; it is in no log or record
    r = cli("batch", "stop", "-c", str(cfg), "--user", "operator", env=as_user("operator", generated))
    assert reply(r)["error"]["code"] == "no_batch" or "no" in reply(r)["error"]["message"], r.stdout
    r = cli("users", "list", "-c", str(cfg))
    assert r.returncode == 0 and [ln.split()[0] for ln in r.stdout.splitlines()] == ["admin", "operator", "qa"], r.stdout
    text = " ".join(str(d) for (d,) in db_query(tmp_path / "line.db", "SELECT detail FROM audit"))
    assert generated not in text and TEST_PASSWORDS["admin"] not in text
    # a password from the environment that the policy refuses: refused before any store exists
    other = tmp_path / "other"
    other.mkdir()
    r = cli("init", "-c", str(line_config(other)), env={"LINECTL_PASSWORD_QA": "short"})
    assert r.returncode == 2 and "LINECTL_PASSWORD_QA" in r.stderr and not (other / "line.db").exists()


def test_users_offline_add_passwd_roles_deactivate_with_reasons_and_permissions(tmp_path):
    cfg = str(line_config(tmp_path))
    assert cli("init", "-c", cfg, env=password_env()).returncode == 0
    # no --user, a wrong password, a user without users_admin: refused, nothing changed
    r = cli("users", "add", "erin", "-c", cfg, "--name", "Erin E.", "--roles", "operator", "--reason", "hire",
            env={"LINECTL_NEW_PASSWORD": NEW_PW})
    assert r.returncode == 1 and reply(r)["error"]["code"] == "unauthenticated"
    r = cli("users", "add", "erin", "-c", cfg, "--name", "Erin E.", "--roles", "operator", "--reason", "hire", "--user", "admin", "--sign",
            env=as_user("admin", "wrong", LINECTL_NEW_PASSWORD=NEW_PW))
    assert r.returncode == 1 and reply(r)["error"]["code"] == "wrong_password"
    r = cli("users", "add", "erin", "-c", cfg, "--name", "Erin E.", "--roles", "operator", "--reason", "hire", "--user", "operator", "--sign",
            env=as_user("operator", LINECTL_NEW_PASSWORD=NEW_PW))
    assert r.returncode == 1 and reply(r)["error"]["code"] == "forbidden"
    r = cli("users", "add", "erin", "-c", cfg, "--name", "Erin E.", "--roles", "operator", "--reason", "hire", "--user", "admin", "--sign",
            env=as_user("admin", LINECTL_NEW_PASSWORD="weak"))
    assert r.returncode == 1 and reply(r)["error"]["code"] == "password_policy"
    # the new password from a file (never on the command line)
    pwfile = tmp_path / "pw.txt"
    pwfile.write_text(NEW_PW + "\n")
    r = cli("users", "add", "erin", "-c", cfg, "--name", "Erin E.", "--roles", "operator", "--reason", "new hire", "--user", "admin", "--sign",
            "--new-password-file", str(pwfile), env=as_user("admin"))
    assert r.returncode == 0 and reply(r)["result"]["user"]["roles"] == ["operator"], r.stdout + r.stderr
    r = cli("users", "roles", "erin", "-c", cfg, "--roles", "operator,qa", "--reason", "trained", "--user", "admin", "--sign", env=as_user("admin"))
    assert r.returncode == 0 and reply(r)["result"]["user"]["roles"] == ["operator", "qa"]
    # her own password, with her current one (from a file); then the old one is refused
    cur = tmp_path / "cur.txt"
    cur.write_text(NEW_PW)
    r = cli("users", "passwd", "erin", "-c", cfg, "--reason", "routine", "--user", "erin", "--sign", "--password-file", str(cur),
            env={"LINECTL_NEW_PASSWORD": "Fresh-Start-pw-88"})
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("batch", "stop", "-c", cfg, "--user", "erin", env=as_user("erin", NEW_PW))
    assert reply(r)["error"]["code"] == "wrong_password"
    r = cli("users", "deactivate", "erin", "-c", cfg, "--reason", "left", "--user", "admin", "--sign", env=as_user("admin"))
    assert r.returncode == 0
    r = cli("batch", "stop", "-c", cfg, "--user", "erin", env=as_user("erin", "Fresh-Start-pw-88"))
    assert reply(r)["error"]["code"] == "deactivated"
    r = cli("users", "deactivate", "admin", "-c", cfg, "--reason", "oops", "--user", "admin", "--sign", env=as_user("admin"))
    assert r.returncode == 1 and reply(r)["error"]["code"] == "last_administrator"
    r = cli("users", "list", "-c", cfg, "--json")
    erin = next(u for u in json.loads(r.stdout) if u["username"] == "erin")
    assert erin["active"] is False and erin["roles"] == ["operator", "qa"] and "password_hash" not in erin
    changes = db_query(tmp_path / "line.db", "SELECT actor, origin, action, detail FROM audit WHERE detail LIKE '%\"erin\"%' "
                       "AND action != 'signature_added' ORDER BY seq")
    assert [(a, o, act) for a, o, act, _ in changes] == [("admin", "cli:offline", "user_added"), ("admin", "cli:offline", "user_roles_changed"),
                                                         ("erin", "cli:offline", "user_password_changed"), ("admin", "cli:offline", "user_deactivated")]
    assert [json.loads(d)["reason"] for *_, d in changes] == ["new hire", "trained", "routine", "left"]
    # each change signed (--sign, access.signatures users_admin) by who made it, linked to its record
    signed = db_query(tmp_path / "line.db", "SELECT s.signer, s.meaning, a.action FROM signatures s JOIN audit a ON s.record_ref = 'audit:' || a.seq "
                      "AND s.record_digest = a.hash WHERE a.detail LIKE '%\"erin\"%' ORDER BY s.id")
    assert signed == [("admin", "performed", "user_added"), ("admin", "performed", "user_roles_changed"),
                      ("erin", "performed", "user_password_changed"), ("admin", "performed", "user_deactivated")]
    r = cli("audit", "verify", "-c", cfg)
    assert r.returncode == 0, r.stdout
    # no password in any record, and none appears in the CLI's output
    text = " ".join(str(d) for (d,) in db_query(tmp_path / "line.db", "SELECT detail FROM audit"))
    assert NEW_PW not in text and "Fresh-Start-pw-88" not in text and TEST_PASSWORDS["admin"] not in text


async def test_users_and_batch_go_through_the_running_daemon(tmp_path, monkeypatch):
    for k, v in password_env().items():
        monkeypatch.setenv(k, v)
    async with simulated_line(tmp_path, rate=600.0, access=True, overrides={"mqtt": {"protocol": "5"}}) as sl:
        bridge = sl.daemon.upstream[0]
        assert isinstance(bridge, MqttBridge)
        await wait_for(lambda: bridge.status()["connected"], 15, "the bridge to connect")
        cfg = str(sl.run_cfg_path)

        async def acli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
            return await asyncio.to_thread(cli, *args, env=env)  # the daemon runs in this event loop: do not block it

        r = await acli("users", "add", "fred", "-c", cfg, "--name", "Fred F.", "--roles", "supervisor", "--reason", "cover", "--user", "admin", "--sign",
                env=as_user("admin", LINECTL_NEW_PASSWORD=NEW_PW))
        assert r.returncode == 0 and "offline" not in reply(r), r.stdout + r.stderr  # the daemon made the change
        r = await acli("batch", "state", "-c", cfg, "--user", "fred", env=as_user("fred", NEW_PW))
        assert r.returncode == 0 and reply(r)["ok"], r.stdout + r.stderr
        r = await acli("batch", "state", "-c", cfg, env={})
        assert r.returncode == 2 and "give --user" in r.stderr
        r = await acli("batch", "reset", "-c", cfg, "--user", "qa", env=as_user("qa"))
        assert r.returncode == 1 and reply(r)["error"]["code"] == "forbidden"
    rows = db_query(tmp_path / "line.db", "SELECT actor, origin, action FROM audit WHERE action IN ('users_admin', 'user_added', 'request_state')")
    assert ("admin", "users_admin") in {(a, act) for a, _o, act in rows} and any(a == "admin" and act == "user_added" for a, _o, act in rows)
    assert all(o.startswith("mqtt:linectl-cli-") for a, o, act in rows if a == "admin")
