"""Opening: refuse corrupt, foreign and newer files with a clear message and never touch them; migrate v1 -> v2."""

from __future__ import annotations

import hashlib
import os
import sqlite3

import pytest

from linectl import events as ev
from linectl.store import SCHEMA_VERSION, Store, StoreError
from linectl.store.audit import GENESIS, canonical_detail, row_hash

GTIN = "09501101530003"


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


async def make_db(path) -> None:
    s = await Store.open(path)
    await s.create_batch("LOT1", GTIN, "271231", 10, actor="t")
    await s.provision(GTIN, [f"S{i:05d}" for i in range(3000)], "test")
    await s.close()


async def test_new_file_is_created_and_reopened(tmp_path):
    p = tmp_path / "new.db"
    s = await Store.open(p)
    assert s.opened_from_version == 0
    await s.close()
    s = await Store.open(p)
    assert s.opened_from_version == SCHEMA_VERSION and s.stats()["schema_version"] == SCHEMA_VERSION
    with sqlite3.connect(p) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    await s.close()


async def test_empty_file_is_initialised(tmp_path):
    p = tmp_path / "empty.db"
    p.write_bytes(b"")
    s = await Store.open(p)
    assert s.verify_audit().ok
    await s.close()


async def test_missing_file_readonly_or_no_create(tmp_path):
    with pytest.raises(StoreError, match="no such database file"):
        await Store.open(tmp_path / "nope.db", readonly=True)
    with pytest.raises(StoreError, match="no such database file"):
        await Store.open(tmp_path / "nope.db", create=False)
    assert not (tmp_path / "nope.db").exists()


async def test_random_bytes_file_refused_untouched(tmp_path):
    p = tmp_path / "junk.db"
    p.write_bytes(os.urandom(8192))
    before = digest(p)
    with pytest.raises(StoreError) as ei:
        await Store.open(p)
    assert str(p) in str(ei.value) and "file is not a database" in str(ei.value)
    assert digest(p) == before and not os.path.exists(str(p) + "-wal")


async def test_corrupt_pages_refused(tmp_path):
    p = tmp_path / "corrupt.db"
    await make_db(p)
    with sqlite3.connect(p) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = c.execute("PRAGMA page_count").fetchone()[0]
    assert pages > 6
    with open(p, "r+b") as f:  # garble the middle of the file, keep the header intact
        for page in range(2, pages, 2):
            f.seek(page * 4096 + 100)
            f.write(os.urandom(300))
    before = digest(p)
    with pytest.raises(StoreError) as ei:
        await Store.open(p)
    msg = str(ei.value)
    assert str(p) in msg and "integrity_check failed" in msg
    assert digest(p) == before


async def test_foreign_sqlite_db_refused(tmp_path):
    p = tmp_path / "other.db"
    with sqlite3.connect(p) as c:
        c.execute("CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT)")
        c.execute("INSERT INTO customers(name) VALUES ('ACME')")
    before = digest(p)
    with pytest.raises(StoreError, match="not a linectl database: no meta table") as ei:
        await Store.open(p)
    assert str(p) in str(ei.value)
    assert digest(p) == before
    with sqlite3.connect(p) as c:
        assert c.execute("SELECT name FROM customers").fetchall() == [("ACME",)]


async def test_foreign_meta_table_refused(tmp_path):
    p = tmp_path / "other2.db"
    with sqlite3.connect(p) as c:
        c.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
        c.execute("INSERT INTO meta VALUES ('app_id', 'someone-else'), ('schema_version', '1')")
    with pytest.raises(StoreError, match="not a linectl database: meta app_id is 'someone-else'"):
        await Store.open(p)


async def test_newer_schema_refused(tmp_path):
    p = tmp_path / "newer.db"
    s = await Store.open(p)
    await s.close()
    with sqlite3.connect(p) as c:
        c.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match=rf"schema version 99 is newer than this linectl supports \({SCHEMA_VERSION}\)"):
        await Store.open(p)
    with pytest.raises(StoreError, match="newer"):
        await Store.open(p, readonly=True)
    with sqlite3.connect(p) as c:
        assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "99"


# --------------------------------------------------------------------------- migration v1 -> v2

