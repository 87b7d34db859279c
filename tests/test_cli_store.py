"""CLI over the store: serials import/status, trace, audit verify; exit codes 0/1/2/3."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from linectl import events as ev
from linectl import gs1
from linectl.cli import build_parser
from linectl.config import RandomSerials
from linectl.store import SCHEMA_VERSION, Store

GTIN = "09501101530003"
CP = "9501101"
ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *args: str) -> tuple[int, str, str]:
    # The subcommand as `linectl` runs it, in-process for speed; main() is skipped only because its
    # logging set-up would bind structlog to capsys' short-lived stderr. test_entry_point_subprocess runs main().
    ns = build_parser().parse_args(list(args))
    rc = int(ns.func(ns) or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def new_store(db: Path) -> None:
    """Only `linectl init` (or library code) creates a store; the CLI commands under test refuse a missing one."""
    asyncio.run(_make_and_close(db))


def sscc(ref: int, ext: int = 0) -> str:
    return gs1.make_sscc(ext, CP, ref)


CONFIG = """\
line:
  enterprise: acme
  site: lyon
  area: packaging
  name: line1
  gln: "5412345000013"
  company_prefix_length: 7
products:
  - gtin: "{gtin}"
    name: Paracetamol 500 mg
    company_prefix_length: 7
    serials:
      scheme: pool
store:
  path: {db}
