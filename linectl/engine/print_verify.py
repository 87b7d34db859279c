"""The print_verify station: allocate → print → track → read → verify → commission or reject → confirm.

Tracking is by unit sequence (the product-trigger count the printer and the
PLC share), never by time: a reader may answer in 5 ms or 80 ms. Time is only
used to detect that something stopped answering. Each tracked unit number is one
record with an explicit state (TrackedUnit in UnitTracker), so what is awaited of
a unit is read in one place, never pieced together from several containers.

Safety rules carried by this module:
- a serial is durably `sent` before the printer gets it, so a crash can never
  lose track of a printed serial;
- a unit's commissioning event is durable before the PLC hears "good";
- the PLC rejects anything without a "good" verdict (fail-safe), and every
  reject that was ordered must be confirmed by the gate sensor, else the line
  stops;
- a PLC reject of a unit already commissioned is caught from the reject ring
  and that serial decommissioned.

RFID (product carrier rfid/both, an RFID ZPL label printer): each job carries the
serial's EPC; the printer encodes the label's tag and reports its read-back with
the print confirmation (PrintConfirm.rfid_status). A unit is never good before
its tag's outcome is known:
- a VOID, a wrong tag (mismatch) or no verification (no_answer) rejects the unit
  as soon as it is known (the confirmation may come before the read), with its
  own reason (rfid_void, rfid_mismatch, rfid_no_answer);
- the printer reports a VOID or a wrong tag at once but an ok tag only when ~HS
  saw its format leave, so confirmations come out of job order: an older job
  without its outcome is placed on the unit before the newer one (formats print
  in order), its outcome still awaited; once a later label is confirmed ok, an
  older one still without outcome will never get one (rfid_no_answer);
- carrier both: the read decides, and a good read of a unit whose tag outcome
  is still unknown waits a little for it, then rejects (rfid_no_answer);
- carrier rfid: the tag read-back is the verification: the unit is decided when
  its outcome arrives, reads (when a reader is there at all) are not used.
A run of VOID units stops the line (rules.rfid_void_limit).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import structlog

from linectl import gs1
from linectl.config import PrintVerifyStation as PrintVerifyConfig
from linectl.config import queue_depth_for
from linectl.drivers.base import CodeReader, DeviceError, HealthState, Plc, PrintConfirm, Printer, PrintJob, Read
from linectl.drivers.plc_tags import PlcConfigBase
from linectl.engine.station import LinePort, Station, TaskFactory
from linectl.engine.stats import LatencyHistogram
from linectl.engine.verdict import CHALLENGE_EXPECTED_REASON, Expected, Verdict, classify_unknown, verify_unit
from linectl.epc import EpcError, EpcValue, decode_epc
from linectl.events import AlarmRaised, ChallengeResult, RejectReason, Severity, UnitCommissioned, UnitDecommissioned
from linectl.store.model import StoreError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from linectl.drivers.base import Driver
    from linectl.engine.line import BatchContext

log = structlog.get_logger("linectl.station")

#: a reject confirm may take this many times the read-to-gate travel time before the line stops
CONFIRM_MARGIN = 1.5
VERDICT_GOOD = 1
#: watch polls a reject-ring value above the trigger count waits for a fresher count before it is taken for a unit of
#: an earlier PLC epoch (poll_interval_s each: 0.2 s at the default 20 ms)
HOLD_AHEAD_POLLS = 10
VERDICT_REJECT = 2
SERIAL_BLOCK = 256
#: how long a good read of a unit waits for its tag's outcome (carrier both) before the unit is rejected unverified
TAG_WAIT_S = 0.25
#: tag outcomes remembered per unit seq (the VOID-run rule looks back this far at most)
TAG_LOG = 1024
#: PrintConfirm.rfid_status -> the reject reason of a unit whose tag is not the serial's EPC
TAG_REJECTS = {"void": RejectReason.RFID_VOID, "mismatch": RejectReason.RFID_MISMATCH, "no_answer": RejectReason.RFID_NO_ANSWER}
RFID_REASONS = frozenset(r.value for r in TAG_REJECTS.values())
#: the PLC's physical pack counters (optional tags), snapshotted per batch for the report
PLC_COUNTERS = ("trigger_count", "pass_total", "reject_total", "gate_reject_total")


def _int_or_none(v: Any) -> int | None:
    if v is None or isinstance(v, (list, tuple)):
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class TagOutcome:
    """What an RFID label printer reported of one job's tag (PrintConfirm.rfid_status and the rest)."""

    status: str  # ok | void | mismatch | no_answer
    reason: str
    epc_read: str | None
    void_labels: int

    @classmethod
    def of(cls, c: PrintConfirm) -> TagOutcome:
        if c.rfid_status is None:
            return cls("no_answer", "the printer confirmed the print without a verification of the tag", None, 0)
        return cls(c.rfid_status, c.rfid_reason, c.epc_read, c.rfid_void_labels)


@dataclass
class Job:
    job_seq: int
    serial: str
    code: gs1.ParsedCode
    expected: Expected
    sent_at: float
    acked: bool = False  # the printer acknowledged it: it holds the code (see primed)
    #: the EPC its label's tag must carry (product carrier rfid/both), None for a DataMatrix-only job
    epc: EpcValue | None = None
    #: the unit it was placed on (its print confirmation, or a later job's for an RFID job)
    unit_seq: int | None = None
    #: the printer's outcome for its tag, None while awaited
    tag: TagOutcome | None = None


@dataclass(frozen=True)
class ChallengeUnit:
    """A challenge pack QA fed on purpose (its own kind of unit, not a production unit): which challenge, and the
    verdict the station gave it. The challenge passes for it when the gate confirms the reject and the verdict's
    reason is the one the kind must produce (CHALLENGE_EXPECTED_REASON)."""

    kind: str
    verdict: Verdict


class UnitKind(Enum):
    """What a tracked unit is: a production unit, or a challenge pack QA fed on purpose (its own kind, see ChallengeUnit)."""

    NORMAL = "normal"
    CHALLENGE = "challenge"


class UnitState(Enum):
    """Where one unit number is in the print-and-verify cycle.

    PRINTED -> DECIDING -> GOOD_AWAITING_GATE -> GOOD_UNWATCHED | GATE_REJECTED
                        -> REJECT_AWAITING_CONFIRM -> REJECT_CONFIRMED | CLOSED
    PRINTED -> GATE_REJECTED (the gate rejected it fail-safe before any read)
    Any live state -> CLOSED when its PLC epoch closes or the line drains without a gate answer.
    """

    #: no unit of this run under this number (yet): the record only carries a memory (an early gate reject, a unit
    #: commissioned before the daemon started)
    UNSEEN = "unseen"
    #: its print is confirmed; its read is awaited
    PRINTED = "printed"
    #: off the read queue, its verdict being recorded. Deliberately unknown to the reject-ring check: a gate reject
    #: arriving meanwhile is noted as an early reject, which the verdict then finds (else it would be lost)
    DECIDING = "deciding"
    #: commissioned, "good" written: its passage of the gate is not proven, a fail-safe reject in the ring disproves it
    GOOD_AWAITING_GATE = "good_awaiting_gate"
    #: reject ordered, the gate's confirm awaited (else the line stops)
    REJECT_AWAITING_CONFIRM = "reject_awaiting_confirm"
    #: the gate confirmed the ordered reject
    REJECT_CONFIRMED = "reject_confirmed"
    #: the gate rejected it against or without our verdict (fail-safe)
    GATE_REJECTED = "gate_rejected"
    #: good, and out of the gate-watch window: a ring value this old is not matched to it any more
    GOOD_UNWATCHED = "good_unwatched"
    #: its cycle ended without a gate answer: the PLC epoch closed, the line drained, its confirm timed out
    CLOSED = "closed"


#: states that still expect something (a read, a verdict, the gate)
LIVE_STATES = frozenset({UnitState.PRINTED, UnitState.DECIDING, UnitState.GOOD_AWAITING_GATE, UnitState.REJECT_AWAITING_CONFIRM})

_AWAITING = {
    UnitState.PRINTED: "read",
    UnitState.DECIDING: "verdict",
    UnitState.GOOD_AWAITING_GATE: "gate passage",
    UnitState.REJECT_AWAITING_CONFIRM: "reject confirm",
}


@dataclass(eq=False)
class TrackedUnit:
    """Everything print-and-verify knows about one unit number: its state, its job, what it awaits, and which
    memory windows still hold it (each window has its own bound, see TrackingBounds)."""

    seq: int
    state: UnitState = UnitState.UNSEEN
    kind: UnitKind = UnitKind.NORMAL
    job: Job | None = None
    printed_at: float | None = None  # line.clock.monotonic() of its print confirm (reader silence clock)
    challenge: ChallengeUnit | None = None
    reject_reason: str | None = None  # RejectReason value, "challenge" for a challenge unit
    ordered_at: float | None = None  # line.clock.monotonic() of the reject order: the wait is judged at the pace measured meanwhile
    #: order stamps: the position in a bounded window (None: not in it). Windows are separate because their
    #: bounds count different things (all decisions, good ones, early gate rejects)
    decided_no: int | None = None
    good_no: int | None = None
    ordered_no: int | None = None
    early_no: int | None = None
    #: (gtin, serial, lot) of a unit this station commissioned under this number before the daemon started: a
    #: memory, not a state, because with inferred unit numbers a unit of this run may carry the same number
    before_start: tuple[str, str, str | None] | None = None
    #: the read loop is recording this unit's verdict: the feeder counts it as on its way (it may become good)
    holds_issue: bool = False

    @property
    def awaiting(self) -> str | None:
        """What this unit waits for, None when nothing."""
        return _AWAITING.get(self.state)

    @property
    def label(self) -> str:
        return f"challenge:{self.challenge.kind}" if self.challenge is not None else (self.reject_reason or "")

    @property
    def remembered(self) -> bool:
        """Among the last decided units: a second read of it is ignored, a gate reject of it is no early reject."""
        return self.decided_no is not None

    @property
    def gate_rejected_early(self) -> bool:
        return self.early_no is not None

    def idle(self) -> bool:
        """Nothing awaited and no window holds it: the record can go."""
        return self.state not in LIVE_STATES and not self.holds_issue and self.decided_no is None and self.early_no is None and self.before_start is None


@dataclass(frozen=True)
class TrackingBounds:
    """The memory windows' bounds, each with its own meaning (they count different things, so they are not one bound)."""

    #: decided units remembered (the last N decisions, good or not): a second read of one is ignored, and a gate
    #: reject of one that is no longer watched is not taken for an early reject of an unknown unit
    decided: int
    #: good units watched for a fail-safe reject in the reject ring (the last N good ones); an older one is presumed
    #: through the gate (GOOD_UNWATCHED)
    good_watch: int
    #: gate rejects of units not known yet (verdict late), kept for their verdict to find (the last N)
    early: int

    @classmethod
    def for_ring(cls, slots: int) -> TrackingBounds:
        """Four turns of the R-slot verdict ring: farther back, a ring value is another unit's."""
        return cls(decided=4 * slots, good_watch=4 * slots, early=4 * slots)