V1_DDL = """
CREATE TABLE meta (key TEXT NOT NULL PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE products (gtin TEXT NOT NULL PRIMARY KEY, name TEXT NOT NULL, scheme TEXT NOT NULL, config TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE batches (lot TEXT NOT NULL PRIMARY KEY, gtin TEXT NOT NULL, expiry TEXT NOT NULL, planned_qty INTEGER NOT NULL,
  state TEXT NOT NULL, created_by TEXT NOT NULL, created_at TEXT NOT NULL, started_at TEXT, stopped_at TEXT, closed_at TEXT,
  updated_at TEXT NOT NULL, challenge TEXT DEFAULT '[]' NOT NULL);
CREATE TABLE serials (id INTEGER NOT NULL PRIMARY KEY, gtin TEXT NOT NULL, serial TEXT NOT NULL, state TEXT NOT NULL, lot TEXT,
  source TEXT NOT NULL, updated_at TEXT NOT NULL, CONSTRAINT uq_serials_gtin_serial UNIQUE (gtin, serial));
CREATE INDEX ix_serials_gtin_state ON serials (gtin, state);
CREATE INDEX ix_serials_lot_state ON serials (lot, state);
CREATE TABLE counters (name TEXT NOT NULL PRIMARY KEY, value INTEGER NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE outbox (seq INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, lot TEXT,
  gtin TEXT, serial TEXT, created_at TEXT NOT NULL, body TEXT NOT NULL, forwarded_at TEXT);
CREATE INDEX ix_outbox_gtin_serial ON outbox (gtin, serial);
CREATE INDEX ix_outbox_unforwarded ON outbox (seq) WHERE forwarded_at IS NULL;
CREATE TABLE aggregation (id INTEGER NOT NULL PRIMARY KEY, parent TEXT NOT NULL, child_kind TEXT NOT NULL, child_key TEXT NOT NULL,
  child_gtin TEXT, child_serial TEXT, lot TEXT, added_seq INTEGER NOT NULL, removed_seq INTEGER);
CREATE UNIQUE INDEX ux_aggregation_active_child ON aggregation (child_kind, child_key) WHERE removed_seq IS NULL;
CREATE INDEX ix_aggregation_child ON aggregation (child_kind, child_key);
CREATE INDEX ix_aggregation_parent ON aggregation (parent);
CREATE TABLE containers (sscc TEXT NOT NULL PRIMARY KEY, level TEXT NOT NULL, state TEXT NOT NULL, lot TEXT, gtin TEXT, updated_at TEXT NOT NULL);
CREATE TABLE audit (seq INTEGER NOT NULL PRIMARY KEY, ts TEXT NOT NULL, actor TEXT NOT NULL, origin TEXT NOT NULL, action TEXT NOT NULL,
  detail TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
"""
T = "2025-01-02T03:04:05.000000+00:00"
CASE = "095011010000000017"  # check digit computed below


def _sscc(body17: str) -> str:
    total = sum(int(c) * (3 if i % 2 == 0 else 1) for i, c in enumerate(reversed(body17)))
    return body17 + str((10 - total % 10) % 10)


def build_v1(path) -> dict:
    case = _sscc(CASE[:17])
    c = sqlite3.connect(path)
    c.executescript(V1_DDL)
    c.execute("INSERT INTO meta VALUES ('app_id','linectl'), ('schema_version','1'), ('created_at',?)", (T,))
    c.execute("INSERT INTO batches VALUES ('LOTV1',?,'261231',100,'running','cli:old',?,?,NULL,NULL,?,'[]')", (GTIN, T, T, T))
    states = {"A1": "commissioned", "A2": "sent", "A3": "allocated", "A4": "voided", "A5": "voided", "A6": "provisioned"}
    for i, (s, st) in enumerate(states.items(), 1):
        c.execute("INSERT INTO serials VALUES (?,?,?,?,?,?,?)", (i, GTIN, s, st, None if st == "provisioned" else "LOTV1", "import:old.csv", T))
    evs = [
        ev.UnitCommissioned(gtin=GTIN, serial="A1", lot="LOTV1"),
        ev.SerialsVoided(gtin=GTIN, serials=["A4", "A5"], lot="LOTV1"),
        ev.ContainerCommissioned(sscc=case, level="case", gtin=GTIN, lot="LOTV1"),
        ev.Packed(parent=case, children=[ev.ChildRef(gtin=GTIN, serial="A1")], lot="LOTV1"),
    ]
    for seq, e in enumerate(evs, 1):
        c.execute(
            "INSERT INTO outbox(seq, event_id, kind, lot, gtin, serial, created_at, body, forwarded_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (seq, e.event_id, e.kind, e.lot, getattr(e, "gtin", None), getattr(e, "serial", None), T, e.model_dump_json(),
             T if seq == 1 else None),
        )
    c.execute("INSERT INTO containers VALUES (?,?,?,?,?,?)", (case, "case", "commissioned", "LOTV1", GTIN, T))
    c.execute("INSERT INTO aggregation VALUES (1,?,'unit',?,?,?,'LOTV1',4,NULL)", (case, f"01{GTIN}21A1", GTIN, "A1"))
    c.execute("INSERT INTO counters VALUES ('sscc:0:9501101', 1, ?)", (T,))
    prev = GENESIS
    for seq, (action, detail) in enumerate([("store_created", {"schema_version": 1}), ("batch_created", {"lot": "LOTV1"})], 1):
        text = canonical_detail(detail)
        h = row_hash(seq, T, "system", "store", action, text, prev)
        c.execute("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?)", (seq, T, "system", "store", action, text, prev, h))
        prev = h
    c.execute("INSERT INTO meta VALUES ('audit_count','2'), ('audit_head',?)", (prev,))
    c.commit()
    c.close()
    return {"case": case, "events": evs}


