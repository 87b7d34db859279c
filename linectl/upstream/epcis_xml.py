"""Sink "epcis_xml": the outbox's EPCIS events as EPCIS 1.2 (or 2.0) XML documents, POSTed to an L3/L4 capture
endpoint or written into a directory (`upstream.epcis_xml: [{name, ...}]`, one instance and one cursor
`epcis_xml:<name>` each).

Documents are cut like the file sink's (linectl.upstream.file, which this class extends): whole rows, up to
max_events events, fewer after max_age_s, and the last seq of a document is recorded as pending in the cursor
row before it is delivered, so a restarted sink delivers exactly the same document again (same rows, same
bytes: creationDate is the stored time of its last row). Directory mode writes `<prefix>-<first>-<last>.xml`
atomically (tmp name, fsync, rename, fsync dir), names sorting in delivery order.

HTTP: a success code moves the cursor. Everything else:
- 4xx (refused: bad auth, too large, a document the repository will never take): parked; an operator alarm once,
  then the same document again every retry_4xx_s (someone fixes the credentials or the repository).
- 5xx, a timeout, a dropped connection: capped jittered backoff, alarm once per outage.
- The re-send problem. A repository that does not detect duplicate eventIDs (QU4RTET) stores a re-sent document
  twice, and one that refuses to commission an EPC twice fails the whole re-sent document (QU4RTET: HTTP 500 "The
  epc ... has already been commissioned"), which would wedge the sink for ever. The `already_captured` matcher
  (status codes + body regex) recognises that answer, and the sink believes it only for a document whose earlier
  delivery may have reached the repository: the pending document after a restart, or one whose previous attempt
  ended without an answer (timeout, dropped connection). Then:
  split false: the repository captures a document atomically (QU4RTET parses a message in one transaction), so
  the document was captured whole: it counts as delivered. split true: the document is bisected and the halves
  sent, so only the events the repository already holds are skipped (for repositories that keep part of a
  failed document). The same answer to a document never sent before is a real conflict: parked with an alarm.
  What remains: a re-sent document the repository accepts again (events that are no commissioning, packing or
  decommissioning QU4RTET would refuse, e.g. inspections) is stored twice in a repository without eventID checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from linectl import epcis, epcis_xml
from linectl.drivers.base import Backoff
from linectl.upstream.file import SEQ_DIGITS, FileSink, _Document
from linectl.upstream.outbox import BacklogAlarm

if TYPE_CHECKING:  # pragma: no cover
    import httpx

    from linectl.config import EpcisXmlSinkConfig, LineConfig

log = structlog.get_logger("linectl.upstream.epcis_xml")

BODY_EXCERPT = 300  # characters of a refusal's body kept in last_error


class Refused(Exception):
    """A 4xx (or a real already-captured conflict): the repository will not take this document as it is."""


class Transient(Exception):
    """5xx, timeout, dropped connection: try again with backoff."""


def read_secret(sc: EpcisXmlSinkConfig) -> str | None:
    """The basic password or bearer token, from the environment or a file (never from the YAML)."""
    if sc.secret_env:
        value = os.environ.get(sc.secret_env)
        if not value:
            raise ValueError(f"epcis_xml {sc.name}: environment variable {sc.secret_env} is not set")
        return value
    if sc.secret_file:
        try:
            return Path(sc.secret_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"epcis_xml {sc.name}: cannot read secret_file {sc.secret_file}: {exc.strerror}") from None
    return None


class EpcisXmlSink(FileSink):
    """One `upstream.epcis_xml` entry. `run()` until `stop()`."""

    def __init__(self, cfg: LineConfig, store: Any, sc: EpcisXmlSinkConfig, *, page_size: int = 1000, poll_interval_s: float = 0.2,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0, mapper: epcis.EpcisMapper | None = None) -> None:
        # FileSink.__init__ reads upstream.file: this sink gives the shared state its own entry's values
        self.sc = sc
        self.name = f"epcis_xml:{sc.name}"  # the cursor's name: set before _setup opens the OutboxReader
        self.version: epcis_xml.XmlVersion = sc.version
        self.url = sc.url
        self._setup(cfg, store, Path(sc.dir) if sc.dir else Path(), sc.max_events, sc.max_age_s, sc.prefix, page_size=page_size,
                    poll_interval_s=poll_interval_s, backoff_initial_s=backoff_initial_s, backoff_max_s=backoff_max_s, mapper=mapper,
                    backlog_alarm=BacklogAlarm(self.name, sc.backlog_alarm_s, "upstream_epcis_xml_backlog", f"EPCIS XML target {sc.url or sc.dir}"))
        self._pattern = re.compile(sc.already_captured.body_regex) if sc.already_captured else None
        self._client: httpx.AsyncClient | None = None
        #: the current document may already be in the repository (pending at start, or an attempt without a definite answer)
        self._maybe_sent = False
        self._refused = False
        self._first_step = True
        self._normal_backoff = self._backoff
        self.connected: bool | None = None
        self.documents_sent = 0
        self.already_captured = 0
        self.events_skipped = 0
        self.last_status: int | None = None

    @classmethod
    def from_config(cls, cfg: LineConfig, store: Any, **kw: Any) -> list[EpcisXmlSink]:  # type: ignore[override]  # one instance per entry
        return [cls(cfg, store, sc, **kw) for sc in cfg.upstream.epcis_xml]

    @staticmethod
    def enabled(cfg: LineConfig) -> bool:
        return bool(cfg.upstream.epcis_xml)

    @staticmethod
    def names(cfg: LineConfig) -> list[str]:
        return [f"epcis_xml:{sc.name}" for sc in cfg.upstream.epcis_xml]

    # ---------------------------------------------------------------- public

    def status(self) -> dict[str, Any]:
        return {
            "sink": self.name,
            "version": self.version,
            "target": self.url or str(self.dir),
            "cursor": self.reader.cursor,
            "backlog_rows": self.backlog,
            "backlog_age_s": None if self.backlog_age_s is None else round(self.backlog_age_s, 1),
            "backlog_alarm": self.backlog_alarm.alarmed,
            "connected": self.connected,
            "documents": self.files_written,
            "events_written": self.events_written,
            "already_captured": self.already_captured,
            "events_skipped": self.events_skipped,
            "last_file": self.last_file,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "error_since": self.error_since,
            "parked": self._refused,
        }

    def unpark(self) -> bool:
        """A parked (refused) document is sent again now, at normal backoff pace; False: nothing was failing."""
        if self.last_error is None:
            return False
        if self._refused:
            log.info("epcis_xml_unparked", sink=self.name, cursor=self.reader.cursor, reason=self.last_error)
            self._refused = False
            self._backoff = self._normal_backoff
        return super().unpark()

    def file_name(self, first_seq: int, last_seq: int) -> str:
        return f"{self.prefix}-{first_seq:0{SEQ_DIGITS}d}-{last_seq:0{SEQ_DIGITS}d}.xml"

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            if self._client is not None:
                with contextlib.suppress(Exception):
                    await self._client.aclose()
                self._client = None

    # ---------------------------------------------------------------- delivery

    async def _step(self) -> float | None:
        if self._first_step:  # run() has just opened the cursor: a pending document may have reached the far side
            self._first_step = False
            self._maybe_sent = self._pending is not None
        return await super()._step()

    def _document(self, doc: _Document) -> bytes:
        when = datetime.fromtimestamp(doc.created, UTC) if doc.created is not None else None
        return epcis_xml.document_from_encoded(doc.events, self.version, when)

    async def _deliver(self, doc: _Document) -> None:
        if doc.events:
            if self.url:
                await self._post_document(doc, doc.events)
            else:
                name = self.file_name(doc.first_seq, doc.last_seq)
                await asyncio.to_thread(self._write, name, self._document(doc))
                self.last_file = name
            self.files_written += 1
            self.events_written += len(doc.events)
        await self.reader.advance(doc.last_seq)
        self._maybe_sent = False
        self._refused = False
        self._backoff = self._normal_backoff
        self._backoff.reset()

    async def _post_document(self, doc: _Document, events: list[str]) -> None:
        """POST `events` of `doc`; returns once the repository holds them all (captured now or before)."""
        when = datetime.fromtimestamp(doc.created, UTC) if doc.created is not None else None
        body = epcis_xml.document_from_encoded(events, self.version, when)
        status, text = await self._post(body)
        ac = self.sc.already_captured
        if status in self.sc.success_codes:
            self.documents_sent += 1
            return
        match = self._pattern.search(text) if ac is not None and self._pattern is not None and status in ac.status else None
        if match is not None and self._maybe_sent and ac is not None:
            epc = match.groupdict().get("epc")
            if not ac.split or len(events) == 1:
                log.warning("epcis_xml_already_captured", sink=self.name, first_seq=doc.first_seq, last_seq=doc.last_seq,
                            events=len(events), status=status, epc=epc, why="re-sent document already held by the repository")
                self.already_captured += 1
                self.events_skipped += len(events)
                return
            half = len(events) // 2
            await self._post_document(doc, events[:half])
            await self._post_document(doc, events[half:])
            return
        excerpt = " ".join(text.split())[:BODY_EXCERPT]
        if match is not None:
            raise Refused(f"HTTP {status}: the repository already holds an event of a document never sent before "
                          f"(seq {doc.first_seq}-{doc.last_seq}): {excerpt}")
        if 400 <= status < 500:
            raise Refused(f"HTTP {status}: {excerpt}")
        # an answer, even a 5xx, says the document was not taken (the repository rolls back): _maybe_sent stays as it was
        raise Transient(f"HTTP {status}: {excerpt}")

    async def _post(self, body: bytes) -> tuple[int, str]:
        import httpx

        assert self.url is not None
        if self._client is None:  # here, not in run(): a missing secret is reported and retried like any other trouble
            self._client = self._make_client()
        headers = {"Content-Type": "application/xml", **self.sc.headers}
        try:
            resp = await self._client.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            self._maybe_sent = True
            self.connected = False
            raise Transient(f"timeout after {self.sc.timeout_s} s ({type(exc).__name__})") from None
        except httpx.TransportError as exc:  # refused, reset, dropped mid-answer, TLS
            self._maybe_sent = True
            self.connected = False
            raise Transient(f"{type(exc).__name__}: {exc}") from None
        self.connected = True
        self.last_status = resp.status_code
        return resp.status_code, resp.text

    def _make_client(self) -> httpx.AsyncClient:
        import httpx

        sc = self.sc
        secret = read_secret(sc)
        auth: Any = None
        headers: dict[str, str] = {}
        if sc.auth == "basic":
            auth = httpx.BasicAuth(sc.username or "", secret or "")
        elif sc.auth == "bearer":
            headers["Authorization"] = f"{sc.token_scheme} {secret}"
        verify: Any = True
        if sc.ca_file or sc.client_cert:
            ctx = ssl.create_default_context(cafile=sc.ca_file) if sc.ca_file else ssl.create_default_context()
            if sc.client_cert:
                ctx.load_cert_chain(sc.client_cert, sc.client_key)
            verify = ctx
        return httpx.AsyncClient(auth=auth, headers=headers, verify=verify, timeout=sc.timeout_s, follow_redirects=False)

    # ---------------------------------------------------------------- trouble

    def _failed(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (Refused, Transient)) else str(exc)
        self._refused = isinstance(exc, Refused)
        if reason != self.last_error:
            log.error("epcis_xml_delivery_failed", sink=self.name, target=self.url or str(self.dir), error=reason,
                      cursor=self.reader.cursor, pending=self._pending, refused=self._refused)
        if self.error_since is None:
            self.error_since = time.time()
        self.last_error = reason
        # parked: the same document again after about retry_4xx_s (jittered), not at backoff pace
        self._backoff = Backoff(self.sc.retry_4xx_s, self.sc.retry_4xx_s) if self._refused else self._normal_backoff

    async def _alarm(self) -> None:
        if self.on_alarm is None:
            return
        what = "refuses" if self._refused else "cannot take"
        try:
            await self.on_alarm("upstream_epcis_xml_failed", f"{self.name}: {self.url or self.dir} {what} documents: {self.last_error}; "
                                "retrying, nothing is lost (rows wait in the store)")
        except Exception as exc:  # noqa: BLE001 - the alarm is a courtesy; the log line is already written
            log.warning("epcis_xml_alarm_failed", error=str(exc))
