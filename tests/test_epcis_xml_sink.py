"""Sink "epcis_xml" (linectl/upstream/epcis_xml.py) on a real store: EPCIS XML documents written atomically into a
directory, or POSTed to a real HTTP server on a free port (an asyncio HTTP/1.1 server written here, scripted per
request: success, 400/401/413/500 with an HTML body, no answer, a dropped connection, and a repository that captures
a document atomically and refuses to commission an EPC twice, as QU4RTET does). Every document body is checked
against the official EPCIS XSD. The same sink against a real QU4RTET is in test_epcis_xml_qu4rtet.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from mqtt_fixtures import line_yaml, load_line, unique_root
from test_forwarder import Producer, open_store
from test_upstream_file import running, until

from linectl import epcis_xml
from linectl.upstream.epcis_xml import EpcisXmlSink
from linectl.upstream.sink import build_sinks, enabled_names, sink_class

pytestmark = pytest.mark.timeout(120)

OFFICIAL = Path("/work/shared/standards/epcis")
QU4RTET_REGEX = r"already been commissioned\W+(?P<epc>urn:epc:id:[^'\"\s,)]+)"


def xsd(version: str) -> Any:
    """The official XSD, loaded by lxml from the shared standards folder when present (else the shipped copy)."""
    base = OFFICIAL if (OFFICIAL / epcis_xml.XSD_MAIN["1.2"]).is_file() else Path(epcis_xml.__file__).parent / "standards" / "epcis"
    return etree.XMLSchema(etree.parse(str(base / epcis_xml.XSD_MAIN[version])))  # type: ignore[index]


def xml_cfg(tmp_path: Path, *entries: dict[str, Any]) -> Any:
    p = line_yaml(tmp_path / "line.yaml", root=unique_root())
    doc = json.loads(p.read_text())
    doc["mqtt"]["enabled"] = False
    doc["upstream"] = {"epcis_xml": list(entries)}
    p.write_text(json.dumps(doc))
    return load_line(p)


def parse_events(body: bytes, version: str = "1.2") -> list[dict[str, Any]]:
    """eventID, action, bizStep and EPCs of each event of a document, after checking it against the XSD."""
    root = etree.fromstring(body)
    schema = xsd(version)
    assert schema.validate(root), schema.error_log
    out = []
    for e in root.find("EPCISBody/EventList"):
        eid = e.findtext("baseExtension/eventID") if version == "1.2" else e.findtext("eventID")
        epcs = [x.text for x in e.iterfind("epcList/epc")] + [x.text for x in e.iterfind("childEPCs/epc")]
        out.append({"eventID": eid, "action": e.findtext("action"), "bizStep": e.findtext("bizStep"), "epcs": epcs, "parentID": e.findtext("parentID")})
    return out


# --------------------------------------------------------------------------- a real HTTP server


class Repository:
    """A capture endpoint on a free port. `script` holds the answers to the next requests ("ok", "drop", "hang",
    or (status, body)); with it empty, the repository captures like QU4RTET: a document whole or not at all, and a
    commissioning (ObjectEvent ADD) of an EPC it already holds fails the whole document with HTTP 500 naming it."""

    def __init__(self, ssl: Any = None) -> None:
        self.ssl = ssl
        self.script: list[Any] = []
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.captured: list[dict[str, Any]] = []  # events held, in capture order
        self.commissioned: set[str] = set()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Repository:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.ssl else 'http'}://127.0.0.1:{port}/capture/"
        return self

    async def __aexit__(self, *_: Any) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append((path, headers, body))
            answer = self.script.pop(0) if self.script else self._capture(body)
            if callable(answer):
                answer = answer(body)
            if answer == "drop":
                writer.transport.abort()
                return
            if answer == "hang":
                await asyncio.sleep(3600)
            if answer == "ok":
                answer = self._capture(body)
            status, text = answer
            data = text.encode()
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: text/html\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError, OSError):
            pass
        finally:
            writer.close()

    def _capture(self, body: bytes) -> tuple[int, str]:
        version = "2.0" if b"urn:epcglobal:epcis:xsd:2" in body[:400] else "1.2"
        events = parse_events(body, version)
        for e in events:
            if e["action"] == "ADD" and e["bizStep"] == "urn:epcglobal:cbv:bizstep:commissioning":
                for epc in e["epcs"]:
                    if epc in self.commissioned:
                        return 500, json.dumps({"detail": f"('The epc %s has already been commissioned.', '{epc}')"})
        for e in events:
            if e["action"] == "ADD" and e["bizStep"] == "urn:epcglobal:cbv:bizstep:commissioning":
                self.commissioned.update(e["epcs"])
        self.captured += events
        return 201, "task-name"


# --------------------------------------------------------------------------- config


def test_registry_config_and_cursor_names(tmp_path):
    cfg = xml_cfg(tmp_path, {"name": "qu4rtet", "url": "http://127.0.0.1:1/capture/"}, {"name": "mft-dir", "dir": str(tmp_path), "version": "2.0"})
    assert sink_class("epcis_xml") is EpcisXmlSink
    assert enabled_names(cfg) == ["epcis_xml:qu4rtet", "epcis_xml:mft-dir"]
    sinks = build_sinks(cfg, store=None)
    assert [s.name for s in sinks] == ["epcis_xml:qu4rtet", "epcis_xml:mft-dir"]
    assert [s.version for s in sinks] == ["1.2", "2.0"]
    assert sinks[0].status()["target"] == "http://127.0.0.1:1/capture/" and sinks[1].status()["backlog_rows"] is None


@pytest.mark.parametrize("bad, why", [
    ({"name": "a"}, "exactly one of url"),
    ({"name": "a", "url": "http://x/", "dir": "/tmp"}, "exactly one of url"),
    ({"name": "A b", "url": "http://x/"}, "name"),
    ({"name": "a" * 33, "url": "http://x/"}, "name"),
    ({"name": "a", "url": "ftp://x/"}, "url"),
    ({"name": "a", "url": "http://x/", "auth": "basic", "username": "u"}, "auth basic needs"),
    ({"name": "a", "url": "http://x/", "auth": "bearer"}, "auth bearer needs"),
    ({"name": "a", "url": "http://x/", "secret_env": "X"}, "auth is none"),
    ({"name": "a", "url": "http://x/", "auth": "bearer", "secret_env": "X", "secret_file": "/f"}, "not both"),
    ({"name": "a", "url": "http://x/", "auth": "bearer", "secret_env": "X", "username": "u"}, "username is only"),
    ({"name": "a", "url": "http://x/", "headers": {"Authorization": "Basic eA=="}}, "credentials never"),
    ({"name": "a", "url": "http://x/", "client_key": "/k"}, "client_key needs"),
    ({"name": "a", "dir": "/tmp", "auth": "bearer", "secret_env": "X"}, "only apply to url"),
    ({"name": "a", "url": "http://x/", "prefix": "p"}, "prefix only"),
    ({"name": "a", "url": "http://x/", "already_captured": {"body_regex": "("}}, "not a valid regular expression"),
    ({"name": "a", "url": "http://x/", "version": "1.1"}, "version"),
    ({"name": "a", "url": "http://x/", "max_events": 0}, "max_events"),
    ({"name": "a", "url": "http://x/", "colour": "red"}, "colour"),
])
def test_config_refuses_bad_entries(tmp_path, bad, why):
    from linectl.yamlsource import ConfigFileError

    with pytest.raises(ConfigFileError) as exc:
        xml_cfg(tmp_path, bad)
    assert why in str(exc.value) or any(why in p.message for p in exc.value.problems), exc.value.problems


def test_config_refuses_duplicate_names(tmp_path):
    from linectl.yamlsource import ConfigFileError

    with pytest.raises(ConfigFileError) as exc:
        xml_cfg(tmp_path, {"name": "x", "url": "http://a/"}, {"name": "x", "dir": str(tmp_path)})
    assert any("unique" in p.message for p in exc.value.problems)


# --------------------------------------------------------------------------- directory mode


async def test_directory_documents_are_xsd_valid_ordered_atomic_and_each_instance_has_its_cursor(tmp_path):
    d12, d20 = tmp_path / "v12", tmp_path / "v20"
    d12.mkdir()
    d20.mkdir()
    cfg = xml_cfg(tmp_path, {"name": "a", "dir": str(d12), "max_events": 40, "max_age_s": 0.2, "prefix": "pkg"},
                  {"name": "b", "dir": str(d20), "version": "2.0", "max_events": 1000, "max_age_s": 0.2})
    store = await open_store(tmp_path)
    store.set_sinks(enabled_names(cfg))
    prod = Producer(store)
    events = await prod.fill(["LOTA", "LOTB"], 60)
    a, b = build_sinks(cfg, store)
    async with running(a), running(b):
        await until(lambda: store.sink_backlog("epcis_xml:a") == 0 and store.sink_backlog("epcis_xml:b") == 0, what="both written")
    for out, version, sink in ((d12, "1.2", a), (d20, "2.0", b)):
        names = sorted(p.name for p in out.iterdir())
        assert all(n.endswith(".xml") and not n.startswith(".") for n in names), names  # no temporary file left visible
        ids: list[str] = []
        prev = 0
        for n in names:
            first, last = (int(x) for x in n.removesuffix(".xml").split("-")[-2:])
            assert n == sink.file_name(first, last) and first > prev
            prev = last
            ids += [e["eventID"] for e in parse_events((out / n).read_bytes(), version)]
        assert ids == [e.event_id for e in events]
    assert all(n.startswith("pkg-") for n in (p.name for p in d12.iterdir())) and len(list(d12.iterdir())) == 3
    assert len(list(d20.iterdir())) == 1
    assert store.cursors()["epcis_xml:a"]["seq"] == store.cursors()["epcis_xml:b"]["seq"] == store.last_seq()
    await store.close()


async def test_directory_crash_between_rename_and_cursor_rewrites_the_same_document(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    cfg = xml_cfg(tmp_path, {"name": "d", "dir": str(out), "max_events": 50, "max_age_s": 0.1})
    store = await open_store(tmp_path)
    store.set_sinks(enabled_names(cfg))
    events = await Producer(store).fill(["LOTA"], 120)
    (sink,) = EpcisXmlSink.from_config(cfg, store)
    crashed = asyncio.Event()
    real_advance = sink.reader.advance

    async def crash_after_rename(seq: int) -> None:
        if sink.files_written == 2:
            crashed.set()
            await asyncio.sleep(3600)
        await real_advance(seq)

    monkeypatch.setattr(sink.reader, "advance", crash_after_rename)
    task = asyncio.create_task(sink.run())
    await asyncio.wait_for(crashed.wait(), 30)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    names = sorted(p.name for p in out.iterdir())
    second = (out / names[1]).read_bytes()
    assert store.cursors()["epcis_xml:d"]["pending"] is not None
    (sink2,) = EpcisXmlSink.from_config(cfg, store)
    async with running(sink2):
        await until(lambda: store.sink_backlog("epcis_xml:d") == 0, what="the rest after the crash")
    assert sorted(p.name for p in out.iterdir())[:2] == names and (out / names[1]).read_bytes() == second
    ids = [e["eventID"] for n in sorted(p.name for p in out.iterdir()) for e in parse_events((out / n).read_bytes())]
    assert ids == [e.event_id for e in events]
    await store.close()


# --------------------------------------------------------------------------- HTTP


async def test_http_capture_with_basic_auth_from_env_and_extra_headers(tmp_path, monkeypatch):
    monkeypatch.setenv("L4_PASSWORD", "s3cret:x")
    async with Repository() as repo:
        cfg = xml_cfg(tmp_path, {"name": "l4", "url": repo.url, "auth": "basic", "username": "line", "secret_env": "L4_PASSWORD",
                                 "headers": {"X-Site": "plant-1"}, "max_events": 25, "max_age_s": 0.1, "timeout_s": 10})
        store = await open_store(tmp_path)
        store.set_sinks(enabled_names(cfg))
        events = await Producer(store).fill(["LOTA"], 60)
        (sink,) = build_sinks(cfg, store)
        async with running(sink):
            await until(lambda: store.sink_backlog("epcis_xml:l4") == 0, what="captured")
        assert [e["eventID"] for e in repo.captured] == [e.event_id for e in events]
        assert len(repo.requests) == 3
        for _path, headers, _body in repo.requests:
            assert headers["authorization"] == "Basic " + base64.b64encode(b"line:s3cret:x").decode()
            assert headers["x-site"] == "plant-1" and headers["content-type"] == "application/xml"
        st = sink.status()
        assert st["connected"] is True and st["last_error"] is None and st["cursor"] == store.last_seq() and st["documents"] == 3
        await store.close()


async def test_bearer_token_from_file_with_the_token_scheme(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("abc123\n")
    async with Repository() as repo:
        cfg = xml_cfg(tmp_path, {"name": "l4", "url": repo.url, "auth": "bearer", "secret_file": str(secret), "token_scheme": "Token",
                                 "version": "2.0", "max_age_s": 0.1, "success_codes": [201]})
        store = await open_store(tmp_path)
        store.set_sinks(enabled_names(cfg))
        events = await Producer(store).fill(["LOTA"], 5)
        (sink,) = build_sinks(cfg, store)
        async with running(sink):
            await until(lambda: store.sink_backlog("epcis_xml:l4") == 0, what="captured")
        assert repo.requests[0][1]["authorization"] == "Token abc123"
        assert b"urn:epcglobal:epcis:xsd:2" in repo.requests[0][2]
        assert [e["eventID"] for e in repo.captured] == [e.event_id for e in events]
        await store.close()


async def test_missing_secret_is_reported_and_retried_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_SECRET_XML", raising=False)
    async with Repository() as repo:
        cfg = xml_cfg(tmp_path, {"name": "l4", "url": repo.url, "auth": "bearer", "secret_env": "NO_SUCH_SECRET_XML", "max_age_s": 0.1})
        store = await open_store(tmp_path)
        store.set_sinks(enabled_names(cfg))
        await Producer(store).fill(["LOTA"], 3)
        (sink,) = EpcisXmlSink.from_config(cfg, store, backoff_initial_s=0.05, backoff_max_s=0.2)
        async with running(sink):
            await until(lambda: sink.last_error is not None, what="error")
            assert "NO_SUCH_SECRET_XML is not set" in sink.last_error
            monkeypatch.setenv("NO_SUCH_SECRET_XML", "t")
            await until(lambda: store.sink_backlog("epcis_xml:l4") == 0, what="delivered once the secret is there")
        assert len(repo.captured) == 3
        await store.close()


@pytest.mark.parametrize("status", [400, 401, 413])
async def test_4xx_parks_the_document_with_one_alarm_and_retries_slowly(tmp_path, status):
    async with Repository() as repo:
        cfg = xml_cfg(tmp_path, {"name": "l4", "url": repo.url, "max_age_s": 0.1, "retry_4xx_s": 1.0})
        store = await open_store(tmp_path)
        store.set_sinks(enabled_names(cfg))
        events = await Producer(store).fill(["LOTA"], 10)
        repo.script = [(status, "<html><body><h1>Nope</h1></body></html>")] * 3
        alarms: list[tuple[str, str]] = []

        async def on_alarm(code: str, message: str) -> None:
            alarms.append((code, message))

        (sink,) = EpcisXmlSink.from_config(cfg, store, backoff_initial_s=0.01, backoff_max_s=0.02)
        sink.on_alarm = on_alarm
        async with running(sink):
            await until(lambda: len(repo.requests) >= 2, what="a second attempt")
            st = sink.status()
            assert st["parked"] is True and f"HTTP {status}: <html><body><h1>Nope</h1></body></html>" == st["last_error"]
            assert st["cursor"] == 0 and st["connected"] is True and st["last_status"] == status
            await until(lambda: store.sink_backlog("epcis_xml:l4") == 0, 30, what="delivered after the refusals")
        # the first retry waited about retry_4xx_s, not the 10-20 ms of the 5xx backoff
        assert len(repo.requests) == 4 and len(alarms) == 1 and alarms[0][0] == "upstream_epcis_xml_failed"
        assert [e["eventID"] for e in repo.captured] == [e.event_id for e in events]
        assert sink.status()["parked"] is False and sink.status()["last_error"] is None
        await store.close()


@pytest.mark.parametrize("fault", ["500", "hang", "drop"])
async def test_5xx_timeout_and_dropped_connection_are_retried_with_backoff(tmp_path, fault):
    async with Repository() as repo:
        cfg = xml_cfg(tmp_path, {"name": "l4", "url": repo.url, "max_age_s": 0.1, "timeout_s": 0.5})
        store = await open_store(tmp_path)
        store.set_sinks(enabled_names(cfg))
        events = await Producer(store).fill(["LOTA"], 10)
        repo.script = [(500, "<html><title>Server Error (500)</title></html>") if fault == "500" else fault] * 2
        (sink,) = EpcisXmlSink.from_config(cfg, store, backoff_initial_s=0.05, backoff_max_s=0.2)
        async with running(sink):
            await until(lambda: sink.last_error is not None, what="the fault seen")
            assert sink.status()["parked"] is False
            assert sink.status()["connected"] is (fault == "500")
            await until(lambda: store.sink_backlog("epcis_xml:l4") == 0, 30, what="delivered after the fault")
        assert len(repo.requests) == 3 and [e["eventID"] for e in repo.captured] == [e.event_id for e in events]
        await store.close()


async def _crash_after_capture(sink: EpcisXmlSink, monkeypatch: pytest.MonkeyPatch, after_documents: int) -> None:
    """Run `sink` until its n-th document is answered 2xx, then 'kill' it before the cursor moves."""
    crashed = asyncio.Event()
    real_advance = sink.reader.advance

    async def die(seq: int) -> None:
        if sink.documents_sent == after_documents:
            crashed.set()
            await asyncio.sleep(3600)
        await real_advance(seq)

    monkeypatch.setattr(sink.reader, "advance", die)
    task = asyncio.create_task(sink.run())
    await asyncio.wait_for(crashed.wait(), 30)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_resend_after_a_crash_is_recognised_as_captured_never_doubled_never_wedged(tmp_path, monkeypatch):
    async with Repository() as repo:
        cfg = xml_cfg(tmp_path, {"name": "l4", "url": repo.url, "max_events": 20, "max_age_s": 0.1,
                                 "already_captured": {"status": [500], "body_regex": QU4RTET_REGEX, "split": False}})
        store = await open_store(tmp_path)
        store.set_sinks(enabled_names(cfg))
        events = await Producer(store).fill(["LOTA"], 50)
        (sink,) = EpcisXmlSink.from_config(cfg, store)
        await _crash_after_capture(sink, monkeypatch, 2)
        assert len(repo.captured) == 40 and store.cursors()["epcis_xml:l4"]["pending"] is not None
        (sink2,) = EpcisXmlSink.from_config(cfg, store)
        async with running(sink2):
            await until(lambda: store.sink_backlog("epcis_xml:l4") == 0, what="the rest after the crash")
        # the re-sent second document was answered 500 "already been commissioned": counted as delivered
        assert sink2.status()["already_captured"] == 1 and sink2.status()["events_skipped"] == 20
        assert repo.requests[2][2] == repo.requests[1][2]  # the same document, byte for byte
        assert [e["eventID"] for e in repo.captured] == [e.event_id for e in events]  # each event once
        await store.close()


async def test_already_captured_answer_to_a_first_send_is_a_conflict_parked_not_skipped(tmp_path):
    async with Repository() as repo:
        cfg = xml_cfg(tmp_path, {"name": "l4", "url": repo.url, "max_age_s": 0.1, "retry_4xx_s": 60,
                                 "already_captured": {"body_regex": QU4RTET_REGEX}})
        store = await open_store(tmp_path)
        store.set_sinks(enabled_names(cfg))
        await Producer(store).fill(["LOTA"], 5)
        (sink,) = EpcisXmlSink.from_config(cfg, store)
        epc = sink.mapper.sgtin(*_first_unit(store))
        repo.commissioned.add(epc)  # the repository got this EPC from elsewhere
        alarms: list[str] = []

        async def on_alarm(code: str, message: str) -> None:
            alarms.append(message)

        sink.on_alarm = on_alarm
        async with running(sink):
            await until(lambda: sink.last_error is not None, what="refused")
        assert sink.status()["parked"] and "never sent before" in sink.last_error and epc in sink.last_error
        assert store.cursors()["epcis_xml:l4"]["seq"] == 0 and not repo.captured and len(alarms) == 1
        await store.close()


async def test_split_skips_exactly_the_events_a_partial_repository_holds(tmp_path, monkeypatch):
    """A repository that kept part of a failed document (not QU4RTET, which is atomic): with split the sink
    bisects the re-sent document and only the events already held are skipped."""
    async with Repository() as repo:
        cfg = xml_cfg(tmp_path, {"name": "l4", "url": repo.url, "max_events": 16, "max_age_s": 0.1,
                                 "already_captured": {"body_regex": QU4RTET_REGEX, "split": True}})
        store = await open_store(tmp_path)
        store.set_sinks(enabled_names(cfg))
        events = await Producer(store).fill(["LOTA"], 16)
        (sink,) = EpcisXmlSink.from_config(cfg, store)

        def partial(body: bytes) -> str:  # this repository keeps the first 5 events, then the connection drops
            for e in parse_events(body)[:5]:
                repo.commissioned.update(e["epcs"])
                repo.captured.append(e)
            return "drop"

        repo.script = [partial]
        async with running(sink):
            await until(lambda: store.sink_backlog("epcis_xml:l4") == 0, what="delivered")
        assert sorted(e["eventID"] for e in repo.captured) == sorted(e.event_id for e in events)  # each once
        assert sink.status()["events_skipped"] == 5
        await store.close()


def _first_unit(store: Any) -> tuple[str, str]:
    row = store.outbox(0, 1, only_unforwarded=False)[0]
    return row.event.gtin, row.event.serial


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
async def test_tls_with_ca_file_and_client_certificate(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.crt", "-days", "2",
             "-extfile", "ext", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=line1", cwd=d)
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "client.crt", "-days", "2", cwd=d)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(d / "ca.crt"))
    server_ctx.load_cert_chain(str(d / "server.crt"), str(d / "server.key"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no capture
    async with Repository(ssl=server_ctx) as repo:
        base = {"name": "l4", "url": repo.url, "ca_file": str(d / "ca.crt"), "max_age_s": 0.1, "timeout_s": 5}
        store = await open_store(tmp_path)
        events = await Producer(store).fill(["LOTA"], 5)
        # without the client certificate the handshake fails: a transport error, retried, nothing lost
        (nocert,) = EpcisXmlSink.from_config(xml_cfg(tmp_path, base), store, backoff_initial_s=0.05, backoff_max_s=0.1)
        store.set_sinks(["epcis_xml:l4"])
        async with running(nocert):
            await until(lambda: nocert.last_error is not None, what="handshake refused")
        assert nocert.status()["connected"] is False and not repo.captured
        cfg = xml_cfg(tmp_path, {**base, "client_cert": str(d / "client.crt"), "client_key": str(d / "client.key")})
        (sink,) = EpcisXmlSink.from_config(cfg, store)
        async with running(sink):
            await until(lambda: store.sink_backlog("epcis_xml:l4") == 0, what="captured over TLS")
        assert [e["eventID"] for e in repo.captured] == [e.event_id for e in events]
        await store.close()
