"""OpenScsSource against the OPEN-SCS L3 simulator over real OPC UA (the simulator runs as its own process).

The simulator is controlled and its ground truth read through its own OPC UA methods (InjectFault, GroundTruth)
with a separate asyncua client, so every assertion about what the L3 handed out comes from the L3's side.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto import security_policies
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from linectl.sources.base import SerialRequest, SerialSource, SourceRefused, SourceUnavailable
from linectl.sources.openscs import OpenScsSource

REPO = Path(__file__).resolve().parent.parent
GTIN = "09506000134352"
OTHER_GTIN = "09506000134369"
SIM_URI = "urn:linectl:simulators:openscs-l3"
STARTUP_S = 90.0  # nodeset import on a loaded 2-core runner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sim:
    """The simulator as a separate process (python -m simulators.openscs_l3)."""

    def __init__(self, tmp: Path, *extra: str, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.tmp = tmp
        self.port = port or free_port()
        self.extra = list(extra)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = f"opc.tcp://127.0.0.1:{self.port}/openscs"

    def start(self) -> Sim:
        log = self.tmp / f"sim-{self.port}-{time.monotonic_ns()}.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "simulators.openscs_l3", "--port", str(self.port), *self.extra],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=self.env,
            )
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if b"listening on" in log.read_bytes():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"simulator exited {self.proc.returncode}: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"simulator did not start within {STARTUP_S} s: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None


class Control:
    """A separate OPC UA client on the simulator's own methods."""

    def __init__(self, sim: Sim, setup: Any = None) -> None:
        self.sim = sim
        self.setup = setup

    async def _call(self, method: str, *args: Any) -> Any:
        client = Client(self.sim.endpoint, timeout=30)
        if self.setup is not None:
            await self.setup(client)
        async with client:
            ns = await client.get_namespace_index(SIM_URI)
            sim = client.get_node(ua.NodeId("Simulator", ns))
            return await sim.call_method(ua.QualifiedName(method, ns), *args)

    async def inject(self, kind: str, times: int = 1, arg: str = "") -> None:
        await self._call("InjectFault", kind, ua.Variant(times, ua.VariantType.UInt32), arg)

    async def truth(self) -> dict[str, Any]:
        return dict(json.loads(await self._call("GroundTruth")))


@pytest.fixture(scope="module")
def plain_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    sim = Sim(tmp_path_factory.mktemp("openscs"), "--page-size", "4", "--max-requestable", "1000", "--max-returnable", "3", "--gtin", GTIN,
              "--gtin", OTHER_GTIN, "--seed", "7").start()
    yield sim
    sim.stop()


@pytest.fixture
async def ctl(plain_sim: Sim) -> AsyncIterator[Control]:
    c = Control(plain_sim)
    await c.inject("clear")
    yield c


@pytest.fixture
async def source(plain_sim: Sim) -> AsyncIterator[OpenScsSource]:
    src = OpenScsSource(plain_sim.endpoint, timeout_s=15)
    yield src
    await src.aclose()


def req(size: int, key: str | None = None, gtin: str = GTIN) -> SerialRequest:
    return SerialRequest(request_id=1, gtin=gtin, size=size, key=key or f"linectl-{uuid.uuid4().hex}")


async def all_pages(src: OpenScsSource, r: SerialRequest) -> list[str]:
    out: list[str] = []
    cont: str | None = None
    for _ in range(100):
        page = await src.request(r, cont)
        assert not page.foreign
        out.extend(page.serials)
        if not page.more:
            return out
        cont = page.continuation
    raise AssertionError("paging never ended")


# --------------------------------------------------------------------------- paging, idempotency, return


async def test_protocol_conformance(source: OpenScsSource) -> None:
    assert isinstance(source, SerialSource)
    assert source.name.startswith("openscs:")


