"""The daemon as it runs on a line PC: `linectl run -c CONFIG` in its own process, the simulated line in another
(`linectl simulate -c CONFIG`), a real MQTT broker, operator commands with `linectl batch ... -c CONFIG`.

- kill -9 mid-batch, restart: every serial that was in flight is decommissioned (crash_recovery), the batch
  is stopped (never resumed by itself), and once an operator starts it again it finishes with
  commissioned = planned, no serial commissioned twice, no bad unit passed, and a balanced report;
- SIGTERM: a clean stop (line drained, batch stopped, store flushed), exit code 0;
- a corrupt store file: `linectl run` refuses it with exit code 3 and says why.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import (
    LINECTL,
    REPO,
    SHARED_BROKER,
    TEST_PASSWORDS,
    db_query,
    lot_events_from_db,
    password_env,
    port_open,
    serial_states,
    spawn,
    stop_proc,
    unique_root,
    unit_ledger,
    variant_config,
)
from ruamel.yaml import YAML

from linectl.demo import _rewrite_ports
from linectl.events import UnitCommissioned, UnitDecommissioned
from linectl.simulators.control import request
from linectl.yamlsource import load_yaml, to_plain

pytestmark = pytest.mark.slow

GTIN = "09501101530003"
#: the line's operator in these tests, a user of the store (added by the default admin after `linectl init`)
OPERATOR, OPERATOR_PW = "operator1", "Line-Runner-pw-7"


class LineProcesses:
    """A config on disk, the simulator process, the daemon process (restartable), a broker, and the CLI."""

    def __init__(self, tmp: Path, *, rate: float = 1200, defect_rate: float = 0.03, seed: int = 5, plc: dict[str, Any] | None = None) -> None:
        self.tmp = tmp
        self.db = tmp / "line.db"
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.broker: Any = None
        if port_open(*SHARED_BROKER):
            host, port = SHARED_BROKER
        else:
            from mqtt_fixtures import Broker

            self.broker = Broker(tmp / "broker").start()
            host, port = "127.0.0.1", self.broker.port
        # with the demo config's access control: the CLI logs in as operator1 (added after init by the admin, over the CLI)
        base = variant_config(tmp, simulation={"rate_upm": rate, "defect_rate": defect_rate, "seed": seed, "variation_rate": 0.02}, access=True)
        raw = _rewrite_ports(to_plain(load_yaml(base)), tmp)
        raw["mqtt"].update({"host": host, "port": port, "enabled": True, "topic_root": unique_root()})
        raw["store"]["path"] = str(self.db)
        raw["devices"]["plc1"].update(plc or {})
        self.cfg = tmp / "line.yaml"
        with open(self.cfg, "w", encoding="utf-8") as fh:
            YAML(typ="safe").dump(raw, fh)
        self.control_port = int(raw["simulation"]["control_port"])
        self.sim: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_runs = 0

    # -- processes

    def start_sim(self) -> None:
        self.sim = spawn([*LINECTL, "--log-level", "warning", "simulate", "-c", str(self.cfg), "--truth", str(self.tmp / "truth.json")], self.logs / "sim.log")
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", self.control_port):
            assert self.sim.poll() is None, f"simulator exited: {(self.logs / 'sim.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "simulator control port never opened"
            time.sleep(0.05)

    def start_daemon(self) -> None:
        if not self.db.exists():  # `linectl run` never creates a store: the line is commissioned with `linectl init`
            env = {**os.environ, **password_env()}
            subprocess.run([*LINECTL, "init", "-c", str(self.cfg)], check=True, capture_output=True, cwd=REPO, timeout=60, env=env)
            subprocess.run([*LINECTL, "users", "add", OPERATOR, "-c", str(self.cfg), "--name", "Operator One", "--roles", "operator,supervisor,qa",
                            "--reason", "test operator", "--user", "admin", "--sign"], check=True, capture_output=True, cwd=REPO, timeout=60,
                           env={**env, "LINECTL_PASSWORD": TEST_PASSWORDS["admin"], "LINECTL_NEW_PASSWORD": OPERATOR_PW})
        self.daemon_runs += 1
        self.daemon = spawn([*LINECTL, "--log-level", "info", "run", "-c", str(self.cfg)], self.logs / f"daemon{self.daemon_runs}.log")
        self.wait_ready()

    def daemon_log(self) -> str:
        return (self.logs / f"daemon{self.daemon_runs}.log").read_text(errors="replace")

    def close(self) -> None:
        for p in (self.daemon, self.sim):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)
        if self.broker is not None:
            self.broker.close()

    # -- operator CLI (over MQTT)

    def batch(self, action: str, *args: str, timeout: float = 20) -> tuple[int, dict[str, Any], str]:
        # the actions access.signatures lists by default are signed (start, close, a batch without its challenge)
        sign = ["--sign"] if action in ("start", "close") or (action == "create" and "--no-challenge" in args) else []
        p = subprocess.run(
            [*LINECTL, "--log-level", "error", "batch", action, "-c", str(self.cfg), "--user", OPERATOR, "--timeout", str(timeout), *sign, *args],
            capture_output=True, text=True, cwd=REPO, timeout=timeout + 30, env={**os.environ, "LINECTL_PASSWORD": OPERATOR_PW},
        )
        try:
            body = json.loads(p.stdout) if p.stdout.strip() else {}
        except ValueError:
            body = {}
        return p.returncode, body, p.stderr

    def wait_ready(self, timeout: float = 30) -> None:
        """Until the daemon answers over MQTT (its bridge subscribes a moment after start-up)."""
        deadline = time.monotonic() + timeout
        while True:
            rc, body, err = self.batch("state", timeout=1.5)
            if rc == 0 and body.get("ok"):
                return
            assert self.daemon is None or self.daemon.poll() is None, f"daemon exited: {self.daemon_log()[-3000:]}"
            assert time.monotonic() < deadline, f"daemon never answered: {(rc, body, err)}\n{self.daemon_log()[-3000:]}"

    def batch_ok(self, action: str, *args: str, attempts: int = 30) -> dict[str, Any]:
        """The command until the daemon accepts it (it may still be connecting to its devices)."""
        last: Any = None
        for _ in range(attempts):
            rc, body, err = self.batch(action, *args)
            if rc == 0 and body.get("ok"):
                return body
            last = (rc, body, err)
            retryable = rc == 1 and (not body or body.get("error", {}).get("code") in ("devices_not_ready", "plc_error"))
            if not retryable and body:
                break
            time.sleep(0.5)
        raise AssertionError(f"linectl batch {action} failed: {last}\n--- daemon log ---\n{self.daemon_log()[-3000:]}")

    # -- reads

    def q(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return db_query(self.db, sql, params)

    def counts(self, lot: str) -> dict[str, int]:
        return dict(self.q("SELECT state, count(*) FROM serials WHERE lot=? GROUP BY state", lot))

    def batch_state(self, lot: str) -> str | None:
        r = self.q("SELECT state FROM batches WHERE lot=?", lot)
        return r[0][0] if r else None

    async def sim_cmd(self, **msg: Any) -> dict[str, Any]:
        reply = await request("127.0.0.1", self.control_port, msg)
        assert reply.get("ok"), reply
        return reply

    async def wait(self, pred: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                v = pred()
            except Exception:  # noqa: BLE001 - db not there yet, locked for a moment...
                v = None
            if v:
                return v
            if self.daemon is not None and self.daemon.poll() is not None and self.daemon.returncode not in (None, -9):
                raise AssertionError(f"daemon exited with {self.daemon.returncode} while waiting for {what}:\n{self.daemon_log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n--- daemon log ---\n{self.daemon_log()[-3000:]}")
            await asyncio.sleep(0.1)

    async def belt_empty(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            st = await self.sim_cmd(cmd="status")
            if all(int(c["in_flight"]) == 0 for c in st["conveyors"].values()):
                return
            assert time.monotonic() < deadline, f"belt never emptied: {st['conveyors']}"
            await asyncio.sleep(0.1)


@pytest.fixture
def line_procs(tmp_path: Path):
    lp = LineProcesses(tmp_path)
    try:
        yield lp
    finally:
        lp.close()


def _expiry() -> str:
    return time.strftime("%y%m%d", time.localtime(time.time() + 700 * 86400))


async def test_kill9_mid_batch_then_restart_loses_nothing(line_procs: LineProcesses):
    lp = line_procs
    lot, planned = f"K9{os.getpid()}{int(time.time()) % 100000}", 400  # room for the pause after the restart: under load the kill lands well past 80 units
    lp.start_sim()
    lp.start_daemon()
    created = lp.batch_ok("create", "--lot", lot, "--gtin", GTIN, "--expiry", _expiry(), "--qty", str(planned))
    assert created["result"]["state"] == "created"
    await lp.sim_cmd(cmd="challenge", kinds=["no_code", "wrong_code", "duplicate", "not_gs1", "low_grade"])
    started = lp.batch_ok("start")
    assert started["result"]["state"] == "challenge"
    await lp.wait(lambda: lp.batch_state(lot) == "running", 30, "challenge passed, batch running")
    await lp.wait(lambda: lp.counts(lot).get("commissioned", 0) >= 80, 60, "80 units commissioned")

    # power cut of the controller, mid-batch, while the PLC answers slowly: units are commissioned whose "good"
    # is still on its way to the PLC when the controller dies; the gate rejects them fail-safe
    await lp.sim_cmd(cmd="inject", device="plc1", fault="slow", delay_s=0.3, duration_s=1.2)
    await asyncio.sleep(0.6)
    lp.daemon.send_signal(signal.SIGKILL)
    assert lp.daemon.wait(10) == -signal.SIGKILL
    at_kill = lp.counts(lot)
    in_flight = {s for (s,) in lp.q("SELECT serial FROM serials WHERE lot=? AND state='sent'", lot)}
    commissioned_at_kill = {s for (s,) in lp.q("SELECT serial FROM serials WHERE lot=? AND state='commissioned'", lot)}
    assert lp.batch_state(lot) == "running"
    # the PLC notices the dead controller (heartbeat) and stops the belt by itself
    deadline = time.monotonic() + 10
    while True:
        st = await lp.sim_cmd(cmd="status")
        if not st["conveyors"]["pv1"]["belt_running"]:
            seq_at_kill = int(st["devices"]["plc1"]["trigger_count"])
            break
        assert time.monotonic() < deadline, "PLC kept the belt running without a controller"
        await asyncio.sleep(0.1)

    # restart: in-flight serials decommissioned, batch stopped, nothing resumes by itself
    lp.start_daemon()
    await lp.wait(lambda: lp.batch_state(lot) == "stopped", 30, "batch stopped after restart")
    await lp.wait(lambda: lp.counts(lot).get("sent", 0) == 0, 30, "no serial left 'sent'")
    recovered = {
        e.serial for e in lot_events_from_db(lp.db, lot) if isinstance(e, UnitDecommissioned) and e.reason.value == "crash_recovery"
    }
    assert in_flight <= recovered, f"in-flight serials not decommissioned: {in_flight - recovered}"
    assert recovered == in_flight, f"decommissioned as crash_recovery but not in flight at the kill: {recovered - in_flight}"
    await asyncio.sleep(2.0)
    assert lp.batch_state(lot) == "stopped"
    assert lp.counts(lot).get("commissioned", 0) <= at_kill.get("commissioned", 0), "units commissioned without an operator start"
    st = await lp.sim_cmd(cmd="status")
    assert st["conveyors"]["pv1"]["feed_mode"] == 0, "product fed before the operator started the batch"
    await lp.belt_empty()
    audit = lp.q("SELECT action, origin FROM audit WHERE action='crash_recovery'")
    assert audit, "crash recovery not in the audit trail"

    # the operator starts it again; then pauses it (the printer keeps its queue of codes while paused)...
    lp.batch_ok("start")
    good_before = lp.counts(lot).get("commissioned", 0)
    await lp.wait(lambda: lp.counts(lot).get("commissioned", 0) >= good_before + 40, 60, "40 more units commissioned")
    lp.batch_ok("pause")
    await lp.wait(lambda: lp.batch_state(lot) == "paused", 10, "batch paused")
    await lp.belt_empty()
    # ... and the controller dies while paused: the jobs queued on the printer carry serials that recovery
    # decommissions; they must never be printed after the restart
    lp.daemon.send_signal(signal.SIGKILL)
    lp.daemon.wait(10)
    queued = {s for (s,) in lp.q("SELECT serial FROM serials WHERE lot=? AND state='sent'", lot)}
    assert queued, "nothing queued on the printer while paused"
    st = await lp.sim_cmd(cmd="status")
    seq_at_kill2 = int(st["devices"]["plc1"]["trigger_count"])
    lp.start_daemon()
    await lp.wait(lambda: lp.batch_state(lot) == "stopped" and lp.counts(lot).get("sent", 0) == 0, 30, "recovery after the second kill")
    in_flight |= queued

    # the operator starts it again; it runs to the planned quantity
    lp.batch_ok("start")
    await lp.wait(lambda: lp.batch_state(lot) == "stopped" and lp.counts(lot).get("commissioned", 0) >= planned, 90, "batch to reach its planned quantity")
    closed = lp.batch_ok("close")
    assert closed["result"]["state"] == "closed"
    await lp.belt_empty()
    truth = await lp.sim_cmd(cmd="truth")
    units = (await lp.sim_cmd(cmd="units", last=1000))["units"]

    # SIGTERM: clean exit
    assert stop_proc(lp.daemon, signal.SIGTERM, 30) == 0, lp.daemon_log()[-3000:]

    p = subprocess.run([*LINECTL, "report", "--db", str(lp.db), "--batch", lot, "--json"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr + p.stdout
    report = json.loads(p.stdout)
    assert report["balanced"], report
    assert report["commissioned"] == planned, report
    assert report["rejects_by_reason"].get("crash_recovery", 0) == len(in_flight)
    assert len(report["challenge"]) == 5 and all(c["rejected"] for c in report["challenge"])

    assert truth["missed_rejects"] == 0, truth["missed"]
    assert truth["challenge_passed"] == 0
    events = lot_events_from_db(lp.db, lot)
    commissioned = Counter(e.serial for e in events if isinstance(e, UnitCommissioned))
    assert max(commissioned.values()) == 1, [s for s, n in commissioned.items() if n > 1]
    states = serial_states(lp.db, lot)
    assert len([s for s in commissioned if states[s] == "commissioned"]) == planned
    # a unit commissioned before the crash stays commissioned, unless the gate rejected it because its verdict
    # never reached the PLC: then it was decommissioned (plc_failsafe) after the restart
    undone = {s for s in commissioned_at_kill if states[s] != "commissioned"}
    reasons = {e.serial: e.reason.value for e in events if isinstance(e, UnitDecommissioned)}
    assert all(reasons.get(s) == "plc_failsafe" for s in undone), {s: reasons.get(s) for s in undone}
    assert not (set(commissioned) & in_flight), "a serial in flight at the crash was commissioned later"
    assert len(units) == truth["passed"] + truth["rejected"]
    unit_ledger(units, events, states, epochs=(seq_at_kill, seq_at_kill2)).assert_ok()
    assert truth["passed"] == planned, truth
    # after the restart every printed unit is one linectl sent and tracked (no job left over from before the crash)
    decided = {e.seq: e for e in events if isinstance(e, (UnitCommissioned, UnitDecommissioned)) and e.seq is not None}
    untracked = [u["seq"] for u in units if u["seq"] > seq_at_kill and u["job_seq"] is not None and u["seq"] not in decided]
    assert not untracked, f"units printed after the restart without a decision: {untracked}"
    unexpected = [s for s, e in decided.items() if s > seq_at_kill and isinstance(e, UnitDecommissioned) and e.reason.value == "unexpected_unit"]
    assert not unexpected, unexpected


async def test_sigterm_stops_cleanly_and_restart_needs_no_recovery(line_procs: LineProcesses):
    lp = line_procs
    lot = f"ST{os.getpid()}{int(time.time()) % 100000}"
    lp.start_sim()
    lp.start_daemon()
    lp.batch_ok("create", "--lot", lot, "--gtin", GTIN, "--expiry", _expiry(), "--qty", "5000", "--no-challenge")
    lp.batch_ok("start")
    await lp.wait(lambda: lp.counts(lot).get("commissioned", 0) >= 40, 60, "40 units commissioned")
    t0 = time.monotonic()
    rc = stop_proc(lp.daemon, signal.SIGTERM, 40)
    assert rc == 0, f"exit code {rc}\n{lp.daemon_log()[-3000:]}"
    assert time.monotonic() - t0 < 30
    log = lp.daemon_log()
    assert "daemon_stopped" in log
    # drained and flushed: batch stopped, nothing left in flight, every state change durable
    assert lp.batch_state(lot) == "stopped"
    counts = lp.counts(lot)
    assert counts.get("sent", 0) == 0, counts
    history = [json.loads(b)["state"] for (b,) in lp.q("SELECT body FROM outbox WHERE lot=? AND kind='batch_state' ORDER BY seq", lot)]
    assert history[-1] == "stopped", history
    await lp.belt_empty()
    truth = await lp.sim_cmd(cmd="truth")
    assert truth["missed_rejects"] == 0, truth
    units = (await lp.sim_cmd(cmd="units", last=1000))["units"]
    events = lot_events_from_db(lp.db, lot)
    unit_ledger(units, events, serial_states(lp.db, lot)).assert_ok()

    # restart after a clean stop: nothing to recover, batch still stopped, then it can be closed
    recov_before = lp.q("SELECT count(*) FROM audit WHERE action='crash_recovery'")[0][0]
    lp.start_daemon()
    lp.batch_ok("state")
    assert lp.q("SELECT count(*) FROM audit WHERE action='crash_recovery'")[0][0] == recov_before == 0
    assert lp.batch_state(lot) == "stopped"
    closed = lp.batch_ok("close", "--unused", "void")
    assert closed["result"]["report"]["balanced"], closed
    assert stop_proc(lp.daemon, signal.SIGTERM, 30) == 0
    audit_origins = {o for (o,) in lp.q("SELECT origin FROM audit WHERE action IN ('create_batch','start_batch','close_batch')")}
    assert all(o.startswith("mqtt") for o in audit_origins), audit_origins


def test_corrupt_store_is_refused_with_exit_code_3(tmp_path: Path):
    cfg = variant_config(tmp_path)
    db = tmp_path / "corrupt.db"
    db.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    p = subprocess.run([*LINECTL, "run", "-c", str(cfg), "--db", str(db)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 3, (p.returncode, p.stderr[-2000:])
    assert "store refused" in p.stderr and str(db) in p.stderr, p.stderr[-2000:]
    other = tmp_path / "not-a-db.db"
    other.write_text("this is a text file, not a linectl store\n")
    p = subprocess.run([*LINECTL, "run", "-c", str(cfg), "--db", str(other)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 3, (p.returncode, p.stderr[-2000:])
    assert "store refused" in p.stderr, p.stderr[-2000:]
