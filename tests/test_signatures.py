"""Electronic signatures of critical actions (21 CFR 11.50/11.70/11.200/11.300, Annex 11 §14) on the real Line and
Store (tests/fakes.py: fake devices) with real argon2 passwords, as the MQTT bridge drives them: the sender verified
(Access.authenticate), the signature blocks verified (signing.sign), then Line.execute. Each bad input of the
issue is refused with its code before anything changed; a good signature is written with its command's audit
record in one transaction and `linectl audit verify` names a signature row edited afterwards. The store file is
read with sqlite3 directly, not through linectl.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import REPO, wait_for

from linectl import control as C
from linectl.access.gate import Access
from linectl.access.passwords import hash_password
from linectl.access.principal import device_principal
from linectl.access.settings import DEFAULT_SIGNED, AccessConfig
from linectl.access.signing import REVIEW_MEANINGS, requirement, sign, signed_actions
from linectl.control import AUTHENTICATED, COMMAND_ADAPTER, CommandRejected

PW = {"op": "Op-Secret-pw-11", "sup": "Sup-Secret-pw-22", "qa1": "Qa1-Secret-pw-33", "qa2": "Qa2-Secret-pw-44", "admin": "Adm-Secret-pw-55"}
ROLES = {"op": ["operator"], "sup": ["supervisor"], "qa1": ["qa"], "qa2": ["qa"], "admin": ["administrator"]}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("LINECTL_")}
    return subprocess.run([sys.executable, "-m", "linectl", "--log-level", "error", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120, env={**clean, **(env or {})})


def rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return list(c.execute(sql, params))


class Rig:
    """The fake line with access control on, its users, and the bridge's path into it."""

    def __init__(self, fl: Any, store: Any, **signatures: Any) -> None:
        self.fl, self.store, self.line = fl, store, fl.line
        self.line.cfg.access = AccessConfig.model_validate({"lockout": {"attempts": 3, "lock_minutes": 30},
                                                            **({"signatures": signatures} if signatures else {})})
        self.access = Access(self.line.cfg.access, store, refusals=self.line.access_refusals)
        self.line.on_users_admin = self.access.admin  # as the daemon wires it

    async def users(self) -> None:
        for name, roles in ROLES.items():
            await self.store.add_user(name, f"{name.upper()} Person", roles, hash_password(PW[name]), "local", actor="test", origin="test",
                                      reason="setup")

    async def send(self, cmd: Any, user: str, signature: Any = None, second: Any = None) -> dict[str, Any]:
        """What the MQTT bridge does with a command from a logged-in `user` carrying these signature blocks."""
        if isinstance(cmd, dict):
            cmd = COMMAND_ADAPTER.validate_python({**cmd, "actor": user}, context=AUTHENTICATED)
        principal = await self.access.authenticate(user, PW[user], channel="mqtt", origin="mqtt:hmi")
        signed = await sign(self.access, cmd, principal, signature, second, channel="mqtt", origin="mqtt:hmi")
        return await self.line.execute(cmd, "mqtt:hmi", principal=principal, signatures=signed)

    async def refused(self, code: str, cmd: Any, user: str, signature: Any = None, second: Any = None) -> str:
        with pytest.raises(CommandRejected) as info:
            await self.send(cmd, user, signature, second)
        assert info.value.code == code, (info.value.code, info.value.reason)
        return info.value.reason

    async def stopped_batch(self) -> str:
        lot = await self.fl.start_batch(units=10)  # in process (no principal): the trusted harness
        await self.fl.unit()
        await self.fl.execute(C.StopBatch(actor="op"))
        await self.fl.wait_stopped()
        return str(lot)


def sig(user: str, password: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"username": user, "password": password or PW[user], **kw}


def failed_attempts(db: Path, user: str) -> int:
    return int(rows(db, "SELECT failed_attempts FROM users WHERE username=?", (user,))[0][0])


