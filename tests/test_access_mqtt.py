"""Authenticated commands end to end: a real daemon (linectl.demo.SimulatedLine on the demo config with its access:
section: simulators, drivers, store, bridge) on the real Mosquitto, MQTT 5 clients that log in, command, log out,
forge, replay and trespass; and the PLC's device actor with its permission set on the same line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from datetime import date, timedelta
from typing import Any

import aiomqtt
import pytest
from engine_helpers import TEST_PASSWORDS, db_query, password_env, simulated_line, variant_raw, wait_for
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from linectl import control as C
from linectl.engine.plc_surface import PlcSurface
from linectl.mqtt_bridge import MqttBridge

pytestmark = pytest.mark.timeout(180)
GTIN = "09501101530003"
V5 = aiomqtt.ProtocolVersion.V5


class Client:
    """An MQTT 5 HMI: its own reply topic, and its client id as its origin (the user property the bridge reads)."""

    def __init__(self, port: int, root: str, origin: str | None = None) -> None:
        self.root = root
        self.origin = origin or f"hmi-{uuid.uuid4().hex[:8]}"
        self.reply_topic = f"replies/{uuid.uuid4().hex[:8]}"
        self.client = aiomqtt.Client("127.0.0.1", port, protocol=V5, identifier=f"c-{uuid.uuid4().hex[:8]}")
        self.replies: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Client:
        await self.client.__aenter__()
        await self.client.subscribe(self.reply_topic, qos=1)
        self._task = asyncio.create_task(self._listen())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        await self.client.__aexit__(None, None, None)

    async def _listen(self) -> None:
        async for m in self.client.messages:
            body = json.loads(m.payload)  # type: ignore[arg-type]
            self.replies[str(body.get("command_id"))] = body

    async def send(self, name: str, body: dict[str, Any], *, origin: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        cid = uuid.uuid4().hex
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.UserProperty = [("origin", origin or self.origin)]
        await self.client.publish(f"{self.root}/cmd/{name}", json.dumps({"command_id": cid, **body}).encode(), qos=1, properties=props)
        deadline = time.monotonic() + timeout
        while cid not in self.replies:
            assert time.monotonic() < deadline, f"no reply to {name}"
            await asyncio.sleep(0.02)
        return self.replies.pop(cid)

    async def login(self, user: str, password: str | None = None) -> str:
        r = await self.send("login", {"username": user, "password": password or TEST_PASSWORDS[user]})
        assert r["ok"], r
        return str(r["result"]["token"])


def code(reply: dict[str, Any]) -> str:
    assert not reply["ok"], reply
    return str(reply["error"]["code"])


def sig(user: str, password: str | None = None, **kw: Any) -> dict[str, Any]:
    """An e-signature block: the user's password entered again for this command."""
    return {"username": user, "password": password or TEST_PASSWORDS[user], **kw}


def expiry() -> str:
    return (date.today() + timedelta(days=400)).strftime("%y%m%d")


