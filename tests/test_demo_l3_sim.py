"""`linectl demo --config l3-line` on a desk: the shipped example's L3 and EPCIS 2.0 repository are answered by the
simulators (linectl.demo_upstream), and the summary compares the store with what they saw (their own record)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def test_the_l3_example_runs_on_the_simulators(tmp_path):
    db = tmp_path / "line.db"
    r = subprocess.run([sys.executable, "-m", "linectl", "--log-level", "warning", "demo", "--config", "l3-line", "--units", "120",
                        "--seed", "3", "--json", "--db", str(db)], capture_output=True, text=True, timeout=500, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    s = json.loads(r.stdout.strip().splitlines()[-1])
    up = s["upstream"]
    assert {n: x["backlog"] for n, x in up["sinks"].items()} == {"epcis_rest:repository": 0, "epcis_xml:l4-drop": 0}
    sims = up["simulators"]
    assert sims["repository_events"]["repository"] == {"stored": up["store_epcis_events"], "distinct": up["store_epcis_events"]}
    con = sqlite3.connect(db)
    pool = con.execute("SELECT count(*), count(DISTINCT serial) FROM serials").fetchone()
    used = con.execute("SELECT count(*) FROM serials WHERE state != 'provisioned'").fetchone()[0]
    con.close()
    # every serial came from the L3 simulator (it handed out exactly what the pool holds), none made up, none twice
    assert pool[0] == pool[1] == sum(sims["l3_handed_out"].values()) and used >= 120
    assert list(up["sources"].values())[0]["requests"] == {"imported": pool[0] // 200}
