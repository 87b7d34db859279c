"""The plant above a demo line: the L3 that hands out serials and the EPCIS 2.0 repository, as simulators.

A line config that names its L3/L4 endpoints on this machine (127.0.0.1 / localhost) can be run on a desk with
`linectl demo --config FILE`: every local serial source of type serialbox or number_range is answered by one L3
serial simulator (linectl.simulators.l3_serials, a random pool per product), every local `upstream.epcis_rest`
repository by an EPCIS 2.0 repository simulator (linectl.simulators.epcis_repository), each in its own process on a
free port, and every `upstream.epcis_xml` directory is moved into the demo's own folder. The simulators keep what
really happened (serials handed out, events received): the demo summary compares the store with that, not with
linectl's own opinion. `--l3 real` leaves the endpoints as configured (a real QU4RTET, a real repository).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from linectl.broker import free_port, wait_listening

LOCAL_HOSTS = ("127.0.0.1", "localhost")
SIMULATED_SOURCES = ("serialbox", "number_range")


def _local(url: object) -> bool:
    return isinstance(url, str) and urlsplit(url).hostname in LOCAL_HOSTS


def _on_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(("http", f"127.0.0.1:{port}", parts.path, parts.query, parts.fragment))


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - our own simulator on loopback
        return json.loads(r.read())


class UpstreamSimulators:
    """Rewrites a demo config's local L3/L4 endpoints onto simulators, starts and stops them, reads their truth."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.l3_port: int | None = None
        self.pools: list[str] = []
        self.tokens: list[str] = []
        self.repositories: dict[str, int] = {}  # epcis_rest name -> port
        self.procs: list[tuple[str, subprocess.Popen[bytes], Any]] = []

    def rewrite(self, raw: dict[str, Any]) -> None:
        """Point the config's local endpoints at the simulators (called before the config is validated)."""
        for product in raw.get("products") or []:
            serials = product.get("serials") or {}
            source = serials.get("source") if isinstance(serials, dict) else None
            if not isinstance(source, dict) or source.get("type") not in SIMULATED_SOURCES or not _local(source.get("url")):
                continue
            if self.l3_port is None:
                self.l3_port = free_port()
            source["url"] = _on_port(source["url"], self.l3_port)
            pool = source.get("pool") or source.get("object_key_value") or str(product.get("gtin", ""))
            if pool not in self.pools:
                self.pools.append(pool)
            auth = source.get("auth") or {}
            env = auth.get("token_env") if isinstance(auth, dict) else None
            if env and os.environ.get(env):
                self.tokens.append(os.environ[env])
        upstream = raw.get("upstream") or {}
        for sink in upstream.get("epcis_rest") or []:
            if isinstance(sink, dict) and _local(sink.get("url")) and sink.get("auth", "none") == "none":
                port = free_port()
                self.repositories[str(sink.get("name"))] = port
                sink["url"] = _on_port(sink["url"], port)
        for sink in upstream.get("epcis_xml") or []:
            if isinstance(sink, dict) and sink.get("dir"):
                d = self.workdir / f"epcis-xml-{sink.get('name')}"
                d.mkdir(parents=True, exist_ok=True)
                sink["dir"] = str(d)

    def start(self) -> None:
        if self.l3_port is not None:
            cmd = [sys.executable, "-m", "linectl.simulators.l3_serials", "--port", str(self.l3_port), "--seed", "1"]
            for pool in self.pools:
                cmd += ["--pool", f"{pool}:random"]
            for token in self.tokens:
                cmd += ["--token", token]
            self._spawn("l3", cmd, self.l3_port)
        for name, port in self.repositories.items():
            self._spawn(f"repository-{name}", [sys.executable, "-m", "linectl.simulators.epcis_repository", "--port", str(port)], port)

    def _spawn(self, name: str, cmd: list[str], port: int) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append((name, proc, log))
        if not wait_listening(port, 20):
            raise RuntimeError(f"the {name} simulator did not start; see {self.workdir / (name + '.log')}")

    def stop(self) -> None:
        for _name, proc, log in self.procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()
        self.procs = []

    def truth(self) -> dict[str, Any]:
        """What the simulators saw: serials handed out per pool, events received per repository."""
        out: dict[str, Any] = {}
        if self.l3_port is not None:
            state = _get_json(f"http://127.0.0.1:{self.l3_port}/_sim/state")
            out["l3_handed_out"] = {k: v["handed_out"] for k, v in state["pools"].items()}
        for name, port in self.repositories.items():
            ids = _get_json(f"http://127.0.0.1:{port}/_sim/event-ids")  # eventIDs in the order they were stored
            out.setdefault("repository_events", {})[name] = {"stored": len(ids), "distinct": len(set(ids))}
        return out
