"""Engine commands: the one vocabulary for PLC tags, the CLI and MQTT.

Whatever an operator can do over a tag or the command line is one of these
models, so every path is validated the same way and lands in the audit trail
the same way. `origin` says where it came from ("plc:plc1", "mqtt:<client>",
"cli:<user>"); `command_id` makes a retried command harmless.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import date
from typing import Annotated, Any, Literal, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, TypeAdapter, ValidationInfo, field_validator, model_validator

from linectl import gs1
from linectl.gs1_dictionary import LintError, lint_yymmd0

log = structlog.get_logger("linectl.control")

#: the most units one batch may plan (a bound against typos such as an extra zero or a serial number pasted in)
MAX_PLANNED_QTY = 10_000_000
_SET82 = re.compile(r"^[!\"%&'()*+,\-./0-9:;<=>?A-Z_a-z]{1,20}$")


class Command(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command_id: str | None = Field(None, max_length=128, description="client id; a repeated id gets the first reply again")
    actor: str = Field("operator", max_length=128, description="who (user id / system) asked; with access control: the "
                       "authenticated user, set by linectl (linectl/access)")
    reason: str = Field("", max_length=500, description="why (the audit trail keeps it; required for the commands "
                        "the line's audit.reason_required lists)")


#: validation context of a command whose actor was set by linectl from a verified identity (linectl/access): the
#: placeholder checks below ("rework needs actor: the operator's id") are for unauthenticated lines only
AUTHENTICATED = {"authenticated": True}


def _authenticated(info: ValidationInfo) -> bool:
    return isinstance(info.context, dict) and bool(info.context.get("authenticated"))


#: user names (store users, directory users): what an audit record, a login and an OPC UA session name a person by
USERNAME_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}$"


class CreateBatch(Command):
    name: Literal["create_batch"] = "create_batch"
    lot: str
    gtin: str
    expiry: str = Field(description="YYMMDD, DD=00 allowed (end of that month, GS1)")
    planned_qty: int = Field(gt=0, le=MAX_PLANNED_QTY)
    challenge: bool = True
    # the other dates a product's code_template may print (AI 11, 13, 15, 16); required when the template has the AI
    production_date: str | None = Field(None, description="AI (11) YYMMDD; with shelf_life_days it bounds the expiry")
    packaging_date: str | None = Field(None, description="AI (13) YYMMDD")
    best_before: str | None = Field(None, description="AI (15) YYMMDD")
    sell_by: str | None = Field(None, description="AI (16) YYMMDD")

    @field_validator("production_date", "packaging_date", "best_before", "sell_by")
    @classmethod
    def _date(cls, v: str | None, info: Any) -> str | None:
        if v is not None:
            batch_date(v, info.field_name)
        return v

    @property
    def dates(self) -> dict[str, str]:
        """The batch's dates besides expiry that were given: batch attribute name -> YYMMDD."""
        return {k: v for k in BATCH_DATES if (v := getattr(self, k)) is not None}

    @field_validator("lot")
    @classmethod
    def _lot(cls, v: str) -> str:
        if not _SET82.match(v):
            raise ValueError("lot must be 1-20 characters of GS1 character set 82 (AI 10)")
        return v

    @field_validator("gtin")
    @classmethod
    def _gtin(cls, v: str) -> str:
        try:
            return gs1.normalize_gtin(v)
        except gs1.GS1Error as exc:
            raise ValueError(f"gtin {v!r}: {exc.reason}") from None

    @field_validator("expiry")
    @classmethod
    def _expiry(cls, v: str) -> str:
        # the calendar rules only; "not in the past" and the product's shelf life need today and the product
        # (Line._cmd_create_batch), so a command replayed later is judged on the day it runs
        expiry_date(v)
        return v


#: batch dates besides `expiry`, by their CLI/MQTT name (gs1.BATCH_SOURCES gives the AI of each)
BATCH_DATES = ("production_date", "packaging_date", "best_before", "sell_by")


def batch_date(value: str, name: str) -> date:
    """A batch date YYMMDD by the GS1 calendar rules (DD=00: that month); ValueError names the field."""
    if not isinstance(value, str) or not re.fullmatch(r"\d{6}", value):
        raise ValueError(f"{name} {value!r} must be 6 digits YYMMDD")
    try:
        lint_yymmd0(value)
    except LintError as exc:
        raise ValueError(exc.message.replace("invalid date", name)) from None
    return gs1._resolve_date(value, last_day=False)


