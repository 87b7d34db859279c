"""`linectl demo`: a whole simulated line on one machine, one batch, one summary.

The simulator runs in its own process (it is the physical world: it must
not share the daemon's event loop, and on two cores it gets its own). The
daemon runs in this process so the summary can read its counters directly.
Missed and false rejects come from the simulator's ground truth, not from
the daemon's own opinion.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog
from ruamel.yaml import YAML

from linectl import control as C
from linectl import gs1
from linectl.broker import free_port, start_embedded, wait_listening
from linectl.config import LineConfig, load_config
from linectl.demo_upstream import UpstreamSimulators
from linectl.packaged import DEFAULT_EXAMPLE, example_config
from linectl.yamlsource import ConfigFileError, load_yaml, to_plain

log = structlog.get_logger("linectl.demo")

#: the shipped example the demo runs by default (package data: the same file from a clone, an editable install or a wheel)
DEFAULT_CONFIG = example_config(DEFAULT_EXAMPLE)


class SimControl:
    """Client of the line simulator's JSON-lines control port."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def call(self, **msg: Any) -> dict[str, Any]:
        # replies can be long (`units` lists up to 1000 units): the simulator allows 1 MiB lines
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20), 5)
        try:
            writer.write((json.dumps(msg) + "\n").encode())
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 10)
            return json.loads(line) if line else {}
        finally:
            writer.close()