async def test_paging_follows_the_returned_token_and_repeats_are_idempotent(source: OpenScsSource, ctl: Control) -> None:
    r = req(10)
    first = await source.request(r)
    assert len(first.serials) == 4 and first.more and first.continuation
    again = await source.request(r)  # same key = same request token: the same first page, nothing new allocated
    assert again.serials == first.serials and again.continuation == first.continuation
    second = await source.request(r, first.continuation)
    second_again = await source.request(r, first.continuation)
    assert second.serials == second_again.serials and second.more
    third = await source.request(r, second.continuation)
    assert len(third.serials) == 2 and not third.more and third.continuation is None
    got = first.serials + second.serials + third.serials
    assert len(set(got)) == 10
    truth = await ctl.truth()
    assert truth["allocations"][r.key]["serials"] == got  # exactly what the L3 allocated, in its order
    assert sum(1 for s in truth["handed_out"][GTIN] if s in got) == 10  # allocated once although asked twice
    raw = json.loads(first.raw)
    assert raw["method"] == "SNRequestAllocated" and raw["request"]["RequestToken"] == r.key
    assert raw["answer"]["ReturnStatus"] == "NoError1"
    assert raw["answer"]["SNCollection"]["SerialNumbers"] == first.serials
    assert raw["answer"]["SNCollection"]["State"] == "Allocated2"
    assert raw["answer"]["ReturnedRequestToken"] == first.continuation


async def test_a_new_source_gets_the_same_numbers_for_the_same_key(plain_sim: Sim, source: OpenScsSource) -> None:
    r = req(6)
    before = await all_pages(source, r)
    other = OpenScsSource(plain_sim.endpoint, timeout_s=15)  # linectl restarted: a new session, the stored key
    try:
        assert await all_pages(other, r) == before
    finally:
        await other.aclose()


async def test_same_key_with_another_count_is_refused_by_the_l3(source: OpenScsSource) -> None:
    r = req(5)
    await source.request(r)
    with pytest.raises(SourceRefused, match="InvalidRequestToken5"):
        await source.request(SerialRequest(request_id=2, gtin=GTIN, size=6, key=r.key))


async def test_give_back_returns_unused_serials_to_the_pool(source: OpenScsSource, ctl: Control) -> None:
    r = req(4)
    got = await all_pages(source, r)
    assert await source.give_back(GTIN, got[2:], r.key) is True
    truth = await ctl.truth()
    assert set(got[2:]) <= set(truth["returned"][GTIN])
    assert set(got[2:]) <= set(truth["pools"][GTIN])  # back in the pool: the next request gets them first
    nxt = await all_pages(source, req(2))
    assert nxt == got[2:]
    assert source.status()["returned"] >= 2


async def test_give_back_is_cut_to_max_sn_returnable(source: OpenScsSource, ctl: Control) -> None:
    r = req(7)
    got = await all_pages(source, r)
    calls = (await ctl.truth())["calls"].get("SNReturnAllocated", 0)
    assert await source.give_back(GTIN, got, r.key) is True
    truth = await ctl.truth()
    assert truth["calls"]["SNReturnAllocated"] == calls + 3  # 3 + 3 + 1: the L3's MaxSNReturnable is 3
    assert set(got) <= set(truth["returned"][GTIN])


async def test_give_back_of_serials_never_handed_out_is_refused(source: OpenScsSource) -> None:
    with pytest.raises(SourceRefused, match="InvalidSerialNumberCollection2"):
        await source.give_back(GTIN, ["NEVERISSUED1"], "k")


async def test_unknown_gtin_is_refused_with_the_l3s_words(source: OpenScsSource) -> None:
    with pytest.raises(SourceRefused, match="InvalidSelectionCriteria6.*no pool matches"):
        await source.request(req(3, gtin="04012345000009"))


async def test_more_than_max_requestable_is_refused_before_the_call(source: OpenScsSource) -> None:
    with pytest.raises(SourceRefused, match="MaxSNRequestable is 1000"):
        await source.request(req(1001))


# --------------------------------------------------------------------------- faults


async def test_fault_short_page_is_passed_on_short(source: OpenScsSource, ctl: Control) -> None:
    await ctl.inject("short")
    r = req(6)
    got = await all_pages(source, r)
    assert len(got) == 3  # the provisioner counts what came; the source neither pads nor fails
    assert (await ctl.truth())["allocations"][r.key]["serials"] == got