def check_batch_code(c: CreateBatch, template: gs1.CodeTemplate, gtin: str, shelf_life: bool) -> None:
    """Refuse a batch whose dates the product's code cannot carry honestly, before a single code is printed.

    A date AI of the template with no date given, a date the code would not print (nothing would read it:
    production_date is read by shelf_life_days too), or dates that make no valid code (expiry before the
    production date) are refused with CommandRejected naming the field."""
    values: dict[str, str | None] = {"lot": c.lot, "expiry": c.expiry, **c.dates}
    used = set(template.batch_fields) | ({"production_date"} if shelf_life else set())
    unused = [k for k in c.dates if k not in used]
    if unused:
        ais = {v: k for k, v in gs1.BATCH_SOURCES.items()}
        listed = ", ".join(f"{k} ({gs1.ai_name(ais[k])})" for k in unused)
        raise CommandRejected(
            f"{listed} given, but the code_template of GTIN {gtin} ({', '.join(template.ais)}) does not print it; "
            "a date that is neither printed nor checked is not taken", "invalid_dates")
    missing = template.missing(values)
    if missing:
        ais = {v: k for k, v in gs1.BATCH_SOURCES.items()}
        raise CommandRejected(
            f"the code_template of GTIN {gtin} prints {', '.join(gs1.ai_name(ais[m]) for m in missing)}: "
            f"give {', '.join(missing)} (YYMMDD) with the batch", "missing_dates")
    try:
        template.check_batch(gtin, values)
    except gs1.GS1Error as exc:
        raise CommandRejected(f"batch {c.lot}: {exc.reason}", "invalid_dates") from None


def expiry_date(value: str) -> date:
    """A batch expiry YYMMDD as the last day the product may be used (GS1: DD=00 is the end of the month).

    Raises ValueError naming what is wrong, for the reply to the operator."""
    if not isinstance(value, str) or not re.fullmatch(r"\d{6}", value):
        raise ValueError(f"expiry {value!r} must be 6 digits YYMMDD")
    try:
        lint_yymmd0(value)  # the rule GS1's Syntax Dictionary gives AI (17)
    except LintError as exc:
        raise ValueError(exc.message.replace("invalid date", "expiry")) from None
    return gs1._resolve_date(value, last_day=True)


class StartBatch(Command):
    name: Literal["start_batch"] = "start_batch"
    lot: str | None = None


class PauseBatch(Command):
    name: Literal["pause_batch"] = "pause_batch"


class ResumeBatch(Command):
    name: Literal["resume_batch"] = "resume_batch"


class StopBatch(Command):
    name: Literal["stop_batch"] = "stop_batch"


class CloseBatch(Command):
    name: Literal["close_batch"] = "close_batch"
    lot: str | None = None
    unused_serials: Literal["return", "void"] | None = None


class ProvisionPool(Command):
    name: Literal["provision_pool"] = "provision_pool"
    gtin: str
    serials: list[str] | None = Field(None, max_length=1_000_000)
    range_start: int | None = Field(None, ge=0)
    range_count: int | None = Field(None, gt=0, le=1_000_000)
    range_width: int = Field(0, ge=0, le=20)
    request_id: str | None = None  # answer to linectl's own serial request (pages)
    #: set by the MQTT bridge only, after it checked that an L3 service account (role l3) answers an outstanding
    #: serial request of this line with at most the serials still owed: such a page needs no person's signature
    #: (access.signing.signed_actions). Private: no payload can set it (extra keys are refused).
    _l3_answer: bool = PrivateAttr(False)

    def mark_l3_answer(self) -> None:
        self._l3_answer = True

    @property
    def l3_answer(self) -> bool:
        return self._l3_answer

    def count(self) -> int:
        """How many serials the command imports (list length or range count)."""
        return len(self.serials) if self.serials is not None else int(self.range_count or 0)

    @model_validator(mode="after")
    def _one_source(self) -> ProvisionPool:
        has_list = self.serials is not None
        has_range = self.range_start is not None or self.range_count is not None
        if has_list == has_range:
            raise ValueError("give either serials (a list) or range_start + range_count")
        if has_range and (self.range_start is None or self.range_count is None):
            raise ValueError("a range needs both range_start and range_count")
        if has_list and len(set(self.serials or [])) != len(self.serials or []):
            raise ValueError("serials list contains duplicates")
        return self

    def serial_list(self) -> list[str]:
        if self.serials is not None:
            return list(self.serials)
        assert self.range_start is not None and self.range_count is not None
        return [str(n).zfill(self.range_width) for n in range(self.range_start, self.range_start + self.range_count)]