def _rewrite_ports(raw: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Give every simulated device a free localhost port and the camera a private folder, so demos never collide."""
    for name, dev in (raw.get("devices") or {}).items():
        if isinstance(dev.get("port"), int) and dev.get("host", "127.0.0.1") in ("127.0.0.1", "localhost"):
            dev["port"] = free_port()
        url = dev.get("url")
        if dev.get("driver") == "opcua" and isinstance(url, str):  # the OPC UA PLC simulator: its endpoint on a free port
            dev["url"] = _free_endpoint(url)
        sp = dev.get("serial_port")
        if isinstance(sp, str) and sp.startswith("socket://"):
            dev["serial_port"] = f"socket://127.0.0.1:{free_port()}"
        src = dev.get("source")
        if dev.get("driver") == "camera" and isinstance(src, str) and not src.isdigit() and "://" not in src:
            d = workdir / f"frames-{name}"
            d.mkdir(parents=True, exist_ok=True)
            dev["source"] = str(d)
    ua = raw.get("opcua_server")
    if isinstance(ua, dict) and ua.get("enabled") and isinstance(ua.get("endpoint"), str):
        ua["endpoint"] = _free_endpoint(ua["endpoint"])
    sim = raw.setdefault("simulation", {}) or {}
    raw["simulation"] = sim
    sim["control_port"] = free_port()
    return raw


def _free_endpoint(url: str) -> str:
    """An opc.tcp:// URL on this machine with a free port instead of its own (another on the host is left alone)."""
    parts = urlsplit(url)
    if parts.scheme != "opc.tcp" or parts.hostname not in ("127.0.0.1", "localhost", "0.0.0.0"):
        return url
    return urlunsplit((parts.scheme, f"{parts.hostname}:{free_port()}", parts.path, parts.query, parts.fragment))


def demo_batch_dates(template: gs1.CodeTemplate, expiry: str, today: date | None = None) -> dict[str, str]:
    """The dates a demo or campaign batch gives for its product's code template: produced and packed today,
    best before and sell by on the expiry (a real batch takes them from the MES or the operator)."""
    day = (today or date.today()).strftime("%y%m%d")
    by_name = {"production_date": day, "packaging_date": day, "best_before": expiry, "sell_by": expiry}
    return {f: by_name[f] for f in template.batch_fields if f in by_name}


class PortTaken(RuntimeError):
    """A free port picked for a simulated device was bound by another process before the simulator could."""


class SimulatedLine:
    """A line config brought up on the simulators: simulator process, broker, and an in-process daemon.

    `linectl demo` and the end-to-end tests share it, so what the tests prove
    is what the demo shows.
    """

    def __init__(
        self,
        config: str | Path | None = None,
        *,
        rate: float = 600.0,
        defect_rate: float = 0.03,
        seed: int = 1,
        camera: bool = False,
        broker: str | None = None,
        db: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
        l3: str = "sim",
    ) -> None:
        self.cfg_path = Path(config or DEFAULT_CONFIG)
        self.workdir = Path(tempfile.mkdtemp(prefix="linectl-demo-"))
        self.rate, self.defect_rate, self.seed, self.camera = rate, defect_rate, seed, camera
        self.broker = broker
        self.db = Path(db) if db else self.workdir / "demo.db"
        self.overrides = overrides or {}
        self.broker_proc: subprocess.Popen[bytes] | None = None
        self.sim: subprocess.Popen[bytes] | None = None
        self.daemon: Any = None
        self.cfg: LineConfig | None = None
        self.control: SimControl | None = None
        self.run_cfg_path = self.workdir / "line.yaml"
        #: "sim": the config's local L3/L4 endpoints are answered by simulators (linectl.demo_upstream); "real": as configured
        self.l3 = l3
        self.upstream_sims = UpstreamSimulators(self.workdir)
        #: the demo's own OPC UA client (certificate trusted by the line's server) when the config has opcua_server
        self.opcua_client: OpcuaDemoClient | None = None

    def write_config(self) -> Path:
        raw = to_plain(load_yaml(self.cfg_path))
        raw = _rewrite_ports(raw, self.workdir)
        if self.l3 == "sim":
            self.upstream_sims.rewrite(raw)
        if self.camera:
            packing = {st.get("reader") for st in raw.get("stations", []) if st.get("type") in ("case", "pallet")}
            cams = [n for n, d in raw["devices"].items() if d.get("driver") == "camera" and n not in packing]
            if not cams:
                raise RuntimeError(f"{self.cfg_path}: --camera needs a device with driver: camera that no case station uses")
            for st in raw.get("stations", []):
                if st.get("type") == "print_verify":
                    st["reader"] = cams[0]
        if self.broker:
            host, _, port = self.broker.partition(":")
            raw.setdefault("mqtt", {}).update({"host": host or "127.0.0.1", "port": int(port or 1883), "enabled": True})
        else:
            self.broker_proc, bport = start_embedded()
            raw.setdefault("mqtt", {}).update({"host": "127.0.0.1", "port": bport, "protocol": "3.1.1", "enabled": True})
        raw.setdefault("store", {})["path"] = str(self.db)
        _merge(raw, self.overrides)
        with open(self.run_cfg_path, "w", encoding="utf-8") as fh:
            YAML(typ="safe").dump(raw, fh)
        self.cfg = load_config(self.run_cfg_path)
        # the simulator owns the `simulation:` section (LineConfig keeps it as a mapping): check it here, located in
        # the user's file, rather than as a simulator that does not start
        from linectl.commands.check_config import simulation_problems

        problems = simulation_problems(str(self.cfg_path), raw["simulation"])
        if problems:
            raise ConfigFileError(self.cfg_path, problems)
        self.control = SimControl(int(raw["simulation"]["control_port"]))
        return self.run_cfg_path

    def start_simulator(self) -> None:
        assert self.control is not None
        cmd = [
            sys.executable, "-m", "linectl", "--log-level", "warning", "simulate", "-c", str(self.run_cfg_path),
            "--rate", str(self.rate), "--defect-rate", str(self.defect_rate), "--seed", str(self.seed),
            "--truth", str(self.workdir / "truth.json"),
        ]
        if self.camera:
            cmd.append("--camera")
        self._sim_log = open(self.workdir / "simulator.log", "wb")
        self.sim = subprocess.Popen(cmd, stdout=self._sim_log, stderr=subprocess.STDOUT)
        if not wait_listening(self.control.port, 20):
            self._sim_log.flush()
            if self.sim.poll() is not None and b"address already in use" in (self.workdir / "simulator.log").read_bytes():
                raise PortTaken(f"a port picked for the simulator was taken meanwhile; see {self.workdir / 'simulator.log'}")
            raise RuntimeError(f"simulator did not start; see {self.workdir / 'simulator.log'}")

    async def start_daemon(self) -> Any:
        from linectl.daemon import Daemon

        assert self.cfg is not None
        if self.cfg.opcua_server.enabled:
            self.opcua_client = OpcuaDemoClient.prepare(self.cfg, self.db, self.workdir)
        self.daemon = Daemon(self.cfg, str(self.db), create=True)  # the demo (and tests) make their own store
        await self.daemon.start()
        for d in self.daemon.drivers.values():
            if not await d.wait_connected(15):
                raise RuntimeError(f"device {d.name} did not connect: {d.health.reason}")
        return self.daemon

    async def start(self) -> SimulatedLine:
        for attempt in range(3):
            self.write_config()
            self.upstream_sims.start()
            try:
                self.start_simulator()
                break
            except PortTaken:
                # free ports are picked before the simulator binds them: another process (a parallel test) can take one
                # between the two; pick again rather than fail the demo
                if attempt == 2:
                    raise
                log.warning("demo_ports_taken", attempt=attempt + 1)
                self._release_processes()
        await self.start_daemon()
        return self

    def _release_processes(self) -> None:
        """The simulator, the upstream simulators and the embedded broker of a start that did not get its ports."""
        if self.sim is not None:
            if self.sim.poll() is None:
                self.sim.kill()
            self.sim.wait(10)
            self._sim_log.close()
            self.sim = None
        self.upstream_sims.stop()
        self.upstream_sims = UpstreamSimulators(self.workdir)
        if self.broker_proc is not None:
            self.broker_proc.terminate()
            self.broker_proc.wait(5)
            self.broker_proc = None

    @property
    def line(self) -> Any:
        return self.daemon.line

    async def run_command(self, command: Any, user: str) -> dict[str, Any]:
        """Execute `command` in process; an action access.signatures requires a signature for is sent as the demo's
        default `user` (operator, qa), signed with that user's password, so the demo's record reads like a real one."""
        from linectl.access.signing import requirement, sign

        d = self.daemon
        assert self.cfg is not None and d is not None
        pw = d.initial_passwords.get(user)
        if not self.cfg.access.enabled or not pw or requirement(self.cfg.access.signatures, command) is None:
            return await self.line.execute(command, origin="demo")  # type: ignore[no-any-return]
        principal = await d.access.authenticate(user, pw, channel="demo", origin="demo")
        command = command.model_copy(update={"actor": user})
        signed = await sign(d.access, command, principal, {"username": user, "password": pw}, None, channel="demo", origin="demo")
        return await self.line.execute(command, origin="demo", principal=principal, signatures=signed)  # type: ignore[no-any-return]

    async def create_batch(self, units: int, lot: str | None = None, challenge: bool = True) -> str:
        assert self.cfg is not None
        product = self.cfg.products[0]
        if product.serials.scheme == "pool" and product.serials.source is not None:
            await self._first_fill(product)
        elif product.serials.scheme == "pool":
            need = int(units * 1.3) + 200
            await self.line.execute(C.ProvisionPool(gtin=product.gtin, range_start=10**9, range_count=need, actor="demo"), origin="demo")
        lot = lot or f"DEMO{int(time.time() * 1000) % 10**9}"
        expiry = (date.today() + timedelta(days=730)).strftime("%y%m%d")
        dates = demo_batch_dates(product.template, expiry)
        await self.run_command(
            C.CreateBatch(lot=lot, gtin=product.gtin, expiry=expiry, planned_qty=units, challenge=challenge, actor="demo", **dates), "operator")
        return lot

    async def _first_fill(self, product: Any) -> None:
        """A pool filled by its L3 (serials.source): wait for the provisioner's first answer rather than invent serials;
        the line refills it while it runs."""
        assert self.daemon is not None
        store = self.daemon.store
        deadline = time.monotonic() + 60
        while store.available(product.gtin) < max(1, min(product.serials.low_water, product.serials.request_count)):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the serial source of GTIN {product.gtin} gave no serials within 60 s: { {g: p.status() for g, p in self.daemon.provisioners.items()} }"
                )
            self.line.check_pool(product)
            await asyncio.sleep(0.2)

    async def start_batch(self, drive: str = "engine") -> None:
        """Start; when a challenge is configured, feed the challenge units and wait for its verdict.

        drive "packml": the simulated PLC starts the batch, as a PLC programmed to PackML does: Reset then Start
        through the PackTags command handshake (README "PackTags on the PLC"); "engine": start_batch directly."""
        assert self.cfg is not None and self.control is not None
        kinds = list(self.cfg.batch.challenge) if self.line.batch.challenge else []
        if kinds:
            await self.control.call(cmd="challenge", kinds=kinds)
        if drive == "packml":
            for command in ("Reset", "Start"):
                await self.packml(command)
        elif drive == "opcua":
            for method in ("Reset", "Start"):
                await self.opcua(method)
        else:
            await self.run_command(C.StartBatch(actor="demo"), "operator")
        if kinds:
            await asyncio.wait_for(self.line.challenge_done.wait(), 60)
            if not self.line.challenge_passed:
                raise RuntimeError(f"challenge test failed: {self.line.snapshot()['stations']}")

    async def opcua(self, method: str) -> None:
        """One PackML method on the line's OPC UA server, called as SCADA does: as the store user operator."""
        if self.opcua_client is None:
            raise RuntimeError(f"{self.cfg_path}: --drive opcua needs an opcua_server: section (see config/packml-line.yaml)")
        await self.opcua_client.call(method, "operator", self.demo_password("operator"))

    def demo_password(self, user: str) -> str:
        assert self.cfg is not None and self.daemon is not None
        pw = self.daemon.initial_passwords.get(user)
        if not self.cfg.access.enabled or not pw:
            raise RuntimeError("the demo logs in to OPC UA as the store's user operator: the config needs an access: section "
                               "and a new store (the default users' passwords)")
        return str(pw)

    def packml_plc(self) -> str:
        """The PLC whose tag map carries the PackTags command handshake (packml_cntrl_cmd)."""
        from linectl.drivers.plc_tags import PlcConfigBase

        assert self.cfg is not None
        for name, dev in self.cfg.devices.items():
            if isinstance(dev, PlcConfigBase) and "packml_cntrl_cmd" in dev.tag_specs():
                return name
        raise RuntimeError(f"{self.cfg_path}: no PLC with the PackTags handshake (tag packml_cntrl_cmd); see config/packml-line.yaml")

    async def packml(self, command: str, timeout: float = 60.0) -> dict[str, Any]:
        """One PackML command from the simulated PLC, through the handshake; its acknowledge as the PLC saw it."""
        assert self.control is not None
        plc = self.packml_plc()

        def handshakes(status: dict[str, Any]) -> list[dict[str, Any]]:
            return list(status["devices"][plc]["packml"]["done"])

        before = len(handshakes(await self.control.call(cmd="status")))
        await self.control.call(cmd="packml", device=plc, command=command)
        status = await _poll(self.control, lambda s: len(handshakes(s)) > before, timeout, f"the PLC's PackML {command} acknowledged", cmd="status")
        done = handshakes(status)[before]
        if done.get("result") != 1:
            raise RuntimeError(f"PackML {command} from PLC {plc} not done: {done} (packml_cmd_result: README \"PackTags on the PLC\")")
        return done

    async def finish_packing(self, timeout: float = 60.0) -> None:
        """Batch end at the packer: every good unit read into a case, the partial case and pallet closed on command.

        What an operator does at the end of a batch: wait for the last full
        cases, then close the partial case (`close_case`) and the partial
        pallet. Waits on the simulator's ground truth (what it physically
        put in front of each reader) and the stations' handled-read counters.
        """
        assert self.control is not None
        case, pallet = _packing_station(self.line, "case"), _packing_station(self.line, "pallet")
        if case is None:
            return
        ctl = self.control
        await _wait_belt_empty(ctl, 30)
        st = await _poll(ctl, lambda p: p["units_presented"] + p["open_units"] >= p["units_in"], timeout, "units into the case packer")

        def case_reads(p: dict[str, Any]) -> int:
            return int(p["cases_presented"] if p["frame"] else p["units_presented"])

        await _until(lambda: case.counters.reads >= case_reads(st), timeout, "case station reads")
        if st["frame"] and st["open_units"]:
            await self.line.execute(C.CloseCase(station=case.name, actor="demo"), origin="demo")
            st = await ctl.call(cmd="pack", flush=True)
            await _until(lambda: case.counters.reads >= case_reads(st), timeout, "partial case decision")
        elif not st["frame"] and case.snapshot()["open"]:
            await self.line.execute(C.CloseCase(station=case.name, actor="demo"), origin="demo")
        if pallet is None:
            return
        st = await _poll(ctl, lambda p: p["cases_to_pallet"] >= p["case_labels"], timeout, "labelled cases to the palletizer")
        await _until(lambda: pallet.counters.reads >= st["cases_to_pallet"], timeout, "pallet station reads")
        if pallet.snapshot()["open"]:
            await self.line.execute(C.CloseCase(station=pallet.name, actor="demo"), origin="demo")

    async def truth(self) -> dict[str, Any]:
        assert self.control is not None
        await _wait_belt_empty(self.control, 30)
        return await self.control.call(cmd="truth")

    async def stop(self) -> None:
        if self.daemon is not None:
            await self.daemon.shutdown("demo finished")
            self.daemon = None
        if self.sim is not None:
            self.sim.send_signal(signal.SIGTERM)
            try:
                self.sim.wait(10)
            except subprocess.TimeoutExpired:
                self.sim.kill()
            self._sim_log.close()
            self.sim = None
        self.upstream_sims.stop()
        if self.broker_proc is not None:
            self.broker_proc.terminate()
            self.broker_proc.wait(5)
            self.broker_proc = None

    async def __aenter__(self) -> SimulatedLine:
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class OpcuaDemoClient:
    """The demo's SCADA: an asyncua client with its own certificate, trusted by the line's OPC UA server (its file put
    in trusted_clients_dir before the server starts), over the first policy the server offers."""

    def __init__(self, url: str, policy: str, cert: Path, key: Path, server_cert: Path) -> None:
        self.url, self.policy, self.cert, self.key, self.server_cert = url, policy, cert, key, server_cert
        self.calls: list[dict[str, Any]] = []

    @classmethod
    def prepare(cls, cfg: LineConfig, db: Path, workdir: Path) -> OpcuaDemoClient:
        """Make the client's certificate and trust it; paths as the daemon resolves them (beside the store file)."""
        from asyncua.crypto.cert_gen import dump_private_key_as_pem, generate_private_key, generate_self_signed_app_certificate
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding
        from cryptography.x509.oid import ExtendedKeyUsageOID

        ua_cfg = cfg.opcua_server
        base = db.resolve().parent

        def where(p: str) -> Path:
            return Path(p) if Path(p).is_absolute() else base / p

        key = generate_private_key()
        cert = generate_self_signed_app_certificate(
            key, "linectl demo client", {}, [x509.UniformResourceIdentifier("urn:linectl:demo-client"), x509.DNSName("localhost")],
            extended=[ExtendedKeyUsageOID.CLIENT_AUTH], days=30)
        cdir = workdir / "opcua-client"
        cdir.mkdir(mode=0o700, exist_ok=True)
        cp, kp = cdir / "demo-client.der", cdir / "demo-client.pem"
        cp.write_bytes(cert.public_bytes(Encoding.DER))
        kp.touch(mode=0o600)
        kp.write_bytes(dump_private_key_as_pem(key))
        trusted = where(ua_cfg.trusted_clients_dir)
        trusted.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # (the server's key may go there: 0700 as it makes it)
        trusted.mkdir(exist_ok=True, mode=0o700)
        (trusted / "linectl-demo-client.der").write_bytes(cert.public_bytes(Encoding.DER))
        url = ua_cfg.endpoint.replace("//0.0.0.0:", "//127.0.0.1:")
        return cls(url, ua_cfg.security[0], cp, kp, where(ua_cfg.certificate))

    async def client(self, user: str, password: str) -> Any:
        from asyncua import Client, ua
        from asyncua.crypto import security_policies as sp

        name, _, mode = self.policy.partition("_")
        c = Client(self.url, timeout=30)
        c.application_uri = "urn:linectl:demo-client"
        await c.set_security(getattr(sp, f"SecurityPolicy{name}"), str(self.cert), str(self.key), server_certificate=str(self.server_cert),
                             mode=getattr(ua.MessageSecurityMode, mode))
        c.set_user(user)
        c.set_password(password)
        return c

    async def call(self, method: str, user: str, password: str) -> None:
        """Browse to the line by browse names and call `method` on the state machine that holds it."""
        from asyncua import ua

        from linectl.opcua_server import METHODS, PACKML_URI

        machine = next(m for m, names in METHODS.items() if method in names)
        chain = {"BaseStateMachine": ["BaseStateMachine"], "MachineState": ["BaseStateMachine", "MachineState"],
                 "ExecuteState": ["BaseStateMachine", "MachineState", "ExecuteState"]}[machine]
        async with await self.client(user, password) as c:
            ns = await c.get_namespace_index(PACKML_URI)
            folder = await c.nodes.objects.get_child([f"{ns}:PackMLObjects"])
            (line,) = await folder.get_children()
            holder = await line.get_child([f"{ns}:{n}" for n in chain])
            try:
                await holder.call_method(await holder.get_child(f"{ns}:{method}"))
            except ua.UaStatusCodeError as exc:
                status = ua.StatusCode(exc.code).name
                self.calls.append({"method": method, "user": user, "status": status})
                raise RuntimeError(f"OPC UA {method} as {user}: {status} (README \"OPC UA server (PackML)\")") from None
            self.calls.append({"method": method, "user": user, "status": "Good"})

    async def state_current(self, user: str, password: str) -> int:
        """StateCurrent as a SCADA reads it (Status/StateCurrent, namespace urn:linectl:packml)."""
        from linectl.opcua_server import LINECTL_URI, PACKML_URI

        async with await self.client(user, password) as c:
            ns, mine = await c.get_namespace_index(PACKML_URI), await c.get_namespace_index(LINECTL_URI)
            (line,) = await (await c.nodes.objects.get_child([f"{ns}:PackMLObjects"])).get_children()
            return int(await (await line.get_child([f"{ns}:Status", f"{mine}:StateCurrent"])).read_value())

    def how_to_connect(self, db: Path) -> list[str]:
        return [f"OPC UA server {self.url} ({self.policy}; PackML unit under Objects/PackMLObjects)",
                f"  log in as a store user, e.g. operator: its password is in {db}.initial-passwords (or $LINECTL_PASSWORD_OPERATOR)",
                f"  client certificate {self.cert} and key {self.key} (trusted); server certificate {self.server_cert}"]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


