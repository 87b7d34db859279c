"""Node-RED for the dashboard tests: installed from npm into build/node-red (cached, one installer at a time),
started on a free port with a settings file of ours and the shipped flow pointed at the test's broker."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
NR_DIR = REPO / "build" / "node-red"
NR_BIN = NR_DIR / "node_modules" / "node-red" / "red.js"
FLOW = REPO / "config" / "dashboards" / "node-red-flow.json"
USER, PASSWORD = "operator", "line-panel-pw"
NPM_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_node_red() -> Path:
    """npm install node-red@4 once; a file lock keeps two xdist workers from installing into the same directory.

    tests/run.sh calls this before the suite; a test that still has to install has the npm timeout (NPM_TIMEOUT_S)
    inside its own pytest time limit (tests/test_dashboard.py marks it)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise AssertionError("node and npm are needed for the dashboard tests (apt-get install nodejs npm)")
    NR_DIR.mkdir(parents=True, exist_ok=True)
    with open(NR_DIR / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not NR_BIN.exists():
            p = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "node-red@4"], cwd=NR_DIR,
                               capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
            if p.returncode != 0 or not NR_BIN.exists():
                raise AssertionError(f"npm install node-red@4 failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return NR_BIN


def bcrypt_hash(password: str) -> str:
    """Node-RED's settings take bcrypt hashes; bcryptjs ships with Node-RED."""
    p = subprocess.run(["node", "-e", "process.stdout.write(require('bcryptjs').hashSync(process.argv[1], 8))", password],
                       cwd=NR_DIR / "node_modules" / "node-red", capture_output=True, text=True, timeout=60, check=True)
    return p.stdout.strip()


class NodeRed:
    """One Node-RED process: the shipped flow with the broker node rewritten, httpNodeAuth on, restartable."""

    def __init__(self, directory: Path, broker_port: int) -> None:
        self.bin = ensure_node_red()
        self.dir = directory
        self.user_dir = directory / "userdir"
        self.user_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        flow: list[dict[str, Any]] = json.loads(FLOW.read_text(encoding="utf-8"))
        brokers = [n for n in flow if n.get("type") == "mqtt-broker"]
        assert len(brokers) == 1, "the shipped flow should have exactly one broker node"
        brokers[0]["port"] = str(broker_port)
        (self.user_dir / "flows.json").write_text(json.dumps(flow), encoding="utf-8")
        settings = {
            "uiPort": self.port, "uiHost": "127.0.0.1", "userDir": str(self.user_dir), "flowFile": "flows.json",
            "httpAdminRoot": False, "httpNodeAuth": {"user": USER, "pass": bcrypt_hash(PASSWORD)},
            "logging": {"console": {"level": "info"}}, "credentialSecret": False,
        }
        self.settings = self.user_dir / "settings.js"
        self.settings.write_text("module.exports = " + json.dumps(settings, indent=1) + ";\n", encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/linectl"

    def log(self) -> str:
        return "\n".join((self.dir / f"node-red{i}.log").read_text(errors="replace") for i in range(1, self.runs + 1))

    def start(self, timeout: float = 90) -> NodeRed:
        self.runs += 1
        fh = open(self.dir / f"node-red{self.runs}.log", "wb")
        try:
            self.proc = subprocess.Popen(["node", str(self.bin), "--settings", str(self.settings), "--userDir", str(self.user_dir)],
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            fh.close()
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"Node-RED exited:\n{self.log()[-3000:]}"
            try:
                urllib.request.urlopen(self.url, timeout=2)
            except urllib.error.HTTPError as exc:
                if exc.code == 401:  # up, and asking for the password as it should
                    return self
            except OSError:
                pass
            assert time.monotonic() < deadline, f"Node-RED never served {self.url}:\n{self.log()[-3000:]}"
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def restart(self) -> NodeRed:
        self.stop()
        return self.start()


if __name__ == "__main__":  # tests/run.sh: install before the suite, so no test's time limit includes the download
    print(f"Node-RED: {ensure_node_red()}")