class SerialsRetry(Command):
    """Send a pool product's parked serial requests to its source again (the L3 refused them; an operator fixed it)."""

    name: Literal["serials_retry"] = "serials_retry"
    gtin: str


class SinkRetry(Command):
    """An upstream sink parked on a refusal (a 4xx, a document the repository will not take) delivers again now."""

    name: Literal["sink_retry"] = "sink_retry"
    sink: str = Field(min_length=1, max_length=80, description="the sink's name as in <root>/state: epcis_rest:<name>, epcis_xml:<name>, file")


class Challenge(Command):
    name: Literal["challenge"] = "challenge"


class RequestState(Command):
    name: Literal["request_state"] = "request_state"


class AckAlarm(Command):
    name: Literal["ack_alarm"] = "ack_alarm"
    alarm_id: str | None = None  # None = acknowledge all


class ResetLine(Command):
    name: Literal["reset"] = "reset"


class VerifyCode(Command):
    name: Literal["verify_code"] = "verify_code"
    code: str = Field(max_length=4096)
    where: str | None = Field(None, max_length=64, description="SSCC of the container it was scanned in, if any")


class CloseCase(Command):
    """Close the partial case (or pallet) open at a station, e.g. at batch end."""

    name: Literal["close_case"] = "close_case"
    station: str | None = None


class Rework(Command):
    """One rework operation decided at an HMI or MES, the same operations a rework bench scans.

    `code` is what the operation is about: the unit taken out (remove,
    replace, decommission) or the SSCC (add: the target case; dissolve;
    reprint). `child` is the unit put in (add, replace). The actor is
    recorded on every event and in the audit trail, so it must name a person.
    """

    name: Literal["rework"] = "rework"
    operation: Literal["remove", "add", "replace", "dissolve", "decommission", "reprint"]
    code: str = Field(min_length=1, max_length=300)
    child: str | None = Field(None, min_length=1, max_length=300)
    decommission_old: bool = Field(False, description="replace: also destroy the unit taken out")
    keep_sscc: bool = Field(False, description="dissolve: keep the container commissioned (default: void its SSCC)")
    reason: str = Field("", max_length=500, description="dissolve / decommission: why (recorded)")
    station: str | None = Field(None, description="reprint: the rework station whose printer prints (default: the first with one)")

    @model_validator(mode="after")
    def _shape(self, info: ValidationInfo) -> Rework:
        if self.operation in ("add", "replace") and not self.child:
            raise ValueError(f"rework {self.operation} needs child: the unit put in")
        if self.operation not in ("add", "replace") and self.child:
            raise ValueError(f"rework {self.operation} takes no child")
        if not _authenticated(info) and (not self.actor.strip() or self.actor == "operator"):
            raise ValueError("rework needs actor: the operator's id (it goes in the audit trail)")
        return self


class ReworkMode(Command):
    """Set a rework bench's operation (what its `LINECTL:MODE=` command barcode does) and its operator."""

    name: Literal["rework_mode"] = "rework_mode"
    station: str | None = Field(None, description="the rework station (default: the only one)")
    mode: Literal["remove", "add", "replace", "dissolve", "decommission", "reprint", "inspect"]
    operator: str | None = Field(None, min_length=1, max_length=64, description="operator id for the bench's next operations")


