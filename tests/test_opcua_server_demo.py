"""The shipped PackML example (config/packml-line.yaml, access: on) driven entirely through its OPC UA server's
PackML methods by an independent asyncua client, as SCADA would: every method once, each state read back over OPC UA
and on MQTT packml/status (an MES subscriber), which must agree; a method the state forbids and a user whose roles
lack packml_command are refused. The line runs on the simulators (tests/engine_helpers.simulated_line)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.engine_helpers import TEST_PASSWORDS, password_env, simulated_line, wait_async
from tests.test_packml_opcua import BASE, EXECUTE, MACHINE, Scada, call, line_object, mqtt_packtags, path

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "packml-line.yaml"

#: (machine, method, the PackML state it must end in: TR88 StateCurrent) in the order a SCADA operator runs them
STEPS: list[tuple[tuple[str, ...], str, int]] = [
    (MACHINE, "Reset", 4), (EXECUTE, "Start", 6), (EXECUTE, "Hold", 11), (EXECUTE, "Unhold", 6),
    (EXECUTE, "Suspend", 5), (EXECUTE, "Unsuspend", 6), (MACHINE, "Stop", 2), (MACHINE, "Reset", 4), (EXECUTE, "Start", 6),
    (BASE, "Abort", 9), (BASE, "Clear", 2), (MACHINE, "Reset", 4), (EXECUTE, "Start", 6), (EXECUTE, "ToComplete", 17),
]


async def test_the_packml_example_is_driven_through_opcua_methods(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in password_env().items():
        monkeypatch.setenv(k, v)
    # the shipped opcua_server section as it is: certificates beside the store file (tmp_path/line.db), trust there
    scada = Scada(tmp_path / "clients", "", tmp_path / "opcua" / "server_cert.der")
    (tmp_path / "opcua" / "trusted").mkdir(parents=True)
    shutil.copy(scada.cert, tmp_path / "opcua" / "trusted" / "scada.der")
    async with simulated_line(tmp_path, base=EXAMPLE, access=True) as sl:
        assert sl.cfg.access.enabled and sl.cfg.opcua_server.enabled and not sl.cfg.opcua_server.users
        scada.url = sl.cfg.opcua_server.endpoint
        lot = await sl.create_batch(5000, challenge=False)
        # a user of the store whose roles lack packml_command: logged in, refused
        async with await scada.client(user="qa", password=TEST_PASSWORDS["qa"]) as c:
            obj, ns = await line_object(c)
            assert await call(obj, ns, MACHINE, "Reset") == "BadUserAccessDenied"
        async with await scada.client(user="operator", password=TEST_PASSWORDS["operator"]) as c, mqtt_packtags(sl) as mqtt:
            obj, ns = await line_object(c)
            mine = await c.get_namespace_index("urn:linectl:packml")
            state_node = await path(obj, ns, "Status", f"{mine}:StateCurrent")
            # Start while Stopped: PackML forbids it, nothing changes
            assert await call(obj, ns, EXECUTE, "Start") == "BadInvalidState"
            processed = await path(obj, ns, "Admin", "ProdProcessedCount")
            seen: list[Any] = []
            started = False

            async def agree(want: int) -> bool:
                status = mqtt.get("status") or {}
                seen[:] = [await state_node.read_value(), status.get("StateCurrent")]
                return seen == [want, want]

            for machine, method, want in STEPS:
                assert await call(obj, ns, machine, method) == "Good", (method, seen)
                try:
                    await wait_async(lambda want=want: agree(want), 30, f"{method}: StateCurrent {want} on OPC UA and MQTT")
                except AssertionError:
                    raise AssertionError(f"after {method}: OPC UA, MQTT StateCurrent {seen}, want {want}") from None
                if method == "Start" and not started:  # the line really produces (units counted)
                    started = True

                    async def producing(before: int = sl.line.packtags().admin.processed) -> bool:
                        v = await processed.read_value()
                        return bool(v) and v[0].Count >= before + 5

                    await wait_async(producing, 30, "units processed, seen over OPC UA")
            # Complete: the batch stopped at its count, still open; OPC UA's Admin counters are MQTT's
            processed_ua = (await processed.read_value())[0]
            assert processed_ua.Name == lot

            async def counts_agree() -> bool:
                return (mqtt.get("admin") or {}).get("ProdProcessedCount") == processed_ua.Count

            await wait_async(counts_agree, 15, "ProdProcessedCount equal on OPC UA and MQTT")
            assert (await (await path(obj, ns, *EXECUTE, "0:CurrentState")).read_value()).Text == "Complete"
        # each accepted method in the audit trail as the store user who called it; the refused ones are not changes
        audit = [r for r in sl.daemon.store.audit_log(limit=100_000) if r.origin == "opcua"]
        assert [(r.actor, r.action, r.detail["command"]) for r in audit] == [
            ("operator", "packml_command", "Complete" if m == "ToComplete" else m) for _machine, m, _s in STEPS]
