"""Electronic signatures end to end: a real daemon (linectl.demo.SimulatedLine on the demo config with its access:
section: simulators, drivers, store, bridge) on the real Mosquitto; an MQTT 5 HMI that logs in and signs, and the
real CLI in subprocesses (`linectl batch close --sign`, `linectl audit review --sign` through the daemon that holds
the store). The store file is read with sqlite3 directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import REPO, TEST_PASSWORDS, db_query, password_env, simulated_line, wait_for
from test_access_mqtt import Client, code, expiry

from linectl.mqtt_bridge import MqttBridge

pytestmark = pytest.mark.timeout(240)
GTIN = "09501101530003"


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LINECTL_")}
    return subprocess.run([sys.executable, "-m", "linectl", "--log-level", "error", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=90, env={**clean, **env})


def sig(user: str, password: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"username": user, "password": password or TEST_PASSWORDS[user], **kw}


async def test_signed_batch_over_mqtt_and_the_cli_through_the_running_daemon(tmp_path, monkeypatch):
    for k, v in password_env().items():
        monkeypatch.setenv(k, v)
    async with simulated_line(tmp_path, rate=600.0, access=True, overrides={"mqtt": {"protocol": "5"}}) as sl:
        bridge = sl.daemon.upstream[0]
        assert isinstance(bridge, MqttBridge)
        await wait_for(lambda: bridge.status()["connected"], 15, "the bridge to connect")
        port, root, cfg = sl.cfg.mqtt.port, sl.cfg.topic_root, str(sl.run_cfg_path)

        async def acli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
            return await asyncio.to_thread(cli, *args, env=env)  # the daemon runs in this event loop

        create = {"lot": "SIG1", "gtin": GTIN, "expiry": expiry(), "planned_qty": 40, "challenge": False}
        async with Client(port, root) as hmi:
            op = {"auth": {"token": await hmi.login("operator")}}
            # the challenge waiver and the start need the operator's signature, within the session too
            r = await hmi.send("create_batch", {**create, **op})
            assert code(r) == "signature_required" and "create_batch.no_challenge" in r["error"]["message"]
            r = await hmi.send("create_batch", {**create, **op, "signature": sig("operator", "Wrong-pw-000")})
            assert code(r) == "signature_failed"
            r = await hmi.send("create_batch", {**create, **op, "signature": sig("operator", meaning="performed")})
            assert code(r) == "wrong_meaning"
            r = await hmi.send("create_batch", {**create, **op, "signature": sig("operator")})
            assert r["ok"] and r["result"]["signature"]["meaning"] == "approved", r
            assert code(await hmi.send("start_batch", op)) == "signature_required"
            r = await hmi.send("start_batch", {**op, "signature": sig("operator")})
            assert r["ok"] and r["result"]["signature"] == {"signer": "operator", "signer_name": "Default operator", "meaning": "performed"}, r
            await wait_for(lambda: sl.line.batch is not None and sl.line.batch.good_total() >= 5, 30, "some packs")
            assert (await hmi.send("stop_batch", op))["ok"]  # not a signed action
            await wait_for(lambda: sl.line.batch is not None and sl.line.batch.state.value == "stopped", 30, "the stop")
            # a second signature from the same person, or one not allowed to close: refused
            qa = {"auth": {"token": await hmi.login("qa")}}
            r = await hmi.send("close_batch", {**qa, "signature": sig("qa"), "second_signature": sig("qa")})
            assert code(r) == "same_signer"
            r = await hmi.send("close_batch", {**qa, "signature": sig("qa"), "second_signature": sig("operator", meaning="approved")})
            assert code(r) == "signer_forbidden"
        # the CLI: close without --sign refused (exit 1), then signed by QA through the daemon
        r = await acli("batch", "close", "-c", cfg, "--user", "qa", env={"LINECTL_PASSWORD": TEST_PASSWORDS["qa"]})
        assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "signature_required", r.stdout + r.stderr
        r = await acli("batch", "close", "-c", cfg, "--user", "qa", "--sign", env={"LINECTL_PASSWORD": TEST_PASSWORDS["qa"]})
        assert r.returncode == 0, r.stdout + r.stderr
        reply = json.loads(r.stdout)
        assert "offline" not in reply and reply["result"]["signature"] == {"signer": "qa", "signer_name": "Default QA", "meaning": "approved"}
        # the review, read beside the daemon, then signed through it (the daemon holds the store)
        out = tmp_path / "review.json"
        r = await acli("audit", "review", "--batch", "SIG1", "-c", cfg, "-o", str(out), env={})
        assert r.returncode == 0, r.stderr
        doc = json.loads(out.read_text())
        shown = [(s["signed_action"], s["signer"], s["meaning"], s["digest_matches"]) for s in doc["signatures"]["rows"]]
        assert shown == [("create_batch", "operator", "approved", True), ("start_batch", "operator", "performed", True),
                         ("close_batch", "qa", "approved", True)]
        r = await acli("audit", "review", "--batch", "SIG1", "-c", cfg, "--sign", "--user", "qa", "--digest", doc["review_digest"],
                       env={"LINECTL_PASSWORD": TEST_PASSWORDS["qa"]})
        assert r.returncode == 0 and "signed by qa (reviewed)" in r.stderr, r.stdout + r.stderr
        signed = json.loads(next(ln for ln in r.stderr.splitlines() if ln.startswith("{")))
        assert signed["ok"] and "offline" not in signed and json.loads(r.stdout)["review_digest"] == doc["review_digest"]
        # a digest of a document that is not the batch's now: record_changed
        r = await acli("audit", "review", "--batch", "SIG1", "-c", cfg, "--sign", "--user", "qa", "--digest", doc["review_digest"],
                       env={"LINECTL_PASSWORD": TEST_PASSWORDS["qa"]})
        assert r.returncode == 1 and "record_changed" in r.stderr, r.stdout + r.stderr
    db = Path(tmp_path / "line.db")
    audit = {s: (a, act, d, h) for s, a, act, d, h in db_query(db, "SELECT seq, actor, action, detail, hash FROM audit")}
    sigs = db_query(db, "SELECT record_ref, record_digest, signer, meaning, audit_seq FROM signatures ORDER BY id")
    assert [(audit[int(ref[6:])][1], signer, meaning) for ref, _d, signer, meaning, _s in sigs] == [
        ("create_batch", "operator", "approved"), ("start_batch", "operator", "performed"), ("close_batch", "qa", "approved"),
        ("sign_review", "qa", "reviewed")]
    for ref, digest, signer, _m, seq in sigs:  # each linked to its record's hash, written right after it
        assert audit[int(ref[6:])][3] == digest and seq == int(ref[6:]) + 1 and audit[seq][1] == "signature_added" and audit[seq][0] == signer
    reviewed = next(d for a, act, d, _h in audit.values() if act == "sign_review")
    assert json.loads(reviewed)["review_digest"] == doc["review_digest"]
    assert cli("audit", "verify", "--db", str(db), env={}).returncode == 0
    text = " ".join(d for _a, _act, d, _h in audit.values())
    assert all(pw not in text for pw in TEST_PASSWORDS.values())  # a signature's password is never recorded
