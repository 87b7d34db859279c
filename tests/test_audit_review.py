"""The audit trail an inspector reads and the batch review QA signs (Annex 11 §9, 21 CFR 11.10(e)).

A batch runs on the in-process line (tests/fakes.py: real Line, real Store, fake devices); the review is then
produced by the real CLI in a subprocess and checked against the store file read with sqlite3 directly (not
through linectl's reads), the PDF is read back with pypdf, the config file's hash against `sha256sum`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import REPO, variant_raw
from ruamel.yaml import YAML

from linectl import control as C
from linectl.config import load_config
from linectl.review import review_digest

LOT = "<script>"  # GS1 set 82 allows < and >: a lot is user input that must never become markup
STOP_REASON = "<script>alert('x')</script> jam & cleanup"
ACK_REASON = "checked <b>camera</b>"
RECALL_REASON = "complaint #42 <img src=x onerror=alert(1)>"


def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "linectl", *args], capture_output=True, timeout=120)


def raw_audit(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return list(c.execute("SELECT seq, ts, actor, origin, action, detail, prev_hash, hash FROM audit ORDER BY seq"))


def raw_meta(db: Path) -> dict[str, str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return dict(c.execute("SELECT key, value FROM meta"))


async def run_batch(fl: Any) -> None:
    """A batch with everything a review shows: good and rejected packs, an alarm and its acknowledgement, a stop
    with a reason, a close, and a recall marked after the close."""
    await fl.start_batch(units=6, lot=LOT)
    for _ in range(3):
        await fl.unit()
    await fl.unit("no_print")
    r = await fl.execute(C.VerifyCode(code="(01)09501101530003(21)NOSUCHSERIAL", actor="qa"))
    assert r.get("alarm_id"), r
    await fl.execute(C.StopBatch(actor="op1", reason=STOP_REASON))
    await fl.wait_stopped()
    await fl.execute(C.AckAlarm(actor="op1", reason=ACK_REASON))
    await fl.execute(C.CloseBatch(actor="op1"))
    await fl.execute(C.RecallBatch(actor="qa", lot=LOT, reason=RECALL_REASON))


def review(db: Path, fmt: str, out: Path, lot: str = LOT) -> subprocess.CompletedProcess[bytes]:
    return cli("audit", "review", "--db", str(db), "--batch", lot, "--format", fmt, "-o", str(out))


async def test_change_records_carry_old_new_reason(fake_line, store):
    await run_batch(fake_line)
    recs = {(r[4], r[0]): json.loads(r[5]) for r in raw_audit(Path(store.path))}
    by_action: dict[str, list[dict[str, Any]]] = {}
    for (action, _), d in sorted(recs.items(), key=lambda kv: kv[0][1]):
        by_action.setdefault(action, []).append(d)
    stop = by_action["stop_batch"][0]
    assert stop["old"] == {"lot": LOT, "state": "running"} and stop["new"] == {"lot": LOT, "state": "stopped"} and stop["reason"] == STOP_REASON
    states = [(d["old"], d["new"], d["reason"]) for d in by_action["batch_state"]]
    assert states == [(None, "created", "created"), ("created", "running", "start"), ("running", "stopped", STOP_REASON),
                      ("stopped", "closed", states[-1][2])] and states[-1][2].startswith("close")
    ack = by_action["ack_alarm"][0]
    assert ack["reason"] == ACK_REASON and ack["old"][0]["acknowledged"] is False and ack["new"][0]["acknowledged"] is True
    assert by_action["alarm_ack"][0]["old"] == "unacknowledged" and by_action["alarm_ack"][0]["new"] == "acknowledged"
    assert by_action["batch_recalled"][0] == {"lot": LOT, "old": {"recalled": False}, "new": {"recalled": True}, "reason": RECALL_REASON}
    created = by_action["batch_created"][0]
    assert created["old"] is None and created["new"] == {"state": "created", "planned_qty": 6}
    # the config the batch ran under: the resolved config's canonical JSON, hashed independently here
    canon = json.dumps(fake_line.line.cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert created["config"]["config_sha256"] == hashlib.sha256(canon.encode()).hexdigest()
    assert created["config"]["config_file"] is None  # built from data, not loaded from a file
    # every command record has the three keys, with None where nothing applies
    for action in ("create_batch", "start_batch", "close_batch", "recall_batch"):
        assert {"old", "new", "reason"} <= set(by_action[action][0]), action
    assert store.verify_audit().ok


async def test_reason_required_refuses_without_a_reason(fake_line, store):
    await fake_line.start_batch(units=3, lot="R1")
    with pytest.raises(C.CommandRejected) as exc:
        await fake_line.execute(C.RecallBatch(actor="qa", lot="R1"))  # default audit.reason_required lists recall_batch
    assert exc.value.code == "reason_required" and "recall_batch needs a reason" in exc.value.reason
    with pytest.raises(C.CommandRejected) as exc:
        await fake_line.execute(C.RecallBatch(actor="qa", lot="R1", reason="   "))
    assert exc.value.code == "reason_required"
    assert not [r for r in raw_audit(Path(store.path)) if r[4] in ("recall_batch", "batch_recalled")], "a refused command changed nothing"
    assert (await fake_line.execute(C.RecallBatch(actor="qa", lot="R1", reason="complaint")))["recalled"] is True


async def test_reason_required_is_configurable(make_fake_line, tmp_path):
    raw = variant_raw()
    raw["audit"] = {"reason_required": ["stop_batch"]}
    path = tmp_path / "line.yaml"
    with open(path, "w") as f:
        YAML(typ="safe").dump(raw, f)
    fl = await make_fake_line(base=path)
    await fl.start_batch(units=3, lot="R2")
    with pytest.raises(C.CommandRejected) as exc:
        await fl.execute(C.StopBatch(actor="op"))
    assert exc.value.code == "reason_required" and fl.state == "running"
    await fl.execute(C.StopBatch(actor="op", reason="end of shift"))
    await fl.wait_stopped()
    assert (await fl.execute(C.RecallBatch(actor="qa", lot="R2")))["recalled"] is True  # not listed any more


def test_reason_required_config_refuses_unknown_names(tmp_path):
    raw = variant_raw()
    raw["audit"] = {"reason_required": ["stop_batch", "stop_the_world"], "bogus": 1}
    path = tmp_path / "bad.yaml"
    with open(path, "w") as f:
        YAML(typ="safe").dump(raw, f)
    r = cli("check-config", str(path))
    err = (r.stdout + r.stderr).decode()
    assert r.returncode != 0 and "stop_the_world" in err and "bogus" in err and "Traceback" not in err


def test_config_file_hash_matches_sha256sum(tmp_path):
    path = tmp_path / "line.yaml"
    shutil.copy(REPO / "config" / "demo-line.yaml", path)
    with open(path, "a") as f:
        f.write("# a comment changes the file's hash, not the resolved config's\r\n")
    cfg = load_config(path)
    out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
    assert cfg.source == (str(path), out)
    from linectl.config_hash import config_fingerprint

    assert config_fingerprint(cfg)["config_sha256"] == config_fingerprint(load_config(REPO / "config" / "demo-line.yaml"))["config_sha256"]


async def test_recall_cli_without_reason_is_refused(fake_line, store):
    await fake_line.start_batch(units=3, lot="R3")
    await fake_line.execute(C.StopBatch(actor="op"))
    await fake_line.wait_stopped()
    await fake_line.stop()
    db = Path(store.path)
    await store.close()
    r = cli("recall", "--batch", "R3", "--db", str(db), "--mark", "--actor", "qa")
    assert r.returncode == 2 and b"recall_batch needs a reason" in r.stderr and b"Traceback" not in r.stderr
    assert not [x for x in raw_audit(db) if x[4] == "batch_recalled"]
    r = cli("recall", "--batch", "R3", "--db", str(db), "--mark", "--actor", "qa", "--reason", "complaint")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x[5])["reason"] for x in raw_audit(db) if x[4] == "batch_recalled"] == ["complaint"]


async def test_review_json_matches_the_store(fake_line, store, tmp_path):
    await run_batch(fake_line)
    db = Path(store.path)
    out = tmp_path / "review.json"
    r = review(db, "json", out)
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(out.read_text())
    assert doc["review_digest"] == review_digest(doc)
    # recomputed from the file by the documented rule: everything but when/where it was made, the local times and
    # the head of the whole line's chain
    body = {k: v for k, v in doc.items() if k not in ("review_digest", "generated_at", "store", "local_zone")}
    body["chain"] = {k: v for k, v in doc["chain"].items()
                     if k not in ("records_in_chain", "records_verified", "head_seq", "head_hash", "verified_head_hash")}
    body["audit_trail"] = {**doc["audit_trail"], "records": [{k: v for k, v in x.items() if k != "ts_local"} for x in doc["audit_trail"]["records"]]}
    assert doc["review_digest"] == hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()
    # the same records give the same digest when built again (what signing it later compares), whatever the zone
    again = tmp_path / "again.json"
    assert review(db, "json", again).returncode == 0
    assert json.loads(again.read_text())["review_digest"] == doc["review_digest"]

    rows = raw_audit(db)
    details = {seq: json.loads(d) for seq, _, _, _, _, d, _, _ in rows}

    def lot_of(d: dict[str, Any]) -> Any:
        return d.get("lot") if d.get("lot") is not None else (d.get("result") or {}).get("lot")

    created = next(seq for seq, *_ in rows if rows[seq - 1][4] == "batch_created" and details[seq]["lot"] == LOT)
    closed = next(seq for seq, *_ in rows if rows[seq - 1][4] == "close_batch")
    expected = [seq for seq, *_ in rows if (created <= seq <= closed and lot_of(details[seq]) in (None, LOT)) or lot_of(details[seq]) == LOT]
    shown = doc["audit_trail"]["records"]
    assert [x["seq"] for x in shown] == expected
    for x in shown:
        seq, ts, actor, origin, action, _d, prev, h = rows[x["seq"] - 1]
        assert (x["ts_utc"], x["actor"], x["origin"], x["action"], x["hash"], x["prev_hash"]) == (ts, actor, origin, action, h, prev)
        assert x["detail"] == details[seq] and x["verified"] is True
    scopes = {x["action"]: x["scope"] for x in shown}
    assert scopes["batch_recalled"] == "after_close" and scopes["stop_batch"] == "batch" and scopes["alarm_ack"] == "line"
    stop = next(x for x in shown if x["action"] == "stop_batch")
    assert (stop["old"]["state"], stop["new"]["state"], stop["reason"], stop["actor"], stop["origin"]) == ("running", "stopped", STOP_REASON, "op1", "test")

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        b = c.execute("SELECT lot, gtin, expiry, planned_qty, state, created_at, closed_at FROM batches WHERE lot=?", (LOT,)).fetchone()
        commissioned = c.execute("SELECT count(*) FROM serials WHERE lot=? AND state='commissioned'", (LOT,)).fetchone()[0]
    bd = doc["batch"]
    assert (bd["lot"], bd["gtin"], bd["expiry"], bd["planned_qty"], bd["state"], bd["created_at"], bd["closed_at"]) == b
    assert bd["achieved_qty"] == commissioned == 3 and bd["product"] == "Paracetamol 500 mg x16"
    assert doc["config"] == details[created]["config"]

    meta = raw_meta(db)
    ch = doc["chain"]
    assert ch["verified"] is True and ch["head_seq"] == int(meta["audit_count"]) == len(rows) and ch["head_hash"] == meta["audit_head"] == rows[-1][7]
    assert ch["shown_records_verified"] is True and ch["first_bad_seq"] is None

    assert [(a["code"], [k["by"] for k in a["acknowledgements"]]) for a in doc["alarms"]] == [(doc["alarms"][0]["code"], ["op1@test"])]
    rec = doc["reconciliation"]
    assert rec["balanced"] is True and rec["commissioned"] == 3 and rec["rejects_by_reason"]["no_read"] == 1
    # a store (schema v10) without any signature: the table is there, no row names this batch's records
    assert doc["signatures"]["table_present"] is True and doc["signatures"]["rows"] == []
    assert doc["signatures"]["note"] == "no signature names a record of this batch"
    assert doc["review"]["reviewed_by"] is None

    # the batch report exposes the same config hashes
    rep = json.loads(cli("report", "--db", str(db), "--batch", LOT, "--json").stdout)
    assert rep["config"] == doc["config"] and rep["rejects_by_reason"] == rec["rejects_by_reason"] and rep["challenge"] == doc["challenge"]["results"]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.update(a for a, _ in attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


async def test_review_html_escapes_user_input_and_pdf_is_a_pdf(fake_line, store, tmp_path):
    await run_batch(fake_line)
    db = Path(store.path)
    page = tmp_path / "review.html"
    assert review(db, "html", page).returncode == 0
    text = page.read_text()
    p = _Tags()
    p.feed(text)
    # only the renderer's own tags and attributes: no script, no img, no event handler came from the store
    assert p.tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "b", "font", "table", "thead", "tbody", "tr", "th", "td"}, p.tags
    assert p.attrs <= {"lang", "charset", "border", "width", "color"}, p.attrs
    assert "<script" not in text.lower() and "<img" not in text.lower() and "&lt;script&gt;" in text
    shown = "".join(p.text)
    assert STOP_REASON in shown and RECALL_REASON in shown and f"Batch review: lot {LOT}" in shown and "VERIFIED" in shown
    assert "http://" not in text and "https://" not in text and "src=" not in text.replace("src=x", "")  # self-contained

    pdf = tmp_path / "review.pdf"
    r = review(db, "pdf", pdf)
    assert r.returncode == 0, r.stderr.decode()
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-")
    from pypdf import PdfReader

    reader = PdfReader(str(pdf))
    extracted = "\n".join(pg.extract_text() for pg in reader.pages)
    flat = " ".join(extracted.split())
    assert f"Batch review: lot {LOT}" in flat and "VERIFIED" in flat and "jam & cleanup" in flat and "Reviewed by" in flat
    assert re.search(r"review digest [0-9a-f]{64} - page 1/\d", flat), "every page names the digest a signature covers"


async def test_tampered_record_makes_the_review_say_the_chain_is_broken(fake_line, store, tmp_path):
    await run_batch(fake_line)
    db = Path(store.path)
    await store.close()  # the fixture's close after this is harmless
    seq = next(r[0] for r in raw_audit(db) if r[4] == "stop_batch")
    with sqlite3.connect(db) as c:
        c.execute("DROP TRIGGER IF EXISTS audit_never_updated")
        c.execute("UPDATE audit SET detail = replace(detail, 'jam', 'JAM') WHERE seq = ?", (seq,))
    out = tmp_path / "r.json"
    r = review(db, "json", out)
    assert r.returncode == 1 and b"BROKEN" in r.stderr
    doc = json.loads(out.read_text())
    ch = doc["chain"]
    assert ch["verified"] is False and ch["first_bad_seq"] == seq and "altered" in ch["problem"] and ch["records_verified"] == seq - 1
    flags = {x["seq"]: x["verified"] for x in doc["audit_trail"]["records"]}
    assert flags[seq] is False and all(v for s, v in flags.items() if s < seq) and ch["shown_records_not_verified"][0] == seq
    page = tmp_path / "r.html"
    assert review(db, "html", page).returncode == 1
    assert f"AUDIT TRAIL HASH CHAIN BROKEN at record {seq}" in page.read_text()
    pdf = tmp_path / "r.pdf"
    assert review(db, "pdf", pdf).returncode == 1
    from pypdf import PdfReader

    assert "HASH CHAIN BROKEN" in " ".join(PdfReader(str(pdf)).pages[0].extract_text().split())


async def test_signatures_of_the_batch_records_are_shown(fake_line, store, tmp_path):
    """Signatures live in the store's signatures table (schema v10): the review shows those of its own records, from
    the real table, with the action signed and whether the record still has the hash that was signed."""
    await run_batch(fake_line)
    db = Path(store.path)
    rows = raw_audit(db)
    stop = next(r for r in rows if r[4] == "stop_batch")
    before = rows[0]  # the store's first record: before the batch, not shown in its review
    await store.add_signature(f"audit:{stop[0]}", stop[7], "jdoe", "Jane <Doe>", "approved", origin="test", second=("sup1", "S. Up", "reviewed"))
    await store.add_signature(f"audit:{before[0]}", before[7], "other", "Other", "approved", origin="test")
    await store.close()
    out = tmp_path / "s.json"
    assert review(db, "json", out).returncode == 0
    sig = json.loads(out.read_text())["signatures"]
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        table = list(c.execute("SELECT record_ref, signer, signer_name, meaning, second_signer FROM signatures ORDER BY id"))
    assert table == [(f"audit:{stop[0]}", "jdoe", "Jane <Doe>", "approved", "sup1"), (f"audit:{before[0]}", "other", "Other", "approved", None)]
    assert sig["table_present"] and [(r["record_ref"], r["signer"], r["signed_action"], r["meaning"], r["second_signer"], r["second_meaning"],
                                      r["digest_matches"]) for r in sig["rows"]] == \
        [(f"audit:{stop[0]}", "jdoe", "stop_batch", "approved", "sup1", "reviewed", True)]
    page = tmp_path / "s.html"
    assert review(db, "html", page).returncode == 0
    assert "Jane &lt;Doe&gt;" in page.read_text() and "stop_batch" in page.read_text()


def test_review_of_an_unknown_lot_is_bad_input(tmp_path):
    import asyncio

    from linectl.store import Store

    async def make() -> None:
        s = await Store.open(tmp_path / "e.db")
        await s.close()

    asyncio.run(make())
    r = review(tmp_path / "e.db", "json", tmp_path / "x.json", lot="NOPE")
    assert r.returncode == 2 and b"no batch NOPE" in r.stderr and b"Traceback" not in r.stderr
    assert not (tmp_path / "x.json").exists()


async def test_daemon_start_records_config_hashes_and_clock_and_a_changed_config(tmp_path):
    from test_aggregation_support import GTIN
    from test_aggregation_support import config as support_config

    from linectl.config_hash import clock_source
    from linectl.daemon import Daemon
    from linectl.review import build_review

    raw = support_config(db=str(tmp_path / "line.db")).model_dump(mode="json", exclude_defaults=True)
    path = tmp_path / "line.yaml"

    def write(min_grade: float) -> str:
        raw["products"][0]["min_grade"] = min_grade
        with open(path, "w") as f:
            YAML(typ="safe").dump(raw, f)
        return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]

    async def run(min_grade: float, lot: str | None = None) -> tuple[str, dict[str, Any] | None]:
        digest = write(min_grade)
        d = Daemon(load_config(path), create=True)
        doc = None
        try:
            await d.start()
            if lot is not None:
                assert d.line is not None
                await d.line.execute(C.CreateBatch(actor="t", lot=lot, gtin=GTIN, expiry="301231", planned_qty=10), "test")
                doc = build_review(d.store, lot)
        finally:
            await d.shutdown("test")
        return digest, doc

    first, _ = await run(1.5)
    second, doc = await run(2.5, lot="C1")
    rows = raw_audit(tmp_path / "line.db")
    starts = [json.loads(r[5]) for r in rows if r[4] == "daemon_started"]
    assert [s["config"]["config_file_sha256"] for s in starts] == [first, second]
    assert all(s["config"]["config_file"] == str(path) and set(s["clock"]) >= {"clock", "ntp_synchronized", "how", "timezone"} for s in starts)
    changed = [json.loads(r[5]) for r in rows if r[4] == "config_changed"]
    assert len(changed) == 1 and changed[0]["old"] == starts[0]["config"] and changed[0]["new"] == starts[1]["config"]
    assert changed[0]["old"]["config_sha256"] != changed[0]["new"]["config_sha256"] and changed[0]["reason"]
    assert doc is not None and doc["config"] == starts[1]["config"] and doc["clock"] == starts[1]["clock"]
    # the clock source as the machine tells it: systemd-timesyncd's flag file says synchronised
    flag = tmp_path / "synchronized"
    flag.write_text("")
    assert clock_source(str(flag))["ntp_synchronized"] is True and "timesyncd" in clock_source(str(flag))["how"]


async def test_a_record_altered_into_non_json_still_gives_a_review_that_says_so(fake_line, store, tmp_path):
    await run_batch(fake_line)
    db = Path(store.path)
    await store.close()
    seq = next(r[0] for r in raw_audit(db) if r[4] == "batch_state" and '"stopped"' in r[5])
    with sqlite3.connect(db) as c:
        c.execute("DROP TRIGGER IF EXISTS audit_never_updated")
        c.execute("UPDATE audit SET detail = 'not json {' WHERE seq = ?", (seq,))
    out = tmp_path / "r.json"
    r = review(db, "json", out)
    assert r.returncode == 1 and b"Traceback" not in r.stderr, r.stderr.decode()
    doc = json.loads(out.read_text())
    assert doc["chain"]["first_bad_seq"] == seq and not doc["chain"]["verified"]
    assert json.loads(cli("report", "--db", str(db), "--batch", LOT, "--json").stdout)["lot"] == LOT  # the report still reads
