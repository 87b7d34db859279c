"""Sink "epcis_rest" (linectl/upstream/epcis_rest.py) against the EPCIS 2.0 repository simulator
(simulators/epcis_repository.py) over real HTTP on free ports, on a real store.

What the repository stored is the ground truth: compared with the store's outbox (every eventID, in order when
one document is in flight, no gap, no event stored twice; re-sends only as refused duplicates). Every fault of
the repository is met: HTML 500s, 503s, dropped answers, timeouts, failing jobs, 400 (parked), 401 (alarm, slow
retry, a fixed secret picked up), 413 (halved), events that exist already under both error behaviours and as a
synchronous 409, limits, TLS with a client certificate, and a SIGKILL of the sink mid-delivery."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from mqtt_fixtures import line_yaml, load_line, unique_root
from test_forwarder import Producer, open_store

import linectl
from linectl import events as ev
from linectl.simulators.epcis_repository import EpcisRepository, Fault, RepositoryConfig, server_ssl_context
from linectl.upstream.epcis_rest import EpcisRestSink
from linectl.upstream.outbox import encoded_events
from linectl.upstream.sink import build_sinks, enabled_names

pytestmark = pytest.mark.timeout(180)
REPO_ROOT = Path(__file__).resolve().parent.parent


def rest_cfg(tmp_path: Path, *entries: dict[str, Any], mqtt: bool = False) -> Any:
    p = line_yaml(tmp_path / "line.yaml", root=unique_root())
    doc = json.loads(p.read_text())
    doc["mqtt"]["enabled"] = mqtt
    doc["upstream"] = {"epcis_rest": list(entries)}
    p.write_text(json.dumps(doc))
    return load_line(p)


@contextlib.asynccontextmanager
async def repository(**kw: Any):  # type: ignore[no-untyped-def]
    repo = EpcisRepository(RepositoryConfig(**kw))
    await repo.start()
    try:
        yield repo
    finally:
        await repo.stop()


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


async def until(pred: Any, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        await asyncio.sleep(0.02)


def fast(sink: EpcisRestSink) -> EpcisRestSink:
    """Short waits so a test of retries runs in seconds (the same code paths as the defaults)."""
    sink._backoff.initial, sink._backoff.maximum = 0.02, 0.2
    sink._auth_backoff.initial, sink._auth_backoff.maximum = 0.1, 0.3
    sink.auth_retry_s = 0.3
    return sink


def one_sink(cfg: Any, store: Any) -> EpcisRestSink:
    (sink,) = build_sinks(cfg, store)
    assert isinstance(sink, EpcisRestSink)
    return fast(sink)


async def line_store(tmp_path: Path, cfg: Any) -> Any:
    """A store as the daemon opens it: every EPCIS event rendered once when stored; the config's sinks counted."""
    from linectl.epcis import EpcisMapper

    store = await open_store(tmp_path)
    store.set_epcis_mapper(EpcisMapper.from_config(cfg))
    store.set_sinks(enabled_names(cfg))
    return store


def outbox_event_ids(store: Any, sink: EpcisRestSink) -> list[str]:
    ids: list[str] = []
    for row in store.outbox(0, 10**7, only_unforwarded=False):
        for e in encoded_events(row, store, sink.mapper)[0]:
            ids.append(json.loads(e)["eventID"])
    return ids


