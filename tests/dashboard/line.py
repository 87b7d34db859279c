"""A demo line as it runs on a line PC, for the dashboard tests: `linectl simulate` and `linectl run` in their own
processes (so the controller can be killed), talking to the test's broker under their own topic root.

access=True keeps the demo config's `access:` section: `linectl init` creates the default users with the test
passwords, and the test's own CLI commands log in as `operator` (signing what access.signatures lists by default)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from engine_helpers import LINECTL, REPO, TEST_PASSWORDS, password_env, port_open, spawn, variant_config
from ruamel.yaml import YAML

from linectl.demo import _rewrite_ports
from linectl.simulators.control import request
from linectl.yamlsource import load_yaml, to_plain

GTIN = "09501101530003"


class DemoLine:
    def __init__(self, tmp: Path, broker_port: int, *, rate: float = 600, seed: int = 5, access: bool = False) -> None:
        self.access = access
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.db = tmp / "line.db"
        self.logs = tmp / "logs"
        self.logs.mkdir(exist_ok=True)
        self.root = f"dash/{uuid.uuid4().hex[:10]}/pack/line1"
        base = variant_config(tmp, simulation={"rate_upm": rate, "defect_rate": 0.03, "seed": seed, "variation_rate": 0.02},
                              access=access)
        raw = _rewrite_ports(to_plain(load_yaml(base)), tmp)
        raw["mqtt"].update({"host": "127.0.0.1", "port": broker_port, "enabled": True, "topic_root": self.root})
        raw["store"]["path"] = str(self.db)
        self.cfg = tmp / "line.yaml"
        with open(self.cfg, "w", encoding="utf-8") as fh:
            YAML(typ="safe").dump(raw, fh)
        self.control_port = int(raw["simulation"]["control_port"])
        self.sim: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None

    def start(self) -> DemoLine:
        self.sim = spawn([*LINECTL, "--log-level", "warning", "simulate", "-c", str(self.cfg)], self.logs / "sim.log")
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", self.control_port):
            assert self.sim.poll() is None, f"simulator exited: {(self.logs / 'sim.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "simulator control port never opened"
            time.sleep(0.05)
        subprocess.run([*LINECTL, "init", "-c", str(self.cfg)], check=True, capture_output=True, cwd=REPO, timeout=60, env={**os.environ, **password_env()})
        self.daemon = spawn([*LINECTL, "--log-level", "info", "run", "-c", str(self.cfg)], self.logs / "daemon.log")
        deadline = time.monotonic() + 60
        while True:
            rc, body, err = self.batch("state", timeout=2)
            if rc == 0 and body.get("ok"):
                return self
            assert self.daemon.poll() is None, f"daemon exited: {self.daemon_log()[-3000:]}"
            assert time.monotonic() < deadline, f"daemon never answered: {(rc, body, err)}\n{self.daemon_log()[-3000:]}"

    def daemon_log(self) -> str:
        return (self.logs / "daemon.log").read_text(errors="replace")

    def batch(self, action: str, *args: str, timeout: float = 20) -> tuple[int, dict[str, Any], str]:
        who = ["--actor", "operator1"]
        env = dict(os.environ)
        if self.access:  # logged in as the default operator; the actions signed by default are signed
            who = ["--user", "operator"]
            if action == "start" or (action == "create" and "--no-challenge" in args):
                who.append("--sign")
            env["LINECTL_PASSWORD"] = TEST_PASSWORDS["operator"]
        p = subprocess.run([*LINECTL, "--log-level", "error", "batch", action, "-c", str(self.cfg), *who, "--timeout", str(timeout), *args],
                           capture_output=True, text=True, cwd=REPO, timeout=timeout + 30, env=env)
        try:
            body = json.loads(p.stdout) if p.stdout.strip() else {}
        except ValueError:
            body = {}
        return p.returncode, body, p.stderr

    def batch_ok(self, action: str, *args: str, attempts: int = 30) -> dict[str, Any]:
        last: Any = None
        for _ in range(attempts):
            rc, body, err = self.batch(action, *args)
            if rc == 0 and body.get("ok"):
                return body
            last = (rc, body, err)
            if body and body.get("error", {}).get("code") not in ("devices_not_ready", "plc_error"):
                break
            time.sleep(0.5)
        raise AssertionError(f"linectl batch {action} failed: {last}\n--- daemon log ---\n{self.daemon_log()[-3000:]}")

    def start_batch(self, lot: str, qty: int = 5000) -> None:
        expiry = time.strftime("%y%m%d", time.localtime(time.time() + 700 * 86400))
        self.batch_ok("create", "--lot", lot, "--gtin", GTIN, "--expiry", expiry, "--qty", str(qty), "--no-challenge")
        self.batch_ok("start")

    def sim_cmd(self, **msg: Any) -> dict[str, Any]:
        reply = asyncio.run(request("127.0.0.1", self.control_port, msg))
        assert reply.get("ok"), reply
        return reply

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """The line's store as the daemon wrote it, read-only (WAL: alongside the running daemon)."""
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return list(con.execute(sql, args).fetchall())
        finally:
            con.close()

    def kill_daemon(self) -> None:
        assert self.daemon is not None
        os.killpg(self.daemon.pid, signal.SIGKILL)
        self.daemon.wait(10)

    def close(self) -> None:
        for p in (self.daemon, self.sim):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
