"""`linectl upstream status`: per sink its cursor and backlog, per serial source its requests, from the store (read-only)."""

from __future__ import annotations

import json
import subprocess

from engine_helpers import LINECTL, REPO

from linectl.store import Store
from linectl.store.schema import SCHEMA_VERSION

GTIN = "09506000134352"


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LINECTL, "upstream", "status", *args], capture_output=True, text=True, cwd=REPO, timeout=60)


async def test_status_shows_sinks_sources_and_available(tmp_path):
    db = tmp_path / "line.db"
    s = await Store.open(db)
    try:
        await s.provision(GTIN, ["A1", "A2", "A3"], source="import")
        await s.open_cursor("file")
        await s.advance_cursor("file", 0)
        r1 = await s.request_new("request", "serialbox:pool1", GTIN, 100, "k1")
        await s.request_failed(r1, "HTTP 404 (unknown pool or endpoint)", "parked")
        r2 = await s.request_new("request", "serialbox:pool1", GTIN, 50, "k2")
        await s.request_failed(r2, "no answer within 5 s", "lost")
        r3 = await s.request_new("request", "serialbox:pool1", GTIN, 2, "k3")
        await s.request_answered(r3, '{"numbers": "[7, 8]"}', {"serials": ["7", "8"], "foreign": []})
        await s.request_import(r3, f"serialbox:pool1 request {r3}")
        await s.request_new("request", "serialbox:pool1", GTIN, 10, "k4")  # pending
        # what the daemon's LinkStateRecorder writes (linectl/upstream/link_state.py), here as a daemon that stopped would
        await s.note_link_states({
            "sink:file": {"last_error": "No space left on device", "error_since": 1.0e9, "parked": False, "running": False},
            f"source:serialbox:pool1:{GTIN}": {"state": "parked", "connected": True, "last_error": "HTTP 404", "last_error_at": "t0",
                                              "running": False},
        })
    finally:
        await s.close()
    p = status("--db", str(db), "--json")
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    src = st["sources"]["serialbox:pool1"]
    assert src["requests"] == {"parked": 1, "lost": 1, "imported": 1, "pending": 1}
    assert src["serials_lost"] == 50 and src["serials_imported"] == 2 and src["pending"] == 1
    assert src["parked"][0]["request"] == r1 and "404" in src["parked"][0]["reason"]
    assert st["available"] == {GTIN: 5} and st["sinks"]["file"]["cursor"] == 0 and st["sinks"]["file"]["backlog"] == 0
    text = status("--db", str(db))
    assert text.returncode == 0
    assert "serialbox:pool1: pending 1, parked 1, lost 1 (50 serials), imported 2 serials" in text.stdout
    assert f"parked request {r1} (100 of {GTIN}): HTTP 404" in text.stdout and f"{GTIN}: 5" in text.stdout
    as_of = st["sinks"]["file"]["state"]["as_of"]
    assert st["sources"]["serialbox:pool1"]["state"][GTIN]["state"] == "parked" and as_of.startswith("20")
    assert f"last error (since 2001-09-09T01:46:40+00:00): No space left on device [as of {as_of}, when the daemon stopped]" in text.stdout
    assert f"{GTIN}: parked, connected, last error (since t0): HTTP 404 [as of" in text.stdout


def test_status_refuses_bad_input_without_traceback(tmp_path):
    p = status("--db", str(tmp_path / "missing.db"))
    assert p.returncode == 3 and "Traceback" not in p.stderr and "no such database file" in p.stderr
    p = status("--db", str(tmp_path / "x.db"), "--live")
    assert p.returncode == 2 and "--live needs -c CONFIG" in p.stderr
    assert SCHEMA_VERSION == 10