async def test_every_mqtt_command_names_a_verified_user(tmp_path, monkeypatch):
    for k, v in password_env().items():
        monkeypatch.setenv(k, v)  # the demo store's default users get these passwords
    async with simulated_line(tmp_path, rate=600.0, access=True, overrides={"mqtt": {"protocol": "5"}}) as sl:
        bridge = sl.daemon.upstream[0]
        assert isinstance(bridge, MqttBridge) and bridge.access is not None
        await wait_for(lambda: bridge.status()["connected"], 15, "the bridge to connect")
        port, root = sl.cfg.mqtt.port, sl.cfg.topic_root
        create = {"lot": "LA1", "gtin": GTIN, "expiry": expiry(), "planned_qty": 50, "challenge": False}
        async with Client(port, root) as hmi, Client(port, root) as other:
            # no credential, a bad one, a wrong password: refused, nothing created
            assert code(await hmi.send("create_batch", create)) == "unauthenticated"
            assert code(await hmi.send("create_batch", {**create, "auth": {"token": "made-up"}})) == "unauthenticated"
            assert code(await hmi.send("login", {"username": "operator", "password": "wrong"})) == "wrong_password"
            assert code(await hmi.send("login", {"username": "operator"})) == "unauthenticated"
            token = await hmi.login("operator")
            auth = {"auth": {"token": token}}
            # a forged actor is refused; naming oneself is fine
            r = await hmi.send("create_batch", {**create, **auth, "actor": "qa"})
            assert code(r) == "forged_actor" and "not the authenticated user 'operator'" in r["error"]["message"]
            # a batch without its challenge test is a waiver: signed (access.signatures create_batch.no_challenge)
            r = await hmi.send("create_batch", {**create, **auth, "actor": "operator", "signature": sig("operator")})
            assert r["ok"], r
            # the same token from another client id is refused
            r = await other.send("pause_batch", auth)
            assert code(r) == "token_client_mismatch"
            assert code(await hmi.send("pause_batch", auth, origin="someone-else")) == "token_client_mismatch"
            # a role without the permission
            qa = await other.login("qa")
            r = await other.send("start_batch", {"auth": {"token": qa}})
            assert code(r) == "forbidden" and "qa (roles: qa) may not send start_batch" in r["error"]["message"]
            assert (await other.send("request_state", {"auth": {"token": qa}}))["ok"]
            # a one-shot credential: an administrator adds a user in one command, no session
            r = await other.send("users_admin", {"auth": {"username": "admin", "password": TEST_PASSWORDS["admin"]}, "action": "add",
                                                 "signature": sig("admin"),
                                                 "username": "dave", "display_name": "Dave D.", "roles": ["supervisor"],
                                                 "new_password": "Shift-Lead-pw-42", "reason": "new shift lead"})
            assert r["ok"] and r["result"]["user"]["roles"] == ["supervisor"], r
            assert code(await other.send("users_admin", {"auth": {"token": qa}, "action": "deactivate", "username": "dave",
                                                         "reason": "x"})) == "forbidden"
            dave = await other.login("dave", "Shift-Lead-pw-42")
            assert (await other.send("close_batch", {"auth": {"token": dave}, "unused_serials": "return",
                                                     "signature": sig("dave", "Shift-Lead-pw-42")}))["ok"]
            # logout, then the same token again
            r = await hmi.send("logout", auth)
            assert r["ok"] and r["result"]["closed"]
            assert code(await hmi.send("create_batch", {**create, "lot": "LA2", **auth})) == "token_revoked"
            assert code(await hmi.send("logout", auth)) == "token_revoked"
            # a deactivated user's live session dies with the account
            r = await hmi.send("users_admin", {"auth": {"username": "admin", "password": TEST_PASSWORDS["admin"]}, "action": "deactivate",
                                               "username": "dave", "reason": "left the company", "signature": sig("admin")})
            assert r["ok"], r
            assert code(await other.send("request_state", {"auth": {"token": dave}})) == "deactivated"
        # the PLC's tags act as device plc:plc1 with its access.devices set: start yes, close no
        line = sl.line
        surface = PlcSurface(line, line.plcs[0])
        assert surface.principal is not None and surface.principal.name == "plc:plc1"
        with pytest.raises(C.CommandRejected) as info:
            await line.execute(C.CloseBatch(actor="hmi"), origin="plc:plc1", principal=surface.principal)
        assert info.value.code == "forbidden" and "device plc:plc1 may not send close_batch" in info.value.reason
        await line.execute(C.CreateBatch(lot="LP1", gtin=GTIN, expiry=expiry(), planned_qty=10, challenge=False, actor="t"), origin="test")
        with pytest.raises(C.CommandRejected) as info:
            await line.execute(C.CreateBatch(lot="LP2", gtin=GTIN, expiry=expiry(), planned_qty=10, actor="hmi"), origin="plc:plc1",
                               principal=surface.principal)
        assert info.value.code == "forbidden"
        # a device cannot sign: with the default access.signatures its start is refused; without the rule it starts
        with pytest.raises(C.CommandRejected) as info:
            await line.execute(C.StartBatch(actor="hmi"), origin="plc:plc1", principal=surface.principal)
        assert info.value.code == "signature_required" and "a device cannot sign" in info.value.reason
        line.cfg.access.signatures.required.pop("start_batch")
        await line.execute(C.StartBatch(actor="hmi"), origin="plc:plc1", principal=surface.principal)
        await line.execute(C.StopBatch(actor="hmi"), origin="plc:plc1", principal=surface.principal)
    db = tmp_path / "line.db"
    rows = db_query(db, "SELECT actor, origin, action, detail FROM audit ORDER BY seq")
    by_action: dict[str, tuple[str, str, dict[str, Any]]] = {}
    for actor, origin, a, d in rows:
        by_action.setdefault(a, (actor, origin, json.loads(d)))  # the first record of each action
    actor, origin, detail = by_action["create_batch"]
    assert actor == "operator" and origin.startswith("mqtt:hmi-") and detail["auth"]["channel"] == "mqtt" and detail["auth"]["session"]
    assert by_action["close_batch"][0] == "dave" and by_action["start_batch"][:2] == ("plc:plc1", "plc:plc1")
    added = [(actor, json.loads(d)) for actor, _o, a, d in rows if a == "user_added"]
    assert [(a, d["username"]) for a, d in added] == [("system", "operator"), ("system", "qa"), ("system", "admin"), ("admin", "dave")]
    assert added[-1][1]["reason"] == "new shift lead" and added[-1][1]["new"]["roles"] == ["supervisor"]
    assert by_action["user_deactivated"][2]["old"] == {"active": True} and by_action["user_deactivated"][2]["new"] == {"active": False}
    counts: dict[str, int] = {}
    for _a, _o, action, d in rows:
        if action == "access_refused":
            for k, n in json.loads(d)["counts"].items():
                counts[k] = counts.get(k, 0) + n
    for c in ("unauthenticated", "wrong_password", "forged_actor", "token_client_mismatch", "forbidden", "token_revoked", "deactivated"):
        assert counts.get(c), (c, counts)  # every refusal counted, in aggregated records
    assert len([a for a in rows if a[2] == "access_refused"]) <= 2
    text = " ".join(str(r[3]) for r in rows)
    assert TEST_PASSWORDS["admin"] not in text and "Shift-Lead-pw-42" not in text and "argon2" not in text
    assert db_query(db, "SELECT count(*) FROM batches WHERE lot='LA2'")[0][0] == 0