class ReconcileUnits(Command):
    """An operator's finding for units of unknown fate (a PLC restart lost their gate evidence).

    in_bin: found in the reject bin -> decommissioned; passed: not in the bin
    (counted / rescanned downstream) -> stay commissioned. Either way the
    fate_unknown record is closed with the actor, and the report can balance.
    """

    name: Literal["reconcile_units"] = "reconcile_units"
    serials: list[str] = Field(min_length=1, max_length=10_000)
    outcome: Literal["in_bin", "passed"]
    gtin: str | None = Field(None, description="default: the GTIN recorded with each unit of unknown fate")
    copies: int | None = Field(
        None, ge=1, le=1000,
        description="in_bin: packs carrying each listed code found in the bin; needed when copies of a code were "
        "rejected as duplicates (the bin holds those too)",
    )

    @model_validator(mode="after")
    def _who(self, info: ValidationInfo) -> ReconcileUnits:
        if not _authenticated(info) and (not self.actor.strip() or self.actor == "operator"):
            raise ValueError("reconcile_units needs actor: the id of the operator who checked the bin (audit trail)")
        if len(set(self.serials)) != len(self.serials):
            raise ValueError("serials: a serial is listed twice")
        return self


class RecallBatch(Command):
    name: Literal["recall_batch"] = "recall_batch"
    lot: str


class SignReview(Command):
    """Sign the batch review document (linectl.review) of `lot`: the signer read a document whose `review_digest` this is.

    The line builds the review again when the signature is given: a batch whose records changed since the signer's
    document was built gives another digest, and the signing is refused (record_changed). Always carries a signature
    (the envelope's `signature`, meaning reviewed or approved)."""

    name: Literal["sign_review"] = "sign_review"
    lot: str = Field(min_length=1, max_length=20)
    review_digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="the review_digest of the document the signer read")


class PackmlCmd(Command):
    """A PackML CntrlCmd (Reset, Start, Stop, Hold, ...), mapped onto the line's own commands (README "PackML")."""

    name: Literal["packml_command"] = "packml_command"
    command: str = Field(description="PackML command name (case-insensitive, e.g. Start) or its CntrlCmd number")

    @field_validator("command", mode="before")
    @classmethod
    def _command(cls, v: Any) -> str:
        from linectl.engine.packml import parse_command

        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise ValueError("command must be a PackML command name or CntrlCmd number")
        return parse_command(v).name

    @property
    def cmd(self) -> Any:
        """The PackmlCommand (typed Any here: control.py must not import the engine at module load)."""
        from linectl.engine.packml import PackmlCommand

        return PackmlCommand[self.command]


class SetUnitMode(Command):
    """Change the PackML unit mode (UnitModeCurrent); only while the line does not produce."""

    name: Literal["set_unit_mode"] = "set_unit_mode"
    mode: str = Field(description="unit mode name (Production, Maintenance, Manual; case-insensitive) or its number")

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, v: Any) -> str:
        from linectl.engine.packml import parse_unit_mode

        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise ValueError("mode must be a unit mode name or number")
        return parse_unit_mode(v).name


class UsersAdmin(Command):
    """A change to a user (linectl/access): add, roles, passwd, lock, unlock, deactivate, reactivate.

    The CLI's `linectl users ...` sends it to a running daemon (the store has one owner); offline the CLI makes the
    same change itself. Needs the permission users_admin, except a user's passwd of their own account. Every
    change is an audit record with the old and the new value and `reason` (Annex 11 §9). `new_password` is a
    secret: it is hashed (argon2id) and never logged, audited or echoed."""

    name: Literal["users_admin"] = "users_admin"
    action: Literal["add", "roles", "passwd", "lock", "unlock", "deactivate", "reactivate"]
    username: str = Field(pattern=USERNAME_PATTERN)
    display_name: str | None = Field(None, min_length=1, max_length=128)
    roles: list[str] | None = Field(None, min_length=1, max_length=20)
    source: Literal["local", "ldap"] = "local"
    new_password: SecretStr | None = Field(None, max_length=1024)
    reason: str = Field(min_length=1, max_length=500, description="why (Annex 11 §9: recorded with the change)")

    @model_validator(mode="after")
    def _shape(self) -> UsersAdmin:
        if self.action == "add":
            if not self.display_name or not self.roles:
                raise ValueError("users_admin add needs display_name and roles")
            if self.source == "local" and self.new_password is None:
                raise ValueError("users_admin add of a local user needs new_password")
        elif self.action == "roles":
            if not self.roles:
                raise ValueError("users_admin roles needs roles")
        elif self.action == "passwd":
            if self.new_password is None:
                raise ValueError("users_admin passwd needs new_password")
        if self.action != "add" and self.display_name is not None:
            raise ValueError(f"users_admin {self.action} takes no display_name")
        if self.action not in ("add", "roles") and self.roles is not None:
            raise ValueError(f"users_admin {self.action} takes no roles")
        if self.action not in ("add", "passwd") and self.new_password is not None:
            raise ValueError(f"users_admin {self.action} takes no new_password")
        return self