async def run_demo(args: Any) -> dict[str, Any]:
    sl = SimulatedLine(
        args.config, rate=args.rate, defect_rate=args.defect_rate, seed=args.seed, camera=args.camera, broker=args.broker, db=args.db,
        l3=args.l3,
    )
    async with sl:
        line = sl.line
        if sl.opcua_client is not None:
            for text in sl.opcua_client.how_to_connect(sl.db):
                print(text, file=sys.stderr)
        await sl.create_batch(args.units)
        t_start = time.monotonic()
        await sl.start_batch(drive=args.drive)
        t_prod = time.monotonic()
        await _progress(line, args.units, args.json)
        t_end = time.monotonic()
        packml: dict[str, Any] | None = None
        if args.drive == "packml":  # the planned quantity reached: PackML Complete, as the PLC reads it in StateCurrent
            await _until(lambda: line.packtags().state.name == "Complete", 60, "PackML Complete at the planned quantity")
            assert sl.control is not None
            plc = sl.packml_plc()
            # the PLC reads StateCurrent from its own tag, written by linectl at the change (and every second)
            status = await _poll(sl.control, lambda s: s["devices"][plc]["packml"].get("packml_state_current") == 17, 15,
                                 "StateCurrent 17 (Complete) in the PLC", cmd="status")
            st = status["devices"][plc]["packml"]
            packml = {"plc": sl.packml_plc(), "handshakes": st["done"], "state_current": st.get("packml_state_current"),
                      "packtags": line.packtags().to_json()}
        elif args.drive == "opcua":  # Complete at the planned quantity, as a SCADA reads it over OPC UA
            assert sl.opcua_client is not None
            await _until(lambda: line.packtags().state.name == "Complete", 60, "PackML Complete at the planned quantity")
            pw = sl.demo_password("operator")
            deadline = time.monotonic() + 15  # the server writes PackTags at a change and every publish_interval_s
            while (seen := await sl.opcua_client.state_current("operator", pw)) != 17 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            packml = {"opcua": sl.opcua_client.url, "calls": sl.opcua_client.calls, "state_current": seen,
                      "packtags": line.packtags().to_json()}
        await sl.finish_packing()
        close = await sl.run_command(C.CloseBatch(actor="demo"), "qa")  # batch close = release: signed by QA, approved
        await _wait_forwarded(sl.daemon, 60)
        truth = await sl.truth()
        summary = _summary(line, sl.daemon, close["report"], truth, sl.db, t_end - t_prod, t_end - t_start)
        upstream = _upstream_summary(sl)
        if upstream:
            summary["upstream"] = upstream
        if packml is not None:
            summary["packml"] = packml
        if _packing_station(line, "case") is not None:
            summary["aggregation"] = await _aggregation_summary(sl, close["report"].get("lot"))
        return summary