async def test_l3_service_account_answers_the_lines_serial_request_unsigned_a_person_signs(tmp_path, monkeypatch):
    """The L3 answers <root>/serials/request through a service account (role l3): pages for the outstanding request
    are imported without a signature; anything beyond it, and every provision_pool of a person, is signed."""
    for k, v in password_env().items():
        monkeypatch.setenv(k, v)
    products = variant_raw(access=True)["products"][:1]
    products[0]["serials"] = {"scheme": "pool", "low_water": 0, "request_count": 50}
    async with simulated_line(tmp_path, rate=600.0, access=True, overrides={"mqtt": {"protocol": "5"}, "products": products}) as sl:
        bridge = sl.daemon.upstream[0]
        assert isinstance(bridge, MqttBridge) and bridge.access is not None
        await wait_for(lambda: bridge.status()["connected"], 15, "the bridge to connect")
        port, root = sl.cfg.mqtt.port, sl.cfg.topic_root
        async with Client(port, root) as admin, Client(port, root, origin="l3-sap") as l3, Client(port, root) as eng:
            a = {"auth": {"token": await admin.login("admin")}, "signature": sig("admin")}
            add = {**a, "action": "add", "username": "l3svc", "display_name": "SAP ATTP", "new_password": "Service-Acct-pw-77",
                   "reason": "the L3's service account"}
            r = await admin.send("users_admin", {**add, "roles": ["l3", "supervisor"]})
            assert code(r) == "invalid_role" and "goes alone" in r["error"]["message"]
            assert (await admin.send("users_admin", {**add, "roles": ["l3"]}))["ok"]
            assert (await admin.send("users_admin", {**a, "action": "add", "username": "erin", "display_name": "Erin E.", "roles": ["engineer"],
                                                     "new_password": "Line-Engineer-pw-5", "reason": "engineer"}))["ok"]
            await l3.client.subscribe(f"{root}/serials/request", qos=1)
            rid = bridge.request_serials(GTIN, 50, "pool")  # what the line's low-water check calls (daemon._pool_low)
            svc = {"auth": {"token": await l3.login("l3svc", "Service-Acct-pw-77")}}
            page = {**svc, "gtin": GTIN, "request_id": rid}
            # more than the request owes, or a page nobody asked for: refused (a service account cannot sign)
            r = await l3.send("provision_pool", {**page, "serials": [f"L3S{i:05d}" for i in range(51)]})
            assert code(r) == "request_exceeded" and "owed 50" in r["error"]["message"]
            r = await l3.send("provision_pool", {**svc, "gtin": GTIN, "serials": ["L3X00001"]})
            assert code(r) == "signature_required" and "not an outstanding serial request" in r["error"]["message"]
            r = await l3.send("provision_pool", {**page, "serials": ["L3X00002"], "signature": sig("l3svc", "Service-Acct-pw-77", meaning="performed")})
            assert code(r) == "signer_forbidden" and "service account" in r["error"]["message"]
            assert code(await l3.send("start_batch", svc)) == "forbidden"
            # a person's provision_pool is signed, with the request's id or without
            e = {"auth": {"token": await eng.login("erin", "Line-Engineer-pw-5")}}
            assert code(await eng.send("provision_pool", {**e, "gtin": GTIN, "request_id": rid, "serials": ["ERIN0001"]})) == "signature_required"
            # the answer, in two pages: imported unsigned, the request complete after the second
            r = await l3.send("provision_pool", {**page, "serials": [f"L3S{i:05d}" for i in range(30)]})
            assert r["ok"] and r["result"]["accepted"] == 30 and "signature" not in r["result"], r
            assert [q["received"] for q in bridge.pending_serial_requests()] == [30]
            r = await l3.send("provision_pool", {**page, "range_start": 900000, "range_count": 20})
            assert r["ok"] and r["result"]["accepted"] == 20, r
            assert bridge.pending_serial_requests() == []
            r = await l3.send("provision_pool", {**page, "serials": ["L3S99999"]})  # the request is answered: nothing more unsigned
            assert code(r) == "signature_required"
            r = await eng.send("provision_pool", {**e, "gtin": GTIN, "serials": ["ERIN0001"], "signature": sig("erin", "Line-Engineer-pw-5")})
            assert r["ok"] and r["result"]["signature"]["signer"] == "erin", r
            assert sl.daemon.store.available(GTIN) == 51
    db = tmp_path / "line.db"
    rows = [(actor, json.loads(d)) for actor, a, d in db_query(db, "SELECT actor, action, detail FROM audit ORDER BY seq") if a == "provision_pool"]
    assert [(actor, d.get("request_id"), "signature" in d) for actor, d in rows] == [("l3svc", rid, False), ("l3svc", rid, False), ("erin", None, True)]
    signed = db_query(db, "SELECT signer, meaning FROM signatures ORDER BY id")
    assert ("erin", "performed") in signed and all(s != "l3svc" for s, _m in signed)
