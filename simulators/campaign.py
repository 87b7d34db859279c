"""Seeded fault campaign: a real line driven through random faults, then checked against ground truth.

One run brings up, all on loopback with free ports, in a private work dir:

- a Mosquitto broker of its own (persistence on, so it can restart with or
  without its state);
- the line simulator (`linectl simulate`, a subprocess) writing the
  append-only unit journal (`simulation.units_log`, simulators.model.UnitJournal);
- a chaos proxy (simulators.chaos) on every TCP device link, between
  the daemon's drivers and the simulated devices;
- the daemon (`linectl run`, a subprocess in its own process group, so it can
  be killed -9, stalled with SIGSTOP and given a full disk);
- an independent subscriber on <root>/# with a persistent session that
  confirms what it stored on <root>/confirm (the upstream of confirmed delivery);
- an operator who creates, challenges, starts, resumes, stops and closes
  batches over MQTT (as an HMI / the `linectl batch` CLI would).

A seeded scheduler injects faults one episode at a time (FAULT_KINDS). At the
end every fault is healed, the open batch is stopped and closed, the outbox
drained, the processes stopped, and `check()` compares what linectl recorded
with what physically happened (the unit journal) and with what the subscriber
received. linectl's own counters are never the reference.

It lives next to the simulators because it is product tooling like them (a
line builder can run it against their own line YAML before a validation run),
and so both tests/test_campaign.py and bench/campaign.py import it without
installing anything beyond the project.

The seed fixes the fault schedule and the simulated defects; process
scheduling on a loaded machine still varies between runs of the same seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from linectl.config import Product
from linectl.demo import demo_batch_dates
from linectl.gs1 import CodeTemplate
from linectl.simulators.chaos import ChaosProxy
from linectl.simulators.control import request as sim_request

log = structlog.get_logger("linectl.simulators.campaign")
#: paho's logger for the campaign's own clients: a broker killed under them is this harness's doing, not news
QUIET_MQTT = logging.getLogger("linectl.simulators.campaign.mqtt")
QUIET_MQTT.setLevel(logging.CRITICAL)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "config" / "demo-line.yaml"
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
GS = "\x1d"
#: the reject reason that proves a challenge unit of each kind was recognised (linectl.engine.verdict.CHALLENGE_EXPECTED_REASON)
CHALLENGE_REASON = {"no_code": "no_read", "wrong_code": "wrong_content", "duplicate": "duplicate", "not_gs1": "not_gs1", "low_grade": "low_grade"}

#: what the `hostile` fault publishes on the command topics, dealt from a shuffled deck
HOSTILE_KINDS = ("malformed", "empty", "retained_start", "retained_clear", "oversize", "nested", "sys_reply", "events_reply", "garbage_verify", "unknown")

#: uncoded production packs fed in a row beyond which the line failed to stop. Generous: the stop rules
#: (5 consecutive rejects, 3 no-reads) plus the units between printer and gate plus a 2 s PLC heartbeat
#: timeout at 600 upm stay well below it.
UNCODED_RUN_LIMIT = 60

FAULT_KINDS = (
    "kill",  # kill -9 of the daemon at a random moment, then restart
    "kill_challenge",  # kill -9 while the batch is in its challenge test
    "kill_close",  # kill -9 right after a close_batch was sent
    "stall",  # SIGSTOP 0.2-5 s, then SIGCONT
    "plc_cold",  # PLC cold restart (counters and rings back to 0)
    "plc_warm",  # PLC warm restart (retentive memory kept)
    "sim_crash",  # kill -9 of the simulator process, restart it
    "broker_keep",  # broker stopped and restarted with its persistence file
    "broker_lose",  # broker killed and restarted empty (state lost)
    "consumer_late",  # the subscriber goes away for a while and comes back
    "chaos",  # garbage / splits / delays / resets on device links for a while
    "disk_full",  # the daemon cannot grow its store files for a while (RLIMIT_FSIZE)
    "operator",  # pause / resume / stop / start / challenge / close at a random moment
    "hostile",  # malformed, retained, empty, oversize, deeply nested commands, abusive response topics
)


# --------------------------------------------------------------------------- options and results


@dataclass
class CampaignOptions:
    seconds: float = 60.0
    seed: int = 1
    faults: tuple[str, ...] = FAULT_KINDS
    rate_upm: float = 600.0
    batch_units: int = 150
    defect_rate: float = 0.03
    mean_gap_s: float = 4.0  # mean time between fault episodes
    #: fault time runs on (up to 3x `seconds`) until this many episodes went in: on a loaded machine a slow
    #: restart can take most of a short window, and a run with too few faults proves little
    min_faults: int = 0
    confirm: str = "upstream"  # mqtt.delivery_confirm; dropped (and noted) when this build refuses the key
    config: Path = DEFAULT_CONFIG
    workdir: Path | None = None
    keep: bool = False  # keep the work dir (logs, store, journal) even when the run is clean
    echo: Callable[[str], None] | None = None


@dataclass
class Violation:
    check: str
    detail: str
    serial: str | None = None  # the serial concerned, when there is one

    def __str__(self) -> str:
        return f"[{self.check}] {self.detail}"


@dataclass
class RunResult:
    seed: int
    seconds: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    skipped: dict[str, str] = field(default_factory=dict)
    units: dict[str, int] = field(default_factory=dict)
    batches: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    restart_to_ready_s: list[float] = field(default_factory=list)
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations

    def by_check(self) -> Counter[str]:
        return Counter(v.check for v in self.violations)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "seconds": round(self.seconds, 1),
            "faults": dict(sorted(self.faults.items())),
            "skipped": self.skipped,
            "units": self.units,
            "batches": self.batches,
            "violations": len(self.violations),
            "violations_by_check": dict(sorted(self.by_check().items())),
            "violation_examples": [str(v) for v in self.violations[:40]],
            "notes": self.notes,
            "restart_to_ready_s": [round(x, 2) for x in self.restart_to_ready_s],
            "workdir": self.workdir,
        }

    def summary(self) -> str:
        f = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"
        u = ", ".join(f"{k} {v}" for k, v in self.units.items())
        lines = [
            f"seed {self.seed}: {self.seconds:.0f} s, batches {len(self.batches)}",
            f"  faults: {f}",
            f"  units: {u}",
            f"  violations: {len(self.violations)}" + (f" {dict(sorted(self.by_check().items()))}" if self.violations else ""),
        ]
        if self.restart_to_ready_s:
            r = sorted(self.restart_to_ready_s)
            lines.append(f"  daemon restart to answering commands: {len(r)} restarts, median {r[len(r) // 2]:.1f} s, max {r[-1]:.1f} s")
        if self.skipped:
            lines.append(f"  skipped: {self.skipped}")
        for v in self.violations[:12]:
            lines.append(f"    {v}")
        if len(self.violations) > 12:
            lines.append(f"    ... {len(self.violations) - 12} more")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- small helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def kill_group(p: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
    """Signal the process group of a child started with start_new_session (its pid is the group id)."""
    if p is None or p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)


def stop_child(p: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    if p is None or p.poll() is not None:
        return
    kill_group(p, signal.SIGCONT)
    kill_group(p, signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_group(p, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)


def parse_element_string(content: str | None) -> dict[str, str]:
    """AIs of a printed element string; {} when it is not one.

    A valid code is read by linectl.gs1 (any AI a code template may print: dates, constants such as 714);
    a damaged one as far as its 01/date/10/21 prefix goes."""
    out: dict[str, str] = {}
    if not content:
        return out
    from linectl import gs1

    try:
        return dict(gs1.parse(content).ais)
    except gs1.GS1Error:
        pass
    s = content
    fixed = {"01": 14, "11": 6, "13": 6, "15": 6, "16": 6, "17": 6}
    i = 0
    while i < len(s):
        ai = s[i : i + 2]
        if ai in fixed:
            out[ai] = s[i + 2 : i + 2 + fixed[ai]]
            i += 2 + fixed[ai]
        elif ai in ("10", "21"):
            j = s.find(GS, i + 2)
            j = len(s) if j < 0 else j
            out[ai] = s[i + 2 : j]
            i = j + 1
        else:
            return out
        if i < len(s) and s[i] == GS:
            i += 1
    return out


def ro_query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return list(con.execute(sql, params))
    finally:
        con.close()


# --------------------------------------------------------------------------- processes


class Broker:
    """A private mosquitto with a persistence file: restart with state (SIGTERM saves) or without (kill, delete)."""

    def __init__(self, directory: Path) -> None:
        if MOSQUITTO is None:
            raise RuntimeError("mosquitto binary not found")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.dir / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.dir}/",
            "max_queued_messages 200000",
            "max_inflight_messages 100",
            "log_dest none",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if MOSQUITTO is None:
            raise RuntimeError("the campaign needs mosquitto (apt-get install mosquitto)")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if port_open(self.port):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not listen")

    def restart(self, keep_state: bool) -> None:
        if keep_state:
            stop_child(self.proc, 10)
        else:
            kill_group(self.proc)
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
            for f in self.dir.glob("*.db"):
                f.unlink()
        self.start()

    def close(self) -> None:
        kill_group(self.proc)


class LoggedChild:
    """A subprocess in its own process group whose output goes through a pipe to a log file.

    Through a pipe, not straight into a file: the disk_full fault limits the
    size of files the daemon may write, and that must hit its store, not its log.
    """

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> subprocess.Popen[bytes]:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(REPO), env=self.env, start_new_session=True)
        out = self.proc.stdout
        path = self.log_path

        def pump() -> None:
            assert out is not None
            with open(path, "ab") as fh:
                for line in iter(out.readline, b""):
                    fh.write(line)
                    fh.flush()

        self._thread = threading.Thread(target=pump, daemon=True, name=f"pump:{path.name}")
        self._thread.start()
        return self.proc

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        kill_group(self.proc, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        stop_child(self.proc, timeout)
        if self._thread is not None:
            self._thread.join(2)


# --------------------------------------------------------------------------- the upstream consumer


class Subscriber:
    """The independent consumer: persistent session on <root>/#, keeps every eventID, confirms seq ranges."""

    def __init__(self, port_of: Callable[[], int], root: str, confirm: bool) -> None:
        self.port_of = port_of
        self.root = root
        self.confirm = confirm
        self.client_id = f"campaign-sub-{uuid.uuid4().hex[:8]}"
        self.event_ids: set[str] = set()
        self.messages = 0
        self.foreign: list[str] = []  # non-EPCIS payloads on <root>/events
        self.state: dict[str, Any] | None = None
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="campaign.subscriber")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        self.connected.clear()

    async def _run(self) -> None:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        quiet = QUIET_MQTT
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port_of(), identifier=self.client_id, protocol=aiomqtt.ProtocolVersion.V5,
                    clean_start=False, properties=props, keepalive=10, logger=quiet,
                ) as c:
                    await c.subscribe(f"{self.root}/#", qos=1)
                    self.connected.set()
                    async for m in c.messages:
                        await self._handle(c, m)
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.2)

    async def _handle(self, c: Any, m: Any) -> None:
        topic = str(m.topic)
        payload = bytes(m.payload) if isinstance(m.payload, (bytes, bytearray)) else str(m.payload or "").encode()
        sub = topic[len(self.root) + 1 :] if topic.startswith(self.root + "/") else topic
        if sub == "state":
            with contextlib.suppress(ValueError):
                self.state = json.loads(payload)
            return
        if sub not in ("events", "records", "alarms"):
            return
        self.messages += 1
        first = last = None
        try:
            body = json.loads(payload)
            if sub == "events":
                ids = [e["eventID"] for e in body["epcisBody"]["eventList"]]
                a, _, b = str(body.get("instanceIdentifier", "")).partition("-")
                first, last = int(a), int(b)
            else:
                ids = [body["event_id"]]
                first = last = int(body["seq"])
        except (ValueError, KeyError, TypeError) as exc:
            if sub == "events":
                self.foreign.append(f"{payload[:120]!r} ({exc})")
            return
        up = dict(getattr(m.properties, "UserProperty", None) or []) if m.properties is not None else {}
        if "first_seq" in up:
            first, last = int(up["first_seq"]), int(up["last_seq"])
        self.event_ids.update(ids)
        if self.confirm and first is not None:
            import aiomqtt

            with contextlib.suppress(aiomqtt.MqttError):
                await c.publish(f"{self.root}/confirm", json.dumps({"ranges": [[first, last]]}).encode(), qos=1)