async def test_migrates_v1_database_and_keeps_data(tmp_path):
    p = tmp_path / "v1.db"
    built = build_v1(p)
    s = await Store.open(p)
    try:
        assert s.opened_from_version == 1
        assert s.stats()["schema_version"] == SCHEMA_VERSION
        assert os.path.exists(f"{p}.v1.bak"), "a backup is taken before migrating"
        with sqlite3.connect(f"{p}.v1.bak") as c:
            assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1"
        # data survived
        assert s.batch("LOTV1").state == "running"
        assert s.tally_mismatches() == []  # v2 counts were built from the v1 rows
        counts = s.serial_counts(GTIN)[GTIN]
        assert counts == {"provisioned": 1, "allocated": 1, "sent": 1, "commissioned": 1, "decommissioned": 0, "voided": 2}
        assert s.serial(GTIN, "A1").source == "import:old.csv"
        assert s.outbox(0, 10, only_unforwarded=False)[0].event.event_id == built["events"][0].event_id
        assert s.backlog() == 3
        # the new columns/tables were back-filled
        assert s.serial(GTIN, "A2").sent_at == T and s.serial(GTIN, "A3").sent_at is None
        assert [h.kind for h in s.serial_history(GTIN, "A1")] == ["unit_commissioned", "packed"]
        assert [h.kind for h in s.serial_history(GTIN, "A4")] == ["serials_voided"]
        assert [h.kind for h in s.container_history(built["case"])] == ["container_commissioned", "packed"]
        assert s.parent_of(GTIN, "A1") == built["case"]
        # the audit chain continues across the migration, and records it
        chk = s.verify_audit()
        steps = SCHEMA_VERSION - 1  # one audit record per migration step (1 -> 2, 2 -> 3, ...)
        assert chk.ok and chk.checked == 2 + steps
        migrated = [a.detail for a in s.audit_log() if a.action == "schema_migrated"]
        assert migrated == [{"from": v, "to": v + 1} for v in range(1, SCHEMA_VERSION)]
        # the store works on the migrated file: v2 semantics apply to old rows
        seqs = await s.append(ev.UnitCommissioned(gtin=GTIN, serial="A2", lot="LOTV1"))
        assert seqs == [5]
        assert await s.next_sscc_refs("9501101", 0, 1) == [2]
        with pytest.raises(StoreError, match="it is commissioned"):
            await s.append(ev.SerialsReturned(gtin=GTIN, serials=["A2"]))
        await s.append(ev.SerialsReturned(gtin=GTIN, serials=["A3"], lot="LOTV1"))
        assert s.available(GTIN) == 2
        assert s.tally_mismatches() == []
    finally:
        await s.close()
    with sqlite3.connect(p) as c:
        idx = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "ix_outbox_gtin_serial" not in idx and "ix_outbox_serial_id" in idx
        trg = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
        assert "audit_never_deleted" in trg
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    s = await Store.open(p)  # a second open does not migrate again
    assert s.opened_from_version == SCHEMA_VERSION and s.verify_audit().checked == 2 + SCHEMA_VERSION - 1 and s.verify_audit().ok
    await s.close()


async def test_migrates_v2_database_challenge_state(tmp_path):
    """v2 -> v3 (_migrate_challenge_state): batches.challenge_required is added; old batches read None (= the line's
    configured challenge), new batches record what they must pass ([] = waived at create)."""
    p = tmp_path / "v2.db"
    s = await Store.open(p)
    await s.create_batch("LOTV2", GTIN, "291231", 10, actor="t")
    await s.close()
    with sqlite3.connect(p) as c:  # the file as linectl with schema v2 left it
        c.execute("ALTER TABLE batches DROP COLUMN challenge_required")
        c.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    s = await Store.open(p)
    try:
        assert s.opened_from_version == 2 and s.stats()["schema_version"] == SCHEMA_VERSION
        assert s.batch("LOTV2").challenge_required is None
        b = await s.create_batch("LOTV3", GTIN, "291231", 10, actor="t", challenge_required=[])
        assert b.challenge_required == [] and s.batch("LOTV3").challenge_required == []
        await s.create_batch("LOTV4", GTIN, "291231", 10, actor="t", challenge_required=["no_code", "duplicate"])
        assert s.batch("LOTV4").challenge_required == ["no_code", "duplicate"]
        assert s.verify_audit().ok
    finally:
        await s.close()