def test_every_default_action_maps_to_its_rule():
    rules = AccessConfig().signatures
    assert set(DEFAULT_SIGNED) == {"start_batch", "create_batch.no_challenge", "close_batch", "rework.decommission", "rework.dissolve",
                                   "provision_pool", "recall_batch", "users_admin"}
    cmds = {
        "start_batch": {"name": "start_batch"},
        "create_batch.no_challenge": {"name": "create_batch", "lot": "L", "gtin": "09501101530003", "expiry": "301231", "planned_qty": 5,
                                      "challenge": False},
        "close_batch": {"name": "close_batch"},
        "rework.decommission": {"name": "rework", "operation": "decommission", "code": "x", "reason": "damaged"},
        "rework.dissolve": {"name": "rework", "operation": "dissolve", "code": "x"},
        "provision_pool": {"name": "provision_pool", "gtin": "09501101530003", "range_start": 1, "range_count": 5},
        "recall_batch": {"name": "recall_batch", "lot": "L"},
        "users_admin": {"name": "users_admin", "action": "lock", "username": "x", "reason": "r"},
    }
    for action, body in cmds.items():
        req = requirement(rules, COMMAND_ADAPTER.validate_python(body, context=AUTHENTICATED))
        assert req is not None and req.action in (action, "users_admin") and req.meaning == DEFAULT_SIGNED[req.action], action
    # the PackML Start is the same decision as start_batch; a batch with its challenge, a remove, a pause: unsigned
    assert signed_actions(COMMAND_ADAPTER.validate_python({"name": "packml_command", "command": "Start"})) == ("start_batch",)
    # an Unhold is one only where it restarts the batch (the line says when: Line.restarts_batch)
    unhold = COMMAND_ADAPTER.validate_python({"name": "packml_command", "command": "Unhold"})
    assert signed_actions(unhold) == ("packml_command",) and requirement(rules, unhold) is None
    assert signed_actions(unhold, starts_batch=True) == ("start_batch",)
    for body in ({"name": "create_batch", "lot": "L", "gtin": "09501101530003", "expiry": "301231", "planned_qty": 5},
                 {"name": "rework", "operation": "remove", "code": "x", "actor": "op"}, {"name": "pause_batch"}):
        assert requirement(rules, COMMAND_ADAPTER.validate_python(body, context=AUTHENTICATED)) is None
    # a review is always signed, with the signer's meaning
    rv = requirement(rules, COMMAND_ADAPTER.validate_python({"name": "sign_review", "lot": "L", "review_digest": "a" * 64}))
    assert rv is not None and rv.meaning is None and REVIEW_MEANINGS == ("reviewed", "approved")


@pytest.mark.parametrize(("bad", "msg"), [
    ({"required": {"fly": "approved"}}, "unknown action 'fly'"),
    ({"required": {"close_batch": "liked"}}, "performed"),
    ({"required": {"close_batch": "approved"}, "four_eyes": {"recall_batch": "approved"}}, "four_eyes recall_batch: not in required"),
    ({"required": {"sign_review": "reviewed"}}, "a review is always signed"),
    ({"requried": {}}, "Extra inputs"),
])
def test_signature_rules_refuse_what_would_not_work(bad, msg):
    with pytest.raises(ValueError, match=msg):
        AccessConfig.model_validate({"signatures": bad})


async def test_close_signed_by_qa_is_written_with_its_record_in_one_transaction(fake_line, store, tmp_path):
    rig = Rig(fake_line, store)
    await rig.users()
    lot = await rig.stopped_batch()
    r = await rig.send(C.CloseBatch(actor="qa1"), "qa1", sig("qa1"))
    assert r["state"] == "closed" and r["signature"] == {"signer": "qa1", "signer_name": "QA1 Person", "meaning": "approved"}
    db = Path(store.path)
    audit = {a[0]: a for a in rows(db, "SELECT seq, ts, actor, action, detail, hash FROM audit")}
    close = next(a for a in audit.values() if a[3] == "close_batch")
    signed = audit[close[0] + 1]
    assert signed[3] == "signature_added" and signed[2] == "qa1" and signed[1] == close[1]  # one transaction: one timestamp
    assert json.loads(close[4])["signature"]["signer"] == "qa1"
    d = json.loads(signed[4])
    assert (d["record_ref"], d["record_digest"], d["signed_action"], d["lot"], d["meaning"]) == (f"audit:{close[0]}", close[5], "close_batch", lot, "approved")
    sigs = rows(db, "SELECT record_ref, record_digest, signer, signer_name, meaning, signed_at, second_signer, audit_seq FROM signatures")
    assert sigs == [(f"audit:{close[0]}", close[5], "qa1", "QA1 Person", "approved", close[1], None, signed[0])]
    assert store.verify_audit().ok


