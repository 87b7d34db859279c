"""A real QU4RTET (the open-source L4: serialbox, quartet_capture, quartet_epcis) as a test subprocess.

QU4RTET is GPL/AGPL and brings its own pinned Django stack (and a top-level `tests` package in
site-packages), so it never enters linectl's virtualenv: `ensure_venv()` builds a separate one under
<repo>/build/qu4rtet-venv from tests/l4/requirements.txt, and the server runs from there with the site
files written for linectl in tests/l4/site (settings, urls, seed script, reply templates).

Usage in a test module::

    from tests.l4.harness import qu4rtet  # noqa: F401   (session-scoped, one server per xdist worker)

    def test_something(qu4rtet: Qu4rtet) -> None:
        gtin = qu4rtet.new_gtin()
        qu4rtet.create_pool(gtin, kind="random", minimum=1, maximum=10**9, request_threshold=1000, response="sap")
        ... POST a SOAP request to qu4rtet.base_url + "/guardian/NumberRangeService/" with qu4rtet.auth_header ...

`fresh_qu4rtet` (function scope) gives a server of its own, e.g. to stop and restart it.
`python -m tests.l4.harness serve [--port N]` starts one for desk trials and benchmarks.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

REPO = Path(__file__).resolve().parents[2]
L4_DIR = Path(__file__).resolve().parent
SITE_DIR = L4_DIR / "site"
REQUIREMENTS = L4_DIR / "requirements.txt"
BUILD_DIR = REPO / "build"
VENV_DIR = BUILD_DIR / "qu4rtet-venv"
DB_CACHE_DIR = BUILD_DIR / "qu4rtet-db"

# Test-only credentials, baked into the cached template database.
USERNAME = "linectl"
PASSWORD = "linectl-l4-password"
TOKEN = "1c4e7a0b9d3f4e2a8b6c5d7e9f0a1b2c3d4e5f60"

Kind = Literal["random", "sequential"]
Response = Literal["sap", "unitrace", "tracelink"]

# SOAP number-range endpoints of quartet_integrations, by reply shape.
SOAP_PATHS: dict[str, str] = {
    "sap": "/guardian/NumberRangeService/",
    "unitrace": "/unitrace/NumberRangeService/",
    "tracelink": "/soap/snx/snrequest/",
}

# Timings of the last build/start in this process (seconds), reported by the harness test.
TIMINGS: dict[str, float] = {}


class Qu4rtetError(RuntimeError):
    """QU4RTET could not be built, seeded or started; the message carries the tool output."""


def _venv_python() -> Path:
    return VENV_DIR / "bin" / "python"


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:16]


def _venv_key() -> str:
    return _digest(REQUIREMENTS.read_bytes(), sys.version.encode())


def _site_key() -> str:
    files = sorted(p for p in SITE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    parts = [str(p.relative_to(SITE_DIR)).encode() + b"\0" + p.read_bytes() for p in files]
    return _digest(_venv_key().encode(), USERNAME.encode(), PASSWORD.encode(), TOKEN.encode(), *parts)


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive fcntl lock: two xdist workers (or two worktrees' sessions) must not build the same thing."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with open(BUILD_DIR / name, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], what: str, *, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 900) -> str:
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, timeout=timeout, cwd=SITE_DIR)
    except subprocess.TimeoutExpired as exc:
        raise Qu4rtetError(f"{what}: timed out after {timeout:.0f} s\n{exc.stdout or ''}\n{exc.stderr or ''}") from exc
    if proc.returncode != 0:
        raise Qu4rtetError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    return proc.stdout


def ensure_venv() -> Path:
    """Build QU4RTET's virtualenv once per requirements hash; return its python.

    Raises Qu4rtetError with pip's output when the packages cannot be installed: a missing L4 is a
    failure, never a skip.
    """
    key = _venv_key()
    marker = VENV_DIR / ".linectl-requirements-key"
    with _locked("qu4rtet-venv.lock"):
        if marker.exists() and marker.read_text() == key and _venv_python().exists():
            return _venv_python()
        started = time.monotonic()
        shutil.rmtree(VENV_DIR, ignore_errors=True)
        # the base interpreter, not linectl's venv: nothing of linectl leaks into QU4RTET's environment
        base = getattr(sys, "_base_executable", sys.executable)
        _run([base, "-m", "venv", str(VENV_DIR)], "creating the QU4RTET virtualenv")
        _run(
            [str(_venv_python()), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", str(REQUIREMENTS)],
            "pip install of QU4RTET (tests/l4/requirements.txt)",
        )
        marker.write_text(key)
        TIMINGS["venv_build"] = time.monotonic() - started
        return _venv_python()


def _site_env(db: Path, media: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "DJANGO"))}
    env.update(
        DJANGO_SETTINGS_MODULE="settings",
        PYTHONPATH=str(SITE_DIR),
        PYTHONDONTWRITEBYTECODE="1",
        Q4_DB=str(db),
        Q4_MEDIA=str(media),
    )
    return env


def ensure_template_db() -> Path:
    """A migrated and seeded SQLite database, cached per (requirements, site files) and copied per server."""
    python = ensure_venv()
    key = _site_key()
    path = DB_CACHE_DIR / f"template-{key}.sqlite3"
    with _locked("qu4rtet-db.lock"):
        if path.exists():
            return path
        DB_CACHE_DIR.mkdir(parents=True, exist_ok=True)
        for old in DB_CACHE_DIR.glob("template-*.sqlite3"):
            old.unlink()
        tmp = DB_CACHE_DIR / f"building-{os.getpid()}.sqlite3"
        tmp.unlink(missing_ok=True)
        env = _site_env(tmp, DB_CACHE_DIR / "media")
        started = time.monotonic()
        _run([str(python), "-m", "django", "migrate", "--noinput", "-v", "0"], "QU4RTET migrate", env=env)
        TIMINGS["migrate"] = time.monotonic() - started
        started = time.monotonic()
        spec = json.dumps({"username": USERNAME, "password": PASSWORD, "token": TOKEN})
        _run([str(python), str(SITE_DIR / "seed.py"), "init"], "QU4RTET seed (user, token, EPCIS rule, reply templates)", env=env, stdin=spec)
        TIMINGS["seed"] = time.monotonic() - started
        tmp.rename(path)
        return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _gtin_check_digit(body13: str) -> str:
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(body13)))
    return str((10 - total % 10) % 10)


class Qu4rtet:
    """One QU4RTET server: its own copy of the template database, one port, restartable on both.

    Started with `runserver --noreload --nothreading`: threaded, serialbox hands out duplicate serials;
    the reloader forks a child the PID would not name.
    """

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.db_path = workdir / "qu4rtet.sqlite3"
        self.media_dir = workdir / "media"
        self.log_path = workdir / "server.log"
        self.port = port or free_port()
        self.username = USERNAME
        self.password = PASSWORD
        self.token = TOKEN
        self._proc: subprocess.Popen[bytes] | None = None
        self._gtins = 0

    # -- addresses and credentials -------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth_header(self) -> dict[str, str]:
        """DRF token authentication."""
        return {"Authorization": f"Token {self.token}"}

    @property
    def basic_auth_header(self) -> dict[str, str]:
        raw = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}

    @property
    def capture_url(self) -> str:
        """EPCIS 1.2 XML capture, parsed in the request (quartet_epcis' rule EPCIS)."""
        return f"{self.base_url}/capture/quartet-capture/?rule=EPCIS&run-immediately=true"

    def soap_url(self, shape: str) -> str:
        """Number-range SOAP endpoint: "sap" (SAP AII/ATTP, Guardian), "unitrace" or "tracelink"."""
        return self.base_url + SOAP_PATHS[shape]

    def allocate_url(self, machine_name: str, size: int, fmt: str = "json") -> str:
        return f"{self.base_url}/serialbox/allocate/{machine_name}/{size}/?format={fmt}"

    # -- process -------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 90.0) -> None:
        """Start (or start again, same port and database) and return once it answers HTTP."""
        if self.running:
            return
        python = ensure_venv()
        if not self.db_path.exists():
            shutil.copyfile(ensure_template_db(), self.db_path)
        self.media_dir.mkdir(exist_ok=True)
        started = time.monotonic()
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                [str(python), "-m", "django", "runserver", f"127.0.0.1:{self.port}", "--noreload", "--nothreading"],
                cwd=SITE_DIR,
                env=_site_env(self.db_path, self.media_dir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise Qu4rtetError(f"QU4RTET runserver exited with {code} on port {self.port}:\n{self.log_tail()}")
            try:
                self.request("GET", "/serialbox/", auth=False, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise Qu4rtetError(f"QU4RTET did not answer on {self.base_url} within {timeout:.0f} s:\n{self.log_tail()}") from None
                time.sleep(0.1)
        TIMINGS["start"] = time.monotonic() - started

    def stop(self, timeout: float = 15.0) -> None:
        """Stop this server by its PID (SIGTERM, then SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no server log)"

    def __enter__(self) -> Qu4rtet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP ----------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        *,
        auth: bool = True,
        timeout: float = 60.0,
    ) -> tuple[int, bytes]:
        """Plain HTTP to the server; answers (status, body) for every status, raises OSError when unreachable."""
        all_headers = dict(self.auth_header) if auth else {}
        all_headers.update(headers or {})
        url = path if path.startswith("http") else self.base_url + path
        req = urllib.request.Request(url, data=body, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get_json(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise Qu4rtetError(f"GET {path}: HTTP {status}: {body[:2000]!r}")
        return json.loads(body)

    def _list_all(self, path: str) -> list[dict[str, Any]]:
        """Every row of a paginated (limit/offset) DRF list."""
        sep = "&" if "?" in path else "?"
        url: str | None = f"{self.base_url}{path}{sep}format=json&limit=500"
        rows: list[dict[str, Any]] = []
        while url:
            page = self.get_json(url)
            rows.extend(page["results"])
            url = page["next"]
        return rows

    # -- serial numbers ------------------------------------------------------------------------

    def new_gtin(self, prefix: str = "0950600") -> str:
        """A valid GTIN-14 not used before on this server object (pools are unique by machine name)."""
        self._gtins += 1
        body = f"{prefix}{self._gtins:0{13 - len(prefix)}d}"
        if len(body) != 13:
            raise ValueError(f"GTIN prefix {prefix!r} leaves no room for {self._gtins} pools")
        return body + _gtin_check_digit(body)

    def create_pool(
        self,
        machine_name: str,
        kind: Kind = "random",
        minimum: int = 1,
        maximum: int = 999_999_999,
        request_threshold: int = 50_000,
        response: Response | None = None,
        *,
        element_strings: bool = False,
    ) -> None:
        """A serialbox pool with one region (randomized or sequential) over [minimum, maximum].

        `response` attaches the reply template for SOAP (and `?format=xml`) requests: "sap" (SAP AII/ATTP and
        Guardian), "unitrace", "tracelink" (with `element_strings`, each number as 01<GTIN>21<serial>).
        """
        self.create_pools(
            [dict(machine_name=machine_name, kind=kind, minimum=minimum, maximum=maximum, request_threshold=request_threshold, response=response)],
            element_strings=element_strings,
        )

    def create_pools(self, specs: list[dict[str, Any]], *, element_strings: bool = False) -> None:
        """Several pools in one seed run (each spec: the keyword arguments of create_pool)."""
        out = []
        for spec in specs:
            spec = dict(spec)
            if spec.get("response") == "tracelink" and (element_strings or spec.pop("element_strings", False)):
                spec["response"] = "tracelink-gs1"
            spec.pop("element_strings", None)
            out.append(spec)
        _run(
            [str(ensure_venv()), str(SITE_DIR / "seed.py"), "pools"],
            "QU4RTET pool creation",
            env=_site_env(self.db_path, self.media_dir),
            stdin=json.dumps(out),
            timeout=120,
        )

    def allocate(self, machine_name: str, size: int) -> list[int]:
        """REST allocation (JSON); a sequential pool answers [first, last]."""
        data = self.get_json(f"/serialbox/allocate/{machine_name}/{size}/?format=json")
        numbers: list[int] = ast.literal_eval(data["numbers"])
        return numbers

    # -- EPCIS ---------------------------------------------------------------------------------

    def capture(self, document: bytes) -> str:
        """Capture an EPCIS 1.2 XML document; return the task name (raises with QU4RTET's detail on failure)."""
        status, body = self.request("POST", self.capture_url, document, {"Content-Type": "application/xml"})
        if status != 201:
            raise Qu4rtetError(f"capture: HTTP {status}: {body[:4000]!r}")
        name: str = json.loads(body)
        return name

    def task(self, name: str) -> dict[str, Any]:
        """A quartet_capture task: status (FINISHED, FAILED, ...) and its taskmessage_set."""
        task: dict[str, Any] = self.get_json(f"/capture/tasks/{urllib.parse.quote(name)}/?format=json")
        return task

    def tasks(self) -> list[dict[str, Any]]:
        return self._list_all("/capture/tasks/")

    def events_by_epc(self, urn: str) -> list[dict[str, Any]]:
        """The events naming an EPC, as quartet_epcis renders them ({"objectEvent": {...}} etc.)."""
        status, body = self.request("GET", f"/epcis/events-by-entry-id/{urllib.parse.quote(urn, safe=':')}/?format=json")
        if status == 404:
            return []
        if status != 200:
            raise Qu4rtetError(f"events-by-entry-id {urn}: HTTP {status}: {body[:2000]!r}")
        events: list[dict[str, Any]] = json.loads(body).get("events", [])
        return events

    def events(self) -> list[dict[str, Any]]:
        """Every stored event (flat rows: event_time, action, biz_step, disposition, type "ob"/"ag"/..., message_id)."""
        return self._list_all("/epcis/events/")

    def entries(self) -> list[dict[str, Any]]:
        """Every stored entry (EPC): identifier, last_disposition, decommissioned, parent_id, ..."""
        return self._list_all("/epcis/entries/")


@pytest.fixture(scope="session")
def qu4rtet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qu4rtet]:
    """One QU4RTET per test session (per xdist worker). Tests share it: use new_gtin() for pools; stop() it only if
    you start() it again."""
    server = Qu4rtet(tmp_path_factory.mktemp("qu4rtet"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_qu4rtet(tmp_path: Path) -> Iterator[Qu4rtet]:
    """A QU4RTET of the test's own (fresh database): free to stop, restart, fill."""
    server = Qu4rtet(tmp_path / "qu4rtet")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _serve(args: argparse.Namespace) -> int:
    workdir = Path(args.dir) if args.dir else Path(os.environ.get("TMPDIR", "/tmp")) / f"qu4rtet-{os.getpid()}"
    server = Qu4rtet(workdir, port=args.port)
    server.start()
    print(f"url       {server.base_url}")
    print(f"user      {server.username}")
    print(f"password  {server.password}")
    print(f"token     {server.token}")
    print(f"database  {server.db_path}")
    print(f"log       {server.log_path}")
    print(f"capture   {server.capture_url}")
    print("(Ctrl-C stops it)", flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop and server.running:
            time.sleep(0.5)
    finally:
        server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.l4.harness", description="a real QU4RTET for desk trials and benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start QU4RTET on 127.0.0.1 and print url, user and token")
    serve.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    serve.add_argument("--dir", default=None, help="working directory (database copy, log); kept, so a restart keeps pools")
    args = parser.parse_args(argv)
    try:
        return _serve(args)
    except Qu4rtetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