async def test_fault_duplicates(source: OpenScsSource, ctl: Control) -> None:
    await all_pages(source, req(3))  # something handed out before
    await ctl.inject("duplicate")
    r = req(4)
    page = await source.request(r)
    planted = (await ctl.truth())["injected"]["duplicate"]
    repeated = [v for v, why in page.foreign if why == "repeated in this answer"]
    assert repeated and repeated[0] == page.serials[0] and repeated[0] in planted
    assert len(page.serials) == len(set(page.serials)) == 3
    # a serial of an earlier request is not visible in one answer: it is passed on, the provisioner's store refuses it
    reused = [s for s in page.serials if s in planted and s != repeated[0]]
    assert reused and reused[0] in (await ctl.truth())["handed_out"][GTIN][:-4]  # handed out before this request


async def test_fault_malformed_serial_is_surfaced_not_imported(source: OpenScsSource, ctl: Control) -> None:
    await ctl.inject("malformed")
    page = await source.request(req(4))
    assert len(page.foreign) == 1
    value, why = page.foreign[0]
    assert value.startswith("BAD SERIAL") and why.startswith("malformed serial")
    assert len(page.serials) == 3 and all(" " not in s for s in page.serials)


async def test_fault_serial_of_another_gtin_is_foreign_with_epc_uris(plain_sim: Sim, ctl: Control) -> None:
    src = OpenScsSource(plain_sim.endpoint, timeout_s=15, sn_format="EPCURI")
    try:
        await ctl.inject("foreign")
        page = await src.request(req(4))
        assert len(page.foreign) == 1
        value, why = page.foreign[0]
        assert value.startswith("urn:epc:id:sgtin:") and f"not {GTIN}" in why and "GTIN 0950600013436" in why
        assert len(page.serials) == 3 and not any(s.startswith("urn:") for s in page.serials)
        assert json.loads(page.raw)["answer"]["SNCollection"]["SerialNumbers"][0] == value
    finally:
        await src.aclose()


async def test_fault_serial_of_another_gtin_cannot_be_seen_in_serialonly(source: OpenScsSource, ctl: Control) -> None:
    """SERIALONLY answers carry no GTIN: the planted serial comes through (why EPCURI exists); the L3's truth knows."""
    await ctl.inject("foreign")
    page = await source.request(req(4))
    planted = (await ctl.truth())["injected"]["foreign"][-1]
    assert page.serials[0] == planted and not page.foreign
    assert planted in (await ctl.truth())["issued"][OTHER_GTIN]


async def test_epcuri_answers_are_decoded_to_serials(plain_sim: Sim, ctl: Control) -> None:
    src = OpenScsSource(plain_sim.endpoint, timeout_s=15, sn_format="EPCURI")
    try:
        r = req(5)
        got = await all_pages(src, r)
        assert got == (await ctl.truth())["allocations"][r.key]["serials"]
    finally:
        await src.aclose()


async def test_fault_return_status_is_refused(source: OpenScsSource, ctl: Control) -> None:
    await ctl.inject("status", arg="3")
    with pytest.raises(SourceRefused, match="InsufficientSerialNumbers3: the pool has not enough serial numbers"):
        await source.request(req(3))


async def test_fault_bad_status_codes(source: OpenScsSource, ctl: Control) -> None:
    await ctl.inject("bad_status", arg="BadUserAccessDenied")
    with pytest.raises(SourceRefused, match="BadUserAccessDenied"):
        await source.request(req(3))
    await ctl.inject("bad_status", arg="BadSessionClosed")
    with pytest.raises(SourceUnavailable, match="BadSessionClosed"):
        await source.request(req(3))
    assert source.status()["connected"] is False
    assert len((await source.request(req(3))).serials) == 3  # reconnected on demand
    assert source.status()["connected"] is True


async def test_fault_dropped_connection_is_unavailable_then_reconnects(source: OpenScsSource, ctl: Control) -> None:
    await source.request(req(1))
    await ctl.inject("drop")
    r = req(3)
    with pytest.raises(SourceUnavailable) as exc:
        await source.request(r)
    assert "OPEN-SCS SNRequestAllocated" in exc.value.reason
    page = await source.request(r)
    assert page.serials == (await ctl.truth())["allocations"][r.key]["serials"][:4]


