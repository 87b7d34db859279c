"""`linectl demo --config packml-line --drive packml`: the shipped PackML example driven from its PLC (OPC UA, the
PackTags command handshake) as a PLC programmed to PackML would: Reset, Start, and PackML Complete at the planned
quantity, read back by the PLC in StateCurrent; the commands audited with the PLC as their origin."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def test_the_packml_example_is_driven_from_its_plc(tmp_path):
    db = tmp_path / "line.db"
    r = subprocess.run([sys.executable, "-m", "linectl", "--log-level", "warning", "demo", "--config", "packml-line", "--drive", "packml",
                        "--units", "80", "--json", "--db", str(db)], capture_output=True, text=True, timeout=500, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    s = json.loads(r.stdout.strip().splitlines()[-1])
    pm = s["packml"]
    # what the PLC saw at each acknowledge: Reset -> Idle (4), Start -> Starting (3: the challenge runs first)
    assert [(h["cntrl_cmd"], h["result"], h["state_current"]) for h in pm["handshakes"]] == [(1, 1, 4), (2, 1, 3)]
    assert pm["state_current"] == 17 and pm["packtags"]["State"] == "Complete"
    assert pm["packtags"]["Admin"]["ProdProcessedCount"] >= 80
    con = sqlite3.connect(db)
    origins = [o for (o,) in con.execute("SELECT origin FROM audit WHERE action='packml_command' ORDER BY seq")]
    con.close()
    assert origins == ["plc:plc1", "plc:plc1"]


def test_drive_packml_needs_a_plc_with_the_handshake(tmp_path):
    r = subprocess.run([sys.executable, "-m", "linectl", "--log-level", "warning", "demo", "--drive", "packml", "--units", "20"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1 and "packml_cntrl_cmd" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