"""


# --------------------------------------------------------------------------- serials import / status


def test_import_csv_with_serial_column(tmp_path, capsys):
    db = tmp_path / "line.db"
    f = tmp_path / "pool.csv"
    new_store(db)
    f.write_text("batch;serial;note\nX;AAA001;ok\nX;AAA002;\nX;AAA001;again\nX;BAD SERIAL;\nX;ÄÖ;\nX;AAA003;\n")
    rc, out, _ = run(capsys, "serials", "import", str(f), "--gtin", GTIN, "--db", str(db), "--source", "L3-order-17")
    assert rc == 1  # invalid rows present
    assert "accepted 3, duplicates 1, invalid 2" in out
    assert "line 4: 'AAA001': duplicate: repeated in the file (first on line 2)" in out
    assert "line 5: 'BAD SERIAL': invalid: character ' '" in out
    assert "line 6: 'ÄÖ': invalid" in out
    rc, out, _ = run(capsys, "serials", "status", "--db", str(db), "--json")
    assert rc == 0
    assert json.loads(out)[GTIN] == {"provisioned": 3, "available": 3, "allocated": 0, "sent": 0,
                                     "commissioned": 0, "decommissioned": 0, "voided": 0, "fate_unknown": 0}


def test_import_plain_list_then_again(tmp_path, capsys):
    db = tmp_path / "line.db"
    new_store(db)
    f = tmp_path / "pool.txt"
    f.write_text("\n".join(f"SN{i:06d}" for i in range(25_000)) + "\n\n")  # more than one chunk
    rc, out, _ = run(capsys, "serials", "import", str(f), "--gtin", GTIN[1:], "--db", str(db))  # GTIN-13 accepted
    assert rc == 0 and "accepted 25000, duplicates 0, invalid 0" in out
    f2 = tmp_path / "more.txt"
    f2.write_text("SN000001\nNEW1\n")
    rc, out, _ = run(capsys, "serials", "import", str(f2), "--gtin", GTIN, "--db", str(db))
    assert rc == 0 and "accepted 1, duplicates 1, invalid 0" in out  # duplicates alone do not fail
    assert "line 1: 'SN000001': duplicate: already known for GTIN" in out
    rc, out, _ = run(capsys, "serials", "import", str(f2), "--gtin", GTIN, "--db", str(db))
    assert rc == 1 and "accepted 0, duplicates 2" in out  # nothing new
    rc, out, _ = run(capsys, "serials", "status", "--db", str(db))
    assert rc == 0
    line = next(ln for ln in out.splitlines() if ln.startswith(GTIN))
    assert line.split()[1:3] == ["25001", "25001"]
    s = asyncio.run(_audit_actions(db))
    assert s.count("serials_provisioned") == 4  # two chunks + two small imports


async def _audit_actions(db) -> list[str]:
    s = await Store.open(db, readonly=True)
    try:
        return [a.action for a in s.audit_log()]
    finally:
        await s.close()


def test_import_bad_input_exits_2(tmp_path, capsys):
    db = tmp_path / "line.db"
    rc, _, err = run(capsys, "serials", "import", str(tmp_path / "missing.csv"), "--gtin", GTIN, "--db", str(db))
    assert rc == 2 and "cannot read" in err and "missing.csv" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    rc, _, err = run(capsys, "serials", "import", str(empty), "--gtin", GTIN, "--db", str(db))
    assert rc == 2 and "no serials" in err
    f = tmp_path / "ok.txt"
    f.write_text("A1\n")
    rc, _, err = run(capsys, "serials", "import", str(f), "--gtin", "09501101530004", "--db", str(db))
    assert rc == 2 and "check digit" in err
    rc, _, err = run(capsys, "serials", "import", str(f), "--gtin", GTIN)
    assert rc == 2 and "--db" in err
    rc, _, err = run(capsys, "serials", "import", str(f), "--gtin", GTIN, "--db", str(db))
    assert rc == 3 and "linectl init" in err  # a mistyped --db never starts a new, empty registry
    assert not db.exists()


def test_config_gives_the_db_path(tmp_path, capsys):
    db = tmp_path / "fromcfg.db"
    cfg = tmp_path / "line.yaml"
    cfg.write_text(CONFIG.format(gtin=GTIN, db=db))
    f = tmp_path / "s.txt"
    f.write_text("C1\nC2\n")
    rc, out, err = run(capsys, "serials", "import", str(f), "--gtin", GTIN, "-c", str(cfg))
    assert rc == 3 and not db.exists(), err
    rc, out, err = run(capsys, "init", "-c", str(cfg))
    assert rc == 0 and db.exists(), err
    rc, out, _ = run(capsys, "serials", "import", str(f), "--gtin", GTIN, "-c", str(cfg))
    assert rc == 0
    rc, _, err = run(capsys, "serials", "import", str(f), "--gtin", "04012345000016", "-c", str(cfg))
    assert rc == 2 and "not configured" in err
    rc, out, _ = run(capsys, "serials", "status", "-c", str(cfg), "--json")
    assert rc == 0 and json.loads(out)[GTIN]["available"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("line: {}\n")
    rc, _, err = run(capsys, "serials", "status", "-c", str(bad))
    assert rc == 2


# --------------------------------------------------------------------------- store errors -> exit 3


@pytest.mark.parametrize("kind", ["corrupt", "foreign", "newer", "missing"])
def test_every_store_command_exits_3_on_store_error(tmp_path, capsys, kind):
    db = tmp_path / "x.db"
    if kind == "corrupt":
        db.write_bytes(os.urandom(4096))
        expect = "file is not a database"
    elif kind == "foreign":
        with sqlite3.connect(db) as c:
            c.execute("CREATE TABLE t(x)")
        expect = "not a linectl database: no meta table"
    elif kind == "newer":
        asyncio.run(_make_and_close(db))
        with sqlite3.connect(db) as c:
            c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
        expect = "newer"
    else:
        expect = "no such database file"
    f = tmp_path / "s.txt"
    f.write_text("A\n")
    commands = [
        ["serials", "status", "--db", str(db)],
        ["trace", f"(01){GTIN}(21)A", "--db", str(db)],
        ["audit", "verify", "--db", str(db)],
    ]
    commands.append(["serials", "import", str(f), "--gtin", GTIN, "--db", str(db)])
    for cmd in commands:
        rc, out, err = run(capsys, *cmd)
        assert rc == 3, (cmd, out, err)
        lines = [ln for ln in err.splitlines() if ln.startswith("linectl: store error:")]
        assert len(lines) == 1 and expect in lines[0] and str(db) in lines[0], err
        assert "Traceback" not in err


async def _make_and_close(db) -> None:
    s = await Store.open(db)
    await s.close()


# --------------------------------------------------------------------------- trace


async def _line_history(db) -> dict:
    s = await Store.open(db)
    try:
        await s.create_batch("LOT42", GTIN, "271231", 100, actor="cli:bob")
        units = await s.allocate(GTIN, "LOT42", 3, RandomSerials(scheme="random"))
        await s.mark_sent(GTIN, "LOT42", units)
        await s.append(*(ev.UnitCommissioned(gtin=GTIN, serial=u, lot="LOT42", expiry="271231") for u in units[:2]))
        case, pallet = sscc(1), sscc(1, ext=1)
        await s.append(
            ev.ContainerCommissioned(sscc=case, level="case", gtin=GTIN, lot="LOT42"),
            ev.Packed(parent=case, children=[ev.ChildRef(gtin=GTIN, serial=u) for u in units[:2]], lot="LOT42"),
            ev.ContainerCommissioned(sscc=pallet, level="pallet", lot="LOT42"),
            ev.Packed(parent=pallet, children=[ev.ChildRef(sscc=case)], lot="LOT42"),
        )
        await s.append(ev.UnitDecommissioned(gtin=GTIN, serial=units[2], reason=ev.RejectReason.NO_READ, lot="LOT42"))
        return {"units": units, "case": case, "pallet": pallet}
    finally:
        await s.close()


def test_trace_unit_in_every_notation(tmp_path, capsys):
    db = tmp_path / "t.db"
    h = asyncio.run(_line_history(db))
    u = h["units"][0]
    code = gs1.compose_unit(GTIN, u, lot="LOT42", expiry="271231")
    notations = [
        "]d2" + code.element_string,  # raw scan with symbology identifier and GS separators
        code.hri,
        gs1.sgtin_urn(GTIN, u, 7),
        gs1.digital_link(GTIN, u, lot="LOT42"),
    ]
    for n in notations:
        rc, out, err = run(capsys, "trace", n, "--db", str(db))
        assert rc == 0, (n, err)
        t = json.loads(out)
        assert t["identity"]["gtin"] == GTIN and t["identity"]["serial"] == u
        assert t["status"] == "commissioned" and t["lot"] == "LOT42" and t["batch"]["expiry"] == "271231"
        assert [p["sscc"] for p in t["parents"]] == [h["case"], h["pallet"]]
        assert [e["kind"] for e in t["events"]] == ["unit_commissioned", "packed"]
        assert t["events"][0]["serial"] == u
    rc, out, _ = run(capsys, "trace", f"(01){GTIN}(21){h['units'][2]}", "--db", str(db))
    t = json.loads(out)
    assert rc == 0 and t["status"] == "decommissioned" and t["events"][0]["reason"] == "no_read"


def test_trace_container_unknown_and_bad(tmp_path, capsys):
    db = tmp_path / "t.db"
    h = asyncio.run(_line_history(db))
    rc, out, _ = run(capsys, "trace", f"(00){h['case']}", "--db", str(db))
    t = json.loads(out)
    assert rc == 0 and t["status"] == "commissioned" and t["level"] == "case"
    assert [c["serial"] for c in t["tree"]] == h["units"][:2] and t["contents"] == {"units": 2}
    assert [p["sscc"] for p in t["parents"]] == [h["pallet"]]
    assert [e["kind"] for e in t["events"]] == ["container_commissioned", "packed", "packed"]
    rc, out, _ = run(capsys, "trace", f"(01){GTIN}(21)NEVERSEEN", "--db", str(db))
    assert rc == 1 and json.loads(out)["status"] == "unknown"
    rc, _, err = run(capsys, "trace", "hello world", "--db", str(db))
    assert rc == 2 and "cannot identify" in err


def test_entry_point_subprocess(tmp_path):
    """The real `python -m linectl` entry point, once, end to end."""
    db = tmp_path / "e.db"
    f = tmp_path / "s.txt"
    f.write_text("Z1\nZ2\n")
    new_store(db)
    env = {**os.environ}
    r = subprocess.run([sys.executable, "-m", "linectl", "serials", "import", str(f), "--gtin", GTIN, "--db", str(db)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 0 and "accepted 2" in r.stdout
    r = subprocess.run([sys.executable, "-m", "linectl", "audit", "verify", "--db", str(db)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "audit trail OK: 2 records"