class UnitTracker:
    """One ordered map, unit seq -> TrackedUnit, with every transition a named method. No I/O: the runtime does the
    writes and records, this keeps which unit is where. Map order: the order in which units became PRINTED (a unit
    becoming PRINTED moves to the end), so the printed units read in print order; other windows keep order stamps."""

    def __init__(self, bounds: TrackingBounds) -> None:
        self.bounds = bounds
        self._by_seq: OrderedDict[int, TrackedUnit] = OrderedDict()
        self._stamp = 0

    # ---------------------------------------------------------------- queries

    def get(self, seq: int) -> TrackedUnit | None:
        return self._by_seq.get(seq)

    def __len__(self) -> int:
        return len(self._by_seq)

    def in_state(self, state: UnitState) -> list[TrackedUnit]:
        return [u for u in self._by_seq.values() if u.state is state]

    def printed(self) -> list[TrackedUnit]:
        """Printed units awaiting their read, in print order."""
        return self.in_state(UnitState.PRINTED)

    def is_printed(self, seq: int) -> bool:
        u = self._by_seq.get(seq)
        return u is not None and u.state is UnitState.PRINTED

    def first_printed(self) -> TrackedUnit | None:
        return next((u for u in self._by_seq.values() if u.state is UnitState.PRINTED), None)

    def count(self, state: UnitState) -> int:
        return sum(1 for u in self._by_seq.values() if u.state is state)

    def awaiting_confirm(self) -> list[TrackedUnit]:
        """Rejects ordered and not confirmed, oldest order first."""
        return sorted(self.in_state(UnitState.REJECT_AWAITING_CONFIRM), key=lambda u: u.ordered_no or 0)

    def good_awaiting_gate(self) -> list[TrackedUnit]:
        return self.in_state(UnitState.GOOD_AWAITING_GATE)

    def before_start(self) -> list[TrackedUnit]:
        return [u for u in self._by_seq.values() if u.before_start is not None]

    def remembered(self, seq: int) -> bool:
        u = self._by_seq.get(seq)
        return u is not None and u.remembered

    def issue_holds(self) -> int:
        return sum(1 for u in self._by_seq.values() if u.holds_issue)

    # ---------------------------------------------------------------- housekeeping

    def _next(self) -> int:
        self._stamp += 1
        return self._stamp

    def _record(self, seq: int) -> TrackedUnit:
        u = self._by_seq.get(seq)
        if u is None:
            u = self._by_seq[seq] = TrackedUnit(seq)
        return u

    def _settle(self, u: TrackedUnit) -> None:
        """Drop the record once nothing refers to it."""
        if u.idle() and self._by_seq.get(u.seq) is u:
            del self._by_seq[u.seq]

    def _evict(self, field_name: str, bound: int) -> list[TrackedUnit]:
        """Take the oldest units out of one window until it holds `bound`; the units taken out."""
        held = [u for u in self._by_seq.values() if getattr(u, field_name) is not None]
        out: list[TrackedUnit] = []
        if len(held) <= bound:
            return out
        held.sort(key=lambda u: getattr(u, field_name))
        for u in held[: len(held) - bound]:
            setattr(u, field_name, None)
            out.append(u)
        return out

    # ---------------------------------------------------------------- transitions

    def print_confirmed(self, seq: int, job: Job, at: float) -> TrackedUnit | None:
        """The printer put `job` on unit `seq`: the unit now awaits its read. None when a unit of that number is
        already on its way (deciding, or awaiting the gate): this late print is on that unit, for the caller to settle."""
        u = self._by_seq.get(seq)
        if u is not None and u.state in LIVE_STATES and u.state is not UnitState.PRINTED:
            return None
        if u is not None and u.state is UnitState.PRINTED:
            u.job, u.printed_at = job, at  # the same number printed again: the newer job (its place kept)
            return u
        u = self._record(seq)
        self._by_seq.move_to_end(seq)
        u.state, u.kind, u.job, u.printed_at = UnitState.PRINTED, UnitKind.NORMAL, job, at
        u.challenge = u.reject_reason = u.ordered_at = None
        u.good_no = u.ordered_no = None
        return u

    def take_printed(self, seq: int, *, holds_issue: bool) -> TrackedUnit | None:
        """A read (or a later unit's read) takes printed unit `seq` off the read queue to decide it."""
        u = self._by_seq.get(seq)
        if u is None or u.state is not UnitState.PRINTED:
            return None
        u.state, u.holds_issue = UnitState.DECIDING, holds_issue
        return u

    def deciding(self, seq: int, job: Job | None, kind: UnitKind = UnitKind.NORMAL) -> TrackedUnit:
        """A unit read without a confirmed print (or a challenge unit) is being decided."""
        u = self._record(seq)
        u.state, u.kind, u.job = UnitState.DECIDING, kind, job
        u.good_no = u.ordered_no = None
        return u

    def remember(self, u: TrackedUnit) -> None:
        """A verdict for `u` is given: it joins the decided window (the oldest decided unit may leave it)."""
        if u.decided_no is None:
            u.decided_no = self._next()
        for old in self._evict("decided_no", self.bounds.decided):
            self._settle(old)

    def good(self, u: TrackedUnit) -> None:
        """Commissioned and "good": watched for a fail-safe reject until it leaves the gate-watch window."""
        u.state, u.good_no = UnitState.GOOD_AWAITING_GATE, self._next()
        for old in self._evict("good_no", self.bounds.good_watch):
            old.state = UnitState.GOOD_UNWATCHED
            self._settle(old)

    def take_early_reject(self, u: TrackedUnit) -> bool:
        """Did the gate reject `u` before its verdict? (The note is used up.)"""
        if u.early_no is None:
            return False
        u.early_no = None
        return True

    def reject_ordered(self, u: TrackedUnit, reason: str, challenge: ChallengeUnit | None, at: float) -> None:
        u.state, u.reject_reason, u.challenge, u.ordered_at, u.ordered_no = UnitState.REJECT_AWAITING_CONFIRM, reason, challenge, at, self._next()
        u.good_no = None

    def reject_confirmed(self, u: TrackedUnit) -> None:
        """The gate confirmed the reject (from the ring, or noted early)."""
        u.state, u.ordered_no = UnitState.REJECT_CONFIRMED, None
        self._settle(u)

    def gate_rejected(self, u: TrackedUnit) -> None:
        """The gate rejected `u` fail-safe (printed and unread, or after its good verdict)."""
        u.state, u.good_no = UnitState.GATE_REJECTED, None
        self._settle(u)

    def note_early_reject(self, seq: int) -> None:
        """The gate rejected a unit number not known here (its read may be being handled): its verdict will find it."""
        u = self._record(seq)
        if u.early_no is None:
            u.early_no = self._next()
        for old in self._evict("early_no", self.bounds.early):
            self._settle(old)

    def closed(self, u: TrackedUnit) -> None:
        """Its cycle ends without a gate answer."""
        u.state, u.good_no, u.ordered_no = UnitState.CLOSED, None, None
        self._settle(u)

    def decision_done(self, u: TrackedUnit) -> None:
        """The read loop is done with `u`: the feeder's hold goes; a unit still DECIDING (recording its verdict
        failed) is closed, known as little as before its read."""
        u.holds_issue = False
        if u.state is UnitState.DECIDING:
            self.closed(u)
        else:
            self._settle(u)

    def commissioned_before_start(self, units: Mapping[int, tuple[str, str, str | None]]) -> None:
        for seq, what in units.items():
            self._record(seq).before_start = what

    def take_before_start(self, seq: int) -> tuple[str, str, str | None] | None:
        u = self._by_seq.get(seq)
        if u is None or u.before_start is None:
            return None
        what, u.before_start = u.before_start, None
        self._settle(u)
        return what

    def forget_before_start(self) -> None:
        for u in list(self._by_seq.values()):
            u.before_start = None
            self._settle(u)

    def forget_epoch(self) -> None:
        """A new PLC epoch: nothing remembered of the old one matches a unit of the new one (decided, early rejects,
        units commissioned before start), and good units awaiting the gate are closed (the caller put them in doubt).
        Units deciding, printed or awaiting a confirm stay for the caller to settle."""
        for u in list(self._by_seq.values()):
            u.decided_no = u.early_no = None
            u.before_start = None
            if u.state is UnitState.GOOD_AWAITING_GATE:
                u.state, u.good_no = UnitState.CLOSED, None
            self._settle(u)

    def close_all(self, state: UnitState) -> list[TrackedUnit]:
        """Close every unit in `state` (map order); the units closed."""
        out = self.in_state(state)
        for u in out:
            self.closed(u)
        return out


@dataclass
class StationCounters:
    printed: int = 0
    read: int = 0
    good: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    reject_confirmed: int = 0
    failsafe_rejects: int = 0
    print_failures: int = 0
    production_units: int = 0
    challenge_units: int = 0
    #: RFID tag outcomes reported by the printer: ok / void / mismatch / no_answer
    tags: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "printed": self.printed,
            "read": self.read,
            "good": self.good,
            "rejected": dict(self.rejected),
            "rejected_total": sum(self.rejected.values()),
            "reject_confirmed": self.reject_confirmed,
            "failsafe_rejects": self.failsafe_rejects,
            "print_failures": self.print_failures,
            "production_units": self.production_units,
            "challenge_units": self.challenge_units,
            "tags": dict(self.tags),
        }


