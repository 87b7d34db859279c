"""Restart benchmark: time from `linectl run` process start to READY and to the first answered command.

The demo line on its simulators (simulator process, daemon process, the machine's Mosquitto on 1883), a batch
in production, then `kill -9` of the daemon and a restart, `--restarts` times. For each restart it prints:

- ready_s: process start → the `daemon_started` log line (what systemd's READY=1 marks);
- answer_s: process start → first reply to a `request_state` command over MQTT (a client publishing every 50 ms);
- idle_s: process start → the PLC's infeed back to idle (`plc_line_mode_resynced` log line);
- the start-up phases the daemon logs with `daemon_started` (startup_ms).

    .venv/bin/python bench/bench_recovery.py --restarts 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date, timedelta
from pathlib import Path

import aiomqtt
from ruamel.yaml import YAML

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchinfo import machine  # noqa: E402

from linectl.demo import DEFAULT_CONFIG, _rewrite_ports  # noqa: E402
from linectl.yamlsource import load_yaml, to_plain  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LINECTL = [sys.executable, "-m", "linectl"]


def setup(tmp: Path, rate: float) -> tuple[Path, str, int]:
    raw = _rewrite_ports(to_plain(load_yaml(DEFAULT_CONFIG)), tmp)
    root = f"bench/{uuid.uuid4().hex[:10]}/pack/line1"
    raw["mqtt"].update({"host": "127.0.0.1", "port": 1883, "enabled": True, "topic_root": root})
    raw["store"]["path"] = str(tmp / "line.db")
    raw["simulation"].update({"rate_upm": rate, "defect_rate": 0.02})
    cfg = tmp / "line.yaml"
    with open(cfg, "w", encoding="utf-8") as fh:
        YAML(typ="safe").dump(raw, fh)
    return cfg, root, int(raw["simulation"]["control_port"])


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


async def command(client: aiomqtt.Client, root: str, name: str, body: dict) -> None:
    await client.publish(f"{root}/cmd/{name}", json.dumps({"command_id": uuid.uuid4().hex, "actor": "bench", **body}), qos=1)


def log_time(log: Path, event: str) -> float | None:
    """Unix time of the first log line with this event (structlog console: ISO timestamp first)."""
    from datetime import datetime

    for line in log.read_text(errors="replace").splitlines():
        if f" {event} " in line or line.rstrip().endswith(f" {event}"):
            m = re.match(r"(\S+Z)", line)
            if m:
                return datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
    return None


def startup_ms(log: Path) -> str:
    for line in log.read_text(errors="replace").splitlines():
        if " daemon_started " in line:
            m = re.search(r"startup_ms=(\{[^}]*\})", line)
            return m.group(1) if m else ""
    return ""


async def restart(cfg: Path, root: str, logs: Path, n: int) -> dict:
    log = logs / f"daemon{n}.log"
    async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"bench-{uuid.uuid4().hex[:8]}") as c:
        await c.subscribe(f"{root}/cmd/request_state/reply", qos=1)
        t0 = time.time()
        proc = spawn([*LINECTL, "--log-level", "info", "run", "-c", str(cfg)], log)

        async def ask() -> None:
            while True:
                await command(c, root, "request_state", {})
                await asyncio.sleep(0.05)

        asker = asyncio.create_task(ask())
        try:
            async with asyncio.timeout(60):
                async for m in c.messages:
                    if json.loads(m.payload).get("ok"):
                        answered = time.time()
                        break
        finally:
            asker.cancel()
    await asyncio.sleep(1.5)  # let the log lines land
    ready = log_time(log, "daemon_started")
    idle = log_time(log, "plc_line_mode_resynced")
    return {
        "proc": proc,
        "ready_s": round(ready - t0, 2) if ready else None,
        "answer_s": round(answered - t0, 2),
        "idle_s": round(idle - t0, 2) if idle else None,
        "phases_ms": startup_ms(log),
    }


def committed(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(con.execute("SELECT count(*) FROM serials WHERE state='commissioned'").fetchone()[0])
    finally:
        con.close()


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    logs = tmp / "logs"
    logs.mkdir()
    cfg, root, _ = setup(tmp, args.rate)
    sim = spawn([*LINECTL, "--log-level", "warning", "simulate", "-c", str(cfg)], logs / "sim.log")
    await asyncio.sleep(2.0)
    rows = []
    try:
        first = await restart(cfg, root, logs, 0)
        proc = first["proc"]
        print(f"cold start (new store): ready {first['ready_s']} s, answers {first['answer_s']} s {first['phases_ms']}")
        expiry = (date.today() + timedelta(days=700)).strftime("%y%m%d")
        async with aiomqtt.Client("127.0.0.1", 1883) as c:
            await command(c, root, "create_batch", {"lot": f"B{int(time.time()) % 10**8}", "gtin": "09501101530003", "expiry": expiry,
                                                    "planned_qty": 1_000_000, "challenge": False})
            await asyncio.sleep(1.0)
            await command(c, root, "start_batch", {})
        for n in range(1, args.restarts + 1):
            target = committed(tmp / "line.db") + 200
            deadline = time.monotonic() + 60
            while committed(tmp / "line.db") < target and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            await asyncio.sleep(0.5)
            r = await restart(cfg, root, logs, n)
            proc = r.pop("proc")
            rows.append(r)
            print(f"restart {n} after kill -9 mid-batch ({committed(tmp / 'line.db')} commissioned): ready {r['ready_s']} s, "
                  f"answers {r['answer_s']} s, PLC idle {r['idle_s']} s {r['phases_ms']}")
            async with aiomqtt.Client("127.0.0.1", 1883) as c:
                await command(c, root, "start_batch", {})
    finally:
        for p in (locals().get("proc"), sim):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)
    print(json.dumps({"machine": machine(), "load": os.getloadavg(), "restarts": rows}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--rate", type=float, default=600)
    asyncio.run(main(ap.parse_args()))