# --------------------------------------------------------------------------- the campaign


class Campaign:
    def __init__(self, opts: CampaignOptions) -> None:
        self.o = opts
        self.rng = random.Random(f"campaign:{opts.seed}")
        self.res = RunResult(seed=opts.seed)
        self.dir = Path(opts.workdir or tempfile.mkdtemp(prefix=f"linectl-campaign-{opts.seed}-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.res.workdir = str(self.dir)
        self.db = self.dir / "line.db"
        self.journal = self.dir / "units.jsonl"
        self.root = f"campaign/{uuid.uuid4().hex[:10]}/line1"
        self.broker: Broker | None = None
        self.daemon: LoggedChild | None = None
        self.sim: LoggedChild | None = None
        self.proxies: dict[str, ChaosProxy] = {}
        self.sub: Subscriber | None = None
        self.ctl_port = 0
        self.plc = ""
        self.kinds: list[str] = []
        self.gtin = ""
        self.template: CodeTemplate | None = None
        self.lots: list[dict[str, Any]] = []  # {"lot", "created_t"}
        self.batch_n = 0
        self.hold_until = 0.0  # operator leaves a pause / stop alone until then
        self.want_kill_challenge = False
        self.want_kill_close = False
        #: the harness killed the daemon and has not restarted it yet (an episode cut short at the end of fault time)
        self.killed_by_harness = False
        self._last_state: str | None = None
        self.challenge_t = 0.0  # when challenge units were last put on the infeed
        self._hostile_deck: list[str] = []
        self.retained_starts = 0  # retained start_batch commands published (each may run once, live, never again)
        self.ready = asyncio.Event()  # the daemon is up (not killed / stalled / restarting)
        self.busy = asyncio.Lock()  # one fault episode or operator action on the daemon at a time
        self.ending = False
        self.t0 = time.monotonic()

    def echo(self, msg: str) -> None:
        if self.o.echo is not None:
            self.o.echo(f"{time.monotonic() - self.t0:7.1f}s {msg.strip()}")

    # ------------------------------------------------------------------ setup

    def _write_configs(self) -> tuple[Path, Path]:
        from ruamel.yaml import YAML

        from linectl.yamlsource import load_yaml, to_plain

        raw = to_plain(load_yaml(self.o.config))
        sim_raw = json.loads(json.dumps(raw))
        run_raw = json.loads(json.dumps(raw))
        for name, dev in (raw.get("devices") or {}).items():
            if dev.get("driver") == "camera":
                sim_raw["devices"].pop(name, None)
                run_raw["devices"].pop(name, None)
                continue
            if isinstance(dev.get("port"), int):
                port = free_port()
                sim_raw["devices"][name]["port"] = port
                proxy = ChaosProxy(("127.0.0.1", port), name=name, seed=self.o.seed)
                self.proxies[name] = proxy
        self.ctl_port = free_port()
        sim = sim_raw.setdefault("simulation", {})
        sim.update(
            {"control_port": self.ctl_port, "units_log": str(self.journal), "seed": self.o.seed,
             "rate_upm": self.o.rate_upm, "defect_rate": self.o.defect_rate}
        )
        run_raw.pop("simulation", None)
        assert self.broker is not None
        mqtt: dict[str, Any] = {"host": "127.0.0.1", "port": self.broker.port, "protocol": "5", "topic_root": self.root, "enabled": True,
            "state_interval_s": 1.0}
        run_raw["mqtt"] = {**(run_raw.get("mqtt") or {}), **mqtt}
        run_raw.setdefault("store", {})["path"] = str(self.db)
        if run_raw.pop("access", None) is not None:
            # the campaign's subject is the record under faults; its operator sends unauthenticated commands as to a
            # line without access control (the daemon says so at start). Access control has its own tests
            # (tests/test_access*.py), through the same MQTT command path.
            self.res.notes.append("access control off in the campaign's run config (the operator's commands are anonymous)")
        self.plc = next(st["plc"] for st in raw["stations"] if st.get("type") in ("print_verify", "verify"))
        self.kinds = list((raw.get("batch") or {}).get("challenge") or [])
        self.gtin = raw["products"][0]["gtin"]
        self.template = Product.model_validate(raw["products"][0]).template  # which dates its batches must give
        sim_path, run_path = self.dir / "sim.yaml", self.dir / "run.yaml"
        for path, doc in ((sim_path, sim_raw), (run_path, run_raw)):
            with open(path, "w", encoding="utf-8") as fh:
                YAML(typ="safe").dump(doc, fh)
        return sim_path, run_path

    def _confirm_key(self, run_path: Path) -> None:
        """Ask for confirmed delivery (mqtt.delivery_confirm, with a short mqtt.confirm_timeout_s so a lost
        message is resent within the run) as far as this build knows the keys."""
        from ruamel.yaml import YAML

        from linectl.config import load_config
        from linectl.yamlsource import ConfigFileError, load_yaml, to_plain

        if self.o.confirm == "puback":
            return
        first_error = ""
        for extra in ({"delivery_confirm": self.o.confirm, "confirm_timeout_s": 10.0}, {"delivery_confirm": self.o.confirm}):
            raw = to_plain(load_yaml(run_path))
            raw["mqtt"].update(extra)
            trial = self.dir / "run-confirm.yaml"
            with open(trial, "w", encoding="utf-8") as fh:
                YAML(typ="safe").dump(raw, fh)
            try:
                load_config(trial)
            except (ConfigFileError, ValueError) as exc:
                first_error = str(exc).splitlines()[0][-120:]  # the last attempt's: delivery_confirm alone
                trial.unlink()
                continue
            os.replace(trial, run_path)
            self.res.notes.append("mqtt: " + ", ".join(f"{k}: {v}" for k, v in extra.items()))
            return
        self.res.notes.append(f"mqtt.delivery_confirm refused by this build ({first_error}): the forwarder confirms on PUBACK")

    async def setup(self) -> None:
        self.broker = Broker(self.dir / "broker")
        self.broker.start()
        sim_path, run_path = self._write_configs()
        self._confirm_key(run_path)
        # the daemon's devices are the proxies; the simulator listens behind them
        from ruamel.yaml import YAML

        from linectl.yamlsource import load_yaml, to_plain

        for proxy in self.proxies.values():
            await proxy.start()
        raw = to_plain(load_yaml(run_path))
        for name, proxy in self.proxies.items():
            raw["devices"][name]["port"] = proxy.port
        with open(run_path, "w", encoding="utf-8") as fh:
            YAML(typ="safe").dump(raw, fh)
        self.sim_path, self.run_path = sim_path, run_path
        py = sys.executable
        self.sim = LoggedChild([py, "-m", "linectl", "--log-level", "warning", "simulate", "-c", str(sim_path)], self.dir / "simulator.log")
        self.daemon = LoggedChild([py, "-m", "linectl", "--log-level", "info", "--log-format", "json", "run", "-c", str(run_path)], self.dir / "daemon.log")
        await self._init_store(run_path)
        await self._start_sim()
        self.sub = Subscriber(lambda: self.broker.port if self.broker else 0, self.root, confirm=self.o.confirm == "upstream")
        self.sub.start()
        await asyncio.wait_for(self.sub.connected.wait(), 15)
        await self._start_daemon()

    async def _init_store(self, run_path: Path) -> None:
        """`linectl init -c CONFIG` where this build has it (only init creates a store); else `run` creates it."""
        py = sys.executable
        p = await asyncio.create_subprocess_exec(py, "-m", "linectl", "init", "-c", str(run_path), cwd=str(REPO), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(p.communicate(), 60)
        if p.returncode != 0 and b"invalid choice" not in out:
            raise RuntimeError(f"linectl init failed: {out.decode(errors='replace')[-500:]}")

    async def _start_sim(self) -> None:
        assert self.sim is not None
        self.sim.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not self.sim.alive:
                raise RuntimeError(f"simulator exited; see {self.dir / 'simulator.log'}")
            with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError):
                if (await sim_request("127.0.0.1", self.ctl_port, {"cmd": "status"}, 2.0)).get("ok"):
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError("simulator control did not answer")

    async def _start_daemon(self) -> float:
        """Start `linectl run` and wait until it answers a command; returns the seconds that took."""
        assert self.daemon is not None
        t0 = time.monotonic()
        self.daemon.start()
        deadline = t0 + 90
        while time.monotonic() < deadline:
            if not self.daemon.alive:
                raise RuntimeError(f"daemon exited with {self.daemon.proc.returncode if self.daemon.proc else '?'}; see {self.dir / 'daemon.log'}")
            r = await self.command("request_state", timeout=2.0)
            if r is not None:
                self.ready.set()
                return time.monotonic() - t0
        raise RuntimeError(f"daemon did not answer commands within 90 s; see {self.dir / 'daemon.log'}")

    # ------------------------------------------------------------------ talking to the line

    async def sim_cmd(self, **msg: Any) -> dict[str, Any]:
        try:
            return await sim_request("127.0.0.1", self.ctl_port, msg, 5.0)
        except (TimeoutError, OSError, ValueError) as exc:
            return {"ok": False, "error": f"simulator unreachable: {exc}"}

    async def command(self, name: str, timeout: float = 10.0, **body: Any) -> dict[str, Any] | None:
        """One operator command over MQTT, as `linectl batch` sends it; None when no reply came in time."""
        import aiomqtt

        assert self.broker is not None
        cid = uuid.uuid4().hex
        msg = {"name": name, "command_id": cid, "actor": "campaign-operator", **body}
        try:
            async with asyncio.timeout(timeout):
                async with aiomqtt.Client("127.0.0.1", self.broker.port, identifier=f"campaign-op-{cid[:8]}", protocol=aiomqtt.ProtocolVersion.V5,
                    logger=QUIET_MQTT) as c:
                    await c.subscribe(f"{self.root}/cmd/{name}/reply", qos=1)
                    await c.publish(f"{self.root}/cmd/{name}", json.dumps(msg), qos=1)
                    async for m in c.messages:
                        with contextlib.suppress(ValueError, TypeError):
                            reply = json.loads(bytes(m.payload))
                            if isinstance(reply, dict) and reply.get("command_id") == cid:
                                return reply
        except (aiomqtt.MqttError, TimeoutError, OSError):
            return None
        return None

    async def cli_command(self, action: str, *extra: str) -> int:
        """The same command through `linectl batch` (a subprocess), as an operator at a terminal."""
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "linectl", "batch", action, "-c", str(self.run_path), "--timeout", "8", *extra,
            cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            return await asyncio.wait_for(p.wait(), 30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()
            return -1

    async def state(self) -> dict[str, Any] | None:
        r = await self.command("request_state", timeout=3.0)
        if r is None or not r.get("ok"):
            return None
        return r.get("result")

    # ------------------------------------------------------------------ the operator

    async def operator(self) -> None:
        """Keeps the line producing, as an operator at the HMI would: new batch, challenge units, start, resume, close."""
        while True:
            await asyncio.sleep(0.5)
            if self.ending:
                return
            if not self.ready.is_set() or time.monotonic() < self.hold_until:
                continue
            async with self.busy:
                st = await self.state()
                if st is None:
                    continue
                batch = st.get("batch")
                state = st.get("state")
                if state != self._last_state:
                    self.echo(f"line: {self._last_state} -> {state} (good {batch.get('good') if batch else '-'}, fault {st.get('fault')})")
                    self._last_state = state
                if batch is None or state == "closed":
                    await self._new_batch()
                    continue
                if state == "created":
                    await self._start_batch()
                    continue
                if state == "challenge":
                    sim = await self.sim_cmd(cmd="status")
                    conv: dict[str, Any] = next(iter((sim.get("conveyors") or {}).values()), {}) if sim.get("ok") else {}
                    if conv and conv.get("challenge_queued", 1) == 0 and conv.get("in_flight", 1) == 0 and time.monotonic() - self.challenge_t > 8.0:
                        # the line has asked for challenge units for a while and none is left to feed: feed a set
                        # the kinds the line has not yet seen rejected for their own reason (all, for a new challenge)
                        done = {r.get("challenge") for stn in (st.get("stations") or {}).values() if isinstance(stn, dict)
                                for r in (stn.get("challenge") or []) if isinstance(r, dict) and r.get("passed")}
                        todo = [k for k in self.kinds if k not in done] or self.kinds
                        await self.sim_cmd(cmd="challenge", kinds=todo)
                        self.challenge_t = time.monotonic()
                        self.echo(f"operator: the line still waits for challenge units: fed {todo}")
                    continue
                if state == "paused":
                    await self.command("resume_batch")
                    continue
                if state == "stopped":
                    if batch.get("good", 0) >= batch.get("planned_qty", 1 << 30):
                        await self._reconcile_fates()
                        await self._close_batch()
                    else:
                        await self.command("ack_alarm")
                        await self.command("reset")
                        self.echo(f"operator: restart after stop (alarms {[a.get('code') for a in st.get('alarms') or []][-4:]})")
                        await self._start_batch()
                    continue

    async def _new_batch(self) -> None:
        self.batch_n += 1
        lot = f"C{self.o.seed % 10000}N{self.batch_n}{uuid.uuid4().hex[:4].upper()}"
        expiry = (date.today() + timedelta(days=700)).strftime("%y%m%d")
        created_t = time.time()  # before the command: nothing of this batch can have been fed earlier
        dates: dict[str, Any] = demo_batch_dates(self.template, expiry) if self.template is not None else {}
        r = await self.command("create_batch", lot=lot, gtin=self.gtin, expiry=expiry, planned_qty=self.o.batch_units, **dates)
        self.echo(f"operator: create_batch {lot} -> {'ok' if r and r.get('ok') else (r or {}).get('error', 'no reply')}")
        if r is not None and r.get("ok"):
            self.lots.append({"lot": lot, "created_t": created_t})
            self.res.batches.append(lot)
            await self._start_batch()

    async def _reconcile_fates(self) -> int:
        """Units whose passage of the gate a PLC restart left unproven: the operator looks, as on a real line.

        What a person finds is what physically happened (the journal): the pack in the reject bin, the pack
        downstream (passed), or the pack still on the belt of a crashed line, which they take off by hand into
        the reject bin. They say so with reconcile_units; nothing here asks linectl what it thinks.
        """
        try:
            open_serials = [r[0] for r in ro_query(self.db, "SELECT serial FROM unit_fates WHERE state='fate_unknown'")]
        except sqlite3.Error:
            return 0  # no such table (an older store) or the file is busy: look again next round
        if not open_serials:
            return 0
        # a code can be on more than one pack (a printer duplicate): the person counts the packs carrying it that are
        # not downstream (in the bin, or on the belt of a crashed line and taken off by hand)
        in_bin: dict[str, int] = {}
        on_belt: list[str] = []
        wanted = set(open_serials)
        for u in load_journal(self.journal)["units"]:
            serial = parse_element_string(u.get("content")).get("21")
            if serial and not u.get("challenge"):
                in_bin[serial] = in_bin.get(serial, 0) + (u.get("outcome") != "passed")
                if serial in wanted and u.get("outcome") is None and u.get("uid"):
                    on_belt.append(str(u["uid"]))
        if on_belt:
            # a pack of unknown fate still on the stopped belt: the person lifts it off into the reject bin (else
            # it would ride on to the gate at the next start and pass, after being reconciled as in the bin)
            with contextlib.suppress(Exception):
                r = await self.sim_cmd(cmd="take_off", uids=on_belt)
                self.echo(f"operator: took {len((r or {}).get('taken') or [])} pack(s) of unknown fate off the belt")
        groups: dict[tuple[str, int | None], list[str]] = {}
        for serial in open_serials:
            n = in_bin.get(serial, 0)
            groups.setdefault(("in_bin", n) if n else ("passed", None), []).append(serial)
        done = 0
        for (outcome, copies), serials in groups.items():
            done += await self._reconcile(serials, outcome, copies)
        return done

    async def _reconcile(self, serials: list[str], outcome: str, copies: int | None) -> int:
        # the reason the audit trail keeps (audit.reason_required lists reconcile_units by default): what was checked
        where = "in the reject bin" if outcome == "in_bin" else "past the gate (not in the bin)"
        args: dict[str, Any] = {"serials": serials, "outcome": outcome,
                                "reason": f"physical check after the stop: {len(serials)} unit(s) found {where}"}
        if copies is not None and copies > 1:
            args["copies"] = copies
        r = await self.command("reconcile_units", **args)
        self.echo(f"operator: reconcile_units {outcome} {len(serials)}{f' copies {copies}' if copies and copies > 1 else ''} -> "
                  f"{'ok' if r and r.get('ok') else (r or {}).get('error', 'no reply')}")
        if r and r.get("ok"):
            return len(serials)
        if r is not None and (r.get("error") or {}).get("code") == "ambiguous_copies":
            # linectl knows copies of some of these codes were rejected as duplicates, and the bin holds no more packs
            # with the code than those copies: the unit itself is not in the bin, it went downstream
            if len(serials) > 1:
                return sum([await self._reconcile([s], outcome, copies) for s in serials])
            return await self._reconcile(serials, "passed", None)
        return 0

    async def _start_batch(self) -> None:
        await self._reconcile_fates()
        st = await self.state()
        if st is not None and st.get("fault"):
            await self.command("ack_alarm")
            await self.command("reset")
            self.echo(f"operator: reset fault {st.get('fault')} before start")
        sim = await self.sim_cmd(cmd="status")
        conv: dict[str, Any] = next(iter((sim.get("conveyors") or {}).values()), {}) if sim.get("ok") else {}
        if self.kinds and conv.get("challenge_queued", 0) == 0:
            await self.sim_cmd(cmd="challenge", kinds=self.kinds)
            self.challenge_t = time.monotonic()
        r = await self.command("start_batch")
        self.echo(f"operator: start_batch -> {'ok' if r and r.get('ok') else (r or {}).get('error', 'no reply')}")
        if self.want_kill_challenge and r is not None and r.get("ok"):
            await asyncio.sleep(self.rng.uniform(0.05, 1.0))
            st = await self.state()
            if st is not None and st.get("state") == "challenge":
                self.want_kill_challenge = False
                self.res.faults["kill_challenge"] += 1
                await self._kill_restart("during the challenge")

    async def _close_batch(self) -> None:
        if self.want_kill_close:
            # kill -9 while the close is being executed: the command is out, its reply not yet back
            self.want_kill_close = False
            self.res.faults["kill_close"] += 1
            task = asyncio.create_task(self.command("close_batch", timeout=5.0, unused_serials="return"))
            await asyncio.sleep(self.rng.uniform(0.0, 0.3))
            await self._kill_restart("during close_batch")
            with contextlib.suppress(BaseException):
                await task
            return
        r = await self.command("close_batch", unused_serials="return")
        self.echo(f"operator: close_batch -> {'ok' if r and r.get('ok') else (r or {}).get('error', 'no reply')}")

    # ------------------------------------------------------------------ faults

    async def _kill_restart(self, why: str) -> None:
        assert self.daemon is not None
        self.ready.clear()
        self.killed_by_harness = True
        self.daemon.kill9()
        self.echo(f"  kill -9 daemon ({why})")
        await asyncio.sleep(self.rng.uniform(0.2, 2.0))
        took = await self._start_daemon()
        self.killed_by_harness = False
        self.res.restart_to_ready_s.append(took)
        self.echo(f"daemon answering again {took:.1f} s after its restart")

    async def scheduler(self) -> None:
        """Fault episodes one at a time, at exponential intervals; kinds dealt from a seeded shuffled deck,
        so a short run still sees every enabled kind before any kind comes twice."""
        deck: list[str] = []
        while not self.ending:
            await asyncio.sleep(self.rng.expovariate(1.0 / self.o.mean_gap_s))
            enabled = [k for k in self.o.faults if k not in self.res.skipped]
            if self.ending or not enabled:
                return
            deck = [k for k in deck if k in enabled]
            if not deck:
                deck = list(enabled)
                self.rng.shuffle(deck)
            kind = deck.pop()
            self.echo(f"fault: {kind}")
            try:
                async with self.busy:
                    await self.episode(kind)
            except Exception as exc:  # noqa: BLE001 - a harness failure is reported, never swallowed
                self.res.violations.append(Violation("harness", f"fault {kind} failed: {exc!r}"))
                return

    async def episode(self, kind: str) -> None:
        assert self.daemon is not None and self.sim is not None and self.broker is not None and self.sub is not None
        rng = self.rng
        if kind == "kill":
            self.res.faults[kind] += 1
            await self._kill_restart("random moment")
        elif kind == "kill_challenge":
            st = await self.state()
            if st is not None and st.get("state") == "challenge":
                self.res.faults[kind] += 1
                await self._kill_restart("during the challenge")
            else:
                self.want_kill_challenge = True  # the operator kills in the next challenge it starts
        elif kind == "kill_close":
            self.want_kill_close = True
        elif kind == "stall":
            self.res.faults[kind] += 1
            d = rng.uniform(0.2, 5.0)
            self.ready.clear()
            kill_group(self.daemon.proc, signal.SIGSTOP)
            try:
                await asyncio.sleep(d)
            finally:
                kill_group(self.daemon.proc, signal.SIGCONT)
                self.ready.set()
        elif kind in ("plc_cold", "plc_warm"):
            r = await self.sim_cmd(cmd="inject", device=self.plc, fault="plc_restart", cold=kind == "plc_cold")
            if not r.get("ok"):
                err = str(r.get("error"))
                if "unknown" in err:
                    self.res.skipped[kind] = f"simulator: {err[:100]}"
                    self.echo(f"  {kind}: skipped ({err[:80]})")
                    return
                raise RuntimeError(f"plc_restart refused: {err}")
            self.res.faults[kind] += 1
        elif kind == "sim_crash":
            self.res.faults[kind] += 1
            self.sim.kill9()
            for p in self.proxies.values():
                p.reset_now()
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            await self._start_sim()
        elif kind in ("broker_keep", "broker_lose"):
            self.res.faults[kind] += 1
            await asyncio.to_thread(self.broker.restart, kind == "broker_keep")
        elif kind == "consumer_late":
            self.res.faults[kind] += 1
            await self.sub.stop()
            away = rng.uniform(2.0, 12.0)
            if rng.random() < 0.5 and "broker_lose" in self.o.faults:
                # the README's hard case: the broker loses its state while the consumer is away
                await asyncio.sleep(away / 2)
                self.res.faults["broker_lose"] += 1
                await asyncio.to_thread(self.broker.restart, False)
                await asyncio.sleep(away / 2)
            else:
                await asyncio.sleep(away)
            self.sub.start()
            await asyncio.wait_for(self.sub.connected.wait(), 20)
        elif kind == "chaos":
            self.res.faults[kind] += 1
            links = list(self.proxies.items())
            for name, proxy in links:
                binary = name == self.plc  # Modbus TCP: no noise bytes (no real TCP link corrupts them)
                proxy.set(
                    garbage=0.0 if binary else rng.choice([0.0, 0.05, 0.2]),
                    split=rng.choice([0.0, 0.3, 0.8]),
                    delay_s=rng.choice([0.0, 0.0, 0.005, 0.03]),
                    reset=rng.choice([0.0, 0.0, 0.002]),
                    directions="down",
                )
            await asyncio.sleep(rng.uniform(2.0, 8.0))
            if rng.random() < 0.5:
                rng.choice(links)[1].reset_now()
            for _, proxy in links:
                proxy.clear()
        elif kind == "disk_full":
            self.res.faults[kind] += 1
            await self._disk_full(rng.uniform(1.0, 6.0))
        elif kind == "operator":
            self.res.faults[kind] += 1
            await self._operator_action()
        elif kind == "hostile":
            self.res.faults[kind] += 1
            await self._hostile()
        else:
            raise ValueError(f"unknown fault kind {kind!r}")

    async def _disk_full(self, seconds: float) -> None:
        """The store cannot grow: RLIMIT_FSIZE of the daemon lowered to the current size of its files.

        CPython ignores SIGXFSZ, so a write past the limit fails with EFBIG in
        SQLite, as a full disk fails with ENOSPC; the daemon's log goes through a
        pipe and is not affected. Then the limit is lifted: space is back.
        """
        assert self.daemon is not None
        sizes = [f.stat().st_size for f in self.dir.glob("line.db*") if f.exists()]
        limit = max(sizes or [0]) + 4096
        pid = self.daemon.pid
        try:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        except (ProcessLookupError, PermissionError, OSError) as exc:
            self.res.notes.append(f"disk_full not applied: {exc}")
            return
        try:
            await asyncio.sleep(seconds)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    async def _operator_action(self) -> None:
        rng = self.rng
        action = rng.choice(["pause", "resume", "stop", "start", "challenge", "close", "state"])
        via_cli = rng.random() < 0.25
        names = {"pause": "pause_batch", "resume": "resume_batch", "stop": "stop_batch", "start": "start_batch",
                 "challenge": "challenge", "close": "close_batch", "state": "request_state"}
        self.echo(f"  operator: {action}{' (linectl batch)' if via_cli else ''}")
        if action in ("pause", "stop"):
            self.hold_until = time.monotonic() + rng.uniform(0.5, 4.0)
        if action == "challenge" and self.kinds:
            await self.sim_cmd(cmd="challenge", kinds=self.kinds)
        if via_cli:
            extra = ["--unused", "return"] if action == "close" else []
            await self.cli_command(action, *extra)
        else:
            body: dict[str, Any] = {"unused_serials": "return"} if action == "close" else {}
            await self.command(names[action], **body)

    async def _hostile(self) -> None:
        """What a misconfigured HMI or a hostile client publishes on the command topics."""
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        assert self.broker is not None
        rng = self.rng
        cmd = f"{self.root}/cmd/"
        if not self._hostile_deck:
            self._hostile_deck = list(HOSTILE_KINDS)
            rng.shuffle(self._hostile_deck)
        kind = self._hostile_deck.pop()
        self.echo(f"  hostile: {kind}")

        def props(topic: str) -> Properties:
            p = Properties(PacketTypes.PUBLISH)
            p.ResponseTopic = topic
            p.CorrelationData = b"x"
            return p

        async with aiomqtt.Client("127.0.0.1", self.broker.port, identifier=f"campaign-hostile-{uuid.uuid4().hex[:8]}", protocol=aiomqtt.ProtocolVersion.V5,
            logger=QUIET_MQTT) as c:
            if kind == "malformed":
                await c.publish(cmd + "start_batch", b'{"name": "start_batch", "command_id": ', qos=1)
            elif kind == "empty":
                await c.publish(cmd + "start_batch", b"", qos=1)
            elif kind == "retained_start":
                self.retained_starts += 1
                await c.publish(cmd + "start_batch", json.dumps({"name": "start_batch", "command_id": uuid.uuid4().hex, "actor": "stale-hmi"}), qos=1,
                    retain=True)
            elif kind == "retained_clear":
                await c.publish(cmd + "start_batch", b"", qos=1, retain=True)
            elif kind == "oversize":
                await c.publish(cmd + "verify_code", json.dumps({"name": "verify_code", "code": "A" * 1_200_000}), qos=1)
            elif kind == "nested":
                depth = 100_000
                await c.publish(cmd + "request_state", b"[" * depth + b"]" * depth, qos=1)
            elif kind == "sys_reply":
                await c.publish(cmd + "request_state", json.dumps({"name": "request_state", "command_id": uuid.uuid4().hex}), qos=1, properties=props("$SYS/x"))
            elif kind == "events_reply":
                await c.publish(cmd + "request_state", json.dumps({"name": "request_state", "command_id": uuid.uuid4().hex}), qos=1,
                    properties=props(f"{self.root}/events"))
            elif kind == "garbage_verify":
                for _ in range(20):
                    junk = "".join(rng.choice("0123456789ABCDEF]d\x1d") for _ in range(rng.randint(1, 60)))
                    await c.publish(cmd + "verify_code", json.dumps({"name": "verify_code", "code": junk}), qos=1)
            elif kind == "unknown":
                await c.publish(cmd + "format_disk", json.dumps({"name": "format_disk"}), qos=1)
        await asyncio.sleep(0.5)

    # ------------------------------------------------------------------ the run

    async def heal(self) -> None:
        """Every fault undone: daemon running and not stopped, full disk gone, links clean, broker and consumer back."""
        assert self.daemon is not None and self.sim is not None and self.broker is not None and self.sub is not None
        kill_group(self.daemon.proc, signal.SIGCONT)
        if self.daemon.alive:
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                resource.prlimit(self.daemon.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        for p in self.proxies.values():
            p.clear()
        if self.broker.proc is None or self.broker.proc.poll() is not None:
            self.broker.start()
        if not self.sim.alive:
            await self._start_sim()
        if not self.daemon.alive:
            if self.killed_by_harness:  # a kill episode the end of fault time cut short before its restart
                self.echo("daemon restarted after a kill episode cut short by the end of fault time")
            else:
                rc = self.daemon.proc.returncode if self.daemon.proc else "?"
                self.res.violations.append(Violation("harness", f"daemon had exited on its own (rc {rc})"))
            self.res.restart_to_ready_s.append(await self._start_daemon())
            self.killed_by_harness = False
        self.sub.start()
        await asyncio.wait_for(self.sub.connected.wait(), 20)
        # a retained command a hostile client left must not outlive the run
        import aiomqtt

        with contextlib.suppress(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", self.broker.port, identifier=f"campaign-clean-{uuid.uuid4().hex[:8]}", logger=QUIET_MQTT) as c:
                await c.publish(f"{self.root}/cmd/start_batch", b"", qos=1, retain=True)

    async def _until_producing(self, timeout: float) -> None:
        """Until the simulator feeds a coded production unit again (or `timeout`): the operator does the rest."""
        deadline = time.monotonic() + timeout
        n0 = load_journal(self.journal)["units"]
        seen = {u["uid"] for u in n0}
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            units = load_journal(self.journal)["units"]
            if any(u["uid"] not in seen and not u.get("challenge") and u.get("content") for u in units):
                return

    async def _belt_empty(self, timeout_s: float = 20.0) -> None:
        for _ in range(int(timeout_s / 0.2)):
            s = await self.sim_cmd(cmd="status")
            if s.get("ok") and all(int(c.get("in_flight", 0)) == 0 for c in s["conveyors"].values()):
                return
            await asyncio.sleep(0.2)

    async def finish(self) -> None:
        """Stop and close the open batch, wait for the belt to empty and the outbox to drain."""
        deadline = time.monotonic() + 90
        last: Any = None
        while time.monotonic() < deadline:
            st = await self.state()
            if st is None:
                await asyncio.sleep(0.5)
                continue
            state = st.get("state")
            if st.get("batch") is None or state == "closed":
                break
            if state in ("running", "paused", "challenge"):
                last = await self.command("stop_batch", reason="campaign end")
                await asyncio.sleep(0.5)
                continue
            await self._belt_empty()
            await self._reconcile_fates()
            last = await self.command("close_batch", unused_serials="return")
            if last is not None and last.get("ok"):
                break
            await asyncio.sleep(1.0)
        else:
            self.res.violations.append(Violation("close", f"the open batch could not be stopped and closed within 90 s: last reply {json.dumps(last)[:400]}"))
        await self._belt_empty()  # ground truth final: nothing on the belt
        # everything stored has left the outbox and reached the consumer: wait until it has, or until the
        # outbox has been empty for 3 s (what the broker lost by then it has lost), at most 120 s
        assert self.sub is not None
        deadline = time.monotonic() + 120
        empty_since: float | None = None
        while time.monotonic() < deadline:
            try:
                left = ro_query(self.db, "SELECT count(*) FROM outbox WHERE forwarded_at IS NULL")[0][0]
                ids = {r[0] for r in ro_query(self.db, "SELECT event_id FROM outbox")}
            except sqlite3.Error:
                await asyncio.sleep(0.5)
                continue
            if left == 0 and ids <= self.sub.event_ids:
                break
            if left == 0:
                empty_since = empty_since or time.monotonic()
                if time.monotonic() - empty_since > 3.0:
                    break
            else:
                empty_since = None
            await asyncio.sleep(0.5)

    async def run(self) -> RunResult:
        t0 = self.t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        default_handler = loop.get_exception_handler()

        def quiet(lp: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
            # aiomqtt leaves a future with "Unexpected disconnection" behind when the broker is killed: expected here
            if "disconnect" in repr(ctx.get("exception", "")).lower():
                return
            if default_handler is not None:
                default_handler(lp, ctx)  # (was called with ctx alone: a TypeError instead of the report)
            else:
                lp.default_exception_handler(ctx)

        loop.set_exception_handler(quiet)
        tasks: list[asyncio.Task[None]] = []
        try:
            await self.setup()
            tasks = [asyncio.create_task(self.operator(), name="operator"), asyncio.create_task(self.scheduler(), name="scheduler")]
            start = time.monotonic()  # fault time, after the line is up
            end, longest = start + self.o.seconds, start + 3 * self.o.seconds

            def more() -> bool:
                now = time.monotonic()
                return now < end or (sum(self.res.faults.values()) < self.o.min_faults and now < longest)

            while more():
                await asyncio.sleep(0.5)
                for t in tasks:
                    if t.done() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
            # faults over: heal everything, let the operator bring the line back to production (so a batch
            # whose challenge a late fault interrupted shows what happens next), then end
            sched = tasks[1]
            sched.cancel()
            await asyncio.gather(sched, return_exceptions=True)
            self.want_kill_challenge = self.want_kill_close = False
            async with self.busy:
                await self.heal()
            await self._until_producing(30.0)
            self.ending = True
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.finish()
            assert self.daemon is not None and self.sim is not None
            self.daemon.stop()
            if self.daemon.proc is not None and self.daemon.proc.returncode not in (0, None):
                self.res.notes.append(f"daemon exit code at the end: {self.daemon.proc.returncode}")
            self.sim.stop()
            await self.check()
        except Exception as exc:  # noqa: BLE001 - a run that cannot finish is a finding, with its logs kept
            self.res.violations.append(Violation("harness", f"{type(exc).__name__}: {exc}"))
        finally:
            for t in tasks:
                t.cancel()
            if self.sub is not None:
                await self.sub.stop()
            for p in self.proxies.values():
                await p.stop()
            for child in (self.daemon, self.sim):
                if child is not None:
                    kill_group(child.proc, signal.SIGCONT)
                    kill_group(child.proc, signal.SIGKILL)
            if self.broker is not None:
                self.broker.close()
            self.res.seconds = time.monotonic() - t0
            if self.res.ok and not self.o.keep:
                shutil.rmtree(self.dir, ignore_errors=True)
        return self.res

    # ------------------------------------------------------------------ the checks

    async def check(self) -> None:
        """Truth (journal), store (read-only), subscriber: the pure checks, then report and audit per batch.

        A unit that passed the gate may be left in an explicit open state (fate unknown to linectl after an
        outage, waiting for the operator's reconciliation) instead of `commissioned`: that is no violation
        when its batch report names the serial, and the report's pack count is compared without it.
        """
        truth = load_journal(self.journal)
        fed = truth["units"]
        self.res.units = unit_counts(fed, truth["runs"])
        ev = store_events(self.db)
        assert self.sub is not None
        viol = check_records(fed, ev, kinds=self.kinds, lots=self.lots, received=self.sub.event_ids, foreign=self.sub.foreign, root=self.root)
        if ev["stale_starts"] > self.retained_starts:
            viol.append(
                Violation("retained_command_replayed",
                    f"{self.retained_starts} retained start_batch published, the line started {ev['stale_starts']} times on it "
                    "(replayed after a reconnect or restart)")
            )
        reports = {x["lot"]: await self._report(x["lot"]) for x in self.lots}
        named = {v.serial for v in viol if v.check == "passed_commissioned" and v.serial and any(v.serial in txt for txt, _ in reports.values())}
        if named:
            viol = [v for v in viol if not (v.check == "passed_commissioned" and v.serial in named)]
            self.res.notes.append(f"{len(named)} unit(s) that passed the gate are left open and named by their batch report")
        self.res.violations += viol
        passed_by_lot = Counter(
            u.get("lot") for u in fed
            if u.get("outcome") == "passed" and not u.get("defect") and not u.get("challenge") and u.get("content") and u.get("serial") not in named
        )
        for lot, (_, rep) in reports.items():
            if rep is not None and rep.get("state") == "closed" and int(rep.get("commissioned") or 0) != passed_by_lot[lot]:
                self.res.violations.append(
                    Violation("report_packs",
                        f"batch {lot}: report says {rep.get('commissioned')} commissioned, {passed_by_lot[lot]} coded packs of the lot passed the gate")
                )
        rc, out = await self._linectl("audit", "verify", "--db", str(self.db))
        if rc != 0:
            self.res.violations.append(Violation("audit_verify", f"linectl audit verify exit {rc}: {out[-300:]}"))

    async def _linectl(self, *args: str) -> tuple[int, str]:
        p = await asyncio.create_subprocess_exec(sys.executable, "-m", "linectl", *args, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(p.communicate(), 120)
        return int(p.returncode or 0), out.decode(errors="replace")

    async def _report(self, lot: str) -> tuple[str, dict[str, Any] | None]:
        """`linectl report --json` of a batch: balances by serials when closed, names what is open when not."""
        rc, out = await self._linectl("report", "--db", str(self.db), "--batch", lot, "--json")
        try:
            rep = json.loads(out[out.index("{") :])
        except ValueError:
            self.res.violations.append(Violation("report", f"batch {lot}: linectl report exit {rc}: {out[-300:]}"))
            return out, None
        problems = rep.get("problems") or []
        if rep.get("state") != "closed":
            if not problems:
                self.res.violations.append(Violation("report", f"batch {lot} is {rep.get('state')} and its report names nothing open"))
            return out, rep
        if not rep.get("balanced"):
            self.res.violations.append(Violation("report", f"batch {lot}: closed but not balanced: {problems[:3]}"))
        if rep.get("provisioned") != sum(int(rep.get(k) or 0) for k in ("commissioned", "decommissioned", "returned", "voided")):
            self.res.violations.append(Violation("report",
                f"batch {lot}: serials do not add up: {({k: rep.get(k) for k in ('provisioned', 'commissioned', 'decommissioned', 'returned', 'voided')})}"))
        return out, rep


# --------------------------------------------------------------------------- the checks


def unit_counts(fed: list[dict[str, Any]], runs: int) -> dict[str, int]:
    gated = [u for u in fed if u.get("outcome")]
    prod = [u for u in fed if not u.get("challenge")]
    longest = run = 0
    for u in sorted(prod, key=lambda x: x["fed_t"]):
        run = run + 1 if u.get("content") is None else 0
        longest = max(longest, run)
    return {
        "fed": len(fed),
        "production": len(prod),
        "challenge": len(fed) - len(prod),
        "passed": sum(1 for u in gated if u["outcome"] == "passed"),
        "rejected": sum(1 for u in gated if u["outcome"] == "rejected"),
        "lost_in_sim_crash": len(fed) - len(gated),
        "defects": sum(1 for u in fed if u.get("defect")),
        "uncoded": sum(1 for u in prod if u.get("content") is None),
        "uncoded_longest_run": longest,
        "simulator_runs": runs,
    }


def check_records(
    fed: list[dict[str, Any]],
    ev: dict[str, Any],
    *,
    kinds: list[str],
    lots: list[dict[str, Any]],
    received: set[str],
    foreign: list[str],
    root: str = "<root>",
) -> list[Violation]:
    """The invariants that need no subprocess: ground truth (journal units) against the store's record
    (`store_events`) and the subscriber (`received` eventIDs, `foreign` payloads on <root>/events).

    A physical unit is known by the serial printed on it (AI 21 of its content);
    PLC seqs restart with a cold PLC or a new simulator and identify nothing.
    Units lost in a simulator crash (fed, never gated) are of unknown fate.
    """
    viol: list[Violation] = []
    comm: Counter[str] = ev["commissioned"]
    decomm: dict[str, list[str]] = ev["decommissioned"]
    states: dict[str, str] = ev["states"]
    passed_good: dict[str, dict[str, Any]] = {}
    on_units: dict[str, list[dict[str, Any]]] = {}
    # 1. no defective or uncoded unit passed the gate
    for u in fed:
        ais = parse_element_string(u.get("content"))
        u["serial"], u["lot"] = ais.get("21"), ais.get("10")
        serial = u["serial"]
        if serial and not u.get("defect") and not u.get("challenge"):
            on_units.setdefault(serial, []).append(u)
        if u.get("outcome") != "passed":
            continue
        if u.get("defect") or u.get("challenge") or not u.get("content"):
            what = u.get("defect") or (f"challenge {u['challenge']}" if u.get("challenge") else "uncoded")
            viol.append(Violation("bad_passed", f"unit {u['uid']} (seq {u['seq']}, {what}) passed the gate"))
        elif serial:
            passed_good[serial] = u
    # 2. every unit that passed is commissioned exactly once and never decommissioned
    for s, u in passed_good.items():
        if s in decomm:
            viol.append(Violation("passed_decommissioned",
                f"serial {s} passed the gate (unit {u['uid']}, seq {u['seq']}) and was decommissioned ({', '.join(decomm[s])})"))
        elif comm[s] != 1:
            viol.append(Violation("passed_commissioned",
                f"serial {s} (unit {u['uid']}, seq {u['seq']}) passed the gate but was commissioned {comm[s]} time(s)"))
        elif states.get(s) != "commissioned":
            viol.append(Violation("passed_commissioned", f"serial {s} passed the gate but its registry state is {states.get(s)!r}", serial=s))
    #    and a unit that went to the bin (or never reached the gate) is not on the market
    for s in comm:
        if s in passed_good or states.get(s) != "commissioned":
            continue
        where = on_units.get(s)
        fate = ", ".join(f"{x['uid']} {x.get('outcome') or 'lost'}" for x in where) if where else "on no unit that was fed"
        viol.append(Violation("commissioned_not_passed", f"serial {s} is commissioned but its unit did not pass the gate ({fate})"))
    # 3. no serial on two physical units, none commissioned twice
    for s, us in on_units.items():
        if len(us) > 1:
            viol.append(Violation("serial_on_two_units", f"serial {s} printed on {len(us)} units: {[x['uid'] for x in us]}"))
    for s, n in comm.items():
        if n > 1:
            viol.append(Violation("commissioned_twice", f"serial {s} commissioned {n} times"))
    # 4. every decommissioned serial belongs to a unit proven rejected or never printed (passed: reported above)
    for s, reasons in decomm.items():
        us = on_units.get(s, [])
        if any(x.get("outcome") == "passed" for x in us):
            continue
        unproven = [x for x in us if x.get("outcome") not in ("rejected", None)]
        if unproven:
            viol.append(Violation("decommissioned_unproven",
                f"serial {s} decommissioned ({', '.join(reasons)}) but its unit's fate is {[x.get('outcome') for x in unproven]}"))
    # 5. no production unit of a batch precedes its complete challenge
    viol += check_challenges(fed, ev["challenge_results"], kinds, lots)
    # the line stops when it cannot code: no long run of uncoded production packs (printer starved, store full...)
    run: list[dict[str, Any]] = []
    for u in sorted((x for x in fed if not x.get("challenge")), key=lambda x: x["fed_t"]):
        if u.get("content") is None:
            run.append(u)
            continue
        if len(run) > UNCODED_RUN_LIMIT:
            viol.append(Violation("line_not_stopped",
                f"{len(run)} uncoded packs fed in a row (units {run[0]['uid']} .. {run[-1]['uid']}): the line kept feeding what it could not code"))
        run = []
    if len(run) > UNCODED_RUN_LIMIT:
        viol.append(Violation("line_not_stopped",
            f"{len(run)} uncoded packs fed in a row (units {run[0]['uid']} .. {run[-1]['uid']}): the line kept feeding what it could not code"))
    # 7. every stored event reached the subscriber
    ids = ev["event_ids"]
    missing = [i for i in ids if i not in received]
    if missing:
        viol.append(Violation("event_lost", f"{len(missing)} of {len(ids)} stored events never reached the subscriber (first: {missing[:3]})"))
    if ev["unforwarded"]:
        viol.append(Violation("event_lost", f"{ev['unforwarded']} outbox rows still not forwarded at the end"))
    for f in foreign[:5]:
        viol.append(Violation("foreign_in_events", f"non-EPCIS message on {root}/events: {f}"))
    return viol


def check_challenges(fed: list[dict[str, Any]], results: list[dict[str, Any]], kinds: list[str], lots: list[dict[str, Any]]) -> list[Violation]:
    """Before the first production unit of a batch, every configured challenge kind was physically fed,
    went to the reject bin, and was recognised for its own reason (a fail-safe reject of a dead
    controller proves nothing about the verification).

    A kind counts when a ChallengeResult of the lot (rejected, with the expected reason) names a unit
    seq at which the journal has a challenge unit of that kind that went to the bin, fed after the
    batch was created and before its first production unit.
    """
    out: list[Violation] = []
    if not kinds:
        return out
    order = sorted(fed, key=lambda u: u["fed_t"])
    for b in lots:
        lot, t0 = b["lot"], b["created_t"]
        first = next((u for u in order if u.get("lot") == lot and not u.get("challenge")), None)
        if first is None:
            continue
        window = [u for u in order if u.get("challenge") and t0 <= u["fed_t"] <= first["fed_t"]]
        done: set[str] = set()
        for r in results:
            if r.get("lot") != lot or not r.get("rejected") or r.get("t", 0) > first["fed_t"]:
                continue
            k = str(r.get("challenge"))
            if r.get("reason_seen") != CHALLENGE_REASON.get(k):
                continue
            unit_seq = r.get("unit_seq", r.get("seq"))  # the unit's PLC seq (a fix may rename the field unit_seq)
            if any(u["challenge"] == k and u["seq"] == unit_seq and u.get("outcome") == "rejected" for u in window):
                done.add(k)
        missing = [k for k in kinds if k not in done]
        if missing:
            fed_kinds = Counter(u["challenge"] for u in window)
            out.append(
                Violation(
                    "challenge_incomplete",
                    f"batch {lot}: production unit {first['uid']} fed before the challenge was complete: not proven {missing} "
                    f"(challenge units fed in the window: {dict(fed_kinds)})",
                )
            )
    return out


# --------------------------------------------------------------------------- ground truth and store readers


def load_journal(path: Path) -> dict[str, Any]:
    """Units from the simulator's append-only journal: fed record + gate outcome, keyed by uid."""
    units: dict[str, dict[str, Any]] = {}
    runs = 0
    if not path.exists():
        return {"units": [], "runs": 0}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            kind = rec.get("ev")
            if kind == "start":
                runs += 1
            elif kind == "fed":
                u = dict(rec)
                u["fed"] = True
                u["fed_t"] = rec["t"]
                units[rec["uid"]] = u
            elif kind == "gate" and rec["uid"] in units:
                units[rec["uid"]]["outcome"] = rec["outcome"]
    return {"units": list(units.values()), "runs": runs}


def store_events(db: Path) -> dict[str, Any]:
    """Commissioning history and final states, read-only from the store (no writer, no migration)."""
    commissioned: Counter[str] = Counter()
    decommissioned: dict[str, list[str]] = {}
    ids: list[str] = []
    challenges: list[dict[str, Any]] = []
    stale_starts = 0
    for event_id, kind, serial, body in ro_query(db, "SELECT event_id, kind, serial, body FROM outbox ORDER BY seq"):
        ids.append(event_id)
        if kind == "unit_commissioned":
            commissioned[serial or json.loads(body).get("serial")] += 1
        elif kind == "unit_decommissioned":
            b = json.loads(body)
            decommissioned.setdefault(serial or b.get("serial"), []).append(str(b.get("reason")))
        elif kind == "batch_state":
            b = json.loads(body)
            if str(b.get("actor", "")).startswith("stale-hmi") and b.get("state") in ("challenge", "running"):
                stale_starts += 1
        elif kind == "challenge_result":
            b = json.loads(body)
            with contextlib.suppress(ValueError, KeyError, TypeError):
                b["t"] = datetime.fromisoformat(b["event_time"]).timestamp()
            challenges.append(b)
    states = {s: st for s, st in ro_query(db, "SELECT serial, state FROM serials WHERE lot IS NOT NULL")}
    unforwarded = ro_query(db, "SELECT count(*) FROM outbox WHERE forwarded_at IS NULL")[0][0]
    return {"commissioned": commissioned, "decommissioned": decommissioned, "states": states, "challenge_results": challenges, "stale_starts": stale_starts,
        "event_ids": ids, "unforwarded": unforwarded}


# --------------------------------------------------------------------------- entry points


def parse_faults(spec: str | None) -> tuple[str, ...]:
    if not spec or spec == "all":
        return FAULT_KINDS
    kinds = tuple(k.strip() for k in spec.split(",") if k.strip())
    bad = [k for k in kinds if k not in FAULT_KINDS]
    if bad:
        raise ValueError(f"unknown fault kind(s) {bad}; known: {', '.join(FAULT_KINDS)}")
    return kinds


async def run_campaign(opts: CampaignOptions) -> RunResult:
    """One run. SIGTERM / SIGINT cancel it, and cancelling still kills every process it started."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    installed: list[signal.Signals] = []
    if task is not None and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, task.cancel)
                installed.append(sig)
    try:
        return await Campaign(opts).run()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def run_sync(opts: CampaignOptions) -> RunResult:
    return asyncio.run(run_campaign(opts))