async def test_fault_delay_past_the_timeout_is_unavailable_and_the_retry_gets_the_same_numbers(plain_sim: Sim, ctl: Control) -> None:
    src = OpenScsSource(plain_sim.endpoint, timeout_s=1.0)
    try:
        await src.request(req(1))  # connected before the clock matters
        await ctl.inject("delay", arg="4")
        r = req(3)
        with pytest.raises(SourceUnavailable, match="no answer .* within 1 s"):
            await src.request(r)
        page = None
        for _ in range(60):  # the retry after the L3 woke up (the provisioner's backoff)
            try:
                page = await src.request(r)
                break
            except SourceUnavailable:
                await asyncio.sleep(0.5)
        assert page is not None
        truth = await ctl.truth()
        assert page.serials == truth["allocations"][r.key]["serials"]
        assert sum(1 for a in truth["allocations"].values() if a["token"] == r.key) == 1
    finally:
        await src.aclose()


async def test_an_l3_slower_than_a_second_keeps_the_session(plain_sim: Sim, ctl: Control) -> None:
    """asyncua's own watchdog (a ServerState read each second, 1 s to answer) would drop the session of a server
    that is busy with a call for longer than that."""
    src = OpenScsSource(plain_sim.endpoint, timeout_s=15)
    try:
        await src.request(req(1))
        await ctl.inject("stall", arg="3")
        r = req(2)
        page = await src.request(r)
        assert page.serials == (await ctl.truth())["allocations"][r.key]["serials"]
        await asyncio.sleep(1.5)  # a watchdog round after the stall
        assert len((await src.request(req(2))).serials) == 2  # the same session still serves
        assert src.status()["connected"] is True and src.status()["last_error"] is None
    finally:
        await src.aclose()


async def test_no_server_is_unavailable(tmp_path: Path) -> None:
    src = OpenScsSource(f"opc.tcp://127.0.0.1:{free_port()}/openscs", timeout_s=5)
    with pytest.raises(SourceUnavailable, match="OPEN-SCS connect"):
        await src.request(req(1))
    assert src.status()["connected"] is False and "connect" in (src.status()["last_error"] or "")
    await src.aclose()


# --------------------------------------------------------------------------- restart, bare nodeset


async def test_l3_restart_mid_request_then_same_numbers_after_reconnect(tmp_path: Path) -> None:
    state = tmp_path / "l3-state.json"
    sim = Sim(tmp_path, "--page-size", "50", "--state", str(state), "--seed", "3").start()
    src = OpenScsSource(sim.endpoint, timeout_s=20)
    try:
        done = req(5)
        before = await all_pages(src, done)
        await Control(sim).inject("delay", arg="60")
        r = req(7)
        pending = asyncio.create_task(src.request(r))
        for _ in range(400):  # the call is at the L3 once its delay fault is consumed
            if not (await Control(sim).truth())["faults_pending"]:
                break
            await asyncio.sleep(0.05)
        sim.stop()  # the L3 dies with the call in flight
        with pytest.raises(SourceUnavailable):
            await asyncio.wait_for(pending, timeout=60)
        with pytest.raises(SourceUnavailable):
            await src.request(r)  # still down
        sim.start()  # same port, same state file
        assert await all_pages(src, done) == before  # kept across the L3's restart
        got = await all_pages(src, r)
        assert len(got) == 7 and not set(got) & set(before)
        assert (await Control(sim).truth())["allocations"][r.key]["serials"] == got
    finally:
        await src.aclose()
        sim.stop()


def test_bare_official_nodeset_is_decoded_by_the_source_patch(tmp_path: Path) -> None:
    """Served as published (no definition for OPENSCSSNCollectionDataType), in a fresh process: no class leaks in."""
    sim = Sim(tmp_path, "--bare-nodeset", "--page-size", "10").start()
    try:
        script = (
            "import asyncio, json, sys\n"
            "from linectl.sources.base import SerialRequest\n"
            "from linectl.sources.openscs import OpenScsSource\n"
            "async def main():\n"
            f"    s = OpenScsSource({sim.endpoint!r}, timeout_s=20)\n"
            f"    p = await s.request(SerialRequest(request_id=1, gtin={GTIN!r}, size=5, key='bare-1'))\n"
            "    await s.aclose()\n"
            "    print(json.dumps(p.serials))\n"
            "asyncio.run(main())\n"
        )
        out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        serials = json.loads(out.stdout.strip().splitlines()[-1])
        assert "has no definition on the L3" in out.stdout + out.stderr  # the source's own patch decoded it
        truth = asyncio.run(Control(sim).truth())
        assert serials == truth["allocations"]["bare-1"]["serials"]
    finally:
        sim.stop()


