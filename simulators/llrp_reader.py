"""RAIN RFID reader simulator speaking LLRP 1.0.1 on TCP (port 5084), with the tags physically in its field.

A tunnel reader in a packaging line reads the tags of one case during an
inventory window. This simulator is that reader for any LLRP client: it
announces itself with a ConnectionAttemptEvent, keeps ROSpecs (including those
of a previous client, as real readers do) through add/enable/start/stop/
disable/delete, inventories the tags in its field while a ROSpec is active and
reports them in RO_ACCESS_REPORT as its ROReportSpec asks (every N tags or at
the end of the ROSpec, with the fields the TagReportContentSelector enables),
sends KEEPALIVEs and ROSpec events when configured to, and answers what it
does not support with an LLRPStatus error, never silence.

The line simulator moves tags with `field_enter` / `field_leave` / `set_field`.
Ground truth (`windows`) records, for each ROSpec run, every tag that was
physically in the field at any moment of it and every EPC the reader put on
the wire, so a test can compare what the driver decided with what happened.

Tag faults are properties of a tag in the field: `dead` (never answers),
`stray` (a neighbouring case's tag at the edge of the field, low RSSI),
`reports_as` (the tag carries another EPC than its unit's), two tags with the
same `unit`, and `field_leave(..., after_windows=1)` (the tag lingers into the
next window, so it is seen in two). Link faults go through `inject`: `drop`,
`malformed` (garbage, bad_length, huge_length, unknown_type, truncated,
bad_parameter), `keepalive_loss`, `refuse` (as if another client held the
reader).

Encoding is simulators/llrp_wire.py (ours, from the LLRP Toolkit definition
file), not llrpkit, which the driver uses: each side proves the other.

    python -m linectl.simulators.llrp_reader --port 5084 --demo-tags 120
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from linectl.simulators import llrp_wire as w
from linectl.simulators.serialpty import SimServer, run_forever

LLRP_PORT = 5084
#: requests longer than this are refused (a client bug or noise, not an inventory)
MAX_REQUEST_BYTES = 1 << 20
#: TagReportData per RO_ACCESS_REPORT when a large accumulation is flushed
REPORT_CHUNK = 200
#: IANA private enterprise number in the capabilities (0: not a vendor's, so clients enable no vendor extensions)
MANUFACTURER = 0
MALFORMED_VARIANTS = ("garbage", "bad_length", "huge_length", "unknown_type", "truncated", "bad_parameter")
FAULTS = ("drop", "malformed", "keepalive_loss", "refuse")


def _now_us() -> int:
    return time.time_ns() // 1000


def normalize_epc(epc_hex: str) -> str:
    text = epc_hex.strip().lower()
    if not text or len(text) % 4 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"EPC {epc_hex!r} must be hex in whole 16-bit words (the EPC bank is word-addressed)")
    return text


@dataclass
class FieldTag:
    """A tag physically in the reader's field (or, in ground truth, as it was during a window)."""

    epc_hex: str
    antenna: int = 1
    rssi: int = -50
    unit: str | None = None
    dead: bool = False
    stray: bool = False
    reports_as: str | None = None
    #: set by field_leave(after_windows=n): the tag stays for n more ROSpec runs, then leaves
    leave_after_windows: int | None = None

    @property
    def reported_epc(self) -> str:
        return self.reports_as or self.epc_hex


@dataclass
class WindowTruth:
    """One ROSpec run: what was physically in the field, and what the reader reported."""

    ro_spec_id: int
    started_at: float
    ended_at: float | None = None
    in_field: dict[str, FieldTag] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)

    @property
    def readable(self) -> set[str]:
        """EPCs a correct reader reports for this window: every tag in the field except dead ones, as it answers."""
        return {t.reported_epc for t in self.in_field.values() if not t.dead}

    def where(self, **flags: bool) -> set[str]:
        """EPCs of in-field tags with these flags, e.g. where(stray=True), where(dead=True)."""
        return {t.epc_hex for t in self.in_field.values() if all(getattr(t, k) == v for k, v in flags.items())}


