"""`linectl demo --config packml-line --drive packml`: the shipped PackML example driven from its PLC (OPC UA, the
PackTags command handshake) as a PLC programmed to PackML would: Reset, Start, and PackML Complete at the planned
quantity, read back by the PLC in StateCurrent; the commands audited with the PLC as their origin."""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "packml-line.yaml"


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


def test_the_packml_example_is_driven_through_its_opcua_server(tmp_path):
    """`--drive opcua`: the demo's SCADA client (its own certificate, trusted by the server) resets and starts the batch
    over OPC UA as the store user operator, and reads Complete back there; the server's key is 0600."""
    db = tmp_path / "line.db"
    r = subprocess.run([sys.executable, "-m", "linectl", "--log-level", "warning", "demo", "--config", str(EXAMPLE), "--drive", "opcua",
                        "--units", "40", "--rate", "1200", "--json", "--db", str(db)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "OPC UA server opc.tcp://127.0.0.1:" in r.stderr and f"{db}.initial-passwords" in r.stderr, r.stderr[-2000:]
    pm = json.loads(r.stdout.strip().splitlines()[-1])["packml"]
    assert [(c["method"], c["user"], c["status"]) for c in pm["calls"]] == [("Reset", "operator", "Good"), ("Start", "operator", "Good")]
    assert pm["state_current"] == 17 and pm["packtags"]["State"] == "Complete"
    assert stat.S_IMODE((tmp_path / "opcua" / "server_key.pem").stat().st_mode) == 0o600
    con = sqlite3.connect(db)
    rows = list(con.execute("SELECT actor, origin FROM audit WHERE action='packml_command' ORDER BY seq"))
    con.close()
    assert rows == [("operator", "opcua"), ("operator", "opcua")]
