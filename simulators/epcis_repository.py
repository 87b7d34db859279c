"""An EPCIS 2.0 capture repository, written from GS1's OpenAPI (shipped as linectl/standards/epcis/rest/openapi.json).

No installable EPCIS 2.0 repository runs on a laptop, so this one stands in for L3/L4 when the `epcis_rest` sink
(linectl/upstream/epcis_rest.py) is tested, benchmarked or commissioned on a desk:

    python -m linectl.simulators.epcis_repository --port 8090 [--auth basic --username u --password-env PW] ...

What it implements of the OpenAPI, as the spec says it:
- `OPTIONS /capture` (204) announces GS1-EPCIS-Version/Min/Max, GS1-CBV-Version, GS1-EPCIS-Capture-Limit,
  GS1-EPCIS-Capture-File-Size-Limit and GS1-Capture-Error-Behaviour; `OPTIONS` on the other resources (204).
- `POST /capture` validates the document against the official EPCIS 2.0 JSON schema (400 ValidationException
  otherwise), refuses more events or bytes than announced (413 CaptureLimitExceededException), answers 202 with
  the capture job's URL in Location. The job applies GS1-Capture-Error-Behaviour: `rollback` (the default) stores
  nothing if any event fails, `proceed` stores every event that can be stored. An eventID that exists already
  (or twice in one document) is a job error of type ResourceAlreadyExistsException (status 409) naming the
  eventID in `instance` and `detail`. `--duplicates 409` makes the capture answer 409 at once instead (nothing
  stored), as some repositories do.
- `GET /capture` (jobs, paginated with perPage/nextPageToken and a Link header), `GET /capture/{captureID}`:
  captureID, createdAt, finishedAt, running, success, captureErrorBehaviour, errors.
- `POST /events` (one event, synchronous: 201 + Location, 409 if its eventID exists), `GET /events` (an
  EPCISQueryDocument of every event, paginated), `GET /events/{eventID}` (404 when unknown). Not `GET /`: the
  OpenAPI wants it to list at least the nine top-level resources, and this repository serves only capture and events.
- Authentication none, basic or bearer (401 SecurityException without or with wrong credentials), optional TLS
  with client certificates.

Schema validation uses jsonschema-rs (Rust): fastjsonschema compiles this schema and judges it correctly but takes
~73 µs per event (about 13,700 events/s on this machine, below the 20,000 events/s a catch-up must reach) where
jsonschema-rs takes ~2 µs; `jsonschema` (pure Python) is slower still. Formats (date-time, uri) are checked.

HTTP server: aiohttp. It parses HTTP in C (llhttp), serves many keep-alive connections in one event loop, and
lets a handler sleep (delay), abort the transport halfway through an answer (drop) or answer HTML, all of which
the stdlib's threaded http.server makes awkward; and it is a different HTTP implementation from the sink's
httpx, so the two do not share a misreading of the protocol.

Ground truth for tests and benches: `events` (eventID -> the event's JSON as captured), `capture_order`,
`duplicates` (eventIDs received again), `jobs`; over HTTP (not EPCIS, for desks and benches)
`GET /_sim/stats`, `GET /_sim/event-ids`, `POST /_sim/captured-at` [eventIDs] -> {eventID: epoch s stored},
`POST /_sim/faults` {"kind", "count", "delay_s", "only": "POST /capture"}.

Faults (`fail_next`): the next N requests answer 500 with an HTML body (`html500`), 503 (`unavailable`), drop the
connection halfway through the answer after doing the work (`drop`: a capture is stored, the client never hears
of it), wait `delay_s` first (`delay`) or answer 401 (`unauthorized`). `invalid`: the next N captures are refused
with 400 (a repository with stricter rules); `job_fail`: the next N capture jobs finish with success=false
(ImplementationException) and store nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hmac
import json
import os
import signal
import ssl
import sys
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode

import jsonschema_rs
from aiohttp import web

EPCIS_VERSION = "2.0.0"
CBV_VERSION = "2.0.0"
VENDOR_VERSION = "linectl-epcis-repository-1"
CONTEXT = "https://ref.gs1.org/standards/epcis/epcis-context.jsonld"
PROBLEM = "application/problem+json"
DEFAULT_PER_PAGE = 1000
MAX_PER_PAGE = 10_000

ErrorBehaviour = Literal["rollback", "proceed"]


class Fault(StrEnum):
    HTML_500 = "html500"
    UNAVAILABLE = "unavailable"
    DROP = "drop"
    DELAY = "delay"
    UNAUTHORIZED = "unauthorized"
    INVALID = "invalid"
    JOB_FAIL = "job_fail"


@dataclass
class RepositoryConfig:
    capture_limit: int = 10_000  # events per capture (GS1-EPCIS-Capture-Limit)
    file_size_limit: int = 64 * 1024 * 1024  # bytes per capture (GS1-EPCIS-Capture-File-Size-Limit)
    error_behaviour: Literal["rollback", "proceed", "all"] = "all"  # what GS1-Capture-Error-Behaviour announces
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = None
    password: str | None = None
    token: str | None = None
    job_delay_s: float = 0.0  # a job stays `running` this long before its events are stored
    duplicates: Literal["job", "409"] = "job"  # an existing eventID: a job error (the spec) or 409 at once
    name_duplicates: bool = True  # the error names the existing eventID (instance/detail); False: it does not
    announce_limits: bool = True  # OPTIONS /capture announces the capture limits (False: enforced all the same)


@dataclass
class Job:
    capture_id: str
    behaviour: ErrorBehaviour
    created_at: str
    event_ids: list[str]
    running: bool = True
    success: bool = True
    finished_at: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)

    def document(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "captureID": self.capture_id,
            "createdAt": self.created_at,
            "running": self.running,
            "success": self.success,
            "captureErrorBehaviour": self.behaviour,
            "errors": self.errors,
        }
        if self.finished_at is not None:
            out["finishedAt"] = self.finished_at
        return out


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def problem(status: int, kind: str, title: str, detail: str | None = None, *, headers: dict[str, str] | None = None) -> web.Response:
    """An RFC 7807 answer as the OpenAPI's error responses define it (type epcisException:<kind>)."""
    body: dict[str, Any] = {"type": f"epcisException:{kind}", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    return web.Response(status=status, text=json.dumps(body), content_type=PROBLEM, headers=headers)


_DECODER = json.JSONDecoder()


def raw_event_texts(raw: bytes, events: list[Any]) -> list[str | None] | None:
    """Each event's own text in a captured EPCISDocument, as sent (not re-serialised: at 20,000 events/s json.dumps
    per event would cost the repository more than parsing and validating the document). Found by decoding the
    eventList's items in place; None when that does not give back exactly the parsed events (then they are dumped)."""
    try:
        text = raw.decode("utf-8")
        at = text.find('"eventList"')
        at = text.index("[", at) + 1 if at >= 0 else -1
        if at < 0:
            return None
        out: list[str | None] = []
        n = len(text)
        while at < n:
            while text[at] in " \t\r\n,":
                at += 1
            if text[at] == "]":
                break
            obj, end = _DECODER.raw_decode(text, at)
            if len(out) >= len(events) or obj != events[len(out)]:
                return None
            out.append(text[at:end])
            at = end
        return out if len(out) == len(events) else None
    except (ValueError, IndexError):
        return None


def load_schema_validator() -> Any:
    """The official EPCIS 2.0 JSON schema (the copy linectl ships), compiled by jsonschema-rs with format checks."""
    from linectl.epcis import SCHEMA_FILE, schema_dir

    schema = json.loads((schema_dir() / SCHEMA_FILE).read_text(encoding="utf-8"))
    return jsonschema_rs.Draft7Validator(schema, validate_formats=True)


class EpcisRepository:
    """The repository's state and its aiohttp application. One event loop; no locks needed."""

    def __init__(self, cfg: RepositoryConfig | None = None) -> None:
        self.cfg = cfg or RepositoryConfig()
        self.validator = load_schema_validator()
        #: eventID -> the event's JSON text as it was captured (in capture order)
        self.events: dict[str, str] = {}
        self.capture_order: list[str] = []
        #: eventID -> when it was stored (epoch seconds): the end of an event's journey, for delay measurements
        self.captured_at: dict[str, float] = {}
        #: eventIDs received again after they were stored (re-sends answered with ResourceAlreadyExists)
        self.duplicates: Counter[str] = Counter()
        self.jobs: dict[str, Job] = {}
        self.requests: Counter[str] = Counter()  # "<METHOD> <route> <status>"
        self.captures_received = 0
        self.documents_invalid = 0
        self._faults: deque[tuple[Fault, float, str | None]] = deque()  # (kind, delay_s, only requests "METHOD /route...")
        self._job_faults = 0
        self._invalid_faults = 0  # the next N captures are refused as invalid (a stricter repository)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # ---------------------------------------------------------------- control (tests, /_sim/faults)

    def fail_next(self, kind: Fault | str, count: int = 1, delay_s: float = 0.0, only: str | None = None) -> None:
        """The next `count` EPCIS requests (or captures, for invalid and job_fail) fail this way; `only`: just the
        requests whose "METHOD route" starts with it (e.g. "POST /capture")."""
        fault = Fault(kind)
        if fault is Fault.JOB_FAIL:
            self._job_faults += count
        elif fault is Fault.INVALID:
            self._invalid_faults += count
        else:
            self._faults.extend([(fault, delay_s, only)] * count)

    def clear_faults(self) -> None:
        self._faults.clear()
        self._job_faults = 0
        self._invalid_faults = 0

    def stats(self) -> dict[str, Any]:
        return {
            "events": len(self.events),
            "jobs": len(self.jobs),
            "jobs_running": sum(1 for j in self.jobs.values() if j.running),
            "jobs_failed": sum(1 for j in self.jobs.values() if not j.running and not j.success),
            "captures_received": self.captures_received,
            "documents_invalid": self.documents_invalid,
            "duplicates": sum(self.duplicates.values()),
            "requests": dict(self.requests),
            "faults_pending": len(self._faults) + self._job_faults + self._invalid_faults,
        }

    # ---------------------------------------------------------------- lifetime

    def app(self) -> web.Application:
        # the body limit is enforced in the handler (a 413 problem document, not aiohttp's text answer)
        app = web.Application(client_max_size=self.cfg.file_size_limit + 1, middlewares=[self._middleware])
        r = app.router
        r.add_route("OPTIONS", "/", self._options_default)
        r.add_route("OPTIONS", "/capture", self._options_capture)
        r.add_post("/capture", self._post_capture)
        r.add_get("/capture", self._list_jobs)
        r.add_route("OPTIONS", "/capture/{captureID}", self._options_job)
        r.add_get("/capture/{captureID}", self._get_job)
        r.add_route("OPTIONS", "/events", self._options_events)
        r.add_post("/events", self._post_event)
        r.add_get("/events", self._list_events)
        r.add_route("OPTIONS", "/events/{eventID:.+}", self._options_event)
        r.add_get("/events/{eventID:.+}", self._get_event)
        r.add_get("/_sim/stats", self._sim_stats)
        r.add_get("/_sim/event-ids", self._sim_event_ids)
        r.add_post("/_sim/faults", self._sim_faults)
        r.add_post("/_sim/captured-at", self._sim_captured_at)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None) -> int:
        """Serve until stop(); returns the port (0: a free one)."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context, backlog=256)
        await site.start()
        server = site._server  # the bound socket's port when 0 was asked
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---------------------------------------------------------------- cross-cutting: auth, faults, headers

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_sim/"):
            return await handler(request)  # type: ignore[no-any-return]
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else request.path
        fault: Fault | None = None
        delay = 0.0
        for i, (kind, kind_delay, only) in enumerate(self._faults):
            if only is None or f"{request.method} {route}".startswith(only):
                del self._faults[i]
                fault, delay = kind, kind_delay
                break
        if fault is not None:
            if fault is Fault.DELAY:
                await asyncio.sleep(delay)
                fault = None
        if fault is Fault.HTML_500:
            resp: web.StreamResponse = web.Response(
                status=500, text="<html><head><title>500 Internal Server Error</title></head><body><h1>Internal Server Error</h1></body></html>",
                content_type="text/html",
            )
        elif fault is Fault.UNAVAILABLE:
            resp = web.Response(status=503, text="Service Unavailable", headers={"Retry-After": "1"})
        elif fault is Fault.UNAUTHORIZED or not self._authorized(request):
            resp = problem(401, "SecurityException", "Unauthorised request", headers=self._challenge())
        else:
            resp = await handler(request)
            resp.headers.setdefault("GS1-EPCIS-Version", EPCIS_VERSION)
            resp.headers.setdefault("GS1-CBV-Version", CBV_VERSION)
        self.requests[f"{request.method} {route} {resp.status}"] += 1
        if fault is Fault.DROP:
            # the work is done (a capture is stored); the client gets half a status line and a closed connection
            transport = request.transport
            if transport is not None:
                transport.write(b"HTTP/1.1 20")
                transport.abort()
            raise asyncio.CancelledError  # aiohttp ends the handler quietly: nothing more is written
        return resp

    def _challenge(self) -> dict[str, str]:
        if self.cfg.auth == "basic":
            return {"WWW-Authenticate": 'Basic realm="epcis"'}
        if self.cfg.auth == "bearer":
            return {"WWW-Authenticate": 'Bearer realm="epcis"'}
        return {}

    def _authorized(self, request: web.Request) -> bool:
        if self.cfg.auth == "none":
            return True
        got = request.headers.get("Authorization", "")
        if self.cfg.auth == "basic":
            want = "Basic " + base64.b64encode(f"{self.cfg.username or ''}:{self.cfg.password or ''}".encode()).decode()
        else:
            want = f"Bearer {self.cfg.token or ''}"
        return hmac.compare_digest(got.encode(), want.encode())

    # ---------------------------------------------------------------- discovery

    def _discovery_headers(self, allow: str) -> dict[str, str]:
        return {
            "Allow": allow,
            "GS1-EPCIS-Version": EPCIS_VERSION,
            "GS1-EPCIS-Min": EPCIS_VERSION,
            "GS1-EPCIS-Max": EPCIS_VERSION,
            "GS1-CBV-Version": CBV_VERSION,
            "GS1-CBV-Min": CBV_VERSION,
            "GS1-CBV-Max": CBV_VERSION,
            "GS1-Vendor-Version": VENDOR_VERSION,
        }

    async def _options_default(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=self._discovery_headers("OPTIONS, GET"))

    async def _options_capture(self, request: web.Request) -> web.Response:
        h = self._discovery_headers("OPTIONS, POST, GET")
        if self.cfg.announce_limits:
            h["GS1-EPCIS-Capture-Limit"] = str(self.cfg.capture_limit)
            h["GS1-EPCIS-Capture-File-Size-Limit"] = str(self.cfg.file_size_limit)
        h["GS1-Capture-Error-Behaviour"] = self.cfg.error_behaviour
        return web.Response(status=204, headers=h)

    async def _options_job(self, request: web.Request) -> web.Response:
        if request.match_info["captureID"] not in self.jobs:
            return problem(404, "NoSuchNameException", "Resource not found")
        return web.Response(status=204, headers=self._discovery_headers("OPTIONS, GET"))

    async def _options_events(self, request: web.Request) -> web.Response:
        h = self._discovery_headers("OPTIONS, POST, GET")
        h["GS1-EPCIS-Capture-Limit"] = "1"
        h["GS1-EPCIS-Capture-File-Size-Limit"] = str(self.cfg.file_size_limit)
        return web.Response(status=204, headers=h)

    async def _options_event(self, request: web.Request) -> web.Response:
        if request.match_info["eventID"] not in self.events:
            return problem(404, "NoSuchNameException", "Resource not found")
        return web.Response(status=204, headers=self._discovery_headers("OPTIONS, GET"))

    # ---------------------------------------------------------------- capture

    async def _read_document(self, request: web.Request) -> tuple[Any, web.Response | None]:
        """The parsed body, or the answer refusing it (413 over the size limit, 415, 400 not JSON). The raw text of
        a capture is kept on the request (request["raw"]) so each event can be stored as it was sent."""
        if request.content_length is not None and request.content_length > self.cfg.file_size_limit:
            return None, self._too_large(f"{request.content_length} bytes; at most {self.cfg.file_size_limit}")
        ctype = request.content_type
        if ctype not in ("application/json", "application/ld+json"):
            return None, problem(415, "UnsupportedMediaType", "Unsupported media type", f"{ctype}: this repository takes application/json")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return None, self._too_large(f"more than {self.cfg.file_size_limit} bytes")
        if len(raw) > self.cfg.file_size_limit:
            return None, self._too_large(f"{len(raw)} bytes; at most {self.cfg.file_size_limit}")
        try:
            request["raw"] = raw
            return json.loads(raw), None
        except ValueError as exc:
            self.documents_invalid += 1
            return None, problem(400, "ValidationException", "Not a JSON document", str(exc))

    def _too_large(self, detail: str) -> web.Response:
        return problem(
            413, "CaptureLimitExceededException", "Capture Payload too large", detail,
            headers={"GS1-EPCIS-Capture-Limit": str(self.cfg.capture_limit), "GS1-EPCIS-Capture-File-Size-Limit": str(self.cfg.file_size_limit)},
        )

    def _schema_problems(self, doc: Any) -> list[str]:
        if self.validator.is_valid(doc):
            return []
        out = []
        for err in self.validator.iter_errors(doc):
            where = "/".join(str(p) for p in err.instance_path) or "(document)"
            out.append(f"{where}: {err.message}")
            if len(out) >= 5:
                break
        return out

    async def _post_capture(self, request: web.Request) -> web.Response:
        self.captures_received += 1
        doc, refusal = await self._read_document(request)
        if refusal is not None:
            return refusal
        header = request.headers.get("GS1-Capture-Error-Behaviour", "rollback")
        if header not in ("rollback", "proceed"):
            return problem(400, "ValidationException", "Invalid GS1-Capture-Error-Behaviour", f"{header!r}: rollback or proceed")
        behaviour: ErrorBehaviour = "proceed" if header == "proceed" else "rollback"
        if self.cfg.error_behaviour not in ("all", behaviour):
            return problem(400, "ValidationException", "Unsupported GS1-Capture-Error-Behaviour", f"this repository does {self.cfg.error_behaviour}")
        kind = doc.get("type") if isinstance(doc, dict) else None
        if kind not in ("EPCISDocument", "EPCISQueryDocument"):
            self.documents_invalid += 1
            return problem(400, "ValidationException", "Not an EPCIS document", "type must be EPCISDocument or EPCISQueryDocument")
        problems = self._schema_problems(doc)
        if not problems and self._invalid_faults > 0:
            self._invalid_faults -= 1
            problems = ["refused on purpose (simulated: a repository with stricter rules)"]
        if problems:
            self.documents_invalid += 1
            return problem(400, "ValidationException", "The document does not follow the EPCIS 2.0 JSON schema", "; ".join(problems))
        body = doc.get("epcisBody", {})
        events = body.get("eventList") if kind == "EPCISDocument" else body.get("queryResults", {}).get("resultsBody", {}).get("eventList")
        events = events or []
        if len(events) > self.cfg.capture_limit:
            return self._too_large(f"{len(events)} events; at most {self.cfg.capture_limit}")
        texts = raw_event_texts(request["raw"], events) if kind == "EPCISDocument" else None
        for i, e in enumerate(events):
            if not e.get("eventID"):  # the spec: the server should populate a missing eventID
                e["eventID"] = f"urn:uuid:{uuid.uuid4()}"
                if texts is not None:
                    texts[i] = None
        if self.cfg.duplicates == "409":
            existing = [e["eventID"] for e in events if e["eventID"] in self.events]
            if existing:
                for eid in existing:
                    self.duplicates[eid] += 1
                detail = ("events already captured: " + " ".join(existing)) if self.cfg.name_duplicates else f"{len(existing)} events already captured"
                return problem(409, "ResourceAlreadyExistsException", "A resource with the provided identifier already exists.", detail)
        job = Job(f"id{uuid.uuid4().hex}", behaviour, now_iso(), [e["eventID"] for e in events])
        self.jobs[job.capture_id] = job
        fail = self._job_faults > 0
        if fail:
            self._job_faults -= 1
        if self.cfg.job_delay_s > 0:
            asyncio.get_running_loop().call_later(self.cfg.job_delay_s, self._run_job, job, events, fail, texts)
        else:
            self._run_job(job, events, fail, texts)
        return web.Response(status=202, headers={"Location": f"/capture/{job.capture_id}"})

    def _run_job(self, job: Job, events: list[dict[str, Any]], fail: bool, texts: list[str | None] | None = None) -> None:
        """Store the job's events under its error behaviour; the job then says what happened."""
        errors: list[dict[str, Any]] = []
        keep: list[tuple[dict[str, Any], str | None]] = []
        seen: set[str] = set()
        if fail:
            errors.append({"type": "epcisException:ImplementationException", "title": "A server-side error occurred", "status": 500,
                           "detail": "the capture job failed (simulated); no event of it was stored"})
        else:
            for i, e in enumerate(events):
                eid = e["eventID"]
                if eid in self.events or eid in seen:
                    self.duplicates[eid] += 1
                    error = {"type": "epcisException:ResourceAlreadyExistsException",
                             "title": "A resource with the provided identifier already exists.", "status": 409}
                    if self.cfg.name_duplicates:
                        error.update(detail=f"event {eid} already exists", instance=eid)
                    errors.append(error)
                else:
                    seen.add(eid)
                    keep.append((e, texts[i] if texts is not None else None))
        if not fail and (job.behaviour == "proceed" or not errors):
            now = time.time()
            for e, text in keep:
                eid = e["eventID"]
                self.events[eid] = text if text is not None else json.dumps(e, separators=(",", ":"))
                self.capture_order.append(eid)
                self.captured_at[eid] = now
        job.errors = errors
        job.success = not errors
        job.running = False
        job.finished_at = now_iso()

    async def _post_event(self, request: web.Request) -> web.Response:
        """Synchronous capture of one event (201 + Location; 409 if its eventID exists)."""
        event, refusal = await self._read_document(request)
        if refusal is not None:
            return refusal
        problems = ["(document): not an EPCIS event"] if not isinstance(event, dict) or "eventTime" not in event else self._schema_problems(event)
        if problems:
            self.documents_invalid += 1
            return problem(400, "ValidationException", "The event does not follow the EPCIS 2.0 JSON schema", "; ".join(problems))
        eid = event.get("eventID") or f"urn:uuid:{uuid.uuid4()}"
        if eid in self.events:
            self.duplicates[eid] += 1
            return problem(409, "ResourceAlreadyExistsException", "A resource with the provided identifier already exists.", f"event {eid} already exists")
        event["eventID"] = eid
        event.pop("@context", None)
        self.events[eid] = json.dumps(event, separators=(",", ":"))
        self.capture_order.append(eid)
        self.captured_at[eid] = time.time()
        return web.json_response(event, status=201, headers={"Location": f"/events/{quote(eid, safe='')}"})

    # ---------------------------------------------------------------- reading back

    def _page(self, request: web.Request, total: int) -> tuple[int, int, dict[str, str]] | web.Response:
        """(start, end, headers with the Link to the next page) from perPage / nextPageToken."""
        try:
            per_page = int(request.query.get("perPage", DEFAULT_PER_PAGE))
            start = int(request.query.get("nextPageToken", "0"))
        except ValueError:
            return problem(400, "QueryParameterException", "Invalid perPage or nextPageToken")
        if not 1 <= per_page <= MAX_PER_PAGE or start < 0:
            return problem(400, "QueryParameterException", "Invalid perPage or nextPageToken", f"perPage 1..{MAX_PER_PAGE}")
        end = min(total, start + per_page)
        headers: dict[str, str] = {}
        if end < total:
            headers["Link"] = f'<{request.path}?{urlencode({"perPage": per_page, "nextPageToken": end})}>; rel="next"'
        return start, end, headers

    def _query_document(self, encoded_events: list[str]) -> str:
        head = json.dumps({
            "@context": [CONTEXT], "type": "EPCISQueryDocument", "schemaVersion": "2.0", "creationDate": now_iso(),
        }, separators=(",", ":"))
        return head[:-1] + ',"epcisBody":{"queryResults":{"queryName":"SimpleEventQuery","resultsBody":{"eventList":[' + ",".join(encoded_events) + "]}}}}"

    async def _list_events(self, request: web.Request) -> web.Response:
        page = self._page(request, len(self.capture_order))
        if isinstance(page, web.Response):
            return page
        start, end, headers = page
        text = self._query_document([self.events[i] for i in self.capture_order[start:end]])
        return web.Response(text=text, content_type="application/json", headers=headers)

    async def _get_event(self, request: web.Request) -> web.Response:
        eid = request.match_info["eventID"]
        encoded = self.events.get(eid)
        if encoded is None:
            return problem(404, "NoSuchNameException", "Resource not found", f"no event {eid}")
        return web.Response(text=self._query_document([encoded]), content_type="application/json")

    async def _list_jobs(self, request: web.Request) -> web.Response:
        jobs = list(self.jobs.values())
        page = self._page(request, len(jobs))
        if isinstance(page, web.Response):
            return page
        start, end, headers = page
        return web.json_response([j.document() for j in jobs[start:end]], headers=headers)

    async def _get_job(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["captureID"])
        if job is None:
            return problem(404, "NoSuchNameException", "Resource not found")
        return web.json_response(job.document())

    # ---------------------------------------------------------------- simulator control (not EPCIS)

    async def _sim_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _sim_event_ids(self, request: web.Request) -> web.Response:
        return web.json_response(self.capture_order)

    async def _sim_captured_at(self, request: web.Request) -> web.Response:
        """{eventID: epoch seconds it was stored, or null} for the eventIDs posted as a JSON list."""
        try:
            ids = await request.json()
            return web.json_response({str(i): self.captured_at.get(str(i)) for i in ids})
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=400)

    async def _sim_faults(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            only = body.get("only")
            self.fail_next(body["kind"], int(body.get("count", 1)), float(body.get("delay_s", 0.0)), None if only is None else str(only))
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": f"{type(exc).__name__}: {exc}", "kinds": [f.value for f in Fault]}, status=400)
        return web.json_response(self.stats())


# --------------------------------------------------------------------------- standalone


def server_ssl_context(cert: str, key: str | None, client_ca: str | None) -> ssl.SSLContext:
    """TLS for the repository; with client_ca, a client certificate signed by it is required."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _secret(env: str | None, path: str | None, what: str) -> str | None:
    if env:
        value = os.environ.get(env)
        if not value:
            raise SystemExit(f"epcis_repository: environment variable {env} ({what}) is not set")
        return value
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SystemExit(f"epcis_repository: cannot read {what} from {path}: {exc.strerror}") from None
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m linectl.simulators.epcis_repository", description="An EPCIS 2.0 capture repository for desks and tests.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090, help="0: a free port (printed)")
    p.add_argument("--capture-limit", type=int, default=10_000, help="events per capture (GS1-EPCIS-Capture-Limit)")
    p.add_argument("--file-size-limit", type=int, default=64 * 1024 * 1024, help="bytes per capture (GS1-EPCIS-Capture-File-Size-Limit)")
    p.add_argument("--error-behaviour", choices=["rollback", "proceed", "all"], default="all", help="what the repository supports")
    p.add_argument("--auth", choices=["none", "basic", "bearer"], default="none")
    p.add_argument("--username")
    p.add_argument("--password-env", help="environment variable holding the basic-auth password")
    p.add_argument("--password-file")
    p.add_argument("--token-env", help="environment variable holding the bearer token")
    p.add_argument("--token-file")
    p.add_argument("--job-delay-s", type=float, default=0.0, help="capture jobs stay running this long")
    p.add_argument("--duplicates", choices=["job", "409"], default="job", help="an existing eventID: job error (spec) or 409 at once")
    p.add_argument("--anonymous-duplicates", action="store_true", help="errors for existing eventIDs do not name them")
    p.add_argument("--no-announce-limits", action="store_true", help="OPTIONS /capture does not announce the limits (still enforced)")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
    a = p.parse_args(argv)
    if a.capture_limit < 1 or a.file_size_limit < 1:
        p.error("limits must be at least 1")
    if a.auth == "basic" and not a.username:
        p.error("--auth basic needs --username and --password-env or --password-file")
    cfg = RepositoryConfig(
        capture_limit=a.capture_limit, file_size_limit=a.file_size_limit, error_behaviour=a.error_behaviour, auth=a.auth,
        username=a.username, password=_secret(a.password_env, a.password_file, "password"), token=_secret(a.token_env, a.token_file, "token"),
        job_delay_s=a.job_delay_s, duplicates=a.duplicates, name_duplicates=not a.anonymous_duplicates, announce_limits=not a.no_announce_limits,
    )
    if a.auth == "basic" and cfg.password is None or a.auth == "bearer" and cfg.token is None:
        p.error(f"--auth {a.auth} needs its secret (--password-env/--password-file or --token-env/--token-file)")
    try:
        ctx = server_ssl_context(a.tls_cert, a.tls_key, a.tls_client_ca) if a.tls_cert else None
    except (OSError, ssl.SSLError) as exc:
        print(f"epcis_repository: TLS: {exc}", file=sys.stderr)
        return 2

    async def go() -> None:
        repo = EpcisRepository(cfg)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            port = await repo.start(a.host, a.port, ctx)
        except OSError as exc:
            print(f"epcis_repository: cannot listen on {a.host}:{a.port}: {exc.strerror}", file=sys.stderr)
            raise SystemExit(2) from None
        scheme = "https" if ctx else "http"
        print(f"EPCIS REPOSITORY READY {scheme}://{a.host}:{port} capture_limit={cfg.capture_limit} file_size_limit={cfg.file_size_limit}", flush=True)
        await stop.wait()
        t0 = time.monotonic()
        await repo.stop()
        print(f"EPCIS REPOSITORY STOPPED events={len(repo.events)} jobs={len(repo.jobs)} in {time.monotonic() - t0:.1f}s", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())
    return 0


if __name__ == "__main__":
    sys.exit(main())