async def _progress(line: Any, units: int, quiet: bool) -> None:
    tty = sys.stderr.isatty() and not quiet
    last = -1.0
    while not line.completed.is_set():
        if line.fault is not None and line.batch is not None and line.batch.state.value == "stopped":
            raise RuntimeError(f"line stopped with fault {line.fault}: {[a.message for a in line.alarms.values()][-3:]}")
        good = line.batch.good_total() if line.batch else 0
        frac = min(1.0, good / max(1, units))
        if tty:
            bar = "#" * int(frac * 40)
            sys.stderr.write(f"\r[{bar:<40}] {good}/{units} good  {line.achieved_rate_upm():.0f} upm ")
            sys.stderr.flush()
        elif frac - last >= 0.1:
            print(f"progress: {good}/{units} good", file=sys.stderr)
            last = frac
        await asyncio.sleep(0.2)
    if tty:
        sys.stderr.write("\n")


def _packing_station(line: Any, level: str) -> Any:
    """The line's first case (or pallet) station; rework benches share the list but have no level."""
    from linectl.engine.aggregation import AggregationRuntime

    return next((s for s in line.stations if isinstance(s, AggregationRuntime) and s.level == level), None)


async def _until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


async def _poll(control: SimControl, cond: Any, timeout: float, what: str, cmd: str = "pack") -> dict[str, Any]:
    """The simulator's answer to `cmd` (default: its packer status), once `cond(answer)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        st = await control.call(cmd=cmd)
        if cond(st):
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}: {st}")
        await asyncio.sleep(0.1)


async def _aggregation_summary(sl: SimulatedLine, lot: str | None) -> dict[str, Any]:
    """Cases and pallets as the store recorded them, the stations' rejects, and the packer's ground truth."""
    from linectl.engine.rework import check_hierarchy

    assert sl.control is not None
    store = sl.daemon.store
    out: dict[str, Any] = await asyncio.to_thread(store.packing_counts, lot or "")
    case, pallet = _packing_station(sl.line, "case"), _packing_station(sl.line, "pallet")
    for s in (case, pallet):
        if s is not None:
            out[s.name] = s.counters.as_dict()
    out["hierarchy_violations"] = await asyncio.to_thread(check_hierarchy, store)
    packer = await sl.control.call(cmd="pack")
    out["packer"] = {k: packer.get(k) for k in ("units_in", "cases_presented", "case_labels", "cases_to_pallet", "pallet_labels", "skipped")}
    if "tunnel" in packer:  # an RFID tunnel at the case station: what the simulator put in its field, and what linectl read
        # "last": the ground truth of the last 5 cases (EPC in the field -> unit, untagged units, faults per case)
        out["packer"]["tunnel"] = {k: packer["tunnel"][k] for k in ("cases", "faults", "last")}
        if case is not None:
            out["rfid"] = case.snapshot().get("rfid")
    case_plc = getattr(case.cfg, "plc", None) if case is not None else None
    if case_plc:  # what the case reject pusher did, as the simulated PLC saw it over the wire
        plc = ((await sl.control.call(cmd="status")).get("devices") or {}).get(case_plc) or {}
        out["packer"]["plc_cases_passed"] = plc.get("cases_passed")
        out["packer"]["plc_cases_diverted"] = plc.get("cases_diverted")
    return out


async def _wait_belt_empty(control: SimControl, timeout: float) -> None:
    """Ground truth is final only once every unit on the belt has passed the gate."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = await control.call(cmd="status")
        convs = st.get("conveyors") or {}
        if all(int(c.get("in_flight", 0)) == 0 for c in convs.values()):
            return
        await asyncio.sleep(0.1)


