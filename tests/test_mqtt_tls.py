"""The MQTT channel secured per line: TLS with client certificates, a password per line, an ACL per line.

A private Mosquitto runs the shipped config/mosquitto/mosquitto.conf and config/mosquitto/acl (only paths and the
port substituted) with a throwaway CA made here with `cryptography`. Line B's real daemon (`linectl run`, a
subprocess) connects with the config's TLS settings and a password_file; line A's credentials, through linectl's
own client options, connect fine but cannot command line B nor read its topics: the broker drops the command and
line B's daemon never sees it (its audit trail, which records every executed command, has only B's own). No secret
appears in the daemon's log, in the state topic or in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mqtt_fixtures import MOSQUITTO, free_port, port_open
from ruamel.yaml import YAML

from linectl.config import load_config
from linectl.upstream.mqtt_client import SecretRefused, broker_password, client_options

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(MOSQUITTO is None or shutil.which("mosquitto_passwd") is None, reason="needs mosquitto and mosquitto_passwd")

PASSWORDS = {"lineA": "A-pass-7f3c1e9a", "lineB": "B-pass-2d8b6f04"}
ROOT = "acme/site1/packaging"  # the ACL's prefix; a line's default topic root is <enterprise>/<site>/<area>/<name>


# --------------------------------------------------------------------------- a throwaway PKI


def _key(path: Path) -> ec.EllipticCurvePrivateKey:
    k = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
    return k


def _cert(path: Path, cn: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False, san: list[x509.GeneralName] | None = None) -> x509.Name:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer[0] if issuer else name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = b.sign(issuer[1] if issuer else key, hashes.SHA256())
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return name


def make_pki(d: Path) -> None:
    d.mkdir()
    ca_key = _key(d / "ca.key")
    ca = (_cert(d / "ca.crt", "linectl test CA", ca_key, None, ca=True), ca_key)
    _cert(d / "server.crt", "localhost", _key(d / "server.key"), ca,
          san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    for line in PASSWORDS:
        _cert(d / f"{line}.crt", line, _key(d / f"{line}.key"), ca)


class TlsBroker:
    """Mosquitto on the shipped conf and ACL: paths and port substituted, nothing else changed (plus `user root` under root)."""

    def __init__(self, d: Path, pki: Path) -> None:
        self.port = free_port()
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(d / "passwd"), "lineA", PASSWORDS["lineA"]], check=True, capture_output=True)
        subprocess.run(["mosquitto_passwd", "-b", str(d / "passwd"), "lineB", PASSWORDS["lineB"]], check=True, capture_output=True)
        shutil.copy(REPO / "config" / "mosquitto" / "acl", d / "acl")
        conf = (REPO / "config" / "mosquitto" / "mosquitto.conf").read_text()
        conf = (conf.replace("/etc/mosquitto/passwd", str(d / "passwd")).replace("/etc/mosquitto/acl", str(d / "acl"))
                .replace("/etc/mosquitto/certs", str(pki)).replace("listener 8883", f"listener {self.port} 127.0.0.1")
                .replace("persistence true", "persistence false").replace("/var/lib/mosquitto/", f"{d}/"))
        assert "/etc/" not in conf and "/var/" not in conf
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            conf += "user root\n"  # else mosquitto drops to user "mosquitto", who cannot read the 0700 tmp dir
        conf += f"log_dest file {d}/mosquitto.log\nlog_type all\n"
        (d / "mosquitto.conf").write_text(conf)
        self.log = d / "mosquitto.log"
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(d / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def wait(self) -> None:
        for _ in range(250):
            if port_open(self.port):
                return
            assert self.proc.poll() is None, f"mosquitto exited: {self.log.read_text() if self.log.exists() else ''}"
            await asyncio.sleep(0.02)
        raise AssertionError("mosquitto did not listen")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def line_config(tmp: Path, line: str, port: int, pki: Path, *, secret_mode: int = 0o600) -> Path:
    secret = tmp / f"{line}.password"
    secret.write_text(PASSWORDS[line] + "\n")
    secret.chmod(secret_mode)
    raw: dict[str, Any] = {
        "line": {"enterprise": "acme", "site": "site1", "area": "packaging", "name": line, "gln": "4012345000009", "company_prefix_length": 7},
        "products": [{"gtin": "04012345000016", "name": "Test", "company_prefix_length": 7, "serials": {"scheme": "random", "length": 12}}],
        "store": {"path": str(tmp / f"{line}.db")},
        "mqtt": {
            "host": "127.0.0.1", "port": port, "username": line, "password_file": str(secret), "state_interval_s": 0.2,
            "tls": {"ca_file": str(pki / "ca.crt"), "cert_file": str(pki / f"{line}.crt"), "key_file": str(pki / f"{line}.key")},
        },
    }
    path = tmp / f"{line}.yaml"
    with open(path, "w") as f:
        YAML(typ="safe").dump(raw, f)
    return path


def rewrite(src: Path, dst: Path, **mqtt: Any) -> None:
    """A copy of a line YAML with mqtt keys set (None: removed)."""
    yaml = YAML(typ="safe")
    raw = yaml.load(src.read_text())
    for k, v in mqtt.items():
        if v is None:
            raw["mqtt"].pop(k, None)
        else:
            raw["mqtt"][k] = v
    with open(dst, "w") as f:
        yaml.dump(raw, f)


def linectl(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linectl", *args], capture_output=True, text=True, timeout=60, **kw)


@contextlib.asynccontextmanager
async def rig(tmp_path: Path) -> Any:
    pki = tmp_path / "pki"
    make_pki(pki)
    bdir = tmp_path / "broker"
    bdir.mkdir()
    broker = TlsBroker(bdir, pki)
    try:
        await broker.wait()
        yield broker, pki
    finally:
        broker.close()


async def _reply(client: aiomqtt.Client, command_id: str, states: list[bytes], timeout: float = 30.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        async for msg in client.messages:
            if str(msg.topic).endswith("/state"):
                states.append(bytes(msg.payload))
            elif str(msg.topic).endswith("/reply"):
                body = json.loads(msg.payload)
                if body.get("command_id") == command_id:
                    return dict(body)
    raise AssertionError("unreachable")


async def test_line_a_cannot_command_or_read_line_b(tmp_path: Path) -> None:
    async with rig(tmp_path) as (broker, pki):
        cfg_a = load_config(line_config(tmp_path, "lineA", broker.port, pki))
        b_yaml = line_config(tmp_path, "lineB", broker.port, pki)
        cfg_b = load_config(b_yaml)
        assert linectl("init", "-c", str(b_yaml)).returncode == 0
        log_path = tmp_path / "lineB.log"
        with open(log_path, "w") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "linectl", "--log-level", "debug", "run", "-c", str(b_yaml)], stdout=log, stderr=log)
        b_root, a_root = f"{ROOT}/lineB", f"{ROOT}/lineA"
        states: list[bytes] = []
        try:
            # line B's own credentials (the same settings its daemon uses): a command goes through and is answered
            async with aiomqtt.Client(**client_options(cfg_b.mqtt, "lineB-operator")) as b:
                await b.subscribe(f"{b_root}/cmd/+/reply", qos=1)
                await b.subscribe(f"{b_root}/state", qos=0)
                for _ in range(600):  # the daemon's bridge is up once its retained state arrives
                    assert daemon.poll() is None, log_path.read_text()[-3000:]
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            async for msg in b.messages:
                                states.append(bytes(msg.payload))
                                break
                    if states:
                        break
                assert states, "line B's daemon never published its state"
                await b.publish(f"{b_root}/cmd/ack_alarm", json.dumps({"command_id": "b-1", "actor": "mes"}), qos=1)
                assert (await _reply(b, "b-1", states))["ok"] is True

                # line A: linectl's client with line A's TLS settings and password connects (its own subtree works) ...
                async with aiomqtt.Client(**client_options(cfg_a.mqtt, "lineA-intruder")) as a:
                    await a.subscribe(f"{a_root}/#", qos=1)
                    # Mosquitto grants a wildcard subscription and applies the ACL to each message it would deliver
                    await a.subscribe(f"{b_root}/#", qos=1)
                    with contextlib.suppress(aiomqtt.MqttError):  # MQTT 5: the broker may answer "not authorised"
                        await a.publish(f"{b_root}/cmd/ack_alarm", json.dumps({"command_id": "a-1", "actor": "intruder"}), qos=1)
                    with contextlib.suppress(aiomqtt.MqttError):
                        await a.publish(f"{b_root}/cmd/create_batch", json.dumps({"command_id": "a-2", "lot": "EVIL", "gtin": "04012345000016",
                                                                                    "expiry": "301231", "planned_qty": 5}), qos=1)
                    # after A's publishes, B's next command: once it is answered, A's (sent before it) would have been too
                    await b.publish(f"{b_root}/cmd/ack_alarm", json.dumps({"command_id": "b-2", "actor": "mes"}), qos=1)
                    assert (await _reply(b, "b-2", states))["ok"] is True
                    seen_by_a: list[str] = []
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            async for msg in a.messages:
                                seen_by_a.append(str(msg.topic))
                    assert not [t for t in seen_by_a if t.startswith(b_root)], seen_by_a  # not even B's retained state

                async with asyncio.timeout(30):  # a few more state messages (one every state_interval_s at most)
                    async for msg in b.messages:
                        if str(msg.topic).endswith("/state"):
                            states.append(bytes(msg.payload))
                            if len(states) >= 3:
                                break
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(5)
        log_text = log_path.read_text()
        import sqlite3

        with sqlite3.connect(f"file:{tmp_path / 'lineB.db'}?mode=ro", uri=True) as c:
            commands = [json.loads(d).get("command_id") for (a, d) in c.execute("SELECT action, detail FROM audit ORDER BY seq")
                        if a in ("ack_alarm", "create_batch")]
            batches = [r[0] for r in c.execute("SELECT lot FROM batches")]
        assert commands == ["b-1", "b-2"] and batches == [], (commands, batches)  # line B's daemon never saw A's commands
        assert "a-1" not in log_text and "EVIL" not in log_text
        blog = broker.log.read_text()
        assert f"Denied PUBLISH from lineA-intruder (d0, q1, r0, m3, '{b_root}/cmd/ack_alarm'" in blog and "rc135" in blog  # dropped at the broker
        # no secret in the daemon's debug log, its state topic, or the store
        assert states, "the state topic was read"
        db_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("lineB.db*"))
        for pw in PASSWORDS.values():
            assert pw not in log_text and all(pw.encode() not in s for s in states) and pw.encode() not in db_bytes


async def test_secret_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    make_pki(pki)
    path = line_config(tmp_path, "lineB", free_port(), pki, secret_mode=0o644)
    cfg = load_config(path)
    with pytest.raises(SecretRefused, match="may be read by group or others .mode 0644.; make it the owner's alone: chmod 600"):
        broker_password(cfg.mqtt)
    r = linectl("run", "-c", str(path))
    assert r.returncode == 2 and "may be read by group or others" in r.stderr and "Traceback" not in r.stderr
    assert PASSWORDS["lineB"] not in r.stderr + r.stdout
    # from the environment: an unset variable is named, a set one is used
    env_path = tmp_path / "env.yaml"
    rewrite(path, env_path, password_file=None, password_env="LINECTL_TEST_MQTT_PW")
    cfg_env = load_config(env_path)
    env = {k: v for k, v in os.environ.items() if k != "LINECTL_TEST_MQTT_PW"}
    r = linectl("run", "-c", str(env_path), env=env)
    assert r.returncode == 2 and "LINECTL_TEST_MQTT_PW is not set" in r.stderr
    os.environ["LINECTL_TEST_MQTT_PW"] = "from-env"
    try:
        assert client_options(cfg_env.mqtt, "x")["password"] == "from-env"
    finally:
        del os.environ["LINECTL_TEST_MQTT_PW"]
    rewrite(path, tmp_path / "both.yaml", password="inline")
    r = linectl("check-config", str(tmp_path / "both.yaml"))
    assert r.returncode != 0 and "one way" in (r.stdout + r.stderr)


async def test_a_client_without_certificate_or_with_a_wrong_password_is_refused(tmp_path: Path) -> None:
    async with rig(tmp_path) as (broker, pki):
        cfg = load_config(line_config(tmp_path, "lineA", broker.port, pki))
        assert cfg.mqtt.tls is not None
        async with aiomqtt.Client(**client_options(cfg.mqtt, "ok")):
            pass  # the control: these settings connect
        no_cert = cfg.mqtt.model_copy(update={"tls": cfg.mqtt.tls.model_copy(update={"cert_file": None, "key_file": None})})
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(**client_options(no_cert, "nocert"), timeout=5):
                pass
        (tmp_path / "wrong").write_text("not-the-password\n")
        (tmp_path / "wrong").chmod(0o600)
        wrong = cfg.mqtt.model_copy(update={"password_file": str(tmp_path / "wrong")})
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(**client_options(wrong, "wrongpw"), timeout=5):
                pass