@dataclass
class _Spec:
    spec: w.RoSpec
    raw: bytes  # the ROSpec parameter as added (GET_ROSPECS echoes it with the current state)
    state: str = "Disabled"  # Disabled | Inactive | Active (enumeration ROSpecState)


@dataclass
class _Acc:
    obs: w.Observation


@dataclass
class _Run:
    spec: _Spec
    report: w.ReportSpec
    truth: WindowTruth
    antennas: set[int]
    session: int
    started: float
    read_once: set[str] = field(default_factory=set)
    accum: dict[tuple[str, int | None], _Acc] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    rr: int = 0
    budget: float = 0.0
    last: float = 0.0  # monotonic time of the last cycle


STATE_CODES = {"Disabled": 0, "Inactive": 1, "Active": 2}
RESPONSES = {
    w.Msg.GET_READER_CAPABILITIES: w.Msg.GET_READER_CAPABILITIES_RESPONSE,
    w.Msg.GET_READER_CONFIG: w.Msg.GET_READER_CONFIG_RESPONSE,
    w.Msg.SET_READER_CONFIG: w.Msg.SET_READER_CONFIG_RESPONSE,
    w.Msg.CLOSE_CONNECTION: w.Msg.CLOSE_CONNECTION_RESPONSE,
    w.Msg.ADD_ROSPEC: w.Msg.ADD_ROSPEC_RESPONSE,
    w.Msg.DELETE_ROSPEC: w.Msg.DELETE_ROSPEC_RESPONSE,
    w.Msg.START_ROSPEC: w.Msg.START_ROSPEC_RESPONSE,
    w.Msg.STOP_ROSPEC: w.Msg.STOP_ROSPEC_RESPONSE,
    w.Msg.ENABLE_ROSPEC: w.Msg.ENABLE_ROSPEC_RESPONSE,
    w.Msg.DISABLE_ROSPEC: w.Msg.DISABLE_ROSPEC_RESPONSE,
    w.Msg.GET_ROSPECS: w.Msg.GET_ROSPECS_RESPONSE,
}
#: what a reader reports when neither the ROSpec nor SET_READER_CONFIG gave an ROReportSpec
DEFAULT_REPORT = w.ReportSpec(w.ReportTrigger.Upon_N_Tags_Or_End_Of_ROSpec, 0, w.ReportContent(antenna_id=True))


