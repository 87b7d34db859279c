"""Helpers for the end-to-end engine tests: a simulated line per test, ground truth, per-unit reconciliation.

Everything runs through the real simulators (simulator subprocess, real
protocol stacks, a real broker) via `linectl.demo.SimulatedLine`, the same
harness `linectl demo` uses. Nothing is mocked.

The central check is `unit_ledger`: for every unit the simulator's reject
gate saw, what physically happened (passed / rejected, which defect) is
compared with what linectl recorded for that unit seq (commissioned /
decommissioned, with which reason). A serial commissioned for a unit that
went to the reject bin, or a unit that passed without a commissioned serial,
is a regulatory incident and fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from linectl import control as C
from linectl.config import LineConfig, parse_config
from linectl.demo import DEFAULT_CONFIG, SimulatedLine
from linectl.engine.print_verify import PrintVerifyRuntime
from linectl.events import UnitCommissioned, UnitDecommissioned
from linectl.yamlsource import load_yaml, to_plain

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
LINECTL = [PY, "-m", "linectl"]
SHARED_BROKER = ("127.0.0.1", 1883)

#: which reject reason(s) each simulated unit defect must produce
DEFECT_REASONS: dict[str, set[str]] = {
    "no_print": {"no_read"},
    "smudge_heavy": {"low_grade", "no_read"},
    "low_contrast": {"low_grade", "no_read"},
    "partial": {"no_read"},
    "wrong_code": {"wrong_content"},
    "duplicate": {"duplicate"},
    "not_gs1": {"not_gs1"},
    "data_mismatch": {"data_mismatch"},
}


#: the default users' passwords for the stores tests create (`linectl init` and a demo store read them from the environment)
TEST_PASSWORDS = {"operator": "Shift-Runner-pw1", "qa": "Release-Check-pw2", "admin": "Key-Keeper-pw-03"}


def password_env() -> dict[str, str]:
    """The environment `linectl init` takes the default users' passwords from."""
    return {f"LINECTL_PASSWORD_{u.upper()}": pw for u, pw in TEST_PASSWORDS.items()}


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def unique_root() -> str:
    return f"test/{uuid.uuid4().hex[:12]}/pack/line1"


def variant_raw(
    *,
    rules: dict[str, Any] | None = None,
    station: dict[str, Any] | None = None,
    simulation: dict[str, Any] | None = None,
    base: Path = DEFAULT_CONFIG,
    access: bool = False,
) -> dict[str, Any]:
    """The demo line's config as plain data, its print_verify stations' rules / fields and the simulation changed.

    access=False (the default) drops the config's `access:` section: the tests of the line's other features send
    their MQTT commands without logging in, as to a line without access control (whose daemon warns at start
    "access control disabled"). Access control itself is proven by tests/test_access*.py and by the CLI of
    LineProcesses (tests/test_daemon.py), which run with the section. An opcua_server: whose users are the store's
    (packml-line) goes with it: the config check refuses one nobody could log in to."""
    raw: dict[str, Any] = to_plain(load_yaml(base))
    if not access:
        raw.pop("access", None)
        ua = raw.get("opcua_server") or {}
        if not ua.get("users") and not ua.get("allow_anonymous"):
            raw.pop("opcua_server", None)  # its sessions log in as the store's users: without access: nobody could
    for st in raw.get("stations", []):
        if st.get("type") == "print_verify":
            st.setdefault("rules", {}).update(rules or {})
            st.update(station or {})
    raw.setdefault("simulation", {}).update(simulation or {})
    return raw


def demo_line_config(*, rules: dict[str, Any] | None = None, station: dict[str, Any] | None = None, base: Path = DEFAULT_CONFIG) -> LineConfig:
    """`variant_raw` parsed, MQTT off: the config of an in-process line (tests/fakes.py), nothing leaves the process."""
    raw = variant_raw(rules=rules, station=station, base=base)
    raw.setdefault("mqtt", {})["enabled"] = False
    return parse_config(raw)