async def test_missing_wrong_and_mismatched_signatures_are_refused_before_anything_runs(fake_line, store, tmp_path):
    rig = Rig(fake_line, store)
    await rig.users()
    await rig.stopped_batch()
    db = Path(store.path)
    msg = await rig.refused("signature_required", C.CloseBatch(actor="qa1"), "qa1")
    assert "close_batch needs an electronic signature (meaning approved" in msg
    # the line's own check, for a channel that brings no signature (an OPC UA method, a PLC tag)
    principal = await rig.access.authenticate("qa1", PW["qa1"], channel="opcua", origin="opcua:x")
    with pytest.raises(CommandRejected) as info:
        await rig.line.execute(C.CloseBatch(actor="qa1"), "opcua:x", principal=principal)
    assert info.value.code == "signature_required"
    with pytest.raises(CommandRejected) as info:
        await rig.line.execute(C.StartBatch(actor="x"), "plc:plc1", principal=device_principal(rig.line.cfg.access, "plc:plc1"))
    assert info.value.code == "signature_required" and "a device cannot sign" in info.value.reason
    await rig.refused("signer_mismatch", C.CloseBatch(actor="qa1"), "qa1", sig("qa2"))
    await rig.refused("wrong_meaning", C.CloseBatch(actor="qa1"), "qa1", sig("qa1", meaning="performed"))
    await rig.refused("invalid_signature", C.CloseBatch(actor="qa1"), "qa1", {"username": "qa1"})
    await rig.refused("invalid_signature", C.CloseBatch(actor="qa1"), "qa1", sig("qa1", pin="1234"))
    # a signature on an action no rule names needs its meaning said
    await rig.refused("invalid_signature", C.PauseBatch(actor="op"), "op", sig("op"))
    assert failed_attempts(db, "qa1") == 0  # none of these tried a password
    # a wrong password at signing: refused, and counted towards the lockout like a failed login
    await rig.refused("signature_failed", C.CloseBatch(actor="qa1"), "qa1", sig("qa1", "Not-the-pw-1"))
    assert failed_attempts(db, "qa1") == 1
    assert rig.line.batch is not None and rig.line.batch.state.value == "stopped"  # nothing ran
    assert rows(db, "SELECT count(*) FROM signatures") == [(0,)]
    assert not [a for a in rows(db, "SELECT action FROM audit") if a[0] == "close_batch"]
    await rig.line.access_refusals.flush()
    counts: dict[str, int] = {}
    for (d,) in rows(db, "SELECT detail FROM audit WHERE action='access_refused'"):
        for k, n in json.loads(d)["counts"].items():
            counts[k] = counts.get(k, 0) + n
    for c in ("signature_required", "signer_mismatch", "wrong_meaning", "invalid_signature", "wrong_password"):
        assert counts.get(c), (c, counts)  # every refusal audited (aggregated)


