"""The issue's "done when": a demo batch runs with its serials from a real QU4RTET and its events in QU4RTET and in
an EPCIS 2.0 repository, identical to the store.

`linectl demo --config <l3-line variant> --l3 real` (the public command, its own process) runs the aggregation demo
line whose pool product asks QU4RTET for its serials (serialbox REST, or the SOAP number-range request in the SAP
AII/Guardian shape) and whose sinks are `epcis_xml` (EPCIS 1.2 XML into QU4RTET's capture) and `epcis_rest` (the
EPCIS 2.0 repository written from GS1's OpenAPI, its own process). Compared afterwards, each against its own record:
- serials: every serial the store used is one QU4RTET answered (the answers as received are in serial_requests),
  none twice, and none made up on the line;
- QU4RTET: its query API holds each of the store's events exactly once, with bizStep, action, EPCs, hierarchy;
- the repository: exactly the store's eventIDs, each event as stored (JSON equal to the store's rendering).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML
from test_epcis_xml_qu4rtet import QU4RTET_ALREADY, assert_qu4rtet_holds_exactly

from linectl.broker import free_port, wait_listening
from linectl.yamlsource import load_yaml, to_plain
from tests.l4.harness import Qu4rtet, fresh_qu4rtet  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def line_config(tmp_path: Path, q: Qu4rtet, pool: str, source: str, repo_port: int) -> Path:
    raw: dict[str, Any] = to_plain(load_yaml(ROOT / "config" / "l3-line.yaml"))
    serials = raw["products"][0]["serials"]
    if source == "serialbox":
        serials["source"] = {"type": "serialbox", "url": q.base_url, "pool": pool, "page_size": 200, "timeout_s": 30,
                             "auth": {"type": "token", "token_env": "L4_TOKEN"}}
    else:
        serials["source"] = {"type": "number_range", "flavour": "sap", "url": q.soap_url("sap"), "sending_system": "LINE-L3TEST",
                             "object_key_value": pool, "page_size": 200, "timeout_s": 30,
                             "auth": {"type": "basic", "username": q.username, "password_env": "L4_PASSWORD"}}
    serials["low_water"], serials["request_count"] = 300, 400  # the 150-unit batch takes it below low water: refilled while it runs
    raw["upstream"] = {
        "epcis_xml": [{"name": "qu4rtet", "url": q.capture_url, "auth": "bearer", "token_scheme": "Token", "secret_env": "L4_TOKEN",
                       "success_codes": [201], "timeout_s": 120, "max_events": 200, "max_age_s": 0.5,
                       "already_captured": {"status": [500], "body_regex": QU4RTET_ALREADY, "split": False}}],
        "epcis_rest": [{"name": "repository", "url": f"http://127.0.0.1:{repo_port}", "max_age_s": 0.5}],
    }
    path = tmp_path / "line.yaml"
    with open(path, "w", encoding="utf-8") as fh:
        YAML(typ="safe").dump(raw, fh)
    return path


@pytest.mark.parametrize("source", ["serialbox", "number_range"])
def test_a_demo_batch_with_serials_and_events_in_the_real_l4(tmp_path, fresh_qu4rtet, source):  # noqa: F811
    q = fresh_qu4rtet
    pool = q.new_gtin()
    q.create_pool(pool, kind="random", minimum=10**8, maximum=10**9 - 1, request_threshold=1000, response="sap" if source != "serialbox" else None)
    repo_port = free_port()
    repo_log = open(tmp_path / "repository.log", "wb")  # noqa: SIM115
    repo = subprocess.Popen([sys.executable, "-m", "linectl.simulators.epcis_repository", "--port", str(repo_port)],
                            stdout=repo_log, stderr=subprocess.STDOUT)
    try:
        assert wait_listening(repo_port, 30), (tmp_path / "repository.log").read_text()
        cfg = line_config(tmp_path, q, pool, source, repo_port)
        db = tmp_path / "line.db"
        env = {**os.environ, "L4_TOKEN": q.token, "L4_PASSWORD": q.password}
        r = subprocess.run([sys.executable, "-m", "linectl", "--log-level", "warning", "demo", "--config", str(cfg), "--l3", "real",
                            "--units", "150", "--defect-rate", "0.04", "--seed", "5", "--json", "--db", str(db)],
                           capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        assert summary["missed_rejects"] == 0 and summary["balanced"]
        up = summary["upstream"]
        assert {n: s["backlog"] for n, s in up["sinks"].items()} == {"epcis_xml:qu4rtet": 0, "epcis_rest:repository": 0}

        # serials: only what QU4RTET answered (its answers as received), each used once, refilled while running
        con = sqlite3.connect(db)
        answers = con.execute("SELECT raw, state, size FROM serial_requests WHERE kind='request'").fetchall()
        assert len(answers) >= 3 and {a[1] for a in answers} == {"imported"}, answers
        answered = set()
        for raw, _state, _size in answers:
            answered |= set(re.findall(r"\b(\d{9})\b", raw))
        pool_serials = [s for (s,) in con.execute("SELECT serial FROM serials WHERE gtin='09501101530003'")]
        assert len(pool_serials) == len(set(pool_serials)) == sum(a[2] for a in answers)
        assert set(pool_serials) <= answered, "a serial in the pool that QU4RTET never answered"
        used = [s for (s,) in con.execute("SELECT serial FROM serials WHERE gtin='09501101530003' AND state != 'provisioned'")]
        assert len(used) >= 150 and set(used) <= answered
        con.close()

        # QU4RTET holds exactly the store's events (EPCIS 1.2 XML captured, read back through its query API)
        out = tmp_path / "events.json"
        e = subprocess.run([sys.executable, "-m", "linectl", "export", "epcis", "--db", str(db), "--out", str(out)],
                           capture_output=True, text=True, cwd=ROOT)
        assert e.returncode == 0, e.stderr
        events = json.loads(out.read_text())["epcisBody"]["eventList"]
        assert {x["type"] for x in events} == {"ObjectEvent", "AggregationEvent"}
        commissioned_serials = {x["epcList"][0].rsplit(".", 1)[1] for x in events if x.get("bizStep") == "commissioning"
                                and x["epcList"][0].startswith("urn:epc:id:sgtin:")}
        assert commissioned_serials and commissioned_serials <= answered
        assert_qu4rtet_holds_exactly(q, events)

        # the EPCIS 2.0 repository: exactly the store's events, each as stored
        base = f"http://127.0.0.1:{repo_port}"
        ids = get_json(f"{base}/_sim/event-ids")
        assert sorted(ids) == sorted(x["eventID"] for x in events) and len(ids) == len(set(ids))
        for x in events:
            doc = get_json(f"{base}/events/{urllib.request.quote(x['eventID'], safe='')}")  # an EPCISQueryDocument
            (held,) = doc["epcisBody"]["queryResults"]["resultsBody"]["eventList"]
            assert held == x, x["eventID"]
    finally:
        repo.terminate()
        repo.wait(10)
        repo_log.close()
