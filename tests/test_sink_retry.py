"""`linectl upstream retry --sink NAME`: a sink parked on a refusal delivers again when the operator says the cause
is fixed, through the normal command path (sink_retry over MQTT to the running daemon, audited with its origin).

The EPCIS 2.0 repository simulator refuses the first capture with 400 (a repository with stricter rules): the
epcis_rest sink parks with an alarm and sends nothing more; after the operator's retry the parked document and
everything after it reach the repository, which ends holding exactly the store's events (its own record)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import LINECTL, REPO, TEST_PASSWORDS, create_and_start, db_query, password_env, simulated_line, wait_for, wait_good

from linectl import control as C
from linectl.simulators.epcis_repository import EpcisRepository, RepositoryConfig

pytestmark = pytest.mark.slow


async def status_json(db: Path | None, until: Callable[[dict[str, Any]], Any], *args: str, timeout: float = 20.0) -> dict[str, Any]:
    """`linectl upstream status --json` of `db` (None: of the config in `args`; a subprocess: the real CLI) until `until(status)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        proc = await asyncio.create_subprocess_exec(*LINECTL, "upstream", "status", *(("--db", str(db)) if db else ()), "--json", *args, cwd=REPO,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        st: dict[str, Any] = json.loads(out)
        if until(st):
            return st
        assert time.monotonic() < deadline, f"upstream status never showed it: {st}"
        await asyncio.sleep(0.5)


async def test_parked_sink_delivers_again_after_the_operators_retry(tmp_path):
    repo = EpcisRepository(RepositoryConfig())
    port = await repo.start()
    repo.fail_next("invalid", 1)
    try:
        over = {"upstream": {"epcis_rest": [{"name": "repo", "url": f"http://127.0.0.1:{port}", "max_age_s": 0.2}]}}
        async with simulated_line(tmp_path, overrides=over) as sl:
            sink = next(s for s in sl.daemon.upstream if getattr(s, "name", None) == "epcis_rest:repo")
            await create_and_start(sl, 40)
            await wait_good(sl, 40, 60)
            await wait_for(lambda: sink.status()["parked"] is not None, 30, "the sink parked on the 400")
            assert "upstream_epcis_rest_parked" in [a.code for a in sl.line.alarms.values()]
            # `upstream status` from the store (read-only, beside the daemon) shows the park the daemon recorded
            st = await status_json(tmp_path / "line.db", lambda st: (st["sinks"]["epcis_rest:repo"]["state"] or {}).get("parked"))
            rec = st["sinks"]["epcis_rest:repo"]
            assert rec["backlog"] > 0 and rec["state"]["running"] is True and "400" in rec["state"]["parked_reason"] and rec["state"]["as_of"]
            live = await status_json(None, lambda st: True, "-c", str(sl.run_cfg_path), "--live")
            assert live["live"]["upstream_sinks"]["epcis_rest:repo"]["parked"]
            held = len(repo.capture_order)
            await asyncio.sleep(1.0)
            assert len(repo.capture_order) == held and sl.line.store.sink_backlog("epcis_rest:repo") > 0  # parked: nothing goes
            with pytest.raises(C.CommandRejected) as refused:
                await sl.line.execute({"name": "sink_retry", "sink": "epcis_rest:nope"}, origin="test")
            assert refused.value.code == "unknown_sink" and "epcis_rest:repo" in refused.value.reason
            proc = await asyncio.create_subprocess_exec(
                *LINECTL, "upstream", "retry", "-c", str(sl.run_cfg_path), "--sink", "epcis_rest:repo", "--actor", "qa", cwd=REPO,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            assert json.loads(out)["result"]["unparked"] is True
            await wait_for(lambda: sl.line.store.sink_backlog("epcis_rest:repo") == 0, 60, "the backlog delivered after the retry")
            assert sink.status()["parked"] is None
            store_ids = []
            for row in sl.line.store.outbox(0, 100_000, only_unforwarded=False):
                if row.epcis:
                    store_ids += [json.loads(e)["eventID"] for e in row.epcis.split("\n")]
            assert sorted(repo.capture_order) == sorted(store_ids) and len(set(repo.capture_order)) == len(store_ids)
            origins = {r.origin for r in sl.line.store.audit_log(limit=100_000) if r.action == "sink_retry"}
            assert len(origins) == 1 and next(iter(origins)).startswith("mqtt:")
        # the daemon is down: the store still says how each sink was when it stopped
        st = await status_json(tmp_path / "line.db", lambda st: True)
        rec = st["sinks"]["epcis_rest:repo"]["state"]
        assert rec["running"] is False and rec["parked"] is False and rec["last_error"] is None
        proc = await asyncio.create_subprocess_exec(*LINECTL, "upstream", "status", "--db", str(tmp_path / "line.db"), cwd=REPO,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, _err = await asyncio.wait_for(proc.communicate(), 60)
        assert f"no error [as of {rec['as_of']}, when the daemon stopped]" in out.decode()
    finally:
        await repo.stop()


async def test_retry_signed_and_with_its_reason_when_the_site_lists_it(tmp_path, monkeypatch):
    """A site that lists sink_retry in access.signatures.required and audit.reason_required: `linectl upstream retry`
    gives --reason and --sign like the other commands; without them the CLI (reason) or the daemon (signature) refuses."""
    for k, v in password_env().items():
        monkeypatch.setenv(k, v)
    xml = tmp_path / "xml"
    xml.mkdir()
    over = {"mqtt": {"protocol": "5"}, "upstream": {"epcis_xml": [{"name": "gw", "dir": str(xml)}]},
            "access": {"roles": {"operator": ["request_state", "sink_retry"]}, "signatures": {"required": {"sink_retry": "performed"}}},
            "audit": {"reason_required": ["sink_retry"]}}
    async with simulated_line(tmp_path, access=True, overrides=over) as sl:
        await wait_for(lambda: sl.daemon.upstream[0].status()["connected"], 15, "the bridge to connect")
        env = {"LINECTL_PASSWORD": TEST_PASSWORDS["operator"]}

        async def retry(*extra: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                *LINECTL, "upstream", "retry", "-c", str(sl.run_cfg_path), "--sink", "epcis_xml:gw", "--user", "operator", *extra, cwd=REPO,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **env})
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            return int(proc.returncode or 0), out.decode(), err.decode()

        rc, _out, err = await retry("--sign")
        assert rc == 2 and "sink_retry needs a reason" in err, err
        rc, out, err = await retry("--reason", "gateway share mounted again")
        assert rc == 1 and json.loads(out)["error"]["code"] == "signature_required", out + err
        rc, out, err = await retry("--reason", "gateway share mounted again", "--sign")
        assert rc == 0, out + err
        reply = json.loads(out)
        assert reply["result"]["signature"] == {"signer": "operator", "signer_name": "Default operator", "meaning": "performed"}, reply
    db = tmp_path / "line.db"
    rows = [(a, json.loads(d)) for a, act, d in db_query(db, "SELECT actor, action, detail FROM audit ORDER BY seq") if act == "sink_retry"]
    assert len(rows) == 1 and rows[0][0] == "operator" and rows[0][1]["reason"] == "gateway share mounted again"
    assert db_query(db, "SELECT signer, meaning FROM signatures") == [("operator", "performed")]
