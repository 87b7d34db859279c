"""Round trip of a PackML method call on the line's OPC UA server (linectl/opcua_server.py), as a SCADA client sees it.

The demo line runs on the simulators (linectl.demo.SimulatedLine: simulator process, broker, in-process daemon with
`opcua_server` enabled); an asyncua Client connects over Basic256Sha256 SignAndEncrypt with a trusted certificate and
a user, as in production. Measured per call, from the client's send to its reply:

- read: one Read of Status/MachSpeed (the baseline of the channel);
- accepted: SetUnitMode(Production) in Stopped: through line.execute, validated, audited (a store commit);
- refused: Unhold in Stopped: judged by the engine's PackML precheck, BadInvalidState;
- refused, 4 sessions at once: the same call from four clients in parallel (calls/s over all).

    .venv/bin/python bench/bench_opcua_server.py [--n 500] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchinfo import machine  # noqa: E402

from tests.test_packml_opcua import EXECUTE, Scada, free_port, line_object, path, ua_overrides  # noqa: E402


def pct(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"p50_ms": round(statistics.median(xs) * 1000, 2), "p99_ms": round(xs[int(len(xs) * 0.99) - 1] * 1000, 2),
            "max_ms": round(xs[-1] * 1000, 2), "n": len(xs)}


async def refused_call(holder: Any, method: Any) -> None:
    from asyncua import ua

    try:
        await holder.call_method(method)
    except ua.UaStatusCodeError as exc:
        assert ua.StatusCode(exc.code).name == "BadInvalidState", exc
    else:
        raise AssertionError("Unhold in Stopped was taken")


async def timed(n: int, fn: Any) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


async def bench(n: int) -> dict[str, Any]:
    from asyncua import ua

    from linectl.demo import SimulatedLine
    from tests.engine_helpers import variant_config

    tmp = Path(tempfile.mkdtemp(prefix="bench-opcua-"))
    port = free_port()
    scada = Scada(tmp / "clients", f"opc.tcp://127.0.0.1:{port}/linectl", tmp / "pki" / "server.der")
    (tmp / "pki" / "trusted").mkdir(parents=True)
    shutil.copy(scada.cert, tmp / "pki" / "trusted" / "scada.der")
    sl = SimulatedLine(variant_config(tmp), db=tmp / "line.db", overrides=ua_overrides(tmp, port))
    try:
        await sl.start()
        async with await scada.client() as c:
            obj, ns = await line_object(c)
            speed = await path(obj, ns, "Status", "MachSpeed")
            mode = await obj.get_child(f"{ns}:SetUnitMode")

            async def read() -> None:
                await speed.read_value()

            async def accepted() -> None:
                await obj.call_method(mode, ua.Variant(1, ua.VariantType.Int32))

            esm = await path(obj, ns, *EXECUTE)
            unhold = await esm.get_child(f"{ns}:Unhold")

            async def refused() -> None:
                await refused_call(esm, unhold)

            res = {"read": pct(await timed(n, read)), "accepted": pct(await timed(n, accepted)), "refused": pct(await timed(n, refused))}
        clients = [await scada.client() for _ in range(4)]
        for cl in clients:
            await cl.connect()
        try:
            objs = [await line_object(cl) for cl in clients]

            async def worker(o: Any, k: int) -> list[float]:
                holder = await path(o[0], o[1], *EXECUTE)
                m = await holder.get_child(f"{o[1]}:Unhold")
                return await timed(k, lambda: refused_call(holder, m))

            t0 = time.perf_counter()
            lat = await asyncio.gather(*[worker(o, n // 4) for o in objs])
            wall = time.perf_counter() - t0
            res["refused_4_sessions"] = {**pct([x for xs in lat for x in xs]), "calls_per_s": round(sum(map(len, lat)) / wall)}
        finally:
            for cl in clients:
                await cl.disconnect()
        audited = sum(1 for r in sl.daemon.store.audit_log(limit=1_000_000) if r.origin == "opcua")
        res["audited_calls"] = audited
        assert audited == n, f"{audited} audit records for {n} accepted calls"
        return res
    finally:
        await sl.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import asyncua

    from linectl.logging import setup_logging

    setup_logging("warning", "console")
    res = asyncio.run(bench(args.n))
    res["machine"] = machine(f"asyncua {asyncua.__version__ if hasattr(asyncua, '__version__') else '?'}", f"load {os.getloadavg()[0]:.1f}")
    if args.json:
        print(json.dumps(res, indent=1))
        return
    for k, v in res.items():
        print(f"{k:20} {v}")


if __name__ == "__main__":
    main()
