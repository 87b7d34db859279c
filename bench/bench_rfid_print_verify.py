"""RFID print-and-verify benchmark: the RFID example line (config/rfid-line.yaml) on its simulators.

A Zebra-like RFID label printer (ZPL over TCP, a simulated Gen 2 tag per label) encodes each unit's EPC and
reads it back, a smart reader checks the printed DataMatrix (carrier both; `--carrier rfid` runs without the
reader), the Modbus PLC's gate rejects what linectl does not pass. VOID labels, wrong tags and lost verifications
are injected at the given rates. Prints the achieved rate and the missed rejects counted from the simulator's
ground truth (a unit whose tag is not its serial's EPC that passed the gate, or any defect that passed), the
rejects by reason and how many tags the printer verified. Not a test: run it by hand and record the figures in
bench/RESULTS.md.

    .venv/bin/python bench/bench_rfid_print_verify.py --rate 300 --minutes 3
    .venv/bin/python bench/bench_rfid_print_verify.py --rate 300 --minutes 3 --carrier rfid
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from typing import Any

from benchinfo import machine
from ruamel.yaml import YAML

from linectl import control as C
from linectl.demo import SimulatedLine
from linectl.logging import setup_logging
from linectl.packaged import example_config
from linectl.yamlsource import load_yaml, to_plain


def config(args: argparse.Namespace) -> str:
    raw: dict[str, Any] = to_plain(load_yaml(example_config("rfid-line")))
    raw["products"][0]["carrier"] = args.carrier
    st = raw["stations"][0]
    st["rate_upm"] = args.rate
    # the bench counts misses: the stop rules must not end the run on a seeded burst of bad labels
    st["rules"].update({"consecutive_reject_limit": 1000, "rfid_void_limit": 1000})
    if args.carrier == "rfid":
        del st["reader"]
        st["rules"] = {k: v for k, v in st["rules"].items() if k not in ("no_read_limit", "read_timeout_s")}
    else:
        st["rules"]["no_read_limit"] = 1000
    raw["simulation"].update({"rfid_void_rate": args.void_rate, "rfid_wrong_epc_rate": args.wrong_epc_rate,
                              "rfid_no_answer_rate": args.no_answer_rate})
    path = os.path.join(tempfile.mkdtemp(prefix="bench-rfid-"), "rfid-line.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        YAML(typ="safe").dump(raw, fh)
    return path


async def main(args: argparse.Namespace) -> dict[str, Any]:
    units = int(args.rate * args.minutes)
    sl = SimulatedLine(config(args), rate=args.rate, defect_rate=args.defect_rate if args.carrier == "both" else 0.0, seed=args.seed)
    async with sl:
        line = sl.line
        await sl.create_batch(units, challenge=False)
        t0 = time.monotonic()
        await line.execute(C.StartBatch(actor="bench"), origin="bench")
        stopped = None
        while not line.completed.is_set():
            if line.fault is not None and line.batch.state.value == "stopped":
                stopped = {"fault": line.fault, "after_s": round(time.monotonic() - t0, 1),
                           "alarms": [a.message for a in line.alarms.values()][-5:]}
                break
            await asyncio.sleep(0.5)
        elapsed = time.monotonic() - t0
        await asyncio.sleep(20 * 60.0 / args.rate)  # the last units reach the gate
        st = line.stations[0]
        truth = await sl.truth()
        recent = (await sl.control.call(cmd="units", last=1000))["units"] if sl.control else []
        bad_tag_passed = [u["seq"] for u in recent if u["outcome"] == "passed" and u.get("rfid_epc_sent") is not None
                          and u.get("rfid_epc") != u.get("rfid_epc_sent")]
        n = st.counters.production_units
        return {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(),
            "load_avg": os.getloadavg(),
            "carrier": args.carrier,
            "rate_upm_set": args.rate,
            "stopped": stopped,
            "units": n,
            "achieved_rate_upm": round(n / elapsed * 60, 1),
            "commissioned": st.counters.good,
            "rejected": st.counters.rejected,
            "tags": st.counters.tags,
            "missed_rejects": truth.get("missed_rejects"),
            "bad_tags_passed_last_1000": bad_tag_passed,
            "false_rejects": truth.get("false_rejects"),
            "truth_defects": truth.get("defects"),
            "decision_latency_ms": st.latency.summary(),
        }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=300)
    ap.add_argument("--minutes", type=float, default=3)
    ap.add_argument("--carrier", choices=("both", "rfid"), default="both")
    ap.add_argument("--void-rate", type=float, default=0.02)
    ap.add_argument("--wrong-epc-rate", type=float, default=0.02)
    ap.add_argument("--no-answer-rate", type=float, default=0.01)
    ap.add_argument("--defect-rate", type=float, default=0.02, help="DataMatrix defects (carrier both)")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    setup_logging("error")
    print(json.dumps(asyncio.run(main(a)), indent=1))