async def test_a_locked_or_deactivated_signer_cannot_sign(fake_line, store, tmp_path):
    rig = Rig(fake_line, store)
    await rig.users()
    await rig.stopped_batch()
    db = Path(store.path)
    principal = await rig.access.authenticate("qa1", PW["qa1"], channel="mqtt", origin="mqtt:hmi")  # logged in before
    for _ in range(3):  # access.lockout.attempts wrong passwords at signing lock the signer
        with pytest.raises(CommandRejected) as info:
            await sign(rig.access, C.CloseBatch(actor="qa1"), principal, sig("qa1", "Guessing-pw-1"), None, channel="mqtt", origin="mqtt:hmi")
        assert info.value.code == "signature_failed"
    locked = rows(db, "SELECT detail FROM audit WHERE action='user_locked'")
    assert len(locked) == 1 and "3 failed logins" in json.loads(locked[0][0])["reason"]
    with pytest.raises(CommandRejected) as info:  # the right password now: still locked
        await sign(rig.access, C.CloseBatch(actor="qa1"), principal, sig("qa1"), None, channel="mqtt", origin="mqtt:hmi")
    assert info.value.code == "locked" and "signature of qa1" in info.value.reason
    await rig.send({"name": "users_admin", "action": "deactivate", "username": "qa2", "reason": "left"}, "admin", sig("admin"))
    sup = await rig.access.authenticate("sup", PW["sup"], channel="mqtt", origin="mqtt:hmi")
    with pytest.raises(CommandRejected) as info:  # a deactivated second signer
        rig.line.cfg.access.signatures.four_eyes["close_batch"] = "approved"
        await sign(rig.access, C.CloseBatch(actor="sup"), sup, sig("sup"), sig("qa2"), channel="mqtt", origin="mqtt:hmi")
    assert info.value.code == "deactivated"
    assert rig.line.batch is not None and rig.line.batch.state.value == "stopped"
    # the user change was signed by the administrator, with the users_admin command's record
    got = rows(db, "SELECT s.signer, s.meaning, a.action FROM signatures s JOIN audit a ON s.record_ref = 'audit:' || a.seq AND s.record_digest = a.hash")
    assert got == [("admin", "performed", "users_admin")]


async def test_four_eyes_needs_another_person_allowed_the_action(fake_line, store, tmp_path):
    rig = Rig(fake_line, store, required={"close_batch": "performed"}, four_eyes={"close_batch": "approved"})
    await rig.users()
    await rig.stopped_batch()
    db = Path(store.path)
    close = C.CloseBatch(actor="sup")
    assert "second person's signature" in await rig.refused("signature_required", close, "sup", sig("sup"))
    await rig.refused("same_signer", close, "sup", sig("sup"), sig("sup"))
    assert failed_attempts(db, "sup") == 0  # refused before any password was tried
    reason = await rig.refused("signer_forbidden", close, "sup", sig("sup"), sig("op"))  # an operator may not close a batch
    assert "op (roles: operator) may not send close_batch" in reason
    await rig.refused("signature_failed", close, "sup", sig("sup"), sig("qa1", "Wrong-pw-123"))
    assert failed_attempts(db, "qa1") == 1
    await rig.refused("wrong_meaning", close, "sup", sig("sup"), sig("qa1", meaning="reviewed"))
    r = await rig.send(close, "sup", sig("sup"), sig("qa1"))
    assert r["signature"] == {"signer": "sup", "signer_name": "SUP Person", "meaning": "performed", "second_signer": "qa1",
                              "second_signer_name": "QA1 Person", "second_meaning": "approved"}
    got = rows(db, "SELECT signer, meaning, second_signer, second_meaning, second_signed_at IS NOT NULL FROM signatures")
    assert got == [("sup", "performed", "qa1", "approved", 1)] and failed_attempts(db, "qa1") == 0


async def test_a_tampered_signature_row_is_named_by_audit_verify(fake_line, store, tmp_path):
    rig = Rig(fake_line, store)
    await rig.users()
    await rig.stopped_batch()
    await rig.send(C.CloseBatch(actor="qa1"), "qa1", sig("qa1"))
    db = Path(store.path)
    await store.close()
    assert cli("audit", "verify", "--db", str(db)).returncode == 0
    for label, sql in (("meaning", "UPDATE signatures SET meaning='reviewed'"),
                       ("moved to another record", "UPDATE signatures SET record_ref='audit:1'"),
                       ("signer", "UPDATE signatures SET signer='qa2', signer_name='QA2 Person'")):
        copy = tmp_path / f"t-{label.split()[0]}.db"
        with sqlite3.connect(db) as src, sqlite3.connect(copy) as dst:
            src.backup(dst)
        with sqlite3.connect(copy) as c:
            c.execute(sql)
        r = cli("audit", "verify", "--db", str(copy))
        assert r.returncode == 1 and "signatures row 1 was altered outside linectl" in r.stdout, (label, r.stdout, r.stderr)
    # the untouched store still verifies, and its row is the version its record made
    assert cli("audit", "verify", "--db", str(db)).returncode == 0