def variant_config(
    directory: Path,
    *,
    rules: dict[str, Any] | None = None,
    station: dict[str, Any] | None = None,
    simulation: dict[str, Any] | None = None,
    base: Path = DEFAULT_CONFIG,
    name: str = "variant.yaml",
    access: bool = False,
) -> Path:
    """The demo line YAML with station rules / station fields / simulation settings changed."""
    raw = variant_raw(rules=rules, station=station, simulation=simulation, base=base, access=access)
    path = Path(directory) / name
    with open(path, "w", encoding="utf-8") as fh:
        YAML(typ="safe").dump(raw, fh)
    return path


@contextlib.asynccontextmanager
async def simulated_line(
    tmp_path: Path,
    *,
    rate: float = 1200.0,
    defect_rate: float = 0.0,
    seed: int = 1,
    rules: dict[str, Any] | None = None,
    simulation: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    base: Path = DEFAULT_CONFIG,
    access: bool = False,
) -> AsyncIterator[SimulatedLine]:
    """A SimulatedLine on the demo config (variant), own temp dir and db, a unique MQTT topic root.

    Uses the machine's Mosquitto when it listens on 1883 (no broker start-up per
    test), else the embedded broker. Always tears the simulator down, even when
    the daemon's shutdown fails.
    """
    cfg = variant_config(tmp_path, rules=rules, simulation=simulation, base=base, access=access)
    broker = "{}:{}".format(*SHARED_BROKER) if port_open(*SHARED_BROKER) else None
    ov: dict[str, Any] = {"mqtt": {"topic_root": unique_root()}}
    for k, v in (overrides or {}).items():
        ov[k] = v
    sl = SimulatedLine(cfg, rate=rate, defect_rate=defect_rate, seed=seed, broker=broker, db=tmp_path / "line.db", overrides=ov)
    failed = True
    try:
        await sl.start()
        yield sl
        failed = False
    finally:
        try:
            await sl.stop()
        finally:
            if sl.sim is not None and sl.sim.poll() is None:
                sl.sim.kill()
                sl.sim.wait(5)
            if sl.broker_proc is not None and sl.broker_proc.poll() is None:
                sl.broker_proc.kill()
            if failed:
                log = sl.workdir / "simulator.log"
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no simulator log)"
                print(f"--- simulator log ({sl.workdir}, kept) ---\n{tail}", file=sys.stderr)
            else:
                shutil.rmtree(sl.workdir, ignore_errors=True)