# --------------------------------------------------------------------------- security


def make_cert(dirpath: Path, name: str, uri: str) -> tuple[Path, Path]:
    """A self-signed OPC UA application instance certificate (Part 6: SAN URI = application URI)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "linectl tests")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True, data_encipherment=True,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = dirpath / f"{name}.der", dirpath / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.parametrize("mode", ["SignAndEncrypt", "Sign"])
async def test_secure_channel_with_user_and_password(tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    server_cert, server_key = make_cert(tmp_path, "l3", "urn:linectl:simulators:openscs-l3")
    client_cert, client_key = make_cert(tmp_path, "linectl", "urn:linectl:test:client")
    stranger_cert, stranger_key = make_cert(tmp_path, "stranger", "urn:linectl:test:stranger")
    sim = Sim(tmp_path, "--security", "Basic256Sha256", "--mode", mode, "--certificate", str(server_cert),
              "--private-key", str(server_key), "--trust", str(client_cert), "--user", "line7", "--password-env", "L3_PW",
              env={"L3_PW": "s3cret"}).start()

    async def as_line7(client: Client) -> None:
        await client.set_security(security_policies.SecurityPolicyBasic256Sha256, str(client_cert), str(client_key),
                                  server_certificate=str(server_cert), mode=getattr(ua.MessageSecurityMode, mode))
        client.application_uri = "urn:linectl:test:client"
        client.set_user("line7")
        client.set_password("s3cret")

    secure = dict(policy="Basic256Sha256", mode=mode, certificate=str(client_cert), private_key=str(client_key),
                  server_certificate=str(server_cert), username="line7", timeout_s=20)
    monkeypatch.setenv("LINECTL_TEST_OPENSCS_PW", "s3cret")
    good = OpenScsSource(sim.endpoint, password_env="LINECTL_TEST_OPENSCS_PW", **secure)  # type: ignore[arg-type]
    pw_file = tmp_path / "pw"
    pw_file.write_text("wrong\n")
    bad = OpenScsSource(sim.endpoint, password_file=str(pw_file), **secure)  # type: ignore[arg-type]
    plain = OpenScsSource(sim.endpoint, timeout_s=20)
    stranger = OpenScsSource(sim.endpoint, password_env="LINECTL_TEST_OPENSCS_PW",
                             **{**secure, "certificate": str(stranger_cert), "private_key": str(stranger_key)})  # type: ignore[arg-type]
    try:
        r = req(3)
        page = await good.request(r)
        assert page.serials == (await Control(sim, as_line7).truth())["allocations"][r.key]["serials"]
        assert good.status()["security"] == f"Basic256Sha256/{mode}"
        assert await good.give_back(GTIN, page.serials[:1], r.key) is True
        with pytest.raises(SourceRefused, match="BadUserAccessDenied|BadIdentityTokenRejected|BadIdentityTokenInvalid"):
            await bad.request(req(3))
        with pytest.raises((SourceRefused, SourceUnavailable)):  # no unsecured endpoint is offered
            await plain.request(req(3))
        with pytest.raises(SourceRefused, match="BadCertificateUntrusted"):  # right password, certificate not trusted
            await stranger.request(req(3))
    finally:
        for s in (good, bad, plain, stranger):
            await s.aclose()
        sim.stop()


async def test_missing_password_env_is_refused_with_its_name(plain_sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LINECTL_TEST_NO_SUCH_PW", raising=False)
    src = OpenScsSource(plain_sim.endpoint, username="u", password_env="LINECTL_TEST_NO_SUCH_PW", timeout_s=10)
    with pytest.raises(SourceRefused, match="LINECTL_TEST_NO_SUCH_PW"):
        await src.request(req(1))
    await src.aclose()