AnyCommand = Annotated[
    (
        CreateBatch
        | StartBatch
        | PauseBatch
        | ResumeBatch
        | StopBatch
        | CloseBatch
        | ProvisionPool
        | SerialsRetry
        | SinkRetry
        | Challenge
        | RequestState
        | AckAlarm
        | ResetLine
        | VerifyCode
        | CloseCase
        | RecallBatch
        | SignReview
        | Rework
        | ReworkMode
        | ReconcileUnits
        | PackmlCmd
        | SetUnitMode
        | UsersAdmin
    ),
    Field(discriminator="name"),
]
COMMAND_ADAPTER: TypeAdapter[AnyCommand] = TypeAdapter(AnyCommand)
COMMAND_NAMES = tuple(t.model_fields["name"].default for t in AnyCommand.__origin__.__args__)  # type: ignore[attr-defined]


class CommandRejected(Exception):
    """The command is well formed but not allowed now (wrong state, unknown GTIN...). Nothing changed."""

    def __init__(self, reason: str, code: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class CommandTarget(Protocol):
    """What the MQTT bridge, the PLC control surface and the CLI call."""

    async def execute(self, command: Any, origin: str) -> dict[str, Any]:
        """Apply the command; return the reply body. Raises CommandRejected (nothing changed)."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """Current line state for the retained MQTT state topic and `request_state`."""
        ...


class RefusalTally:
    """Refused or suppressed input, counted by reason: one log line (and one audit record) per interval, not per message.

    A flood of malformed commands or garbage scans must cost a counter increment
    each, not a log line, an audit record or an alarm each: otherwise whoever can
    publish on the command topic can fill the disk and drown the operators'
    alarms. The first occurrence of each reason in an interval is logged with
    its detail (the caller asks `note()`); the interval then closes with one
    summary line and, when a store is given, one audit record
    `{counts: {reason: n}, origins: {origin: n}, samples: [...], since, until}`.
    """

    SAMPLES = 10

    def __init__(self, action: str, *, store: Any = None, interval_s: float = 60.0) -> None:
        self.action = action
        self.store = store
        self.interval_s = interval_s
        self.total = 0
        self._counts: dict[str, int] = {}
        self._origins: dict[str, int] = {}
        self._samples: list[str] = []
        self._since: float | None = None
        self._flush: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def note(self, reason: str, origin: str = "", sample: str | None = None) -> bool:
        """Count one; True when it is the first of its reason in this interval (log its detail then)."""
        self.total += 1
        first = reason not in self._counts
        self._counts[reason] = self._counts.get(reason, 0) + 1
        if origin and (origin in self._origins or len(self._origins) < 100):
            self._origins[origin] = self._origins.get(origin, 0) + 1
        if sample is not None and len(self._samples) < self.SAMPLES:
            self._samples.append(sample[:200])
        if self._since is None:
            self._since = time.time()
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._flush = loop.call_later(self.interval_s, self._flush_soon, loop)
        return first

    def _flush_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self.flush())  # kept: an unreferenced task may be collected mid-write

    def pending(self) -> dict[str, int]:
        return dict(self._counts)

    async def flush(self) -> None:
        """Close the interval: one summary log line, one audit record (if a store was given)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if not self._counts:
            self._since = None
            return
        detail = {
            "counts": self._counts,
            "origins": self._origins,
            "samples": self._samples,
            "since": self._since,
            "until": time.time(),
        }
        self._counts, self._origins, self._samples, self._since = {}, {}, [], None
        log.warning(f"{self.action}_summary", counts=detail["counts"], origins=detail["origins"])
        if self.store is not None:
            try:
                await self.store.audit("system", "control", self.action, detail)
            except Exception as exc:  # noqa: BLE001 - a full disk must not turn refused input into a crash
                log.error(f"{self.action}_not_audited", error=str(exc), counts=detail["counts"])