def _upstream_summary(sl: SimulatedLine) -> dict[str, Any]:
    """Per sink its cursor and backlog, per serial source its requests, and what the upstream simulators saw (their
    truth, to compare with the store): empty for a line with only MQTT and no source."""
    store = sl.daemon.store
    cursors = store.cursors()
    out: dict[str, Any] = {}
    sinks = {name: {"cursor": c["seq"], "backlog": store.sink_backlog(name)} for name, c in cursors.items() if name != "mqtt"}
    if sinks:
        out["sinks"] = sinks
    if sl.daemon.provisioners:
        out["sources"] = store.requests_summary()
    if sl.upstream_sims.procs:
        out["simulators"] = sl.upstream_sims.truth()
        out["store_epcis_events"] = _epcis_event_count(store)
    return out


def _epcis_event_count(store: Any) -> int:
    """EPCIS events the store holds (a row may carry several; failed renderings none): what every sink must deliver."""
    from linectl import epcis

    n = after = 0
    while True:
        rows = store.outbox(after, 5000, only_unforwarded=False)
        for r in rows:
            if r.epcis and not r.epcis.startswith(epcis.RENDER_FAILED):
                n += len(epcis.stored_events(r.epcis))
        if len(rows) < 5000:
            return n
        after = rows[-1].seq