async def test_sign_review_refuses_a_changed_batch_and_signs_the_same_one(fake_line, store, tmp_path):
    rig = Rig(fake_line, store)
    await rig.users()
    lot = await rig.stopped_batch()
    await rig.send(C.CloseBatch(actor="qa1"), "qa1", sig("qa1"))
    db = Path(store.path)
    await store.close()
    out = tmp_path / "review.json"
    r = cli("audit", "review", "--batch", lot, "--db", str(db), "-o", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    digest = doc["review_digest"]
    sigs = doc["signatures"]["rows"]
    assert [(s["signed_action"], s["signer"], s["meaning"], s["digest_matches"]) for s in sigs] == [("close_batch", "qa1", "approved", True)]
    env = {"LINECTL_PASSWORD": PW["qa2"]}
    # no user, a wrong password, a meaning a review does not have: refused
    assert cli("audit", "review", "--batch", lot, "--db", str(db), "--sign", "--digest", digest, env=env).returncode == 2
    r = cli("audit", "review", "--batch", lot, "--db", str(db), "--sign", "--user", "qa2", "--digest", digest, env={"LINECTL_PASSWORD": "Nope-nope-123"})
    assert r.returncode == 1 and "signature_failed" in r.stderr and "Traceback" not in r.stderr
    r = cli("audit", "review", "--batch", lot, "--db", str(db), "--sign", "--user", "qa2", "--meaning", "performed", env=env)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    # the batch's records change after the document was built (a recall marked): the old digest is refused
    assert cli("recall", "--batch", lot, "--db", str(db), "--mark", "--actor", "qa1", "--reason", "complaint").returncode == 0
    r = cli("audit", "review", "--batch", lot, "--db", str(db), "--sign", "--user", "qa2", "--digest", digest, "--meaning", "approved", env=env)
    assert r.returncode == 1 and "record_changed" in r.stderr and "changed since the document was built" in r.stderr, r.stderr
    assert rows(db, "SELECT count(*) FROM audit WHERE action='sign_review'") == [(0,)]
    # built again, read, signed
    r = cli("audit", "review", "--batch", lot, "--db", str(db), "-o", str(out))
    digest2 = json.loads(out.read_text())["review_digest"]
    assert digest2 != digest
    r = cli("audit", "review", "--batch", lot, "--db", str(db), "-o", str(tmp_path / "signed.json"), "--sign", "--user", "qa2",
            "--digest", digest2, "--meaning", "approved", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = rows(db, "SELECT seq, actor, detail, hash FROM audit WHERE action='sign_review'")
    assert len(rec) == 1 and rec[0][1] == "qa2" and json.loads(rec[0][2])["review_digest"] == digest2
    got = rows(db, "SELECT record_ref, record_digest, signer, meaning FROM signatures WHERE signer='qa2'")
    assert got == [(f"audit:{rec[0][0]}", rec[0][3], "qa2", "approved")]
    # the review built now shows that it was signed, and what it signed
    r = cli("audit", "review", "--batch", lot, "--db", str(db), "-o", str(out))
    doc = json.loads(out.read_text())
    assert [(x["signer"], x["meaning"], x["review_digest"]) for x in doc["review"]["earlier_signatures"]] == [("qa2", "approved", digest2)]
    assert ("sign_review", "qa2") in {(s["signed_action"], s["signer"]) for s in doc["signatures"]["rows"]}
    assert cli("audit", "verify", "--db", str(db)).returncode == 0


def test_offline_recall_mark_and_serials_import_are_signed(tmp_path):
    """The CLI commands that write the store themselves: with access control the recall marking and the serial
    import are the user's commands recall_batch / provision_pool, refused unsigned, signed with --sign."""
    import asyncio

    from engine_helpers import TEST_PASSWORDS, password_env, variant_raw
    from ruamel.yaml import YAML

    from linectl.store import Store

    raw = variant_raw(access=True)
    raw["store"]["path"] = str(tmp_path / "line.db")
    cfg = tmp_path / "line.yaml"
    with open(cfg, "w", encoding="utf-8") as f:
        YAML(typ="safe").dump(raw, f)
    db = tmp_path / "line.db"
    assert cli("init", "-c", str(cfg), env=password_env()).returncode == 0
    admin = {"LINECTL_PASSWORD": TEST_PASSWORDS["admin"], "LINECTL_NEW_PASSWORD": PW["sup"]}
    assert cli("users", "add", "lead", "-c", str(cfg), "--name", "Sue P.", "--roles", "supervisor", "--reason", "lead", "--user", "admin",
               "--sign", env=admin).returncode == 0
    gtin = raw["products"][0]["gtin"]
    serials = tmp_path / "serials.txt"
    serials.write_text("".join(f"S{n:08d}\n" for n in range(50)))
    imp = ("serials", "import", str(serials), "--gtin", gtin, "-c", str(cfg), "--reason", "L3 file")
    r = cli(*imp, "--user", "operator", "--sign", env={"LINECTL_PASSWORD": TEST_PASSWORDS["operator"]})
    assert r.returncode == 1 and "refused (forbidden)" in r.stderr  # an operator may not fill the pool
    r = cli(*imp, env={})
    assert r.returncode == 1 and "refused (unauthenticated)" in r.stderr
    r = cli(*imp, "--user", "lead", env={"LINECTL_PASSWORD": PW["sup"]})
    assert r.returncode == 1 and "refused (signature_required)" in r.stderr
    r = cli(*imp, "--user", "lead", "--sign", env={"LINECTL_PASSWORD": "Wrong-pw-9999"})
    assert r.returncode == 1 and "refused (wrong_password)" in r.stderr
    assert rows(db, "SELECT count(*) FROM serials") == [(0,)]  # nothing imported by a refused command
    r = cli(*imp, "--user", "lead", "--sign", env={"LINECTL_PASSWORD": PW["sup"]})
    assert r.returncode == 0 and "accepted 50" in r.stdout, r.stdout + r.stderr
    rec = rows(db, "SELECT seq, actor, detail, hash FROM audit WHERE action='serials_import'")
    assert len(rec) == 1 and rec[0][1] == "lead" and json.loads(rec[0][2])["accepted"] == 50
    assert rows(db, "SELECT record_ref, record_digest, signer, meaning FROM signatures WHERE signer='lead'") == \
        [(f"audit:{rec[0][0]}", rec[0][3], "lead", "performed")]

    async def batch() -> None:
        s = await Store.open(db)
        try:
            await s.create_batch("RC1", gtin, "301231", 10, "test", "test")
        finally:
            await s.close()

    asyncio.run(batch())
    mark = ("recall", "--batch", "RC1", "-c", str(cfg), "--mark", "--reason", "complaint", "--out", str(tmp_path / "r.json"))
    qa = {"LINECTL_PASSWORD": TEST_PASSWORDS["qa"]}
    r = cli(*mark, "--user", "qa", env=qa)
    assert r.returncode == 1 and "refused (signature_required)" in r.stderr
    r = cli(*mark, "--user", "qa", "--sign", "--actor", "someone", env=qa)
    assert r.returncode == 1 and "refused (forged_actor)" in r.stderr
    assert rows(db, "SELECT count(*) FROM audit WHERE action='batch_recalled'") == [(0,)]
    r = cli(*mark, "--user", "qa", "--sign", env=qa)
    assert r.returncode == 0 and "is now marked recalled" in r.stderr, r.stderr
    rec = rows(db, "SELECT seq, actor, hash FROM audit WHERE action='batch_recalled'")
    assert rows(db, "SELECT record_ref, record_digest, signer, meaning FROM signatures WHERE signer='qa'") == \
        [(f"audit:{rec[0][0]}", rec[0][2], "qa", "approved")]
    assert cli("audit", "verify", "-c", str(cfg), env={}).returncode == 0


async def test_packml_unhold_that_restarts_a_batch_is_signed_as_start_batch(make_fake_line, store, tmp_path):
    """A line Held on an empty serial pool (fault no_serials: the fault stopped the batch) restarts its batch on a
    PackML Unhold, which runs start_batch: start_batch's signature rule holds for it on every channel. Negative
    control: an Unhold of a line held by a command (paused) resumes it, and needs no signature."""
    from engine_helpers import DEFAULT_CONFIG

    from linectl.engine.packml import PackmlState
    from linectl.yamlsource import load_yaml, to_plain

    raw = to_plain(load_yaml(DEFAULT_CONFIG))
    raw["products"] = raw["products"][:1]
    raw["products"][0]["serials"] = {"scheme": "pool", "low_water": 0}
    base = tmp_path / "pool.yaml"
    base.write_text(json.dumps(raw))  # (JSON is YAML)
    fl = await make_fake_line(base=base)
    rig = Rig(fl, store)
    await rig.users()
    gtin = fl.line.cfg.products[0].gtin
    # one block of serials (print_verify SERIAL_BLOCK, 256) and a few: the refill after half of it finds the pool dry
    assert (await store.provision(gtin, [str(5_000_000 + i) for i in range(260)], source="test")).accepted == 260
    await fl.start_batch(units=100_000)
    for _ in range(260):  # the allocator's PoolExhausted stops the line (Line.task_crashed: fault no_serials)
        if fl.line.fault is not None:
            break
        with contextlib.suppress(AssertionError):
            await fl.unit()
    await wait_for(lambda: fl.line.fault == "no_serials" and fl.line.packtags().state is PackmlState.Held, 10, "Held on no_serials")
    await fl.wait_stopped()
    assert await store.provision(gtin, [str(6_000_000 + i) for i in range(50)], source="test")
    unhold = C.PackmlCmd(command="Unhold", actor="op")

    # a PLC's PackML handshake (a device cannot sign), an OPC UA method and an unsigned MQTT command: refused
    plc = device_principal(rig.line.cfg.access, "plc:plc1")
    with pytest.raises(CommandRejected) as info:
        await rig.line.execute(C.PackmlCmd(command="Unhold", actor="plc"), "plc:plc1", principal=plc)
    assert info.value.code == "signature_required" and "start_batch" in info.value.reason and "a device cannot sign" in info.value.reason
    ua = await rig.access.authenticate("op", PW["op"], channel="opcua", origin="opcua:scada")
    with pytest.raises(CommandRejected) as info:
        await rig.line.execute(unhold, "opcua:scada", principal=ua)
    assert info.value.code == "signature_required" and "empty serial pool" in info.value.reason
    await rig.refused("signature_required", unhold, "op")
    # a signature with another meaning than start_batch's: refused at the channel
    await rig.refused("wrong_meaning", unhold, "op", sig("op", meaning="approved"))
    assert fl.line.fault == "no_serials" and fl.state == "stopped"  # nothing ran
    assert fl.line.packtags().state is PackmlState.Held
    db = Path(store.path)
    assert not rows(db, "SELECT 1 FROM audit WHERE action='packml_command'")

    # signed over MQTT: restarts, and the signature is written with the command's record as start_batch's would be
    r = await rig.send(unhold, "op", sig("op"))
    assert r["signature"]["meaning"] == "performed" and r["state"] == "Execute", r
    assert fl.state == "running" and fl.line.fault is None
    got = rows(db, "SELECT s.signer, s.meaning, a.action FROM signatures s JOIN audit a ON s.record_ref = 'audit:' || a.seq")
    assert got == [("op", "performed", "packml_command")]

    # negative control: Hold then Unhold from the PLC, no signature: a pause and a resume, not a start
    r = await rig.line.execute(C.PackmlCmd(command="Hold", actor="plc"), "plc:plc1", principal=plc)
    assert r["state"] == "Held" and fl.state == "paused"
    r = await rig.line.execute(C.PackmlCmd(command="Unhold", actor="plc"), "plc:plc1", principal=plc)
    assert r["state"] == "Execute" and fl.state == "running"