async def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_async(pred: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = await pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def sim(sl: SimulatedLine, **msg: Any) -> dict[str, Any]:
    """One simulator control command; fails the test when the simulator refuses it."""
    assert sl.control is not None
    reply = await sl.control.call(**msg)
    assert reply.get("ok"), f"simulator refused {msg}: {reply}"
    return reply


async def belt_empty(sl: SimulatedLine, timeout: float = 30.0) -> None:
    async def empty() -> bool:
        st = await sim(sl, cmd="status")
        return all(int(c.get("in_flight", 0)) == 0 for c in st["conveyors"].values())

    await wait_async(empty, timeout, "the belt to empty (every unit past the reject gate)")


async def settle(sl: SimulatedLine, timeout: float = 30.0) -> None:
    """Every unit past the gate in the simulator, and linectl holds nothing undecided or unconfirmed."""
    await belt_empty(sl, timeout)

    def detail() -> str:
        return "; ".join(
            f"{s.name}: mode {s.mode}, on printer {list(s._on_printer)}, printed unread {list(s._units)}, "
            f"rejects unconfirmed {sorted(s._pending_rejects)}, batch {state_of(sl)}, fault {sl.line.fault}"
            for s in print_verify_stations(sl)
        )

    try:
        await wait_for(lambda: all(s.in_flight == 0 for s in print_verify_stations(sl)), timeout, "linectl to hold no unit in flight")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {detail()}") from None
    await asyncio.sleep(0.3)  # a reject confirm written at the gate a moment ago reaches the reject-ring poll


def print_verify_stations(sl: SimulatedLine) -> list[PrintVerifyRuntime]:
    return [s for s in sl.line.stations if isinstance(s, PrintVerifyRuntime)]


def station(sl: SimulatedLine) -> Any:
    """The line's first print_verify station."""
    return print_verify_stations(sl)[0]


def state_of(sl: SimulatedLine) -> str | None:
    b = sl.line.batch
    return b.state.value if b is not None else None


async def create_and_start(sl: SimulatedLine, units: int, *, challenge: bool = False) -> str:
    lot = await sl.create_batch(units, challenge=challenge)
    await sl.start_batch()
    return lot


async def wait_good(sl: SimulatedLine, n: int, timeout: float = 60.0) -> None:
    await wait_for(lambda: sl.line.batch.good_total() >= n, timeout, f"{n} good units")


async def wait_stopped(sl: SimulatedLine, timeout: float = 30.0) -> None:
    """The batch is stopped and the stop (drain included) has finished."""

    def done() -> bool:
        t = sl.line._stop_task
        return state_of(sl) == "stopped" and (t is None or t.done())

    await wait_for(done, timeout, "the batch to be stopped")


def alarm_codes(sl: SimulatedLine) -> list[str]:
    return [a.code for a in sl.line.alarms.values()]


async def close_batch(sl: SimulatedLine) -> dict[str, Any]:
    res = await sl.line.execute(C.CloseBatch(actor="test"), origin="test")
    return res["report"]


# --------------------------------------------------------------------------- store reads


def db_query(db: Path | str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read-only query on the store file (WAL: never blocks the writer)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return list(con.execute(sql, params))
    finally:
        con.close()


def serial_states(db: Path | str, lot: str) -> dict[str, str]:
    return {s: st for s, st in db_query(db, "SELECT serial, state FROM serials WHERE lot=?", (lot,))}


def lot_events(store: Any, lot: str) -> list[Any]:
    out: list[Any] = []
    after = 0
    while True:
        rows = store.events_of_lot(lot, after, 10000)
        if not rows:
            return out
        out.extend(r.event for r in rows)
        after = rows[-1].seq


def lot_events_from_db(db: Path | str, lot: str) -> list[Any]:
    from linectl.events import event_from_json

    return [event_from_json(b) for (b,) in db_query(db, "SELECT body FROM outbox WHERE lot=? ORDER BY seq", (lot,))]


# --------------------------------------------------------------------------- per-unit reconciliation


@dataclass
class Ledger:
    units: list[dict[str, Any]]
    passed: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    commissioned_by_seq: dict[int, list[str]] = field(default_factory=dict)
    decommissioned: dict[str, list[tuple[str, int | None]]] = field(default_factory=dict)  # serial -> [(reason, seq)]
    final_commissioned: set[str] = field(default_factory=set)
    reason_by_seq: dict[int, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def assert_ok(self) -> None:
        assert not self.problems, "per-unit reconciliation failed:\n  " + "\n  ".join(self.problems[:30])


def unit_ledger(
    units: list[dict[str, Any]],
    events: list[Any],
    states: dict[str, str],
    *,
    allow_missed: set[int] = frozenset(),
    epochs: tuple[int, ...] = (),
) -> Ledger:
    """Compare what physically happened at the gate with what linectl recorded, unit by unit.

    - every unit that passed the gate has exactly one serial commissioned for its seq, still commissioned;
    - no unit that went to the reject bin has a serial still commissioned;
    - commissioned serials are unique (one UnitCommissioned per serial, ever);
    - the serials still commissioned are exactly those of units that passed;
    - no printer job was printed on two units (job numbers restart with the daemon: `epochs` are the
      unit seqs after which a new daemon run began).
    """
    led = Ledger(units=units)
    commissioned_serials: Counter[str] = Counter()
    serial_seq: dict[str, int | None] = {}
    for ev in events:
        if isinstance(ev, UnitCommissioned):
            commissioned_serials[ev.serial] += 1
            serial_seq[ev.serial] = ev.seq
            if ev.seq is not None:
                led.commissioned_by_seq.setdefault(ev.seq, []).append(ev.serial)
        elif isinstance(ev, UnitDecommissioned):
            led.decommissioned.setdefault(ev.serial, []).append((ev.reason.value, ev.seq))
            if ev.seq is not None:
                led.reason_by_seq.setdefault(ev.seq, []).append(ev.reason.value)
    for s, n in commissioned_serials.items():
        if n > 1:
            led.problems.append(f"serial {s} commissioned {n} times")
    led.final_commissioned = {s for s, st in states.items() if st == "commissioned"}
    for s in led.final_commissioned:
        if s not in commissioned_serials:
            led.problems.append(f"serial {s} is 'commissioned' in the registry without a UnitCommissioned event")
    jobs: Counter[tuple[int, int]] = Counter()
    passed_serials: set[str] = set()
    for u in units:
        seq = u["seq"]
        if u.get("challenge"):
            if u["outcome"] != "rejected":
                led.problems.append(f"challenge unit {u['seq']} ({u['challenge']}) passed the gate")
            continue
        if u.get("job_seq") is not None:
            jobs[(sum(1 for b in epochs if seq > b), u["job_seq"])] += 1
        live = [s for s in led.commissioned_by_seq.get(seq, []) if s in led.final_commissioned]
        if u["outcome"] == "passed":
            led.passed.append(seq)
            if seq in allow_missed:
                # a unit the gate failed to remove (jam): its serial must not be commissioned
                if live or not led.reason_by_seq.get(seq):
                    led.problems.append(f"escaped unit {seq}: commissioned {live}, decisions {led.reason_by_seq.get(seq)}")
                continue
            if u.get("defect"):
                led.problems.append(f"MISSED REJECT: unit {seq} with defect {u['defect']} passed the gate")
            if len(live) != 1:
                led.problems.append(f"unit {seq} passed the gate but has {len(live)} commissioned serial(s) {live} (decisions: {led.reason_by_seq.get(seq)})")
            passed_serials.update(live)
        else:
            led.rejected.append(seq)
            if live:
                led.problems.append(f"unit {seq} went to the reject bin but serial(s) {live} are still commissioned")
    for j, n in jobs.items():
        if n > 1:
            led.problems.append(f"printer job {j[1]} (daemon run {j[0]}) printed on {n} units")
    return led


async def gate_units(sl: SimulatedLine) -> list[dict[str, Any]]:
    """Every unit the gate saw (the simulator keeps the last 1000)."""
    rep = await sim(sl, cmd="units", last=1000)
    units = rep["units"]
    st = await sim(sl, cmd="status")
    done = sum(int(c["done"]) for c in st["conveyors"].values())
    assert len(units) == done, f"simulator kept {len(units)} of {done} units: test batch too big for the 'units' window"
    return units


def check_report(report: dict[str, Any], *, planned: int | None = None) -> None:
    assert report["balanced"], f"batch report not balanced: {report['problems']} {report}"
    assert report["still_sent"] == 0 and report["still_allocated"] == 0, report
    assert report["provisioned"] == report["commissioned"] + report["decommissioned"] + report["returned"] + report["voided"], report
    if planned is not None:
        assert report["commissioned"] == planned, report


# --------------------------------------------------------------------------- subprocesses (daemon tests)


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    fh = open(log, "ab")
    try:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})}, start_new_session=True)
    finally:
        fh.close()


def stop_proc(p: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
    if p is None or p.poll() is not None:
        return None if p is None else p.returncode
    p.send_signal(sig)
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait(5)