async def test_migrates_v6_database_plc_carry(tmp_path):
    """v6 -> v7 (_migrate_plc_carried): plc_epochs.carried and .foreign_ring are added; a row a v6 daemon saved reads
    as nothing carried (what it assumed), and the next save keeps both."""
    p = tmp_path / "v6.db"
    s = await Store.open(p)
    await s.save_plc_state("plc1", 2, 2, 40, 35)
    await s.close()
    with sqlite3.connect(p) as c:  # the file as linectl with schema v6 left it
        c.execute("ALTER TABLE plc_epochs DROP COLUMN carried")
        c.execute("ALTER TABLE plc_epochs DROP COLUMN foreign_ring")
        c.execute("UPDATE meta SET value='6' WHERE key='schema_version'")
    s = await Store.open(p)
    try:
        assert s.opened_from_version == 6 and s.stats()["schema_version"] == SCHEMA_VERSION
        st = s.plc_state("plc1")
        assert st is not None and (st.epoch, st.trigger_count, st.gated) == (2, 40, 35)
        assert st.carried is None and st.foreign() == {}
        await s.save_plc_state("plc1", 3, 3, 5, 14, 12, {4: 92, 5: 93})
        st = s.plc_state("plc1")
        assert st is not None and st.carried == 12 and st.foreign() == {4: 92, 5: 93}
        assert s.verify_audit().ok
    finally:
        await s.close()


async def test_readonly_open_does_not_migrate(tmp_path):
    p = tmp_path / "v1ro.db"
    build_v1(p)
    with pytest.raises(StoreError, match="needs migrating"):
        await Store.open(p, readonly=True)
    with sqlite3.connect(p) as c:
        assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1"


async def test_schema_is_declared_with_sqlalchemy_core(tmp_path):
    from linectl.store import schema

    assert set(schema.metadata.tables) >= {"meta", "products", "batches", "serials", "counters", "outbox",
                                            "aggregation", "containers", "audit", "event_refs"}
    s = await Store.open(tmp_path / "x.db")
    await s.close()
    with sqlite3.connect(tmp_path / "x.db") as c:
        got = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")}
        assert got == set(schema.metadata.tables)
        m = dict(c.execute("SELECT key, value FROM meta"))
        assert m["app_id"] == "linectl" and m["schema_version"] == str(SCHEMA_VERSION) and "created_at" in m


async def test_migrates_v7_database_forwarded_state_into_the_mqtt_cursor(tmp_path):
    """v7 -> v8 (_migrate_sink_cursors): sink_cursors is added and the MQTT forwarder's position moves into its
    cursor: the last row of the unbroken run of forwarded rows, so nothing is sent again and nothing skipped."""
    from linectl.events import AlarmRaised, Severity

    p = tmp_path / "v7.db"
    s = await Store.open(p)
    seqs = await s.append(*(AlarmRaised(code="x", severity=Severity.INFO, message=str(i)) for i in range(6)))
    await s.close()
    with sqlite3.connect(p) as c:  # the file as linectl with schema v7 left it: rows 1-4 forwarded, 5-6 not
        c.execute("DROP TABLE sink_cursors")
        c.execute("UPDATE outbox SET forwarded_at='2026-11-30T10:00:00.000000+00:00' WHERE seq <= ?", (seqs[3],))
        c.execute("UPDATE meta SET value='7' WHERE key='schema_version'")
    s = await Store.open(p)
    try:
        assert s.opened_from_version == 7 and s.stats()["schema_version"] == SCHEMA_VERSION
        assert s.cursors()["mqtt"]["seq"] == seqs[3] and s.cursors()["mqtt"]["pending"] is None
        assert s.sink_backlog("mqtt") == 2 and s.backlog() == 2
        # forwarded_at of the rows forwarded before is kept (retention counts from then)
        assert [r.forwarded_at for r in s.outbox(0, 10, only_unforwarded=False)][:4] == ["2026-11-30T10:00:00.000000+00:00"] * 4
        assert await s.advance_cursor("mqtt", seqs[5]) == 2 and s.backlog() == 0
        assert any(a.action == "schema_migrated" and a.detail == {"from": 7, "to": 8} for a in s.audit_log())
        assert s.verify_audit().ok
    finally:
        await s.close()
    # every row forwarded, or an outbox emptied by retention: the cursor is the last seq ever stored
    with sqlite3.connect(p) as c:
        c.execute("DROP TABLE sink_cursors")
        c.execute("DELETE FROM outbox")
        c.execute("UPDATE meta SET value='7' WHERE key='schema_version'")
    s = await Store.open(p)
    try:
        assert s.cursor("mqtt") == seqs[5] and s.sink_backlog("mqtt") == 0
    finally:
        await s.close()