class PrintVerifyRuntime(Station):
    def __init__(self, cfg: PrintVerifyConfig, line: LinePort, printer: Printer, reader: CodeReader | None, plc: Plc) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.line = line
        self.printer = printer
        self.reader = reader
        self.plc = plc
        self.rules = cfg.rules
        self.log = log.bind(station=cfg.name)
        self.ring_slots = self._ring_slots()
        self.mode = "idle"  # idle | challenge | production
        self.batch: BatchContext | None = None
        self.counters = StationCounters()
        self.latency = LatencyHistogram()
        self._job_counter = 0
        self._serials: deque[str] = deque()
        self._on_printer: OrderedDict[int, Job] = OrderedDict()
        #: every unit number this station tracks, printed to settled, one record each (UnitTracker)
        self._tracker = UnitTracker(TrackingBounds.for_ring(self.ring_slots))
        self._max_printed_seq = 0
        self._last_read_seq = 0
        self._ring_seen: list[int] | None = None
        self._consecutive_rejects = 0
        self._consecutive_noreads = 0
        self._space = asyncio.Event()
        self._refill = asyncio.Event()
        self._confirm_arrived = asyncio.Event()
        self._tag_arrived = asyncio.Event()
        #: RFID jobs placed on a unit before their own confirmation (a newer job's came first), by job number
        self._placed: OrderedDict[int, Job] = OrderedDict()
        #: unit seq -> its tag's outcome status, the last TAG_LOG units (the VOID-run rule)
        self._tag_log: OrderedDict[int, str] = OrderedDict()
        self._challenge_kinds: list[str] = []
        self._challenge_index = 0
        self._challenge_results: list[dict[str, Any]] = []
        self._challenge_seen: set[tuple[str, str]] = set()
        self._jobs_issued = 0
        self._stopping_feed = False
        self._last_read_at = line.clock.monotonic()
        self._unread_since: float | None = None  # first print confirmed after the last read (reader silence clock)
        self._printer_unknown = True  # the printer may hold jobs we did not send (daemon restart): clear first
        self._feed_lock = asyncio.Lock()  # a group of jobs being handed to the printer (see _feeder, drain)
        # PLC epochs (a PLC restart starts a new sequence space; see _check_reject_ring)
        self.plc_epoch = 0  # linectl's count of epochs seen on this PLC, persisted in the store
        self._epoch_tag: int | None = None  # the PLC's own boot counter (tag plc_epoch), when mapped
        self._trigger_seen: int | None = None
        self._gated_seen: int | None = None  # units the gate had decided in this epoch, last poll
        self._plc_counts: dict[str, int | None] = {}  # pack counters of the last poll
        self._plc_state_saved: tuple[Any, ...] | None = None
        self._plc_state_saved_at = 0.0
        self._counted_mode = "idle"  # mode at the last PLC counter snapshot of the batch
        self._plc_was_down = False
        #: unit numbers of an earlier epoch still on the belt -> True when the new epoch will number units so too
        self._stale: dict[int, bool] = {}
        self._epoch_changes = 0  # new epochs seen since this daemon started
        #: units of an earlier epoch the gate decided after the counters were reset (cold restart with units on the
        #: belt): the gate counters of this epoch include them, so this epoch's own units gated = gated - carried.
        #: Kept across warm restarts (counters continue) and daemon restarts (plc_epochs.carried).
        self._carried = 0
        #: reject-ring slot -> unit number of an earlier epoch it holds (the ring at an epoch change, old units gated
        #: after it): such a value is never this epoch's unit of that number, also for a daemon restarted later
        self._foreign: dict[int, int] = {}
        #: ring slot -> (value, watch polls seen) for a value above the trigger count not yet judged (_hold_ahead_of_count)
        self._held: dict[int, tuple[int, int]] = {}
        self.fate_unknown = 0  # units marked fate_unknown by this station since start
        self._pitch_s: float | None = None  # measured seconds per unit (see _measure_pace)
        self._printer_down_since: float | None = None  # printer health DISCONNECTED since (link grace)
        self._pace_last: tuple[int, float] | None = None

    # ------------------------------------------------------------------ setup

    def _ring_slots(self) -> int:
        tags = getattr(self.plc.config, "tags", {}) or {}
        spec = tags.get("verdict_ring")
        count = getattr(spec, "count", None) if spec is not None else None
        if not count or count < 4 or count % 2:
            raise ValueError(f"PLC {self.plc.name}: tag verdict_ring must be an array of 2*R elements")
        return int(count) // 2

    def tasks(self) -> dict[str, TaskFactory]:
        out: dict[str, TaskFactory] = {
            f"{self.name}.feeder": self._feeder,
            f"{self.name}.allocator": self._allocator,
            f"{self.name}.confirms": self._confirms,
            f"{self.name}.watch": self._watch,
        }
        if self.reader is not None:
            out[f"{self.name}.reads"] = self._reads
        return out

    def line_plcs(self) -> list[Plc]:
        return [self.plc]

    @property
    def runs_challenge(self) -> bool:
        """The challenge packs test the code reading: a station without a reader (carrier rfid) has none to run."""
        return self.reader is not None

    def _reads_codes(self) -> bool:
        """The batch's units are verified by reading their printed code (carrier datamatrix or both)."""
        return self.reader is not None and (self.batch is None or self.batch.product.datamatrix_carrier)

    @property
    def in_challenge(self) -> bool:
        return self.mode == "challenge"

    def halt(self) -> None:
        if self.mode == "production":
            self.mode = "idle"

    def drain_timeout_s(self) -> float:
        """Units on the belt need at least the confirm wait (which follows the pace) to reach the gate."""
        return max(self.rules.drain_timeout_s, self.confirm_timeout_s())

    def serials_held(self) -> set[str]:
        return {j.serial for j in self.jobs_in_memory()}

    def unit_tally(self) -> tuple[int, int]:
        return (self.counters.good, sum(self.counters.rejected.values()))

    # ------------------------------------------------------------------ modes

    def begin_challenge(self, batch: BatchContext, kinds: list[str]) -> None:
        self.batch = batch
        self._challenge_kinds = list(kinds)
        self._challenge_index = 0
        self._challenge_results = []
        self.mode = "challenge"
        self.log.info("challenge_started", kinds=kinds)

    def begin_production(self, batch: BatchContext) -> None:
        self.batch = batch
        if self._trigger_seen is not None and self._trigger_seen > self._max_printed_seq:
            # the infeed is closed: the next unit is the PLC's next trigger. A printer without a product counter
            # (ZPL) has its prints numbered from here (challenge packs and blanks took numbers meanwhile)
            self._max_printed_seq = self._trigger_seen
        self.mode = "production"
        self._stopping_feed = False
        self._consecutive_rejects = 0
        self._consecutive_noreads = 0
        self._unread_since = None
        self._space.set()

    async def primed(self, timeout_s: float = 3.0) -> bool:
        """Wait until the printer holds its queue of codes, so the first trigger does not find it empty.

        Counts jobs the printer acknowledged, not jobs handed to the driver: a printer that takes its codes too
        slowly is not primed, and the line must not feed product it cannot print on."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            held = sum(1 for j in self._on_printer.values() if j.acked)
            want = min(self.queue_target(), max(0, self.remaining_to_issue() + len(self._on_printer)))
            if held >= want:
                return True
            await asyncio.sleep(0.005)
        return False

    def queue_target(self) -> int:
        """Codes to keep on the printer ahead of the trigger.

        With printer_queue_s: that much line time at the faster of the nominal and the measured pace, bounded
        by printer_queue_depth; so one config rides through the same stall at 300 or 6,000 units/min."""
        if self.cfg.printer_queue_s is None:
            return self.cfg.printer_queue_depth
        rate = self.cfg.rate_upm or 0.0
        if self._pitch_s:
            rate = max(rate, 60.0 / self._pitch_s)
        return min(self.cfg.queue_bound, queue_depth_for(self.cfg.printer_queue_s, rate))

    def confirm_timeout_s(self) -> float:
        """How long a reject order waits for the gate's confirm: the configured floor, or 1.5x the time
        read_to_gate_units take at the slower of the nominal and the measured pace (the line may run slower
        than nominal: 300 units/min take twice as long to the gate as 600)."""
        floor = self.rules.reject_confirm_timeout_s
        n = self.rules.read_to_gate_units
        if n is None:
            return floor
        pitch = max(self._pitch_s or 0.0, 60.0 / self.cfg.rate_upm if self.cfg.rate_upm else 0.0)
        return max(floor, CONFIRM_MARGIN * n * pitch)

    def _link_drop(self, exc: DeviceError) -> bool:
        """A send failed because the link dropped (no NAK, no printer fault, no timeout), and a grace is configured."""
        return self.rules.link_grace_s > 0 and exc.code is None and _link_reason(self.printer.health.reason or exc.reason)

    def _within_link_grace(self, now: float) -> bool:
        """The printer is away for a link reason, for less than link_grace_s and less than its queued codes last."""
        if self.rules.link_grace_s <= 0 or self._printer_down_since is None:
            return False
        if not _link_reason(self.printer.health.reason):
            return False  # a stop fault of the printer itself (head, ink, paper): it prints nothing, stop now
        pitch = self._pitch_s or (60.0 / self.cfg.rate_upm if self.cfg.rate_upm else 0.0)
        covered = sum(1 for j in self._on_printer.values() if j.acked) * pitch
        return now - self._printer_down_since < min(self.rules.link_grace_s, covered)

    def _measure_pace(self, seq: int | None, at: float) -> None:
        """Seconds per unit from consecutive reads (EWMA); gaps (a stopped infeed) are not pace."""
        last = self._pace_last
        if seq is None:
            return
        self._pace_last = (seq, at)
        if last is None or seq <= last[0] or seq - last[0] > 4:
            return
        sample = (at - last[1]) / (seq - last[0])
        if sample <= 0 or sample > 10.0:
            return
        self._pitch_s = sample if self._pitch_s is None else 0.8 * self._pitch_s + 0.2 * sample

    def pause(self) -> None:
        self.mode = "idle"

    @property
    def in_flight(self) -> int:
        t = self._tracker
        return len(self._on_printer) + t.count(UnitState.PRINTED) + t.count(UnitState.REJECT_AWAITING_CONFIRM)

    @property
    def printed_unread(self) -> list[int]:
        """Unit numbers printed and not read yet, in print order."""
        return [u.seq for u in self._tracker.printed()]

    @property
    def rejects_unconfirmed(self) -> list[int]:
        """Unit numbers whose reject was ordered and not confirmed yet."""
        return [u.seq for u in self._tracker.awaiting_confirm()]

    # (tests/engine_helpers.py and tests/test_engine_e2e.py read the names of the containers these replaced)
    _units = printed_unread
    _pending_rejects = rejects_unconfirmed

    def remaining_to_issue(self) -> int:
        if self.batch is None:
            return 0
        t = self._tracker
        # a unit whose verdict is being recorded may become good: counted as on its way until its verdict is counted
        need = self.batch.planned_qty - self.batch.good_total() - len(self._on_printer) - t.count(UnitState.PRINTED) - t.issue_holds()
        return max(0, need)

    # ------------------------------------------------------------------ feeder

    async def _feeder(self) -> None:
        """Keep the printer's queue filled ahead of the trigger (coders need the data before the product)."""
        while True:
            if self.mode != "production" or self.batch is None or len(self._on_printer) >= self.queue_target():
                self._space.clear()
                try:
                    await asyncio.wait_for(self._space.wait(), 0.05)
                except TimeoutError:
                    pass
                continue
            if self.remaining_to_issue() > 0 and self.line.infeed_stopped:
                await self.line.set_infeed(self.name, True)  # a unit was rejected after the count was reached: replace it
            if self.remaining_to_issue() <= 0:
                self._space.clear()
                try:
                    await asyncio.wait_for(self._space.wait(), 0.05)
                except TimeoutError:
                    pass
                continue
            if self._printer_unknown and not self._on_printer:
                # jobs a previous run (a crash, a failed clear at stop) may have left queued carry serials that
                # were decommissioned since: they must never be printed, and their job numbers would clash
                try:
                    await self.printer.clear()
                    self._printer_unknown = False
                except DeviceError as exc:
                    await self.line.fault_stop("printer_error", f"printer {self.printer.name}: cannot clear jobs left queued: {exc.reason}", self.name)
                    await asyncio.sleep(0.1)
                    continue
            if not self._serials:
                self._refill.set()
                await asyncio.sleep(0.01)
                continue
            # One group of jobs goes from 'sent' to the printer under the lock; drain() takes it after setting
            # mode idle, so a stop never clears the printer half-way through a group (a job sent after the
            # clear would be printed later with a serial drain() had decommissioned).
            async with self._feed_lock:
                batch = self.batch
                if self.mode != "production" or batch is None:
                    continue
                n = min(self.queue_target() - len(self._on_printer), self.remaining_to_issue(), len(self._serials))
                if n <= 0:
                    continue
                if len(self._serials) - n < SERIAL_BLOCK // 2:
                    self._refill.set()
                taken = [self._serials.popleft() for _ in range(n)]
                try:
                    jobs = [self._make_job(serial, batch) for serial in taken]
                except EpcError as exc:
                    self._serials.extendleft(reversed(taken))  # never sent: still the batch's, returned or voided at close
                    await self.line.fault_stop("rfid_epc_error", f"cannot encode the RFID tag of a serial: {exc}", self.name)
                    continue
                # durable 'sent' before the printer sees a single byte of them
                await self.line.store.mark_sent(batch.gtin, batch.lot, [j.serial for j in jobs])
                for j in jobs:
                    self._on_printer[j.job_seq] = j
                for idx, j in enumerate(jobs):
                    try:
                        await self.printer.send(
                            PrintJob(
                                seq=j.job_seq,
                                element_string=j.code.element_string,
                                hri=j.code.hri,
                                fields={"lot": batch.lot, "expiry": batch.expiry, "gtin": batch.gtin, "serial": j.serial, **batch.dates},
                                epc_hex=None if j.epc is None else j.epc.epc_hex,
                            )
                        )
                        j.acked = True
                        self._jobs_issued += 1
                    except DeviceError as exc:
                        # NAK or no answer: the printer may or may not hold it; never reuse the serial
                        failed = [x for x in jobs[idx:] if x.job_seq in self._on_printer]
                        for x in failed:
                            self._on_printer.pop(x.job_seq, None)
                            self.counters.print_failures += 1
                            await self._decommission(x, RejectReason.PRINT_FAILED, f"printer {self.printer.name}: {exc.reason}", seq=None)
                        if self._link_drop(exc):
                            # the link dropped (the driver reconnects): ride through on the codes the printer holds;
                            # _check_timeouts stops the line if it stays away longer than the grace
                            self._printer_unknown = True  # jobs it may hold from this group are cleared before reuse
                            self.log.warning("printer_link_drop", reason=exc.reason, queued=len(self._on_printer))
                            await asyncio.sleep(0.05)
                        else:
                            await self.line.fault_stop("printer_error", f"printer {self.printer.name}: {exc.reason}", self.name)
                        break

    def _make_job(self, serial: str, batch: BatchContext) -> Job:
        """One job: its code, and for an RFID product the EPC its tag gets (EpcError when the scheme cannot hold it)."""
        epc = batch.product.epc(batch.gtin, serial) if batch.product.rfid_carrier else None
        self._job_counter += 1
        code, exp = batch.unit_code(serial)
        return Job(self._job_counter, serial, code, exp, time.monotonic(), epc=epc)

    async def _allocator(self) -> None:
        """Keep a block of allocated serials in hand, so the feeder never waits on the store mid-run."""
        while True:
            try:
                await asyncio.wait_for(self._refill.wait(), 0.1)
            except TimeoutError:
                pass
            self._refill.clear()
            batch = self.batch
            if self.mode != "production" or batch is None:
                continue
            want = min(SERIAL_BLOCK, self.remaining_to_issue() + self.queue_target()) - len(self._serials)
            if len(self._serials) >= SERIAL_BLOCK // 2 or want <= 0:
                continue
            serials = await self.line.store.allocate(batch.gtin, batch.lot, want, batch.product.serials)
            if not serials:
                await self.line.fault_stop("no_serials", f"no serial available for GTIN {batch.gtin}", self.name)
                continue
            if self.batch is batch:
                self._serials.extend(serials)
            self.line.check_pool(batch.product)

    # ------------------------------------------------------------------ print confirmations

    async def _confirms(self) -> None:
        async for c in self.printer.confirmations():
            now = self.line.clock.monotonic()
            job = self._on_printer.pop(c.seq, None)
            if job is None:
                placed = self._placed.pop(c.seq, None)
                if placed is not None:
                    await self._tag_outcome(placed, TagOutcome.of(c))  # its label was placed when a newer one's came
                else:
                    self.log.warning("unknown_print_confirm", job=c.seq)
                continue
            # jobs queued before this one and not confirmed were skipped by the printer; but an RFID label printer
            # reports a VOID or a wrong tag at once and an ok tag only once its format left: an older RFID job without
            # its confirmation was printed, on the unit before (formats print in order), its outcome still to come
            for older in [k for k in self._on_printer if k < c.seq]:
                skipped = self._on_printer.pop(older)
                if skipped.epc is not None and job.epc is not None:
                    await self._place(skipped, None, now)
                    self._placed[skipped.job_seq] = skipped
                    while len(self._placed) > 4 * self.ring_slots:
                        self._placed.popitem(last=False)  # its unit is decided (gate fail-safe) or gone long since
                    continue
                await self._decommission(skipped, RejectReason.PRINT_FAILED, "printer skipped the job", seq=None)
            await self._place(job, c.product_count, now)
            if job.epc is not None:
                await self._tag_outcome(job, TagOutcome.of(c))
            if self.mode == "production" and not self._on_printer and self.remaining_to_issue() == 0:
                # the last code the batch needs is on a unit: stop the infeed so no unprinted pack follows it
                await self.line.set_infeed(self.name, False)

    async def _place(self, job: Job, product_count: int | None, now: float) -> None:
        """The printer put `job` on a unit: its product count, or the unit after the last printed one."""
        unit_seq = product_count if product_count is not None else self._max_printed_seq + 1
        job.unit_seq = unit_seq
        if self._tracker.print_confirmed(unit_seq, job, now) is None:
            # a late confirm for a unit already being decided or decided (read before its print confirm came):
            # the job is on that unit, which never gets a good verdict for it; its serial goes
            self.log.warning("print_confirm_for_decided_unit", job=job.job_seq, seq=unit_seq)
            await self._decommission(
                job, RejectReason.MISSING_UNIT, f"printed on unit {unit_seq}, already decided without its print confirmation", seq=unit_seq
            )
        elif self._unread_since is None and self._reads_codes():
            self._unread_since = now
        if self.reader is None:
            self._measure_pace(unit_seq, now)  # no reads to measure the pace by: the prints are one per unit
        self._max_printed_seq = max(self._max_printed_seq, unit_seq)
        self.counters.printed += 1
        self._confirm_arrived.set()
        self._space.set()

    # ------------------------------------------------------------------ RFID tag outcomes

    async def _tag_outcome(self, job: Job, tag: TagOutcome) -> None:
        """The printer's outcome for `job`'s tag: decide its unit when that is due, apply the VOID-run rule."""
        job.tag = tag
        self._placed.pop(job.job_seq, None)
        self.counters.tags[tag.status] = self.counters.tags.get(tag.status, 0) + 1
        self._tag_arrived.set()
        seq = job.unit_seq
        if seq is None:
            return
        self._tag_log[seq] = tag.status
        while len(self._tag_log) > TAG_LOG:
            self._tag_log.popitem(last=False)
        unit = self._tracker.get(seq)
        if unit is not None and unit.job is job and unit.state is UnitState.PRINTED:
            if tag.status != "ok":
                await self._decide_now(unit, self._tag_verdict(job))  # known bad: no need to wait for its read
            elif not self._reads_codes():
                await self._decide_now(unit, None)  # carrier rfid: the tag's read-back is the verification
        elif unit is None or unit.job is not job:
            self.log.info("tag_outcome_after_decision", job=job.job_seq, seq=seq, status=tag.status)
        if tag.status == "ok":
            # a later label confirmed ok: an older one still without its outcome will never get one in time
            for u in [u for u in self._tracker.printed() if u.seq < seq and u.job is not None and u.job.epc is not None and u.job.tag is None]:
                why = f"no verification of this label's tag from the printer, which confirmed a later label (unit {seq})"
                await self._decide_now(u, Verdict(False, RejectReason.RFID_NO_ANSWER, why))
        elif tag.status == "void":
            await self._void_run(seq)

    def _tag_verdict(self, job: Job) -> Verdict | None:
        """The reject verdict of a unit whose tag is not verified as the serial's EPC; None when it is (or no tag)."""
        tag = job.tag
        if job.epc is None or (tag is not None and tag.status == "ok"):
            return None
        if tag is None:
            return Verdict(False, RejectReason.RFID_NO_ANSWER, "no verification of the tag from the printer when the unit was decided")
        reason = TAG_REJECTS.get(tag.status, RejectReason.RFID_NO_ANSWER)
        detail = tag.reason or f"RFID tag {tag.status}"
        if tag.void_labels and tag.status != "void":
            detail += f"; {tag.void_labels} VOID label(s) before it"
        seen_gtin = seen_serial = None
        if tag.status == "mismatch" and tag.epc_read:
            other = read_back_epc(tag.epc_read)
            if isinstance(other, EpcValue):
                seen_gtin, seen_serial = other.gtin, other.serial  # (None for an SSCC: the EPC is still recorded)
                detail += f" ({other.pure_uri})"
            else:
                detail += f" (not a GS1 EPC: {other})"
        return Verdict(False, reason, detail, seen_gtin=seen_gtin, seen_serial=seen_serial)

    async def _decide_now(self, unit: TrackedUnit, v: Verdict | None) -> None:
        """Decide a printed unit without its read: rejected by its tag's outcome, or good by it (carrier rfid)."""
        taken = self._tracker.take_printed(unit.seq, holds_issue=True)
        if taken is None or taken.job is None:
            return  # the read loop (or the gate) has it
        job = taken.job
        at = time.monotonic()
        self.counters.production_units += 1
        try:
            if v is None and self.plc.health.state == HealthState.DISCONNECTED:
                v = Verdict(False, RejectReason.PLC_FAILSAFE, f"PLC {self.plc.name} unreachable: the good verdict cannot reach the gate")
            if v is None:
                await self._accept(taken, job, Verdict.ok(None), at)
            else:
                await self._reject(taken, v, at)
        except DeviceError as exc:
            await self.line.fault_stop("plc_write_failed", f"PLC {self.plc.name}: {exc.reason}", self.name)
        finally:
            self._tracker.decision_done(taken)

    async def _void_run(self, seq: int) -> None:
        """Units in a row (by unit seq, up to `seq`) whose tag the printer VOIDed: the line stops at rfid_void_limit."""
        n = 0
        while self._tag_log.get(seq - n) == "void":
            n += 1
        limit = self.rules.rfid_void_limit
        if n >= limit and self.mode == "production":
            await self.line.fault_stop(
                "rfid_void_run",
                f"{n} labels in a row VOIDed by printer {self.printer.name} (rules.rfid_void_limit {limit}): check the RFID inlays and the encoder",
                self.name,
            )

    # ------------------------------------------------------------------ reads

    async def _reads(self) -> None:
        assert self.reader is not None  # the task runs only with a reader (tasks())
        async for r in self.reader.reads():
            if self.mode == "production" and not self._reads_codes():
                self.counters.read += 1  # carrier rfid: the tag's read-back decides, the printed code is not used
                continue
            self._last_read_at = self.line.clock.monotonic()
            self._measure_pace(r.seq, r.received_at)
            self._unread_since = None
            try:
                await self._handle_read(r)
            except DeviceError as exc:
                await self.line.fault_stop("plc_write_failed", f"PLC {self.plc.name}: {exc.reason}", self.name)

    async def _handle_read(self, r: Read) -> None:
        self.counters.read += 1
        t = self._tracker
        seq = r.seq
        if seq is None:
            first = t.first_printed()
            seq = first.seq if first is not None else self._last_read_seq + 1
        if self._stale_read(seq):
            self.log.warning("read_of_earlier_epoch", seq=seq, epoch=self.plc_epoch)
            return
        if t.remembered(seq):
            known = t.get(seq)
            if known is not None and known.reject_reason in RFID_REASONS:
                self.log.debug("read_of_unit_rejected_by_its_tag", seq=seq, reason=known.reject_reason)
            else:
                self.log.warning("second_read_for_unit", seq=seq)
            return
        self._last_read_seq = max(self._last_read_seq, seq)
        if self.mode == "challenge" and not t.is_printed(seq):
            await self._handle_challenge(seq, r)
            return
        if not t.is_printed(seq) and seq > self._max_printed_seq and self._on_printer:
            # the print confirmation may still be on its way; wait a little, not for ever
            # (with no job on the printer nothing can be printed on this unit: no wait, or a printer that
            # prints nothing would put the read loop 0.25 s behind per unit)
            deadline = time.monotonic() + 0.25
            # (a later unit already printed means this one never will be: the printer reports in order)
            while not t.is_printed(seq) and self._max_printed_seq < seq and time.monotonic() < deadline:
                self._confirm_arrived.clear()
                try:
                    await asyncio.wait_for(self._confirm_arrived.wait(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    break
        # units printed before this one that were never read: the reader missed them (always rejects: they hold
        # no issue; one the gate took meanwhile is no longer printed and is skipped)
        for older in [u.seq for u in t.printed() if u.seq < seq]:
            missed = t.take_printed(older, holds_issue=False)
            if missed is not None:
                try:
                    await self._reject(missed, Verdict(False, RejectReason.MISSING_UNIT, "printed but never read"), r.received_at, count_latency=False)
                finally:
                    t.decision_done(missed)
        unit = t.take_printed(seq, holds_issue=True)  # until good/decommissioned is counted, so the feeder does not over-issue
        self.counters.production_units += 1
        if unit is None:
            job = self._job_on_printer(r)
            if job is not None:
                # printed, but its print confirmation was lost (printer link reset): the read names the job.
                # Tracking was not confirmed, so reject it, and record that this serial is on this unit.
                v = Verdict(False, RejectReason.UNEXPECTED_UNIT, f"job {job.job_seq} printed on unit {seq} without a print confirmation")
            else:
                seen = classify_unknown(
                    r.codes, min_grade=self._min_grade(), is_known_serial=self._is_known, require_gs1=self.rules.require_gs1, allow_dmre=self._allow_dmre()
                )
                v = Verdict(False, RejectReason.UNEXPECTED_UNIT, f"no code was printed for unit {seq}; read: {seen.detail}")
            unexpected = t.deciding(seq, job)
            try:
                await self._reject(unexpected, v, r.received_at)
            finally:
                t.decision_done(unexpected)
            return
        try:
            await self._decide_printed(unit, r)
        finally:
            t.decision_done(unit)

    async def _decide_printed(self, unit: TrackedUnit, r: Read) -> None:
        """Verify a printed unit's read against its job, then commission or reject it."""
        assert unit.job is not None  # a printed unit carries its job
        v = verify_unit(
            unit.job.expected,
            r.codes,
            min_grade=self._min_grade(),
            require_gs1=self.rules.require_gs1,
            check_grade=self.rules.check_grade,
            allow_dmre=self._allow_dmre(),
            is_known_serial=self._is_known,
        )
        job = unit.job
        if job.epc is not None:
            if v.good and job.tag is None:
                await self._await_tag(job)
            tag_v = self._tag_verdict(job)
            if tag_v is not None and (v.good or job.tag is not None):
                v = tag_v  # the tag's outcome is the more specific reason (a VOID label reads as nothing at all)
        if v.good and self.plc.health.state == HealthState.DISCONNECTED:
            # the gate will reject it fail-safe whatever we decide: do not commission a unit that cannot leave
            v = Verdict(False, RejectReason.PLC_FAILSAFE, f"PLC {self.plc.name} unreachable: the good verdict cannot reach the gate", grade=v.grade)
        if v.good:
            await self._accept(unit, job, v, r.received_at)
        else:
            await self._reject(unit, v, r.received_at)

    async def _await_tag(self, job: Job) -> None:
        """A good read of a unit whose tag's outcome is not in yet (the printer reports ok once ~HS saw the format
        leave): wait for it a little, never long (the read loop waits meanwhile)."""
        deadline = time.monotonic() + TAG_WAIT_S
        while job.tag is None and time.monotonic() < deadline:
            self._tag_arrived.clear()
            try:
                await asyncio.wait_for(self._tag_arrived.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break

    def _job_on_printer(self, r: Read) -> Job | None:
        """The job on the printer whose serial this read shows (its print confirmation never arrived), if any."""
        if not self._on_printer or not r.codes or not r.codes[0].data:
            return None
        try:
            p = gs1.parse(r.codes[0].data)
        except gs1.GS1Error:
            return None
        for k, job in self._on_printer.items():
            if job.serial == p.serial and job.expected.gtin == p.gtin:
                return self._on_printer.pop(k)
        return None

    def _min_grade(self) -> float:
        return self.batch.product.min_grade if self.batch else 1.5

    def _allow_dmre(self) -> bool:
        return self.batch.product.allow_dmre if self.batch else False

    def _is_known(self, gtin: str, serial: str) -> bool:
        rec = self.line.store.serial(gtin, serial)
        return rec is not None and rec.state in ("sent", "commissioned", "decommissioned")

    async def _accept(self, unit: TrackedUnit, job: Job, v: Verdict, received_at: float) -> None:
        batch = self.batch
        assert batch is not None
        seq = unit.seq
        ev = UnitCommissioned(
            gtin=batch.gtin, serial=job.serial, lot=batch.lot, expiry=batch.expiry, dates=batch.dates or None, seq=seq, grade=v.grade, station=self.name
        )
        epoch = self._epoch_changes
        await self.line.store.append(ev)  # durable before the PLC hears "good"
        if epoch != self._epoch_changes:
            # the PLC restarted while the commissioning was being stored: this unit belongs to the closed epoch,
            # no verdict goes out for it (the gate rejects it fail-safe) and nothing in the new ring can prove it
            self._tracker.closed(unit)
            await self._epoch_closed_late(seq, job)
            return
        # Booked as good before the write: if the write fails (or is late) the gate rejects the unit fail-safe,
        # and the reject ring check finds it GOOD_AWAITING_GATE and decommissions its serial.
        self._tracker.remember(unit)
        self._tracker.good(unit)
        self.counters.good += 1
        self.line.count_units(batch.lot, good=1)
        self._consecutive_rejects = 0
        self._consecutive_noreads = 0
        self.line.unit_decided(self.name, True)
        if self._tracker.take_early_reject(unit):
            # the gate rejected it (fail-safe) while its commissioning was being stored
            self._tracker.gate_rejected(unit)
            await self._rejected_after_good(seq, job)
            return
        await self.plc.write_tag("verdict_ring", [seq, VERDICT_GOOD], index=2 * (seq % self.ring_slots))
        self.latency.add((time.monotonic() - received_at) * 1000.0)
        if batch.good_total() >= batch.planned_qty and not self._on_printer and self._tracker.first_printed() is None:
            await self.line.planned_quantity_reached(self.name)

    async def _reject(self, unit: TrackedUnit, v: Verdict, received_at: float, *, count_latency: bool = True) -> None:
        """Reject `unit` (DECIDING): the order, the wait for its confirm, its serial decommissioned, the stop rules."""
        assert v.reason is not None
        seq, job = unit.seq, unit.job
        # the reject order first: it is the safety-relevant write
        write_error: DeviceError | None = None
        try:
            await self.plc.write_tag("verdict_ring", [seq, VERDICT_REJECT], index=2 * (seq % self.ring_slots))
        except DeviceError as exc:
            write_error = exc  # the gate rejects a unit without a good verdict anyway: book the reject, then report
        if count_latency:
            self.latency.add((time.monotonic() - received_at) * 1000.0)
        self._tracker.remember(unit)
        await self._await_confirm(unit, v.reason.value)
        self.counters.rejected[v.reason.value] = self.counters.rejected.get(v.reason.value, 0) + 1
        if job is not None:
            read_epc = None
            if v.reason is RejectReason.RFID_MISMATCH and job.tag is not None and job.tag.epc_read:
                other = read_back_epc(job.tag.epc_read)
                read_epc = other.epc_hex if isinstance(other, EpcValue) else job.tag.epc_read
            await self._decommission(job, v.reason, v.detail, seq=seq, read=(v.seen_gtin, v.seen_serial), read_epc=read_epc)
        elif self.batch is not None:
            await self.line.store.count_packs(self.batch.lot, "blank")  # a pack with none of the batch's serials on it
        self.line.unit_decided(self.name, False, v.reason.value)
        if write_error is not None:
            raise write_error
        self._consecutive_rejects += 1
        self._consecutive_noreads = self._consecutive_noreads + 1 if v.reason == RejectReason.NO_READ else 0
        if self.mode != "production":
            return  # stop rules guard production; units drained after a stop are rejected anyway
        if self._consecutive_noreads >= self.rules.no_read_limit:
            await self.line.fault_stop("no_read_limit", f"{self._consecutive_noreads} consecutive no-reads (limit {self.rules.no_read_limit})", self.name)
        elif self._consecutive_rejects >= self.rules.consecutive_reject_limit:
            await self.line.fault_stop(
                "consecutive_rejects",
                f"{self._consecutive_rejects} consecutive rejects (limit {self.rules.consecutive_reject_limit}), last: {v.reason.value}",
                self.name,
            )

    async def _decommission(
        self, job: Job, reason: RejectReason, detail: str, *, seq: int | None, read: tuple[str | None, str | None] = (None, None), read_epc: str | None = None
    ) -> None:
        batch = self.batch
        assert batch is not None
        read_gtin, read_serial = read
        if read_serial is None or (read_gtin or batch.gtin, read_serial) == (batch.gtin, job.serial):
            read_gtin = read_serial = None  # the unit carried its own code (or none): no copy of another serial
        # may wait in memory while the store refuses writes (Line.record): a stop must finish without the store
        await self.line.record(
            UnitDecommissioned(
                gtin=batch.gtin,
                serial=job.serial,
                lot=batch.lot,
                reason=reason,
                detail=detail[:500],
                seq=seq,
                station=self.name,
                read_gtin=read_gtin,
                read_serial=read_serial,
                read_epc=read_epc,
            )
        )
        self.line.count_units(batch.lot, decommissioned=1)
        self._space.set()

    # ------------------------------------------------------------------ challenge

    async def _handle_challenge(self, seq: int, r: Read) -> None:
        unit = self._tracker.deciding(seq, None, UnitKind.CHALLENGE)
        try:
            await self._decide_challenge(unit, r)
        finally:
            self._tracker.decision_done(unit)

    async def _decide_challenge(self, unit: TrackedUnit, r: Read) -> None:
        seq = unit.seq
        self.counters.challenge_units += 1
        v = classify_unknown(
            r.codes, min_grade=self._min_grade(), is_known_serial=self._challenge_known, require_gs1=self.rules.require_gs1, allow_dmre=self._allow_dmre()
        )
        if r.codes and r.codes[0].data:
            try:
                p = gs1.parse(r.codes[0].data)
                if p.gtin and p.serial:
                    self._challenge_seen.add((p.gtin, p.serial))
            except gs1.GS1Error:
                pass
        await self.plc.write_tag("verdict_ring", [seq, VERDICT_REJECT], index=2 * (seq % self.ring_slots))
        self.line.unit_decided(self.name, False, "challenge")  # the state's batch.challenge.units and the rate window
        self._tracker.remember(unit)
        kind = self._challenge_kinds[self._challenge_index] if self._challenge_index < len(self._challenge_kinds) else "extra"
        self._challenge_index += 1
        await self._await_confirm(unit, "challenge", ChallengeUnit(kind, v))

    async def _await_confirm(self, unit: TrackedUnit, reason: str, challenge: ChallengeUnit | None = None) -> None:
        """A reject was ordered: expect the gate's confirm, unless the gate already rejected the unit (verdict late)."""
        if self._tracker.take_early_reject(unit):
            unit.challenge = challenge
            self._tracker.reject_confirmed(unit)
            self.counters.reject_confirmed += 1
            if challenge is not None:
                await self._challenge_confirmed(unit.seq, challenge, True)
            return
        self._tracker.reject_ordered(unit, reason, challenge, self.line.clock.monotonic())

    def _challenge_known(self, gtin: str, serial: str) -> bool:
        return (gtin, serial) in self._challenge_seen or self._is_known(gtin, serial)

    async def _challenge_confirmed(self, seq: int, unit: ChallengeUnit, confirmed: bool) -> None:
        kind, v = unit.kind, unit.verdict
        expected = CHALLENGE_EXPECTED_REASON.get(kind)
        ok = confirmed and expected is not None and v.reason == expected
        res = {"seq": seq, "challenge": kind, "rejected": confirmed, "reason_seen": v.reason.value if v.reason else None, "passed": ok}
        self._challenge_results.append(res)
        await self.line.record(
            ChallengeResult(
                lot=self.batch.lot if self.batch else None, station=self.name, challenge=kind, rejected=confirmed, reason_seen=res["reason_seen"], seq=seq
            )
        )
        if len(self._challenge_results) >= len(self._challenge_kinds):
            passed = all(x["passed"] for x in self._challenge_results)
            self.mode = "idle"
            self._challenge_seen = set()
            await self.line.challenge_finished(self.name, passed, list(self._challenge_results))

    # ------------------------------------------------------------------ watch: reject confirmations, silence

    async def _watch(self) -> None:
        cfg = self.plc.config
        interval = max(0.005, cfg.poll_interval_s if isinstance(cfg, PlcConfigBase) else 0.02)
        while True:
            await asyncio.sleep(interval)
            if self.plc.health.state == HealthState.DISCONNECTED:
                self._plc_was_down = True
            await self._check_reject_ring()
            await self._check_timeouts()
            if self._ring_seen is not None:
                await self._save_plc_state()
                if self.mode != self._counted_mode:
                    if self._counted_mode == "idle":
                        await self._snapshot_counters("start")
                    self._counted_mode = self.mode if self.mode != "idle" else self._counted_mode

    async def _check_reject_ring(self) -> None:
        latest = self.plc.latest()
        ring = latest.get("reject_ring")
        if not ring:
            return
        ring = list(ring)
        if self._ring_seen is None:
            await self._first_ring(ring, latest)
            return
        why = self._epoch_change(ring, latest)
        if why is not None:
            await self._new_epoch(why, ring, latest)
            return
        self._note_counters(latest)
        tc = self._trigger_seen
        ring = self._hold_ahead_of_count(ring, tc)
        changed = [v for i, v in enumerate(ring) if v != self._ring_seen[i] and v]
        if self._note_foreign(ring, tc):
            await self._save_plc_state(force=True)  # before a crash can make a restarted daemon match it to a unit
        self._ring_seen = ring
        for seq in sorted(changed):
            if tc is not None and seq > tc:
                # a unit number this epoch has not reached: a unit of an earlier epoch gated after a restart
                # (its fate is already on record as unknown or decided); never matched to a unit of this epoch
                self.log.warning("reject_of_earlier_epoch", seq=seq, trigger_count=tc, epoch=self.plc_epoch)
                continue
            t = self._tracker
            unit = t.get(seq)
            state = unit.state if unit is not None else UnitState.UNSEEN
            if unit is not None and state is UnitState.REJECT_AWAITING_CONFIRM:
                challenge = unit.challenge
                t.reject_confirmed(unit)
                self.counters.reject_confirmed += 1
                if challenge is not None:
                    await self._challenge_confirmed(seq, challenge, True)
                continue
            self.counters.failsafe_rejects += 1
            if unit is not None and state is UnitState.GOOD_AWAITING_GATE and unit.job is not None:
                job = unit.job
                t.gate_rejected(unit)
                await self._rejected_after_good(seq, job)
            elif unit is not None and state is UnitState.PRINTED and unit.job is not None:
                job = unit.job
                t.remember(unit)
                t.gate_rejected(unit)
                self.counters.rejected[RejectReason.PLC_FAILSAFE.value] = self.counters.rejected.get(RejectReason.PLC_FAILSAFE.value, 0) + 1
                await self._decommission(job, RejectReason.PLC_FAILSAFE, "PLC rejected the unit before any read arrived", seq=seq)
            elif unit is not None and unit.before_start is not None:
                await self._rejected_while_down(seq)
            elif unit is None or not unit.remembered:
                # a unit not (yet) known here (DECIDING counts as not known: its read is being handled): its
                # reject order will find the note
                t.note_early_reject(seq)

    # ------------------------------------------------------------------ PLC epochs

    def _epoch_change(self, ring: list[int], latest: dict[str, Any]) -> str | None:
        """Why the PLC is not in the epoch of the last poll any more (it restarted), or None.

        Evidence, strongest first: its boot counter (tag plc_epoch) changed; its
        trigger counter went backwards; a reject-ring slot went back (a ring
        only ever takes higher unit numbers, so lower or zero means reset).
        """
        tag = _int_or_none(latest.get("plc_epoch"))
        if tag is not None and self._epoch_tag is not None and tag != self._epoch_tag:
            return f"PLC boot counter plc_epoch changed from {self._epoch_tag} to {tag}"
        tc = _int_or_none(latest.get("trigger_count"))
        if tc is not None and self._trigger_seen is not None and tc < self._trigger_seen:
            return f"trigger count went back from {self._trigger_seen} to {tc}"
        assert self._ring_seen is not None
        if self._plc_was_down and self.plc.health.state != HealthState.DISCONNECTED:
            # first poll after a reconnect: without an epoch tag or trigger counter, a ring that went back is the
            # sign (live, a slot can go back legitimately: units of the old epoch gated after a restart)
            self._plc_was_down = False
            if tag is None and tc is None:
                for old, new in zip(self._ring_seen, ring):
                    if old and new < old:
                        return f"reject ring reset across a reconnect (a slot held unit {old}, now {new})"
        return None

    def _hold_ahead_of_count(self, ring: list[int], tc: int | None) -> list[int]:
        """The ring as it may be judged now: a slot showing a unit number above the trigger count is held back.

        Above the count is how a unit of an earlier epoch (gated after a PLC restart) shows; but a poll that read the
        trigger count, was stalled (the PC froze, the event loop was blocked), then read the ring, shows this epoch's
        units the same way. Judged at once, their rejects were taken for an earlier epoch's and commissioned units in
        the reject bin stayed commissioned (campaign seed 12). A held slot is judged once later polls still show it
        above the count (then it is an earlier epoch's unit) or as soon as the count has reached it.
        """
        assert self._ring_seen is not None
        held: dict[int, tuple[int, int]] = {}
        out = list(ring)
        for i, v in enumerate(ring):
            if v and v != self._ring_seen[i] and tc is not None and v > tc:
                first = self._held.get(i)
                polls = first[1] + 1 if first is not None and first[0] == v else 1
                if polls < HOLD_AHEAD_POLLS:
                    held[i] = (v, polls)
                    out[i] = self._ring_seen[i]
        self._held = held
        return out

    def _note_foreign(self, ring: list[int], tc: int | None) -> bool:
        """Track ring slots that took a unit number this epoch has not reached (an earlier epoch's unit). True if changed."""
        assert self._ring_seen is not None
        before = dict(self._foreign)
        for i, v in enumerate(ring):
            if v == self._ring_seen[i]:
                continue
            if v and tc is not None and v > tc:
                self._foreign[i] = v
            else:
                self._foreign.pop(i, None)
        return self._foreign != before

    def _counters_of(self, latest: dict[str, Any]) -> dict[str, int | None]:
        return {k: _int_or_none(latest.get(k)) for k in PLC_COUNTERS}

    @staticmethod
    def _gated(counts: dict[str, int | None]) -> int | None:
        """Units the gate has decided in this epoch: passed + pushed out (confirmed or not)."""
        rej = counts.get("gate_reject_total")
        if rej is None:
            rej = counts.get("reject_total")
        if counts.get("pass_total") is None or rej is None:
            return None
        return int(counts["pass_total"] or 0) + int(rej)

    def _note_counters(self, latest: dict[str, Any]) -> None:
        counts = self._counters_of(latest)
        self._plc_counts = counts
        tag = _int_or_none(latest.get("plc_epoch"))
        if tag is not None:
            self._epoch_tag = tag
        if counts["trigger_count"] is not None:
            self._trigger_seen = counts["trigger_count"]
        gated = self._gated(counts)
        if gated is not None:
            self._gated_seen = gated

    async def _save_plc_state(self, force: bool = False) -> None:
        """Persist the epoch and counters seen (at most twice a second): a restarted daemon compares against them."""
        state = (self.plc_epoch, self._epoch_tag, self._trigger_seen, self._gated_seen, self._carried, tuple(sorted(self._foreign.items())))
        now = time.monotonic()
        if state == self._plc_state_saved or (not force and now - self._plc_state_saved_at < 0.5):
            return
        self._plc_state_saved_at = now
        try:
            await self.line.store.save_plc_state(self.plc.name, *state[:5], dict(self._foreign))
        except StoreError as exc:
            # the watch loop confirms rejects: a failing store must not stop it (the line's stop path reports the store)
            self.log.warning("plc_state_not_saved", reason=str(exc))
            return
        self._plc_state_saved = state

    async def _snapshot_counters(self, point: str) -> None:
        """The PLC's pack counters for the batch report (start / stop of a run, the ends of a PLC epoch)."""
        b = self.batch or self.line.batch
        if b is None or all(v is None for v in self._plc_counts.values()):
            return
        try:
            await self.line.store.save_plc_counters(b.lot, self.plc.name, self.plc_epoch, point, self._plc_counts)
        except StoreError as exc:
            self.log.warning("plc_counters_not_saved", point=point, reason=str(exc))

    def _stale_read(self, seq: int) -> bool:
        """A read of a unit of an earlier PLC epoch (on the belt when the PLC restarted), not of this epoch's unit seq."""
        renumbered = self._stale.get(seq)
        if renumbered is None:
            return False
        if renumbered and (self._tracker.is_printed(seq) or (self._trigger_seen is not None and self._trigger_seen >= seq)):
            # this epoch has reached that number (a code of this epoch was printed on it, or the PLC counted it):
            # from now on it is this epoch's unit
            del self._stale[seq]
            return False
        return True

    def _own_gated(self, gated: int | None, carried: int) -> int | None:
        """How far this epoch's own unit numbers are proven through the gate (the counters also count carried units)."""
        return None if gated is None else max(0, gated - carried)

    @staticmethod
    def _carried_after(reset: bool, old_tc: int | None, own_gated: int | None, carried: int) -> int:
        """Units of the closing epoch the next epoch's counters will also count.

        A reset (cold restart) starts the counters at 0 while units triggered in
        the old epoch and not yet gated are still on the belt: the gate counts them
        in the new epoch. When the old counters are unknown the carry is unknown:
        0, the figure that leaves units in doubt rather than presumed gated.
        Without a reset the counters continue and so does the carry.
        """
        if not reset:
            return carried
        if old_tc is None or own_gated is None:
            return 0
        return max(0, int(old_tc) - own_gated)

    async def _gate_caught_up(self, deadline: float) -> None:
        """Units with a good verdict may still be between reader and gate: let the PLC count them before the snapshot."""
        while time.monotonic() < deadline and self.plc.health.state != HealthState.DISCONNECTED:
            gated, tc = self._gated(self._plc_counts), self._plc_counts.get("trigger_count")
            if gated is None or tc is None or gated >= tc + self._carried:
                return
            await asyncio.sleep(0.02)

    async def _first_ring(self, ring: list[int], latest: dict[str, Any]) -> None:
        """First poll after the daemon started: trust the reject ring only if the PLC is still in the epoch we knew."""
        self._ring_seen = ring
        self._tracker.commissioned_before_start(self._commissioned_before_start())
        st = self.line.store.plc_state(self.plc.name)
        tag = _int_or_none(latest.get("plc_epoch"))
        tc = _int_or_none(latest.get("trigger_count"))
        why: str | None = None
        foreign: dict[int, int] = {}
        if st is not None:
            self.plc_epoch = st.epoch
            self._carried = int(st.carried or 0)
            foreign = st.foreign()
            if tag is not None and st.epoch_tag is not None and tag != st.epoch_tag:
                why = f"PLC boot counter plc_epoch changed from {st.epoch_tag} to {tag} while linectl was down"
            elif tc is not None and st.trigger_count is not None and tc < st.trigger_count:
                why = f"trigger count went back from {st.trigger_count} to {tc} while linectl was down"
        else:
            self.plc_epoch = 1
        self._note_counters(latest)
        if why is None:
            # values already there at start belong to this epoch (but for the slots still holding an earlier
            # epoch's unit): a unit commissioned just before a crash whose good verdict never reached the PLC went
            # to the reject bin meanwhile: find those
            self._foreign = {i: v for i, v in foreign.items() if i < len(ring) and ring[i] == v}
            for seq in sorted({v for i, v in enumerate(ring) if v and self._foreign.get(i) != v}):
                await self._rejected_while_down(seq)
            await self._save_plc_state(force=True)
            return
        # the ring and counters belong to a new epoch: nothing in them says anything about the old units
        self.plc_epoch += 1
        self._epoch_changes += 1
        own = self._own_gated(st.gated, self._carried) if st is not None else None
        reset = st is not None and tc is not None and st.trigger_count is not None and tc < st.trigger_count
        self._carried = self._carried_after(reset, st.trigger_count if st is not None else None, own, self._carried)
        doubt = [(u.seq, *u.before_start) for u in sorted(self._tracker.before_start(), key=_by_seq) if u.before_start and (own is None or u.seq > own)]
        self._tracker.forget_before_start()
        self._foreign = {i: v for i, v in enumerate(ring) if v}  # rejects the new epoch decided before we saw it
        await self._save_plc_state(force=True)
        await self._epoch_closed(why, doubt, [], self.plc_epoch - 1)

    async def _new_epoch(self, why: str, ring: list[int], latest: dict[str, Any]) -> None:
        """The PLC restarted under us: close the old sequence space, put units in doubt on record, stop the line."""
        old_epoch = self.plc_epoch
        gated = self._gated_seen
        old_counts = dict(self._plc_counts)
        self._epoch_changes += 1  # first: a commissioning being stored right now must not send its verdict
        await self._snapshot_counters("epoch_end")  # the last counters of the old epoch
        self.plc_epoch += 1
        self._epoch_tag = None
        self._trigger_seen = None
        self._gated_seen = None
        self._ring_seen = ring  # the new epoch's baseline: never matched to units of the old one
        self._held = {}
        self._foreign = {i: v for i, v in enumerate(ring) if v}
        self._note_counters(latest)
        # where the new epoch's counters started: 0 for a counter the restart reset, else where it was (retentive);
        # units of the old epoch still on the belt are counted at the gate of the new one (carried over)
        new_counts = dict(self._plc_counts)
        self._plc_counts = {
            k: (0 if (v is not None and old_counts.get(k) is not None and v < int(old_counts[k] or 0)) else old_counts.get(k, v)) for k, v in new_counts.items()
        }
        old_tc = old_counts.get("trigger_count")
        reset = old_tc is not None and self._plc_counts.get("trigger_count") == 0 and old_tc > 0
        own = self._own_gated(gated, self._carried)  # this epoch's own units proven through the gate
        self._carried = self._carried_after(reset, old_tc, own, self._carried)
        await self._save_plc_state(force=True)
        await self._snapshot_counters("epoch_start")
        self._plc_counts = new_counts
        b = self.batch or self.line.batch
        # commissioned, good verdict given, and not known to have reached the gate: fate unknown
        doubt: list[tuple[int, str, str, str | None]] = []
        t = self._tracker
        for u in sorted(t.good_awaiting_gate(), key=_by_seq):
            if u.job is not None and (own is None or u.seq > own):
                doubt.append((u.seq, u.job.expected.gtin, u.job.serial, b.lot if b else None))
        for u in sorted(t.before_start(), key=_by_seq):
            if u.before_start is not None and (own is None or u.seq > own):
                doubt.append((u.seq, *u.before_start))
        t.forget_epoch()  # good units closed (in doubt or through), memories of the old epoch dropped
        tc = self._new_epoch_trigger()
        printed = t.printed()
        old_top = max([self._max_printed_seq, self._last_read_seq, *(u.seq for u in printed), *(s for s, *_ in doubt)], default=0)
        renumbered = tc is not None and tc < old_top  # the new epoch counts units from (near) zero again
        self._last_read_seq = 0
        if renumbered:
            self._max_printed_seq = tc or 0
        # units of the old epoch still between printer and gate: their reads are not units of the new epoch
        self._stale = {u.seq: renumbered for u in printed}
        if own is not None:
            self._stale.update({s: renumbered for s in range(own + 1, old_top + 1)[-4 * self.ring_slots :]})
        # printed, never decided: no good verdict was ever given, so the gate rejects them (fail-safe); they are
        # decommissioned as the line stop would, and reads of them that still come are ignored (_stale)
        unread = t.close_all(UnitState.PRINTED)
        for unit in unread:
            if unit.job is not None:
                await self._decommission(
                    unit.job, RejectReason.MISSING_UNIT, "printed, not decided when the PLC restarted (no good verdict: rejected fail-safe)", seq=unit.seq
                )
        # rejects ordered in the old epoch cannot be confirmed from the new epoch's ring
        pending = sorted(t.close_all(UnitState.REJECT_AWAITING_CONFIRM), key=_by_seq)
        unconfirmed = [u.seq for u in pending]
        for u in pending:
            if u.challenge is not None:
                await self._challenge_confirmed(u.seq, u.challenge, False)
        await self._epoch_closed(why, doubt, unconfirmed, old_epoch)

    def _new_epoch_trigger(self) -> int | None:
        """The new epoch's trigger count as _note_counters took it (a method, so a reader sees where it comes from)."""
        return self._trigger_seen

    async def _epoch_closed(self, why: str, doubt: list[tuple[int, str, str, str | None]], unconfirmed: list[int], old_epoch: int) -> None:
        cause = f"PLC {self.plc.name} restarted ({why}) before the unit's passage of the reject gate was proven"
        n = 0
        if doubt:
            n = await self.line.store.mark_fate_unknown([(g, s, lot, self.name, self.plc.name, old_epoch, seq, cause) for seq, g, s, lot in doubt])
            self.fate_unknown += n
        self.log.warning("plc_epoch_changed", plc=self.plc.name, why=why, epoch=self.plc_epoch, fate_unknown=n, rejects_unconfirmed=len(unconfirmed))
        if n:
            serials = [s for _, _, s, _ in doubt]
            await self.line.alarm(
                "units_fate_unknown",
                f"{n} unit(s) of unknown fate after the PLC restart (in the reject bin or passed?): {', '.join(serials[:10])}"
                + (" …" if len(serials) > 10 else "")
                + "; check the reject bin and reconcile them (reconcile_units)",
                Severity.CRITICAL,
                self.name,
            )
        detail = f"PLC {self.plc.name} restarted: {why}; new epoch {self.plc_epoch}, {n} unit(s) of unknown fate"
        if unconfirmed:
            detail += f", rejects of units {unconfirmed[:10]} not confirmable"
        # (the line may already be stopping for the PLC's outage: the restart is the cause an operator must see and reset)
        await self.line.fault_overrides("plc_restarted", detail, self.name)

    async def _epoch_closed_late(self, seq: int, job: Job) -> None:
        b = self.batch
        n = await self.line.store.mark_fate_unknown(
            [
                (
                    job.expected.gtin,
                    job.serial,
                    b.lot if b else None,
                    self.name,
                    self.plc.name,
                    self.plc_epoch - 1,
                    seq,
                    f"PLC {self.plc.name} restarted while unit {seq} was being commissioned",
                )
            ]
        )
        self.fate_unknown += n
        self.counters.good += 1
        if b is not None:
            self.line.count_units(b.lot, good=1)
        await self.line.alarm(
            "units_fate_unknown",
            f"unit {seq} (serial {job.serial}) of unknown fate: the PLC restarted while it was being commissioned",
            Severity.CRITICAL,
            self.name,
        )

    def _commissioned_before_start(self) -> dict[int, tuple[str, str, str | None]]:
        """seq -> (gtin, serial, lot) of the last units this station commissioned in the open batch before this start.

        Only units of the PLC's last epoch: a seq names a unit only within one epoch. Units commissioned before
        the last `plc_restarted` of this station were settled when that epoch closed (decided, or fate_unknown
        for the operator), and the same seq in today's reject ring is another unit.
        """
        b = self.line.batch
        if b is None:
            return {}
        window = 16 * self.ring_slots
        rows = self.line.store.outbox(max(0, self.line.store.last_seq() - window), window, only_unforwarded=False)
        out: dict[int, tuple[str, str, str | None]] = {}
        for r in rows:
            ev = r.event
            if isinstance(ev, UnitCommissioned) and ev.lot == b.lot and ev.station == self.name and ev.seq is not None:
                out[ev.seq] = (ev.gtin, ev.serial, ev.lot)
            elif isinstance(ev, AlarmRaised) and ev.code == "plc_restarted" and ev.station == self.name:
                out.clear()  # a new sequence space began here
        return out

    async def _rejected_while_down(self, seq: int) -> None:
        """The gate rejected a unit commissioned before a restart (its "good" never reached the PLC): decommission it."""
        hit = self._tracker.take_before_start(seq)
        if hit is None:
            return
        gtin, serial, lot = hit
        rec = self.line.store.serial(gtin, serial)
        if rec is None or rec.state != "commissioned":
            return
        await self.line.record(
            UnitDecommissioned(
                gtin=gtin,
                serial=serial,
                lot=lot,
                reason=RejectReason.PLC_FAILSAFE,
                seq=seq,
                station=self.name,
                detail="rejected at the gate while linectl was down: its good verdict never reached the PLC",
            )
        )
        self.line.count_units(lot, good_before=-1)
        await self.line.alarm(
            "failsafe_reject", f"unit {seq} was rejected by the PLC while linectl was down; serial {serial} decommissioned", Severity.WARNING, self.name
        )

    async def _rejected_after_good(self, seq: int, job: Job) -> None:
        """A unit we commissioned went to the reject bin (verdict came too late): it is not on the market."""
        await self._decommission(job, RejectReason.PLC_FAILSAFE, "PLC rejected a unit after the good verdict (verdict too late)", seq=seq)
        self.counters.good -= 1
        self.counters.rejected[RejectReason.PLC_FAILSAFE.value] = self.counters.rejected.get(RejectReason.PLC_FAILSAFE.value, 0) + 1
        if self.batch:
            self.line.count_units(self.batch.lot, good=-1)
        await self.line.alarm(
            "failsafe_reject", f"unit {seq} rejected by PLC fail-safe after commissioning; serial {job.serial} decommissioned", Severity.WARNING, self.name
        )
        self._space.set()

    async def _check_timeouts(self) -> None:
        now = self.line.clock.monotonic()
        wait = self.confirm_timeout_s()
        late = [u for u in self._tracker.awaiting_confirm() if now - (u.ordered_at or now) > wait]
        for p in late:
            if p.state is not UnitState.REJECT_AWAITING_CONFIRM:
                continue  # settled meanwhile (the line drained)
            self._tracker.closed(p)
            if p.challenge is not None:
                await self._challenge_confirmed(p.seq, p.challenge, False)
            await self.line.fault_stop(
                "reject_not_confirmed", f"reject of unit {p.seq} ({p.label}) not confirmed within {self.confirm_timeout_s():.2f}s", self.name
            )
        if self.mode == "production" and self.printer.health.state == HealthState.DISCONNECTED:
            # a printer in a stop fault (or gone) prints nothing: packs would go by unprinted. A link that drops
            # and reconnects within the grace (and within the time the codes on the printer cover) rides through.
            if self._printer_down_since is None:
                self._printer_down_since = now
            if not self._within_link_grace(now):
                await self.line.fault_stop("printer_fault", f"printer {self.printer.name}: {self.printer.health.reason or 'not ready'}", self.name)
        else:
            self._printer_down_since = None
        if self.reader is None or not self._reads_codes():
            return  # carrier rfid: no read is awaited (a unit without its tag's outcome is rejected fail-safe at the gate)
        silent_since = self._unread_since if self.mode == "production" else None
        first = self._tracker.first_printed()
        if first is not None and first.printed_at is not None:
            # (units leave _units at the gate too: the PLC rejects unread units fail-safe, so a silent reader
            # would never leave an old unit here; _unread_since keeps the clock running)
            oldest = first.printed_at
            silent_since = oldest if silent_since is None else min(silent_since, oldest)
        if silent_since is not None:
            if now - silent_since > self.rules.read_timeout_s and now - self._last_read_at > self.rules.read_timeout_s:
                await self.line.fault_stop(
                    "reader_silent", f"reader {self.reader.name}: no read for {self.rules.read_timeout_s}s while units were printed", self.name
                )
                self._last_read_at = now

    # ------------------------------------------------------------------ stop / drain

    async def drain(self, timeout_s: float) -> None:
        """After the line stopped: let units on the belt reach the reader and gate; then account for the rest."""
        self.mode = "idle"
        async with self._feed_lock:
            pass  # a group of jobs being handed to the printer is complete (on the printer or failed) from here
        deadline = time.monotonic() + timeout_s
        t = self._tracker
        while (t.count(UnitState.PRINTED) or t.count(UnitState.REJECT_AWAITING_CONFIRM)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        try:
            await self.printer.clear()
        except DeviceError as exc:
            self._printer_unknown = True  # cleared before the next job is sent
            self.log.warning("printer_clear_failed", reason=exc.reason)
        for job in list(self._on_printer.values()):
            await self._decommission(job, RejectReason.LINE_STOPPED, "sent to the printer, not printed before the line stopped", seq=None)
        self._on_printer.clear()
        for unit in t.printed():
            if unit.job is not None:
                await self._decommission(unit.job, RejectReason.MISSING_UNIT, "printed but not read before the line stopped", seq=unit.seq)
        t.close_all(UnitState.PRINTED)
        unconfirmed = t.close_all(UnitState.REJECT_AWAITING_CONFIRM)
        if unconfirmed:
            missing = sorted(u.seq for u in unconfirmed)
            await self.line.alarm("reject_not_confirmed", f"rejects of units {missing[:10]} not confirmed at stop", Severity.CRITICAL, self.name)
        if self._counted_mode != "idle":
            await self._gate_caught_up(deadline)
            await self._snapshot_counters("stop")  # counters of the last poll (the watch checks them for a restart first)
            self._counted_mode = "idle"

    def jobs_in_memory(self) -> list[Job]:
        """Jobs this station still tracks (on the printer, printed and not yet decided)."""
        return [*self._on_printer.values(), *(u.job for u in self._tracker.printed() if u.job is not None)]

    def unused_serials(self) -> list[str]:
        out = list(self._serials)
        self._serials.clear()
        return out

    def snapshot(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "counters": self.counters.as_dict(),
            "decision_latency_ms": self.latency.summary(),
            "in_flight": {
                "on_printer": len(self._on_printer),
                "printed_unread": len(self.printed_unread),
                "rejects_unconfirmed": len(self.rejects_unconfirmed),
            },
            "challenge": list(self._challenge_results),
            "plc_epoch": self.plc_epoch,
            "fate_unknown": self.fate_unknown,
        }


def read_back_epc(epc_read: str) -> EpcValue | str:
    """What a tag that is not the serial's holds, decoded; else why not (the printer reads back as many words as it
    wrote: a shorter EPC, e.g. a pre-encoded 96-bit one under an SGTIN-198 write, comes with zero words after it)."""
    try:
        return decode_epc(epc_read)
    except EpcError as exc:
        why = str(exc)
    short = epc_read[:24]
    if len(epc_read) > 24 and not epc_read[24:].strip("0"):
        try:
            return decode_epc(short)
        except EpcError:
            pass
    return why


def _by_seq(u: TrackedUnit) -> int:
    return u.seq


def _link_reason(reason: str) -> bool:
    """The transport's words for a lost link (drivers/transport.py), as opposed to a fault the printer reports."""
    return reason.startswith(("connection lost", "cannot connect", "not connected")) or " connection lost" in reason


def build(cfg: PrintVerifyConfig, line: LinePort, drivers: Mapping[str, Driver]) -> PrintVerifyRuntime:
    """The registry's builder (linectl/engine/station.py) for `type: print_verify`."""
    printer, plc = drivers[cfg.printer], drivers[cfg.plc]
    reader = drivers[cfg.reader] if cfg.reader is not None else None
    assert isinstance(printer, Printer) and isinstance(plc, Plc)  # roles checked at config load
    assert reader is None or isinstance(reader, CodeReader)
    return PrintVerifyRuntime(cfg, line, printer, reader, plc)
