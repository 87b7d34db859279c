"""`linectl simulate -c CONFIG`: run the whole simulated line of a config until Ctrl-C/SIGTERM or `--units` done.

Prints where each device listens (stdout, one line each), so an operator can
point `linectl run` at the same config in another terminal. With --truth the
ground truth is written as JSON at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("simulate", help="run the line simulator (every device of a config, one process)")
    p.add_argument("-c", "--config", required=True, help="line YAML")
    p.add_argument("--rate", type=float, help="line speed, units/min (overrides simulation.rate_upm)")
    p.add_argument("--defect-rate", type=float, help="fraction of units given a must-reject defect")
    p.add_argument("--variation-rate", type=float, help="fraction of units with a harmless variation")
    p.add_argument("--seed", type=int, help="defect plan seed")
    p.add_argument("--units", type=int, help="stop after this many units have passed the gate (0 = endless)")
    p.add_argument("--truth", metavar="PATH", help="write the final ground truth (JSON) here at exit")
    p.add_argument("--control-port", type=int, help="JSON-lines control server port (0 = any free port)")
    cam = p.add_mutually_exclusive_group()
    cam.add_argument("--camera", dest="camera", action="store_true", default=None,
                     help="require the camera simulator for camera devices (fail if it is unavailable)")
    cam.add_argument("--no-camera", dest="camera", action="store_false", help="do not simulate camera devices")
    p.add_argument("--free-run", action="store_true", default=None,
                   help="feed product without a controller attached (ignores the PLC interlock; gate stays fail-safe)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from linectl.config import load_config
    from linectl.simulators.config import SimulationConfig
    from linectl.simulators.line import SimulatorError
    from linectl.yamlsource import ConfigFileError

    try:
        cfg = load_config(args.config)
    except ConfigFileError as exc:
        for prob in exc.problems:
            print(prob.format(args.config), file=sys.stderr)
        return 2
    try:
        sim = SimulationConfig.from_line(cfg)
        overrides = {
            "rate_upm": args.rate,
            "defect_rate": args.defect_rate,
            "variation_rate": args.variation_rate,
            "seed": args.seed,
            "units": args.units,
            "control_port": args.control_port,
            "free_run": args.free_run,
        }
        data = sim.model_dump()
        data.update({k: v for k, v in overrides.items() if v is not None})
        sim = SimulationConfig.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = ".".join(str(x) for x in ("simulation", *err["loc"]))
            print(f"{args.config}: {loc}: {err['msg']}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_main(cfg, sim, args))
    except SimulatorError as exc:
        print(f"linectl simulate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"linectl simulate: cannot listen: {exc}", file=sys.stderr)
        return 1


async def _main(cfg, sim, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from linectl.simulators.line import LineSim

    line = LineSim(cfg, sim, camera=args.camera)
    await line.start()
    try:
        for name, where in line.listening.items():
            print(f"{name}: {where}", flush=True)
        for name, why in line.skipped.items():
            print(f"{name}: not simulated ({why})", flush=True)
        host, port = line.control_address or ("?", 0)
        print(f"control: tcp {host}:{port} (JSON lines: truth, status, units, challenge, inject, set)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.create_task(line.wait_done())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for t in (waiter, stopper):
            t.cancel()
    finally:
        await line.stop()
        truth = line.truth.as_dict()
        if args.truth:
            tmp = f"{args.truth}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(truth, fh, indent=2, sort_keys=True)
                fh.write("\n")
            os.replace(tmp, args.truth)
        print(
            f"units: passed {truth['passed']}, rejected {truth['rejected']}, missed rejects {truth['missed_rejects']}, "
            f"false rejects {truth['false_rejects']}",
            flush=True,
        )
    return 0
