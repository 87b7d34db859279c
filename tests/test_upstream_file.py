"""Sink "file" (linectl/upstream/file.py) on a real store and a real filesystem: EPCIS 2.0 documents written
atomically into a directory, names in delivery order, one cursor of its own, never a gap, never other bounds
after a restart, a full disk or a missing directory waited out. The daemon end to end (with MQTT beside it)
is in test_demo_upstream.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from mqtt_fixtures import broker_factory, free_port, line_yaml, load_line, unique_root  # noqa: F401 (fixture)
from test_forwarder import Producer, open_store

from linectl import events as ev
from linectl.epcis import validate_document
from linectl.upstream.epcis_xml import EpcisXmlSink
from linectl.upstream.file import FileSink
from linectl.upstream.mqtt import Forwarder
from linectl.upstream.sink import SINKS, build_sinks, enabled_names, sink_class

pytestmark = pytest.mark.timeout(120)


def file_cfg(tmp_path: Path, out: Path, mqtt: bool = False, **file: Any) -> Any:
    p = line_yaml(tmp_path / "line.yaml", root=unique_root())
    doc = json.loads(p.read_text())
    doc["mqtt"]["enabled"] = mqtt
    doc["upstream"] = {"file": {"dir": str(out), **file}}
    p.write_text(json.dumps(doc))
    return load_line(p)


def documents(out: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, json.loads(p.read_bytes())) for p in sorted(out.iterdir()) if p.suffix == ".json"]


def check_documents(out: Path, sink: FileSink) -> list[str]:
    """Every document schema-valid, named by its seq range, ranges consecutive; returns the eventIDs in order."""
    ids: list[str] = []
    prev_last = None
    for name, doc in documents(out):
        validate_document(doc)  # the official EPCIS 2.0 JSON Schema, offline
        first, last = (int(x) for x in doc["instanceIdentifier"].split("-"))
        assert name == sink.file_name(first, last) and first <= last
        assert prev_last is None or first > prev_last
        prev_last = last
        ids += [e["eventID"] for e in doc["epcisBody"]["eventList"]]
    assert not [p.name for p in out.iterdir() if p.suffix != ".json"], "a temporary file is visible"
    return ids


@contextlib.asynccontextmanager
async def running(sink: Any):  # type: ignore[no-untyped-def]
    task = asyncio.create_task(sink.run())
    try:
        yield task
    finally:
        await sink.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(pred: Any, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        await asyncio.sleep(0.05)


def test_registry_has_one_entry_per_sink_and_config_enables_them(tmp_path):
    assert set(SINKS) == {"mqtt", "file", "epcis_xml", "epcis_rest"}
    assert sink_class("file") is FileSink
    cfg = file_cfg(tmp_path, tmp_path / "out", mqtt=True)
    assert enabled_names(cfg) == ["mqtt", "file"]
    cfg = file_cfg(tmp_path, tmp_path / "out", mqtt=False)
    assert enabled_names(cfg) == ["file"]
    with pytest.raises(KeyError, match="unknown upstream sink 'ftp'"):
        sink_class("ftp")


def test_config_refuses_bad_file_sink_keys(tmp_path):
    from linectl.yamlsource import ConfigFileError as ConfigError

    for bad in ({"dir": ""}, {"dir": "x", "max_events": 0}, {"dir": "x", "max_age_s": 0}, {"dir": "x", "prefix": ".hidden"},
                {"dir": "x", "colour": "red"}, {}):
        p = line_yaml(tmp_path / "line.yaml", root=unique_root())
        doc = json.loads(p.read_text())
        doc["upstream"] = {"file": bad}
        p.write_text(json.dumps(doc))
        with pytest.raises(ConfigError):
            load_line(p)


async def test_documents_are_valid_ordered_complete_and_a_restart_resumes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = file_cfg(tmp_path, out, max_events=40, max_age_s=0.3, prefix="pkg-line1")
    store = await open_store(tmp_path)
    store.set_sinks(enabled_names(cfg))
    prod = Producer(store)
    events = await prod.fill(["LOTA", "LOTB"], 150)
    # rows without an EPCIS event travel in the same outbox: the file sink passes over them
    await store.append(ev.AlarmRaised(code="x", severity=ev.Severity.INFO, message="between"))
    (sink,) = build_sinks(cfg, store)
    async with running(sink):
        await until(lambda: store.sink_backlog("file") == 0, what="first 300 rows written")
    ids = check_documents(out, sink)
    assert ids == [e.event_id for e in events]  # every event once, in seq order
    assert all(len(d["epcisBody"]["eventList"]) <= 40 for _n, d in documents(out))
    assert all(n.startswith("pkg-line1-") for n, _d in documents(out))
    assert store.backlog() == 0 and store.cursor("file") == store.last_seq()
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in out.iterdir()}
    # restart with new rows: a new sink resumes after its cursor, old files untouched, nothing skipped
    more = await _more(prod, store, 25)
    (sink2,) = FileSink.from_config(cfg, store)
    async with running(sink2):
        await until(lambda: store.sink_backlog("file") == 0, what="rows after the restart written")
    after = {p.name: (p.stat().st_ino, p.read_bytes()) for p in out.iterdir()}
    assert {k: after[k] for k in before} == before
    assert check_documents(out, sink2) == ids + [e.event_id for e in more]
    # a partial document waits for max_age_s; then goes out on its own
    (e,) = await _more(prod, store, 1)
    (sink3,) = FileSink.from_config(cfg, store)
    async with running(sink3):
        await asyncio.sleep(0.1)
        assert sink3.files_written == 0  # younger than max_age_s
        await until(lambda: sink3.files_written == 1, what="the aged partial document")
    assert check_documents(out, sink3)[-1] == e.event_id
    await store.close()


async def test_file_sink_goes_on_while_the_mqtt_sink_is_down(tmp_path):
    """Two sinks, two cursors: with no broker listening the MQTT sink delivers nothing and retries; the file sink
    writes every event meanwhile; no row is forwarded (MQTT has none) and retention purges nothing."""
    out = tmp_path / "out"
    out.mkdir()
    cfg = file_cfg(tmp_path, out, mqtt=True, max_events=50, max_age_s=0.1)
    cfg = cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"port": free_port()})})  # nothing listens there
    store = await open_store(tmp_path)
    store.set_sinks(enabled_names(cfg))
    events = await Producer(store).fill(["LOTA"], 100)
    fwd, fsink = build_sinks(cfg, store)
    assert (fwd.name, fsink.name) == ("mqtt", "file")
    async with running(fwd), running(fsink):
        await until(lambda: store.sink_backlog("file") == 0, what="the file sink wrote everything")
        await until(lambda: fwd.status()["last_error"] is not None, what="the MQTT sink reports its broker down")
        assert store.sink_backlog("mqtt") == 100 and store.backlog() == 100
        with_cursor = store.cursors()
        assert with_cursor["mqtt"]["seq"] == 0 and with_cursor["file"]["seq"] == store.last_seq()
        assert await store.purge_forwarded(0.0) == 0
    assert check_documents(out, fsink) == [e.event_id for e in events]
    await store.close()


async def _more(prod: Producer, store: Any, n: int) -> list[ev.Event]:
    await prod.prepare("LOTC", n)
    evs = prod.events("LOTC", n)
    await store.append(*evs)
    return evs


async def test_crash_between_rename_and_cursor_rewrites_the_same_file(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    cfg = file_cfg(tmp_path, out, max_events=50, max_age_s=0.1)
    store = await open_store(tmp_path)
    store.set_sinks(["file"])
    events = await Producer(store).fill(["LOTA"], 120)
    (sink,) = FileSink.from_config(cfg, store)
    crashed = asyncio.Event()
    real_advance = sink.reader.advance

    async def crash_after_rename(seq: int) -> None:
        if sink.files_written == 2:  # the second file is renamed and fsynced: die before its cursor is written
            crashed.set()
            await asyncio.sleep(3600)
        await real_advance(seq)

    monkeypatch.setattr(sink.reader, "advance", crash_after_rename)
    task = asyncio.create_task(sink.run())
    await asyncio.wait_for(crashed.wait(), 30)
    task.cancel()  # the process dies here
    with contextlib.suppress(asyncio.CancelledError):
        await task
    names = [n for n, _d in documents(out)]
    assert len(names) == 2
    second = (out / names[1]).read_bytes()
    cur = store.cursors()["file"]
    assert cur["pending"] is not None and cur["seq"] < cur["pending"]  # the pending delivery is durable
    (sink2,) = FileSink.from_config(cfg, store)
    async with running(sink2):
        await until(lambda: store.sink_backlog("file") == 0, what="the rest after the crash")
    assert [n for n, _d in documents(out)][:2] == names  # same names: the second one was rewritten, not renamed
    assert (out / names[1]).read_bytes() == second  # byte for byte
    assert check_documents(out, sink2) == [e.event_id for e in events]  # nothing skipped, nothing twice
    assert store.cursors()["file"]["pending"] is None
    await store.close()


async def test_missing_directory_then_full_disk_are_waited_out_without_loss(tmp_path, capsys):
    fs = tmp_path / "fs"  # where a tiny filesystem gets mounted (a real full disk next)
    fs.mkdir()
    out = fs / "out"  # not there yet: the gateway's mount is missing
    cfg = file_cfg(tmp_path, out, max_events=20, max_age_s=0.1)
    store = await open_store(tmp_path)
    store.set_sinks(["file"])
    prod = Producer(store)
    events = await prod.fill(["LOTA"], 60)
    sink = FileSink(cfg, store, backoff_initial_s=0.05, backoff_max_s=0.2)
    alarms: list[tuple[str, str]] = []

    async def on_alarm(code: str, message: str) -> None:
        alarms.append((code, message))

    sink.on_alarm = on_alarm
    async with running(sink):
        await until(lambda: sink.status()["last_error"] is not None, what="the error reported")
        await asyncio.sleep(1.0)  # several retries
        assert store.cursor("file") == 0 and store.backlog() == 60  # nothing skipped, nothing counted forwarded
        assert "No such file or directory" in sink.status()["last_error"]
        logged = capsys.readouterr().err
        assert logged.count("file_sink_write_failed") == 1, logged  # once, not per retry
        assert [c for c, _m in alarms] == ["upstream_file_failed"] and str(out) in alarms[0][1]  # one alarm per outage
        # the directory appears, on a tiny filesystem: mounted first, then the directory made inside it (made
        # before the mount, a document the sink wrote in between would be hidden under the mount)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(fs)], check=False, capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root): full-disk case not exercised")
        out.mkdir()
        try:
            await until(lambda: store.sink_backlog("file") == 0, what="written once the directory is there")
            await until(lambda: sink.status()["last_error"] is None, what="recovered")
            filler = out / "filler.bin"
            with contextlib.suppress(OSError), open(filler, "wb") as fh:  # fill the disk to the last block
                while True:
                    fh.write(b"\0" * 4096)
                    fh.flush()
            more = await _more(prod, store, 200)
            await until(lambda: sink.status()["last_error"] is not None, what="disk full reported")
            assert "No space left" in sink.status()["last_error"]
            assert len(alarms) == 2 and "No space left" in alarms[1][1]  # a new outage: a new alarm
            await asyncio.sleep(0.5)
            cursor_full = store.cursor("file")
            assert store.sink_backlog("file") > 0
            assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
            filler.unlink()
            await until(lambda: store.sink_backlog("file") == 0, what="written after space was freed")
            assert store.cursor("file") > cursor_full
            docs = [d for n, d in documents(out)]
            for d in docs:
                validate_document(d)
            got = [e["eventID"] for d in docs for e in d["epcisBody"]["eventList"]]
            assert got == [e.event_id for e in events + more]
        finally:
            await sink.stop()
            subprocess.run(["umount", str(fs)], check=False, capture_output=True)
    await store.close()


async def test_backlog_age_alarm_of_the_file_epcis_xml_and_mqtt_sinks_raised_once_and_cleared_when_drained(tmp_path, broker_factory):
    """backlog_alarm_s (as epcis_rest has it) on the file sink, an epcis_xml sink and the MQTT forwarder: each one
    whose oldest undelivered row gets older than it alarms once (its own code), and is re-armed once it delivered."""
    broker = broker_factory(start=False)  # the MQTT sink's broker: not there yet
    out, xml_out = tmp_path / "out", tmp_path / "xml"  # nor the directories
    p = line_yaml(tmp_path / "line.yaml", port=broker.port, root=unique_root(), extra_mqtt={"backlog_alarm_s": 0.5})
    doc = json.loads(p.read_text())
    doc["upstream"] = {"file": {"dir": str(out), "max_age_s": 0.1, "backlog_alarm_s": 0.5},
                       "epcis_xml": [{"name": "gw", "dir": str(xml_out), "max_age_s": 0.1, "backlog_alarm_s": 0.5}]}
    p.write_text(json.dumps(doc))
    cfg = load_line(p)
    store = await open_store(tmp_path)
    store.set_sinks(enabled_names(cfg))
    await Producer(store).fill(["LOTA"], 30)
    fast = {"backoff_initial_s": 0.05, "backoff_max_s": 0.3}
    fwd = Forwarder(cfg, store, stats_interval_s=0.1, **fast)
    fsink, xsink = FileSink(cfg, store, **fast), EpcisXmlSink(cfg, store, cfg.upstream.epcis_xml[0], **fast)
    sinks = [fwd, fsink, xsink]
    assert [s.name for s in sinks] == enabled_names(cfg) == ["mqtt", "file", "epcis_xml:gw"]
    alarms: list[tuple[str, str]] = []

    async def on_alarm(code: str, message: str) -> None:
        alarms.append((code, message))

    for s in sinks:
        s.on_alarm = on_alarm
    async with running(fwd), running(fsink), running(xsink):
        codes = {"upstream_mqtt_backlog", "upstream_file_backlog", "upstream_epcis_xml_backlog"}
        await until(lambda: codes <= {c for c, _m in alarms}, what="the three backlog alarms")
        await asyncio.sleep(1.5)  # still late: no second alarm
        assert sorted(c for c, _m in alarms if c.endswith("_backlog")) == sorted(codes), alarms
        msg = dict(alarms)["upstream_file_backlog"]
        assert "30 rows wait" in msg and "backlog_alarm_s 0.5s" in msg and "No such file or directory" in msg, msg
        assert all(s.status()["backlog_alarm"] for s in sinks)
        out.mkdir()
        xml_out.mkdir()
        broker.start()
        await until(lambda: all(store.sink_backlog(s.name) == 0 for s in sinks), what="everything delivered")
        await until(lambda: not any(s.status()["backlog_alarm"] for s in sinks), what="the alarms re-armed")
    await store.close()
