"""Crash between the case label and the aggregation record: the process is killed with SIGKILL.

A child process runs a real case station (ZPL simulator + ZPL driver, real
store) and is killed either after the label was printed but before the
record was committed, or just after the commit. After "restart" (the store
reopened, `recover_containers` as the daemon runs it at start) the case is
either complete and recorded, or not recorded and its SSCC voided.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_aggregation_support import CP, GTIN, open_store

from linectl import gs1
from linectl.engine.aggregation import LABEL_INTENT_ACTION, RECOVERY_ACTION, recover_containers
from linectl.engine.rework import check_hierarchy
from linectl.store.trace import trace, unit_facts

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[3]); sys.path.insert(0, sys.argv[3] + "/tests")
from linectl.logging import setup_logging
setup_logging("error")
from test_aggregation_support import Rig, commission, unit_code

async def main(tmp, mode):
    rig = await Rig(__import__("pathlib").Path(tmp), per_case=3).start()
    await rig.create_batch()
    serials = await commission(rig.store, 3)
    print("SERIALS " + " ".join(serials), flush=True)
    real_append = rig.store.append

    async def append(*events):
        if any(e.kind == "packed" for e in events):
            if mode == "before_commit":
                print(f"PRINTED {len(rig.zpl_sim.printed)}", flush=True)
                await asyncio.sleep(3600)  # killed here: label printed, record not committed
            seqs = await real_append(*events)
            print("COMMITTED", flush=True)
            await asyncio.sleep(3600)  # killed here: committed
            return seqs
        return await real_append(*events)

    rig.store.append = append
    await rig.rt.close([unit_code(s).scan_string for s in serials])

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def run_until_killed(tmp: Path, mode: str) -> tuple[list[str], list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp), mode, str(REPO)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 30
    try:
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.startswith(("PRINTED", "COMMITTED")):
                break
    finally:
        proc.kill()  # SIGKILL: no cleanup, no flush, no goodbye
        proc.wait(10)
    serials = next(x for x in lines if x.startswith("SERIALS")).split()[1:]
    assert lines[-1].startswith(("PRINTED", "COMMITTED")), (lines, proc.stderr.read() if proc.stderr else "")
    return serials, lines


@pytest.mark.parametrize("mode", ["before_commit", "after_commit"])
async def test_kill_between_label_and_record(tmp_path: Path, mode: str) -> None:
    serials, lines = run_until_killed(tmp_path, mode)
    sscc = gs1.make_sscc(0, CP, 1)
    store = await open_store(tmp_path / "line.db")
    try:
        intents = [a for a in store.audit_log(0, 10000) if a.action == LABEL_INTENT_ACTION]
        assert [a.detail["sscc"] for a in intents] == [sscc]  # durable before the label was sent
        voided = await recover_containers(store)
        facts = unit_facts(store, [(GTIN, s) for s in serials])
        if mode == "before_commit":
            assert lines[-1] == "PRINTED 1"  # the label really was printed
            assert voided == [sscc]
            c = store.container(sscc)
            assert c is not None and c.state == "decommissioned"
            assert all(f.parent is None and f.state == "commissioned" for f in facts.values())  # free for rework
            t = trace(store, "(00)" + sscc)
            assert [e["kind"] for e in t["events"]] == ["container_decommissioned"]
            assert "crash recovery" in t["events"][0]["reason"]
        else:
            assert voided == []
            assert store.container(sscc).state == "commissioned"
            assert all(f.parent == sscc for f in facts.values())
        assert check_hierarchy(store) == []
        # a second start finds nothing new and does not void again
        assert await recover_containers(store) == []
        marks = [a for a in store.audit_log(0, 10000) if a.action == RECOVERY_ACTION]
        assert len(marks) == 1 and marks[0].detail["voided"] == voided
        # the SSCC counter is durable: the next case never reuses the crashed SSCC
        assert await store.next_sscc_refs(CP, 0, 1) == [2]
    finally:
        await store.close()


async def test_recover_skips_intents_that_may_still_be_in_progress(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "x.db")
    try:
        sscc = gs1.make_sscc(0, CP, 7)
        await store.audit("system", "station:cp", LABEL_INTENT_ACTION, {"sscc": sscc, "level": "case", "lot": "L1", "station": "cp"})
        assert await recover_containers(store, older_than_s=60) == []  # a running station may still commit it
        assert store.container(sscc) is None
        assert await recover_containers(store) == [sscc]
        assert store.container(sscc).state == "decommissioned"
    finally:
        await store.close()