def check_ground_truth(repo: EpcisRepository, store: Any, sink: EpcisRestSink, *, ordered: bool) -> list[str]:
    """Everything the outbox holds reached the repository once; the cursor is at the end."""
    want = outbox_event_ids(store, sink)
    got = repo.capture_order
    assert len(got) == len(set(got)), "an event stored twice"
    if ordered:
        assert got == want
    else:
        assert sorted(got) == sorted(want)
    assert store.cursor(sink.name) == store.last_seq()
    assert store.sink_backlog(sink.name) == 0
    for eid in want[:: max(1, len(want) // 20)]:  # the repository kept the events as they were sent
        assert json.loads(repo.events[eid])["eventID"] == eid
    return want


# --------------------------------------------------------------------------- registry and config


def test_config_names_cursors_and_refuses_bad_entries(tmp_path):
    from linectl.yamlsource import ConfigFileError

    cfg = rest_cfg(tmp_path, {"name": "site-l3", "url": "http://127.0.0.1:1"}, {"name": "cmo_2", "url": "https://l4.example/epcis/"}, mqtt=True)
    assert enabled_names(cfg) == ["mqtt", "epcis_rest:site-l3", "epcis_rest:cmo_2"]
    assert EpcisRestSink.names(cfg) == ["epcis_rest:site-l3", "epcis_rest:cmo_2"]
    cfg = rest_cfg(tmp_path, {"name": "a", "url": "http://127.0.0.1:1"})
    assert enabled_names(cfg) == ["epcis_rest:a"]
    bad_entries: list[list[dict[str, Any]]] = [
        [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}],  # names are cursors: unique
        [{"name": "Upper", "url": "http://x"}],
        [{"name": "x" * 33, "url": "http://x"}],
        [{"name": "a", "url": "ftp://x"}],
        [{"name": "a", "url": "http://x", "password": "secret"}],  # no secret in the YAML: there is no such key
        [{"name": "a", "url": "http://x", "auth": "basic", "username": "u"}],  # basic needs secret_env or secret_file
        [{"name": "a", "url": "http://x", "auth": "bearer", "secret_env": "A", "secret_file": "/f"}],
        [{"name": "a", "url": "http://x", "secret_env": "A"}],  # auth none takes no secret
        [{"name": "a", "url": "http://x", "ca_file": "/ca.pem"}],  # TLS options need https
        [{"name": "a", "url": "https://x", "client_key": "/k.pem"}],
        [{"name": "a", "url": "http://x", "inflight": 0}],
        [{"name": "a", "url": "http://x", "max_bytes": 10}],
        [{"name": "a"}],
    ]
    for bad in bad_entries:
        with pytest.raises(ConfigFileError):
            rest_cfg(tmp_path, *bad)


# --------------------------------------------------------------------------- the repository itself


async def test_repository_validates_like_the_reference_validator(tmp_path):
    """jsonschema-rs in the repository and linectl's jsonschema validator agree on valid and broken documents."""
    from linectl.epcis import EpcisValidator, document_bytes

    store = await open_store(tmp_path)
    cfg = rest_cfg(tmp_path, {"name": "a", "url": "http://127.0.0.1:1"})
    from linectl.epcis import EpcisMapper

    mapper = EpcisMapper.from_config(cfg)
    await Producer(store).fill(["L1"], 5)
    events = [e for r in store.outbox(0, 100, only_unforwarded=False) for e in encoded_events(r, store, mapper)[0]]
    good = json.loads(document_bytes(events))
    broken = []
    for key, value in [("action", "FOO"), ("eventTime", "yesterday"), ("eventTimeZoneOffset", "+1"), ("epcList", ["not an epc"]), ("bizStep", 7)]:
        d = json.loads(json.dumps(good))
        d["epcisBody"]["eventList"][2][key] = value
        broken.append(d)
    reference = EpcisValidator()
    async with repository() as repo, httpx.AsyncClient(base_url=f"http://127.0.0.1:{repo.port}") as c:
        r = await c.post("/capture", content=json.dumps(good), headers={"Content-Type": "application/json"})
        assert r.status_code == 202 and not reference.problems(good)
        for d in broken:
            assert reference.problems(d)
            r = await c.post("/capture", content=json.dumps(d), headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["type"] == "epcisException:ValidationException", r.text
        r = await c.post("/capture", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400
    assert len(repo.events) == 5 and repo.documents_invalid == len(broken) + 1
    await store.close()


class _OARequest:
    """An httpx request as openapi-core's Request protocol sees it."""

    def __init__(self, r: httpx.Request) -> None:
        from urllib.parse import parse_qs

        from openapi_core.datatypes import RequestParameters
        from werkzeug.datastructures import Headers, ImmutableMultiDict

        self.host_url = f"{r.url.scheme}://{r.url.netloc.decode()}"
        self.path = r.url.path
        self.method = r.method.lower()
        self.body = r.content or None
        self.content_type = r.headers.get("Content-Type", "")
        self.parameters = RequestParameters(query=ImmutableMultiDict(parse_qs(r.url.query.decode())), header=Headers(dict(r.headers)),
                                            cookie=ImmutableMultiDict())


class _OAResponse:
    def __init__(self, r: httpx.Response) -> None:
        from werkzeug.datastructures import Headers

        self.data = r.content
        self.status_code = r.status_code
        self.content_type = r.headers.get("Content-Type", "").split(";")[0]
        self.headers = Headers(dict(r.headers))


def official_openapi() -> Any:
    """GS1's EPCIS 2.0 OpenAPI, read by openapi-core (a validator nobody here wrote), with three defects of the spec
    patched as narrowly as possible, else NO server could conform:
    - CaptureJob: `oneOf [{properties: errors}, {properties: errorFile}]` without `required`: every object matches
      both, so every capture job fails oneOf. Read as anyOf.
    - EPCISEvent: `oneOf [ObjectEvent, ..., Extended-Event]`: an ObjectEvent is also an Extended-Event, so every
      standard event fails oneOf. Read as anyOf.
    - 409ResourceAlreadyExistsException: its problem body's `status` is `enum: [406]` (copied from 406NotAcceptable;
      its own example says 409, and RFC 7807 makes it the HTTP status). Read as [409].
    The spec check (openapi-spec-validator) is off: the spec's query-time patterns use Oniguruma `\\g<name>` syntax
    that no JSON-schema regex engine accepts."""
    from openapi_core import Config, OpenAPI

    spec = json.loads(_openapi_file().read_text())
    schemas = spec["components"]["schemas"]
    job = schemas["CaptureJob"]["allOf"][1]
    job["anyOf"] = job.pop("oneOf")
    schemas["EPCISEvent"]["anyOf"] = schemas["EPCISEvent"].pop("oneOf")
    for media in spec["components"]["responses"]["409ResourceAlreadyExistsException"]["content"].values():
        status = media["schema"]["allOf"][0]["properties"]["status"]
        assert status["enum"] == [406], "the spec changed: look again at this patch"
        status["enum"], status["default"] = [409], 409
    return OpenAPI.from_dict(spec, config=Config(spec_validator_cls=None, extra_media_type_deserializers={"application/problem+json": json.loads}))


def _openapi_file() -> Path:
    """GS1's OpenAPI: $EPCIS_OPENAPI (another edition to try), else the copy linectl ships (linectl/standards/epcis/rest/)."""
    if os.environ.get("EPCIS_OPENAPI"):
        return Path(os.environ["EPCIS_OPENAPI"])
    return Path(linectl.__file__).parent / "standards/epcis/rest/openapi.json"


def test_the_shipped_openapi_is_gs1s_unmodified():
    """The copy is the file its NOTICE names (so the in-memory patches above are the only changes), Apache-2.0."""
    import hashlib

    path = Path(linectl.__file__).parent / "standards/epcis/rest/openapi.json"
    notice = (path.parent / "NOTICE").read_text()
    assert hashlib.sha256(path.read_bytes()).hexdigest() in notice.replace("\n", "")
    spec = json.loads(path.read_text())
    assert spec["info"]["title"] == "EPCIS 2.0 REST Bindings" and spec["info"]["license"]["name"] == "Apache2"
    assert "Apache License" in (path.parent / "LICENSE").read_text() and (path.parent.parent / "GS1-DISCLAIMER.txt").is_file()


async def test_repository_answers_conform_to_the_official_openapi(tmp_path):
    api = official_openapi()
    store = await open_store(tmp_path)
    cfg = rest_cfg(tmp_path, {"name": "a", "url": "http://127.0.0.1:1"})
    from linectl.epcis import EpcisMapper, document_bytes

    await Producer(store).fill(["L1"], 30)
    events = [e for r in store.outbox(0, 100, only_unforwarded=False) for e in encoded_events(r, store, EpcisMapper.from_config(cfg))[0]]
    doc = document_bytes(events)
    first_id = json.loads(events[0])["eventID"]
    async with repository(capture_limit=20, auth="bearer", token="t0k") as repo, httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{repo.port}", headers={"Authorization": "Bearer t0k"}
    ) as c:
        json_h = {"Content-Type": "application/json"}
        checked: list[tuple[str, str, int]] = []

        async def call(method: str, url: str, **kw: Any) -> httpx.Response:
            rq = c.build_request(method, url, **kw)
            r = await c.send(rq)
            api.validate_response(_OARequest(rq), _OAResponse(r))  # raises on any deviation from the OpenAPI
            checked.append((method, rq.url.path, r.status_code))
            return r

        assert (await call("OPTIONS", "/capture")).headers["GS1-EPCIS-Capture-Limit"] == "20"
        await call("OPTIONS", "/")
        await call("OPTIONS", "/events")
        r = await call("POST", "/capture", content=document_bytes(events[:10]), headers=json_h)
        assert r.status_code == 202
        job = (await call("GET", r.headers["Location"])).json()
        assert job["success"] is True and job["running"] is False
        r = await call("POST", "/capture", content=document_bytes(events[5:15]), headers=json_h)  # 5 exist
        job = (await call("GET", r.headers["Location"])).json()
        assert job["success"] is False and len(job["errors"]) == 5
        assert (await call("POST", "/capture", content=doc, headers=json_h)).status_code == 413  # 30 events > 20
        assert (await call("POST", "/capture", content=b'{"type": "EPCISDocument"}', headers=json_h)).status_code == 400
        listing = await call("GET", "/capture", params={"perPage": 1})
        assert 'rel="next"' in listing.headers["Link"]
        await call("GET", "/capture/nope")
        assert (await call("GET", "/events", params={"perPage": 3})).json()["epcisBody"]["queryResults"]["resultsBody"]["eventList"][0]["eventID"] == first_id
        assert (await call("GET", f"/events/{first_id}")).status_code == 200
        assert (await call("GET", "/events/urn:uuid:00000000-0000-0000-0000-000000000000")).status_code == 404
        single = json.loads(events[20])
        single["@context"] = ["https://ref.gs1.org/standards/epcis/epcis-context.jsonld"]
        assert (await call("POST", "/events", content=json.dumps(single), headers=json_h)).status_code == 201
        assert (await call("POST", "/events", content=json.dumps(single), headers=json_h)).status_code == 409
        rq = c.build_request("OPTIONS", "/capture", headers={"Authorization": "Bearer wrong"})
        r = await c.send(rq)
        assert r.status_code == 401
        api.validate_response(_OARequest(rq), _OAResponse(r))
    assert {s for _m, _p, s in checked} >= {200, 201, 202, 204, 400, 404, 409, 413}
    await store.close()


# --------------------------------------------------------------------------- delivery


@pytest.mark.parametrize("inflight", [1, 4])
async def test_happy_path_everything_once_within_limits(tmp_path, inflight):
    async with repository(capture_limit=40, file_size_limit=16_000) as repo:
        cfg = rest_cfg(tmp_path, {"name": "l3", "url": f"http://127.0.0.1:{repo.port}", "max_events": 500, "max_age_s": 0.2, "inflight": inflight})
        store = await line_store(tmp_path, cfg)
        prod = Producer(store)
        await prod.fill(["LOTA", "LOTB"], 200)
        await store.append(ev.AlarmRaised(code="x", severity=ev.Severity.INFO, message="a row without an EPCIS event"))
        await prod.fill(["LOTC"], 17)
        sink = one_sink(cfg, store)
        assert sink.name == "epcis_rest:l3"
        async with running(sink):
            await until(lambda: store.sink_backlog(sink.name) == 0, what="417 events captured")
            st = sink.status()
        check_ground_truth(repo, store, sink, ordered=inflight == 1)
        # the limits the repository announced were kept: no 413, every capture within them
        assert st["limits"]["repository_events"] == 40 and st["limits"]["events"] == 40 and st["limits"]["bytes"] == 16_000
        assert all(len(j.event_ids) <= 40 for j in repo.jobs.values())
        assert not any(" 413" in k for k in repo.requests)
        assert max(len(j.event_ids) for j in repo.jobs.values()) > 1
        assert st["connected"] is True and st["last_error"] is None and st["parked"] is None and st["events_delivered"] == 417
        assert repo.duplicates == {}
        assert store.backlog() == 0  # the only sink: every row forwarded
        await store.close()


async def catch_up_setup(tmp_path: Path, cfg: Any, backlog: int, live: int) -> tuple[Any, Any, EpcisRestSink]:
    """A store holding `backlog` events of lot OLD (more than the sink's catch-up threshold of 200 rows) and `live`
    events of lot LIVE prepared for later, with its sink: the start of every catch-up test."""
    store = await line_store(tmp_path, cfg)
    prod = Producer(store)
    await prod.fill(["OLD"], backlog)
    await prod.prepare("LIVE", live)
    (sink,) = EpcisRestSink.from_config(cfg, store, catchup_rows=200)
    return store, prod, fast(sink)


async def append_live(store: Any, sink: EpcisRestSink, prod: Any, n: int, gap_s: float = 0.0) -> list[str]:
    """Once the sink is catching up, the line stores `n` new events (`gap_s` apart); their eventIDs."""
    await until(lambda: sink.status()["catching_up"], what="catch-up mode")
    live_ids: list[str] = []
    for e in prod.events("LIVE", n):
        await store.append(e)
        live_ids.append(e.event_id)
        sink.notify()
        if gap_s:
            await asyncio.sleep(gap_s)
    return live_ids


async def test_catch_up_live_events_overtake_the_backlog(tmp_path):
    """After an outage the backlog drains in its own lane; events the line makes meanwhile are captured before the
    backlog is through, and the cursor still ends at the end with every event once."""
    async with repository(job_delay_s=0.05) as repo:
        cfg = rest_cfg(tmp_path, {"name": "l3", "url": f"http://127.0.0.1:{repo.port}", "max_events": 25, "max_age_s": 0.1, "inflight": 2})
        store, prod, sink = await catch_up_setup(tmp_path, cfg, 1500, 10)
        async with running(sink):
            live_ids = await append_live(store, sink, prod, 10, gap_s=0.05)
            await until(lambda: store.sink_backlog(sink.name) == 0, what="all delivered")
            assert not sink.status()["catching_up"]
        check_ground_truth(repo, store, sink, ordered=False)
        order = {eid: i for i, eid in enumerate(repo.capture_order)}
        last_old = max(order[eid] for eid in repo.capture_order if eid not in set(live_ids))
        # the live events went ahead of the rest of the backlog (not after its 1,500 events)
        assert sum(1 for eid in live_ids if order[eid] < last_old) >= 5
        await store.close()


async def test_catch_up_backlog_is_paced_to_catchup_max_rate(tmp_path):
    """The backlog lane sends no more than `catchup_max_rate` events/s (plus the documents one slot round may hold),
    so a drain never takes the line's store and loop; the live lane is not held back by the pacing. Both bounds only
    grow slacker on a slow machine: a broken pacing fails them, a loaded one does not."""
    rate, backlog_events, max_events, inflight = 1000.0, 1500, 50, 4
    async with repository() as repo:
        cfg = rest_cfg(tmp_path, {"name": "l3", "url": f"http://127.0.0.1:{repo.port}", "max_events": max_events, "max_age_s": 0.1,
                                  "inflight": inflight, "catchup_max_rate": rate})
        store, prod, sink = await catch_up_setup(tmp_path, cfg, backlog_events, 3)
        samples: list[tuple[float, int]] = []
        t0 = time.monotonic()
        async with running(sink):
            live_ids = await append_live(store, sink, prod, 3)
            while store.sink_backlog(sink.name) != 0:
                samples.append((time.monotonic() - t0, sum(1 for eid in repo.capture_order if eid not in live_ids)))
                assert time.monotonic() - t0 < 60, "the backlog did not drain"
                await asyncio.sleep(0.02)
            elapsed = time.monotonic() - t0
        check_ground_truth(repo, store, sink, ordered=False)
        # never ahead of the rate by more than one round of documents in flight
        for t, n in samples:
            assert n <= rate * t + inflight * max_events, (t, n)
        # the last backlog document could only go once (backlog - one document) events were due at the rate
        assert elapsed >= (backlog_events - max_events) / rate
        # the live events did not wait for the paced backlog: they are in before its last document
        order = {eid: i for i, eid in enumerate(repo.capture_order)}
        last_old = max(i for eid, i in order.items() if eid not in live_ids)
        assert all(order[eid] < last_old for eid in live_ids)
        await store.close()


async def test_transient_faults_are_retried_and_nothing_is_lost(tmp_path):
    """HTML 500s, 503s, dropped answers (the capture WAS stored), a timeout, failed jobs: all retried with backoff."""
    async with repository(capture_limit=25) as repo:
        cfg = rest_cfg(tmp_path, {"name": "l3", "url": f"http://127.0.0.1:{repo.port}", "max_age_s": 0.1, "inflight": 2, "timeout_s": 0.5})
        store = await line_store(tmp_path, cfg)
        await Producer(store).fill(["LOTA"], 300)
        sink = one_sink(cfg, store)
        alarms: list[tuple[str, str]] = []

        async def alarm(code: str, message: str) -> None:
            alarms.append((code, message))

        sink.on_alarm = alarm
        seen: list[str] = []  # every trouble the sink reported (status() shows only the last one)
        trouble = sink._trouble
        sink._trouble = lambda reason, exc=None: (seen.append(reason), trouble(reason, exc))[1]  # type: ignore[method-assign]
        repo.fail_next(Fault.HTML_500, 3)
        async with running(sink):
            await until(lambda: len(repo.events) >= 50, what="recovered after the 500s")
            assert any("500" in r and "text/html" in r for r in seen), seen  # the HTML page understood as a 500
            repo.fail_next(Fault.UNAVAILABLE, 2)
            await until(lambda: sum(v for k, v in repo.requests.items() if " 503" in k) == 2, what="503s answered")
            repo.fail_next(Fault.DROP, 2, only="POST /capture")  # stored, then the answer cut: the client never knows
            await until(lambda: len(repo.events) >= 150 and not repo._faults, what="dropped answers met")
            repo.fail_next(Fault.DELAY, 1, delay_s=1.5, only="POST /capture")  # longer than timeout_s
            repo.fail_next(Fault.JOB_FAIL, 2)
            await until(lambda: store.sink_backlog(sink.name) == 0, what="all 300 captured")
            st = sink.status()
        check_ground_truth(repo, store, sink, ordered=False)
        assert st["connected"] and st["last_error"] is None
        failed_jobs = [j for j in repo.jobs.values() if not j.success]
        assert sum(1 for j in failed_jobs if j.errors[0]["type"] == "epcisException:ImplementationException") == 2
        # a dropped answer after the capture was stored: its re-send came back "already exists" and counted as delivered
        assert sum(repo.duplicates.values()) > 0 and st["events_already_there"] > 0
        assert alarms == []  # transient trouble is logged and shown in status(), not alarmed
        assert any("RemoteProtocolError" in r for r in seen) and any("Timeout" in r for r in seen), seen
        await store.close()


@pytest.mark.parametrize("mode", ["proceed", "rollback", "rollback-unnamed", "sync409", "sync409-unnamed"])
async def test_events_already_there_are_delivered_and_the_new_ones_stored(tmp_path, mode):
    """A third of the events reached the repository before (another client, a lost answer). Whatever the error
    behaviour, each new event ends up stored once and the existing ones are delivered without being stored twice."""
    kw: dict[str, Any] = {
        "proceed": {"error_behaviour": "all"},
        "rollback": {"error_behaviour": "rollback"},
        "rollback-unnamed": {"error_behaviour": "rollback", "name_duplicates": False},
        "sync409": {"duplicates": "409"},
        "sync409-unnamed": {"duplicates": "409", "name_duplicates": False},
    }[mode]
    async with repository(**kw) as repo:
        cfg = rest_cfg(tmp_path, {"name": "l3", "url": f"http://127.0.0.1:{repo.port}", "max_events": 50, "max_age_s": 0.1, "inflight": 1})
        store = await line_store(tmp_path, cfg)
        await Producer(store).fill(["LOTA"], 200)
        from linectl.epcis import EpcisMapper, document_bytes

        mapper = EpcisMapper.from_config(cfg)
        all_events = [e for r in store.outbox(0, 1000, only_unforwarded=False) for e in encoded_events(r, store, mapper)[0]]
        before = all_events[::3]
        async with httpx.AsyncClient() as c:
            r = await c.post(f"http://127.0.0.1:{repo.port}/capture", content=document_bytes(before), headers={"Content-Type": "application/json"})
            assert r.status_code == 202
        assert len(repo.events) == len(before)
        sink = one_sink(cfg, store)
        async with running(sink):
            await until(lambda: store.sink_backlog(sink.name) == 0, what="all delivered")
            st = sink.status()
        assert st["limits"]["error_behaviour"] == ("rollback" if mode.startswith("rollback") else "proceed")
        want = [json.loads(e)["eventID"] for e in all_events]
        assert sorted(repo.capture_order) == sorted(want) and len(set(repo.capture_order)) == len(want)
        assert set(repo.duplicates) == {json.loads(e)["eventID"] for e in before}  # only the old ones came back refused
        assert st["events_already_there"] == len(before)
        assert store.cursor(sink.name) == store.last_seq()
        await store.close()


async def test_413_halves_the_document_and_keeps_the_smaller_size(tmp_path):
    async with repository(capture_limit=30, announce_limits=False) as repo:  # enforced, not announced
        cfg = rest_cfg(tmp_path, {"name": "l3", "url": f"http://127.0.0.1:{repo.port}", "max_events": 100, "max_age_s": 0.1, "inflight": 1})
        store = await line_store(tmp_path, cfg)
        await Producer(store).fill(["LOTA"], 250)
        sink = one_sink(cfg, store)
        async with running(sink):
            await until(lambda: store.sink_backlog(sink.name) == 0, what="all delivered in smaller documents")
        check_ground_truth(repo, store, sink, ordered=True)
        assert sink.max_events == 25  # 100 -> 50 -> 25
        assert sum(v for k, v in repo.requests.items() if k == "POST /capture 413") == 2  # learnt once, not per document
        assert all(len(j.event_ids) <= 30 for j in repo.jobs.values())
        await store.close()


async def test_400_parks_with_an_alarm_until_unparked(tmp_path):
    async with repository() as repo:
        cfg = rest_cfg(tmp_path, {"name": "l3", "url": f"http://127.0.0.1:{repo.port}", "max_events": 50, "max_age_s": 0.1, "inflight": 2})
        store = await line_store(tmp_path, cfg)
        await Producer(store).fill(["LOTA"], 200)
        sink = one_sink(cfg, store)
        alarms: list[str] = []

        async def alarm(code: str, message: str) -> None:
            alarms.append(code)

        sink.on_alarm = alarm
        repo.fail_next(Fault.INVALID, 1)
        async with running(sink):
            await until(lambda: sink.parked is not None, what="parked")
            assert "400" in sink.parked["reason"] and "ValidationException" in sink.parked["reason"]  # type: ignore[index]
            assert alarms == ["upstream_epcis_rest_parked"]
            # the document sent beside it (inflight 2) still completes; then only the parked one is left
            await until(lambda: sink.status()["jobs_in_flight"] == 1, what="the other document done")
            posts = sum(v for k, v in repo.requests.items() if k.startswith("POST /capture"))
            await asyncio.sleep(0.5)  # parked: nothing more is sent (not a speed assertion: a count that must not move)
            assert sum(v for k, v in repo.requests.items() if k.startswith("POST /capture")) == posts, (repo.requests, sink.status())
            assert store.cursor(sink.name) < store.last_seq()
            assert sink.status()["parked"]["first_seq"] > 0
            assert sink.unpark() is True
            await until(lambda: store.sink_backlog(sink.name) == 0, what="delivered after unpark")
            assert sink.status()["parked"] is None and sink.unpark() is False
        check_ground_truth(repo, store, sink, ordered=False)
        await store.close()


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
async def test_auth_refused_alarms_retries_slowly_and_picks_up_a_fixed_secret(tmp_path, scheme, monkeypatch):
    secret_file = tmp_path / "secret"
    secret_file.write_text("wrong\n")
    repo_kw = {"auth": scheme, "username": "line1", "password": "s3cret"} if scheme == "basic" else {"auth": "bearer", "token": "s3cret"}
    async with repository(**repo_kw) as repo:  # type: ignore[arg-type]
        entry: dict[str, Any] = {"name": "l3", "url": f"http://127.0.0.1:{repo.port}", "auth": scheme, "secret_file": str(secret_file), "max_age_s": 0.1}
        if scheme == "basic":
            entry["username"] = "line1"
        cfg = rest_cfg(tmp_path, entry)
        store = await line_store(tmp_path, cfg)
        await Producer(store).fill(["LOTA"], 40)
        sink = one_sink(cfg, store)
        alarms: list[str] = []

        async def alarm(code: str, message: str) -> None:
            alarms.append(code)

        sink.on_alarm = alarm
        async with running(sink):
            await until(lambda: sum(v for k, v in repo.requests.items() if " 401" in k) >= 3, what="refused and retried")
            assert alarms == ["upstream_epcis_rest_auth"]  # once, not per retry
            assert "401" in (sink.status()["last_error"] or "") and len(repo.events) == 0
            secret_file.write_text("s3cret\n")  # the operator fixes the secret: read again at the next connect
            await until(lambda: store.sink_backlog(sink.name) == 0, what="delivered with the right secret")
            repo.fail_next(Fault.UNAUTHORIZED, 1)  # a 401 mid-run (an expired token): alarm again, then go on
            await Producer(store).fill(["LOTB"], 5)
            sink.notify()
            await until(lambda: store.sink_backlog(sink.name) == 0, what="delivered after a passing 401")
        assert alarms == ["upstream_epcis_rest_auth", "upstream_epcis_rest_auth"]
        check_ground_truth(repo, store, sink, ordered=True)
        await store.close()


async def test_secret_from_env_and_backlog_alarm_when_the_repository_is_away(tmp_path, monkeypatch):
    from mqtt_fixtures import free_port

    monkeypatch.setenv("LINECTL_TEST_EPCIS_TOKEN", "tok")
    port = free_port()  # nothing listens yet
    cfg = rest_cfg(tmp_path, {"name": "l3", "url": f"http://127.0.0.1:{port}", "auth": "bearer", "secret_env": "LINECTL_TEST_EPCIS_TOKEN",
                              "max_age_s": 0.1, "backlog_alarm_s": 0.5})
    store = await line_store(tmp_path, cfg)
    await Producer(store).fill(["LOTA"], 30)
    sink = one_sink(cfg, store)
    alarms: list[tuple[str, str]] = []

    async def alarm(code: str, message: str) -> None:
        alarms.append((code, message))

    sink.on_alarm = alarm
    async with running(sink):
        await until(lambda: any(c == "upstream_epcis_rest_backlog" for c, _m in alarms), what="backlog alarm")
        st = sink.status()
        assert st["connected"] is False and st["last_error"] and st["backlog_rows"] == store.sink_backlog(sink.name) > 0
        repo = EpcisRepository(RepositoryConfig(auth="bearer", token="tok"))
        await repo.start(port=port)
        try:
            await until(lambda: store.sink_backlog(sink.name) == 0, what="delivered once the repository is up")
            await until(lambda: not sink._backlog_alarmed, what="backlog alarm cleared")
        finally:
            await repo.stop()
    assert [c for c, _m in alarms] == ["upstream_epcis_rest_backlog"]
    await store.close()


# --------------------------------------------------------------------------- TLS with a client certificate


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("openssl is not installed")
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for who in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{who}.pem", "-days", "2",
                 *(["-extfile", "san.ext"] if who == "server" else []), cwd=d)
    return d


async def test_tls_with_a_client_certificate(tmp_path, pki):
    repo = EpcisRepository()
    port = await repo.start(ssl_context=server_ssl_context(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem")))
    try:
        base = {"name": "l3", "url": f"https://127.0.0.1:{port}", "ca_file": str(pki / "ca.pem"), "max_age_s": 0.1}
        store = await open_store(tmp_path)
        await Producer(store).fill(["LOTA"], 20)
        # without a client certificate the repository refuses the handshake: retried, shown, nothing stored
        cfg = rest_cfg(tmp_path, base)
        store.set_sinks(enabled_names(cfg))
        sink = one_sink(cfg, store)
        async with running(sink):
            await until(lambda: sink.last_error is not None, what="handshake refused")
        assert len(repo.events) == 0
        cfg = rest_cfg(tmp_path, {**base, "client_cert": str(pki / "client.pem"), "client_key": str(pki / "client.key")})
        sink = one_sink(cfg, store)
        async with running(sink):
            await until(lambda: store.sink_backlog(sink.name) == 0, what="delivered over mutual TLS")
        check_ground_truth(repo, store, sink, ordered=True)
        await store.close()
    finally:
        await repo.stop()


# --------------------------------------------------------------------------- a kill mid-delivery

SINK_PROCESS = """
import asyncio, sys
from linectl.config import load_config
from linectl.store import Store
from linectl.upstream.sink import build_sinks, enabled_names

async def main():
    cfg = load_config(sys.argv[1])
    store = await Store.open(sys.argv[2], create=False, lock="test sink")
    store.set_sinks(enabled_names(cfg))
    (sink,) = build_sinks(cfg, store)
    print("SINK RUNNING", flush=True)
    await sink.run()

asyncio.run(main())
"""


async def test_sigkill_mid_delivery_then_restart_loses_nothing(tmp_path):
    """The sink runs in its own process and is SIGKILLed while captures are in flight (jobs take 0.3 s); a new one
    resends the pending range first: every event ends up stored once, the re-sent ones were refused as duplicates."""
    async with repository(job_delay_s=0.3) as repo:
        cfg_path = tmp_path / "line.yaml"
        cfg = rest_cfg(tmp_path, {"name": "l3", "url": f"http://127.0.0.1:{repo.port}", "max_events": 40, "max_age_s": 0.1, "inflight": 4})
        store = await open_store(tmp_path)
        await Producer(store).fill(["LOTA", "LOTB"], 600)
        db = str(store.path) if hasattr(store, "path") else str(tmp_path / "line.db")
        await store.close()
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        drain: asyncio.Task[bytes] | None = None
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", SINK_PROCESS, str(cfg_path), db, env=env,
                                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert proc.stdout is not None

            async def started() -> None:
                assert proc.stdout is not None
                while b"SINK RUNNING" not in await proc.stdout.readline():  # structlog writes to stdout too
                    assert proc.returncode is None

            await asyncio.wait_for(started(), 60)
            drain = asyncio.create_task(proc.stdout.read())  # the sink's log must not fill the pipe
            # killed while the repository is still working on a capture (jobs take 0.3 s): nothing awaits in between
            await until(lambda: len(repo.events) >= 200 and sum(1 for j in repo.jobs.values() if j.running) >= 1, what="captures in flight")
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            if drain is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(drain, 10)
        stored_at_kill = len(repo.events)
        assert 0 < stored_at_kill < 1200
        store = await line_store(tmp_path, cfg)
        cursor, pending = store.cursors()["epcis_rest:l3"]["seq"], store.cursors()["epcis_rest:l3"]["pending"]
        assert pending is not None and pending > cursor  # the range in flight was recorded before it was sent
        await until(lambda: not any(j.running for j in repo.jobs.values()), what="the killed sink's jobs finished")
        jobs_before = len(repo.jobs)
        sink = one_sink(cfg, store)
        async with running(sink):
            await until(lambda: store.sink_backlog(sink.name) == 0, what="all delivered after the restart")
        check_ground_truth(repo, store, sink, ordered=False)
        assert len(repo.events) == 1200
        # the restarted sink cut its documents at exactly the pending bound: no capture straddles it
        seq_of = {json.loads(e)["eventID"]: r.seq for r in store.outbox(0, 10**6, only_unforwarded=False) for e in encoded_events(r, store, sink.mapper)[0]}
        resent = list(repo.jobs.values())[jobs_before:]
        assert resent and not any(min(seq_of[i] for i in j.event_ids) <= pending < max(seq_of[i] for i in j.event_ids) for j in resent)
        assert any(max(seq_of[i] for i in j.event_ids) == pending for j in resent)
        # the killed sink's captures that completed without their confirmation came back as duplicates, harmlessly
        assert sum(repo.duplicates.values()) > 0 and sink.events_already_there == sum(repo.duplicates.values())
        await store.close()


# --------------------------------------------------------------------------- the repository as a desk tool


async def test_repository_runs_standalone_and_refuses_bad_arguments(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DESK_TOKEN": "t"}
    cmd = [sys.executable, "-m", "linectl.simulators.epcis_repository", "--port", "0", "--auth", "bearer", "--token-env", "DESK_TOKEN",
           "--capture-limit", "7", "--no-announce-limits"]
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith("EPCIS REPOSITORY READY http://127.0.0.1:"), line
        url = line.split()[3]
        async with httpx.AsyncClient() as c:
            assert (await c.options(f"{url}/capture")).status_code == 401
            r = await c.options(f"{url}/capture", headers={"Authorization": "Bearer t"})
            assert r.status_code == 204 and "GS1-EPCIS-Capture-Limit" not in r.headers and r.headers["GS1-EPCIS-Version"] == "2.0.0"
            r = await c.post(f"{url}/_sim/faults", json={"kind": "html500", "count": 1})
            assert r.json()["faults_pending"] == 1
            assert (await c.post(f"{url}/_sim/faults", json={"kind": "nonsense"})).status_code == 400
            r = await c.options(f"{url}/capture", headers={"Authorization": "Bearer t"})
            assert r.status_code == 500 and r.headers["Content-Type"].startswith("text/html")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0 and b"EPCIS REPOSITORY STOPPED" in out
    for bad, message in [(["--auth", "bearer", "--token-env", "NOT_SET_ANYWHERE_X"], "NOT_SET_ANYWHERE_X"),
                         (["--auth", "basic", "--password-env", "DESK_TOKEN"], "--username"),
                         (["--capture-limit", "0"], "at least 1"),
                         (["--tls-cert", str(tmp_path / "missing.pem")], "TLS")]:
        r = subprocess.run([sys.executable, "-m", "linectl.simulators.epcis_repository", "--port", "0", *bad], env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)


async def test_a_missing_secret_is_shown_not_raised(tmp_path):
    async with repository(auth="bearer", token="x") as repo:
        cfg = rest_cfg(tmp_path, {"name": "l3", "url": f"http://127.0.0.1:{repo.port}", "auth": "bearer", "secret_env": "LINECTL_TEST_UNSET_SECRET"})
        store = await line_store(tmp_path, cfg)
        await Producer(store).fill(["LOTA"], 3)
        sink = one_sink(cfg, store)
        async with running(sink) as task:
            await until(lambda: sink.last_error is not None, what="the missing secret reported")
            assert "LINECTL_TEST_UNSET_SECRET" in (sink.last_error or "") and not task.done()
        assert len(repo.events) == 0
        await store.close()