async def _wait_forwarded(daemon: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.store.backlog() == 0:
            return
        await asyncio.sleep(0.2)


def _summary(line: Any, daemon: Any, report: dict[str, Any], truth: dict[str, Any], db: Path, prod_s: float, total_s: float) -> dict[str, Any]:
    rejected: dict[str, int] = {}
    units = commissioned = confirmed = challenge_units = 0
    lat = None
    from linectl.engine.print_verify import PrintVerifyRuntime

    for s in line.stations:
        if not isinstance(s, PrintVerifyRuntime):
            continue  # (the summary is the print-and-verify figures; case stations report in the batch report)
        for k, v in s.counters.rejected.items():
            rejected[k] = rejected.get(k, 0) + v
        units += s.counters.production_units
        commissioned += s.counters.good
        confirmed += s.counters.reject_confirmed
        challenge_units += s.counters.challenge_units
        lat = s.latency.summary()
    stats = daemon.store.stats()
    return {
        "units": units,
        "commissioned": commissioned,
        "rejected": rejected,
        "reject_confirmed": confirmed,
        "missed_rejects": truth.get("missed_rejects"),
        "false_rejects": truth.get("false_rejects"),
        "challenge": {"units": challenge_units, "passed": line.challenge_passed},
        "events_stored": stats["last_seq"],
        "events_forwarded": stats["last_seq"] - stats["backlog"],
        "decision_latency_ms": {k: (lat or {}).get(k) for k in ("p50", "p99", "max")},
        "achieved_rate_upm": round(units / prod_s * 60.0, 1) if prod_s > 0 else 0.0,
        "balanced": report.get("balanced"),
        "batch": report.get("lot"),
        "truth": {k: truth.get(k) for k in ("passed", "rejected", "defects", "variations", "challenge_units", "challenge_passed")},
        "db": str(db),
    }