class LlrpReaderSim(SimServer):
    """An LLRP reader on TCP; one client at a time (a second is refused, as Impinj readers do)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "llrp",
        config: Any = None,
        antennas: int = 4,
        reads_per_s: float = 2000.0,
        cycle_s: float = 0.005,
        rssi_jitter: int = 2,
        model: int = 1,
        firmware: str = "linectl-sim 1.0",
        delete_all: bool = True,
        seed: int = 0,
    ) -> None:
        if config is not None:  # the driver's LlrpConfig: listen where it connects
            host, port = config.host, config.port
        super().__init__(host=host, port=port, name=name)
        if antennas < 1:
            raise ValueError("a reader has at least one antenna")
        self.antennas = antennas
        self.reads_per_s = reads_per_s
        self.cycle_s = cycle_s
        self.rssi_jitter = rssi_jitter
        self.model = model
        self.firmware = firmware
        self.delete_all = delete_all  # False: DELETE_ROSPEC 0 (all) refused, as some readers and llrpkit's emulator do
        self.rng = random.Random(seed)
        # reader state that outlives a connection, as on a real reader
        self.rospecs: dict[int, _Spec] = {}
        self.keepalive_ms = 0
        self.notifications: dict[int, bool] = {}
        self.default_report: w.ReportSpec | None = None
        # the field and the ground truth
        self.field: dict[str, FieldTag] = {}
        self.windows: list[WindowTruth] = []
        self._runs: dict[int, _Run] = {}
        # faults and counters
        self.refuse = False
        self.keepalive_loss = False
        self.refused = 0
        self.keepalives_sent = 0
        self.keepalive_acks = 0
        self.reports_sent = 0
        self.requests: list[str] = []  # message names received, in order (bounded)
        self._keepalive_task: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()

    # ------------------------------------------------------------------ the field (line simulator API)

    def field_enter(
        self,
        epc_hex: str,
        *,
        antenna: int = 1,
        rssi: int | None = None,
        unit: str | None = None,
        dead: bool = False,
        stray: bool = False,
        reports_as: str | None = None,
    ) -> FieldTag:
        """A tag comes into the field. A stray tag defaults to -72 dBm (edge of the field), others to -50 dBm."""
        epc = normalize_epc(epc_hex)
        if not 1 <= antenna <= self.antennas:
            raise ValueError(f"antenna {antenna}: this reader has antennas 1-{self.antennas}")
        tag = FieldTag(
            epc, antenna, rssi if rssi is not None else (-72 if stray else -50), unit, dead, stray,
            normalize_epc(reports_as) if reports_as else None,
        )
        self.field[epc] = tag
        for run in self._runs.values():
            run.truth.in_field.setdefault(epc, dataclasses.replace(tag))
        return tag

    def field_leave(self, epc_hex: str, *, after_windows: int = 0) -> None:
        """The tag leaves the field now, or (after_windows=n) once n more inventory runs have ended: it lingers."""
        epc = normalize_epc(epc_hex)
        if epc not in self.field:
            return
        if after_windows > 0:
            self.field[epc].leave_after_windows = after_windows
        else:
            del self.field[epc]

    def set_field(self, tags: Iterable[FieldTag | str]) -> None:
        """Replace the whole field (strings are plain tags on antenna 1)."""
        self.field.clear()
        for t in tags:
            if isinstance(t, str):
                self.field_enter(t)
            else:
                self.field_enter(
                    t.epc_hex, antenna=t.antenna, rssi=t.rssi, unit=t.unit, dead=t.dead, stray=t.stray, reports_as=t.reports_as
                )

    # ------------------------------------------------------------------ faults

    def inject(self, kind: str, **kw: Any) -> None:
        if kind == "drop":
            self.reset_connection()
        elif kind == "malformed":
            self.send(self.malformed(str(kw.get("variant", "garbage"))))
        elif kind == "keepalive_loss":
            self.keepalive_loss = bool(kw.get("on", True))
        elif kind == "refuse":
            self.refuse = bool(kw.get("on", True))
        else:
            raise ValueError(f"unknown fault kind {kind!r} for an LLRP reader ({', '.join(FAULTS)})")

    def malformed(self, variant: str) -> bytes:
        """Bytes no correct reader sends. `truncated` announces more than it sends and then stays silent."""
        if variant == "garbage":
            return bytes(self.rng.randrange(256) for _ in range(64))
        if variant == "bad_length":
            return struct.pack(">HII", (w.VERSION << 10) | w.Msg.KEEPALIVE, 6, 7)
        if variant == "huge_length":
            return struct.pack(">HII", (w.VERSION << 10) | w.Msg.RO_ACCESS_REPORT, 0x7FFFFFF0, 7)
        if variant == "unknown_type":
            return w.message(999, 7, b"\x00\x01")
        if variant == "truncated":
            return w.message(w.Msg.RO_ACCESS_REPORT, 7, b"\x00" * 200)[:60]
        if variant == "bad_parameter":  # a TagReportData whose length runs past the message
            return w.message(w.Msg.RO_ACCESS_REPORT, 7, struct.pack(">HH", w.Param.TagReportData, 400) + b"\x8d" + bytes(12))
        raise ValueError(f"unknown malformed variant {variant!r} ({', '.join(MALFORMED_VARIANTS)})")

    # ------------------------------------------------------------------ connections

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse or self.connected:
            self.refused += 1
            status = w.ConnectionAttempt.Failed_A_Client_Initiated_Connection_Already_Exists
            writer.write(w.message(w.Msg.READER_EVENT_NOTIFICATION, 0, w.reader_event(_now_us(), w.connection_attempt_event(status))))
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except (TimeoutError, ConnectionError, OSError):
                pass
            writer.close()
            self.log.info("sim_llrp_refused", refused=self.refused)
            return
        self._writer = writer
        self.connections += 1
        self.send(w.message(w.Msg.READER_EVENT_NOTIFICATION, 0, w.reader_event(_now_us(), w.connection_attempt_event(w.ConnectionAttempt.Success))))
        self._restart_keepalive()
        try:
            await self._run_handler(reader, writer)
        except asyncio.CancelledError:
            pass  # stop(): asyncio's stream callback (3.11) logs a cancelled client task as an error
        finally:
            if self._writer is None and self._keepalive_task is not None:
                self._keepalive_task.cancel()
                self._keepalive_task = None

    async def on_stopping(self) -> None:
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        for run in list(self._runs.values()):
            if run.task is not None:
                run.task.cancel()

    async def handle(self, reader: asyncio.StreamReader, writer: Any) -> None:
        while True:
            head = w.parse_header(await reader.readexactly(w.HEADER_LEN))
            if head.length < w.HEADER_LEN or head.length > MAX_REQUEST_BYTES:
                self._error(head, w.Status.M_ParameterError, f"message length {head.length} out of range")
                return
            body = await reader.readexactly(head.length - w.HEADER_LEN)
            try:
                name = w.Msg(head.msg_type).name
            except ValueError:
                name = f"type {head.msg_type}"
            self.requests.append(name)
            del self.requests[:-500]
            if head.version not in (1, 2):
                self._error(head, w.Status.M_UnsupportedVersion, f"LLRP version {head.version} not supported")
                continue
            try:
                closing = await self._dispatch(head, body)
            except w.WireError as exc:
                response = RESPONSES.get(w.Msg(head.msg_type)) if head.msg_type in w.Msg._value2member_map_ else None
                if response is None:
                    self._error(head, exc.status, exc.reason)
                else:
                    self._reply(head, response, w.llrp_status(exc.status, exc.reason))
                continue
            if closing:
                await asyncio.sleep(0.05)  # let the response reach the client before the close
                return

    def _reply(self, head: w.Header, msg_type: int, body: bytes) -> None:
        self.send(w.message(msg_type, head.message_id, body, version=head.version))

    def _error(self, head: w.Header, code: int, text: str) -> None:
        self.send(w.message(w.Msg.ERROR_MESSAGE, head.message_id, w.llrp_status(code, text), version=head.version if head.version in (1, 2) else w.VERSION))

    async def _dispatch(self, head: w.Header, body: bytes) -> bool:
        """Handle one request; True when the connection is to be closed after the response."""
        t = head.msg_type
        ok = w.llrp_status()
        if t == w.Msg.KEEPALIVE_ACK:
            self.keepalive_acks += 1
        elif t == w.Msg.GET_READER_CAPABILITIES:
            caps = w.capabilities(antennas=self.antennas, manufacturer=MANUFACTURER, model=self.model, firmware=self.firmware)
            self._reply(head, w.Msg.GET_READER_CAPABILITIES_RESPONSE, ok + caps)
        elif t == w.Msg.GET_READER_CONFIG:
            self._reply(head, w.Msg.GET_READER_CONFIG_RESPONSE, ok)
        elif t == w.Msg.SET_READER_CONFIG:
            cfg = w.decode_set_reader_config(body)
            if cfg.reset_to_factory_default:
                self.keepalive_ms, self.notifications, self.default_report = 0, {}, None
            if cfg.keepalive_ms is not None:
                self.keepalive_ms = cfg.keepalive_ms
                self._restart_keepalive()
            self.notifications.update(cfg.notifications)
            if cfg.report is not None:
                self.default_report = cfg.report
            self._reply(head, w.Msg.SET_READER_CONFIG_RESPONSE, ok)
        elif t == w.Msg.ADD_ROSPEC:
            self._reply(head, w.Msg.ADD_ROSPEC_RESPONSE, self._add(body))
        elif t in (w.Msg.DELETE_ROSPEC, w.Msg.ENABLE_ROSPEC, w.Msg.DISABLE_ROSPEC, w.Msg.START_ROSPEC, w.Msg.STOP_ROSPEC):
            msg = w.Msg(t)
            status = await self._rospec_op(msg, w.u32_field(body, msg.name))
            self._reply(head, RESPONSES[msg], status)
        elif t == w.Msg.GET_ROSPECS:
            specs = b"".join(s.raw[:9] + bytes((STATE_CODES[s.state],)) + s.raw[10:] for s in self.rospecs.values())
            self._reply(head, w.Msg.GET_ROSPECS_RESPONSE, ok + specs)
        elif t == w.Msg.GET_REPORT:
            for run in self._runs.values():
                self._flush(run)
        elif t == w.Msg.ENABLE_EVENTS_AND_REPORTS:
            pass
        elif t == w.Msg.CLOSE_CONNECTION:
            self._reply(head, w.Msg.CLOSE_CONNECTION_RESPONSE, ok)
            return True
        else:
            what = w.Msg(t).name if t in w.Msg._value2member_map_ else f"message type {t}"
            self._error(head, w.Status.M_UnsupportedMessage, f"{what} is not supported by this reader")
        return False

    # ------------------------------------------------------------------ ROSpecs

    def _add(self, body: bytes) -> bytes:
        items = w.parse_params(body)
        if len(items) != 1 or items[0].ptype != w.Param.ROSpec:
            raise w.WireError("ADD_ROSPEC carries exactly one ROSpec", w.Status.M_MissingParameter)
        spec = w.decode_rospec(items[0])
        if spec.ro_spec_id == 0:
            return w.llrp_status(w.Status.A_Invalid, "ROSpecID 0 is reserved")
        if spec.ro_spec_id in self.rospecs:
            return w.llrp_status(w.Status.A_Invalid, f"ROSpec {spec.ro_spec_id} already exists")
        if spec.start_trigger not in (w.StartTrigger.Null, w.StartTrigger.Immediate):
            return w.llrp_status(w.Status.M_UnsupportedParameter, "only Null and Immediate start triggers are simulated")
        if spec.stop_trigger not in (w.StopTrigger.Null, w.StopTrigger.Duration):
            return w.llrp_status(w.Status.M_UnsupportedParameter, "only Null and Duration stop triggers are simulated")
        for ai in spec.ai_specs:
            bad = [a for a in ai.antenna_ids if a > self.antennas]
            if bad:
                return w.llrp_status(w.Status.M_FieldError, f"antenna {bad[0]} does not exist (antennas 1-{self.antennas})")
        raw = w.tlv(w.Param.ROSpec, items[0].body)
        self.rospecs[spec.ro_spec_id] = _Spec(spec, raw)
        return w.llrp_status()

    async def _rospec_op(self, op: w.Msg, ro_spec_id: int) -> bytes:
        if op == w.Msg.DELETE_ROSPEC:
            ids = list(self.rospecs) if ro_spec_id == 0 else [ro_spec_id]
            if ro_spec_id == 0 and not self.delete_all:
                return w.llrp_status(w.Status.A_Invalid, "no ROSpec 0 (this reader deletes ROSpecs by their ID only)")
            if ro_spec_id and ro_spec_id not in self.rospecs:
                return w.llrp_status(w.Status.A_Invalid, f"no ROSpec {ro_spec_id}")
            for i in ids:
                await self._end_run(i)
                del self.rospecs[i]
            return w.llrp_status()
        targets = list(self.rospecs) if ro_spec_id == 0 and op in (w.Msg.ENABLE_ROSPEC, w.Msg.DISABLE_ROSPEC) else [ro_spec_id]
        for i in targets:
            s = self.rospecs.get(i)
            if s is None:
                return w.llrp_status(w.Status.A_Invalid, f"no ROSpec {i}")
            if op == w.Msg.ENABLE_ROSPEC:
                if s.state == "Disabled":
                    s.state = "Inactive"
                    if s.spec.start_trigger == w.StartTrigger.Immediate:
                        self._start_run(s)
            elif op == w.Msg.DISABLE_ROSPEC:
                await self._end_run(i)
                s.state = "Disabled"
            elif op == w.Msg.START_ROSPEC:
                if s.state != "Inactive":
                    return w.llrp_status(w.Status.A_Invalid, f"ROSpec {i} is {s.state}, not Inactive")
                self._start_run(s)
            elif op == w.Msg.STOP_ROSPEC:
                if s.state != "Active":
                    return w.llrp_status(w.Status.A_Invalid, f"ROSpec {i} is {s.state}, not Active")
                await self._end_run(i)
        return w.llrp_status()

    def _start_run(self, s: _Spec) -> None:
        spec = s.spec
        antennas: set[int] = set()
        session = 0
        for ai in spec.ai_specs:
            antennas |= set(range(1, self.antennas + 1)) if 0 in ai.antenna_ids else set(ai.antenna_ids)
            if ai.session is not None:
                session = ai.session
        truth = WindowTruth(spec.ro_spec_id, time.time())
        truth.in_field = {e: dataclasses.replace(t) for e, t in self.field.items()}
        run = _Run(s, spec.report or self.default_report or DEFAULT_REPORT, truth, antennas, session, time.monotonic())
        s.state = "Active"
        self._runs[spec.ro_spec_id] = run
        self._notify(w.rospec_event(w.RoSpecEventType.Start_Of_ROSpec, spec.ro_spec_id))
        run.task = asyncio.get_running_loop().create_task(self._inventory(run), name=f"llrp-sim-rospec-{spec.ro_spec_id}")

    async def _inventory(self, run: _Run) -> None:
        spec = run.spec.spec
        limits = [spec.stop_duration_ms / 1000.0] if spec.stop_trigger == w.StopTrigger.Duration else []
        limits += [ai.stop_duration_ms / 1000.0 for ai in spec.ai_specs if ai.stop_trigger == w.StopTrigger.Duration]
        limit = min(limits) if limits else None
        while True:
            await asyncio.sleep(self.cycle_s)
            self._singulate(run)
            if limit is not None and time.monotonic() - run.started >= limit:
                run.task = None  # ending from inside: do not cancel ourselves
                await self._end_run(spec.ro_spec_id)
                return

    def _singulate(self, run: _Run) -> None:
        """One inventory cycle: the read-rate budget of the time elapsed, spent on the answering tags of its antennas."""
        now_m = time.monotonic()
        run.budget = min(run.budget + self.reads_per_s * (now_m - (run.last or run.started)), self.reads_per_s)
        run.last = now_m
        live = [t for t in self.field.values() if not t.dead and t.antenna in run.antennas]
        if run.session:  # sessions 1-3: a tag once inventoried stays silent for the rest of the run (flag B)
            live = [t for t in live if t.epc_hex not in run.read_once]
        if not live:
            return
        n = min(len(live), int(run.budget))
        run.budget -= n
        start = run.rr % len(live)
        chosen = (live[start:] + live[:start])[:n]
        run.rr += n
        now = _now_us()
        content = run.report.content
        for tag in chosen:
            run.read_once.add(tag.epc_hex)
            epc = tag.reported_epc
            rssi = tag.rssi + (self.rng.randint(-self.rssi_jitter, self.rssi_jitter) if self.rssi_jitter else 0)
            key = (epc, tag.antenna if content.antenna_id else None)
            acc = run.accum.get(key)
            if acc is None:
                raw = bytes.fromhex(epc)
                run.accum[key] = _Acc(w.Observation(raw, len(raw) * 8, tag.antenna, rssi, now, now, 1, ro_spec_id=run.spec.spec.ro_spec_id))
            else:
                o = acc.obs
                acc.obs = dataclasses.replace(
                    o, peak_rssi=max(o.peak_rssi, rssi), last_seen_us=now, seen_count=o.seen_count + 1,
                    antenna=tag.antenna if rssi > o.peak_rssi else o.antenna,
                )
            if run.report.trigger != w.ReportTrigger.None_ and run.report.n and len(run.accum) >= run.report.n:
                self._flush(run)

    def _flush(self, run: _Run) -> None:
        if not run.accum:
            return
        observations = [a.obs for a in run.accum.values()]
        run.accum.clear()
        for i in range(0, len(observations), REPORT_CHUNK):
            chunk = observations[i : i + REPORT_CHUNK]
            body = b"".join(w.tag_report_data(o, run.report.content) for o in chunk)
            if self.send(w.message(w.Msg.RO_ACCESS_REPORT, 0, body)):
                self.reports_sent += 1
                run.truth.reported.update(o.epc.hex() for o in chunk)

    async def _end_run(self, ro_spec_id: int) -> None:
        """The ROSpec stops: final report, End_Of_ROSpec event, the window into ground truth, lingering tags leave."""
        run = self._runs.pop(ro_spec_id, None)
        if run is None:
            return
        if run.task is not None:
            run.task.cancel()
            try:
                await run.task
            except asyncio.CancelledError:
                pass
        if run.report.trigger != w.ReportTrigger.None_:
            self._flush(run)
        self._notify(w.rospec_event(w.RoSpecEventType.End_Of_ROSpec, ro_spec_id))
        run.spec.state = "Inactive"
        run.truth.ended_at = time.time()
        self.windows.append(run.truth)
        del self.windows[:-1000]
        for epc, tag in list(self.field.items()):
            if tag.leave_after_windows is not None:
                tag.leave_after_windows -= 1
                if tag.leave_after_windows <= 0:
                    del self.field[epc]

    def _notify(self, event: bytes) -> None:
        if self.notifications.get(w.NOTIFY_ROSPEC_EVENT):
            self.send(w.message(w.Msg.READER_EVENT_NOTIFICATION, 0, w.reader_event(_now_us(), event)))

    # ------------------------------------------------------------------ keepalive

    def _restart_keepalive(self) -> None:
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
            self._keepalive_task = None
        if self.keepalive_ms > 0 and self.connected:
            self._keepalive_task = asyncio.get_running_loop().create_task(self._keepalive(self.keepalive_ms / 1000.0))

    async def _keepalive(self, period_s: float) -> None:
        n = 0
        while self.connected:
            await asyncio.sleep(period_s)
            if self.keepalive_loss:
                continue
            n += 1
            if self.send(w.message(w.Msg.KEEPALIVE, 0x4B41_0000 + n)):
                self.keepalives_sent += 1


def demo_epcs(n: int, seed: int = 0) -> list[str]:
    """n SGTIN-96 EPCs of one GTIN (header 0x30, filter 1, partition 5, company prefix 0614141, item 812345)."""
    rng = random.Random(seed)
    base = (0x30 << 88) | (1 << 85) | (5 << 82) | (614141 << 58) | (812345 << 38)
    serials = rng.sample(range(1, 1 << 38), n)
    return [f"{base | s:024x}" for s in serials]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m linectl.simulators.llrp_reader", description="LLRP RFID reader simulator (TCP).")
    p.add_argument("--host", default="127.0.0.1", help="TCP address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=LLRP_PORT, help=f"TCP port (default {LLRP_PORT}; 0 = any free port)")
    p.add_argument("--antennas", type=int, default=4, help="number of antennas (default 4)")
    p.add_argument("--demo-tags", type=int, default=0, metavar="N", help="put N SGTIN-96 tags in the field on antenna 1")
    p.add_argument("--reads-per-s", type=float, default=2000.0, help="singulation rate of the simulated reader")
    p.add_argument("--seed", type=int, default=0, help="seed of RSSI jitter and demo EPCs (default 0)")
    args = p.parse_args(argv)
    from linectl.logging import setup_logging

    setup_logging()
    sim = LlrpReaderSim(host=args.host, port=args.port, antennas=args.antennas, reads_per_s=args.reads_per_s, seed=args.seed)
    for epc in demo_epcs(args.demo_tags, args.seed):
        sim.field_enter(epc)
    try:
        asyncio.run(run_forever(sim))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
