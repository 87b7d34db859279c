"""Fault campaign benchmark: a real line (daemon, simulators, broker, subscriber) through seeded random faults.

Each run prints the faults injected by kind, the units the simulators fed, and the
violations of the invariants (goal: 0), checked against the simulators' ground truth
and the independent subscriber (see simulators/campaign.py and README "Fault campaign").

    .venv/bin/python bench/campaign.py --minutes 2 --seed 7
    .venv/bin/python bench/campaign.py --minutes 60 --seed 1 --runs 10          # seeds 1..10, an hour each
    .venv/bin/python bench/campaign.py --minutes 1 --seed 3 --faults kill_challenge,plc_cold
    .venv/bin/python bench/campaign.py --minutes 1 --seed 3 --json               # one JSON object per run

Exit status 0 when every run had 0 violations, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchinfo import machine  # noqa: E402 - bench/ is the script's own directory

from linectl.logging import setup_logging  # noqa: E402
from linectl.simulators.campaign import FAULT_KINDS, CampaignOptions, parse_faults, run_campaign  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=1.0, help="fault time per run (setup and final checks come on top)")
    p.add_argument("--seed", type=int, default=1, help="first seed")
    p.add_argument("--runs", type=int, default=1, help="runs with seeds seed, seed+1, ...")
    p.add_argument("--faults", default="all", help=f"comma-separated fault kinds (default all): {','.join(FAULT_KINDS)}")
    p.add_argument("--rate", type=float, default=600.0, help="line speed, units/min")
    p.add_argument("--batch-units", type=int, default=150, help="planned quantity of each batch")
    p.add_argument("--mean-gap", type=float, default=4.0, help="mean seconds between fault episodes")
    p.add_argument("--confirm", choices=["upstream", "puback"], default="upstream", help="mqtt.delivery_confirm asked of the daemon")
    p.add_argument("--config", type=Path, default=None, help="line YAML to run (default config/demo-line.yaml)")
    p.add_argument("--keep", action="store_true", help="keep every run's work dir (kept anyway when a run has violations)")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of the text summary")
    a = p.parse_args(argv)
    try:
        faults = parse_faults(a.faults)
    except ValueError as exc:
        p.error(str(exc))
    setup_logging("warning")
    print(f"machine: {machine()}", flush=True)
    bad = 0
    total: dict[str, int] = {}
    for i in range(a.runs):
        seed = a.seed + i
        opts = CampaignOptions(
            seconds=a.minutes * 60, seed=seed, faults=faults, rate_upm=a.rate, batch_units=a.batch_units,
            mean_gap_s=a.mean_gap, confirm=a.confirm, **({"config": a.config} if a.config else {}), keep=a.keep,
                echo=None if a.json else (lambda m: print(m, flush=True)),
        )
        res = asyncio.run(run_campaign(opts))
        bad += 0 if res.ok else 1
        for k, v in res.by_check().items():
            total[k] = total.get(k, 0) + v
        print(json.dumps(res.as_dict()) if a.json else res.summary() + (f"\n  work dir kept: {res.workdir}" if not res.ok or a.keep else ""), flush=True)
    if a.runs > 1:
        print(f"{a.runs} runs, {bad} with violations; violations by check: {total or 'none'}", flush=True)
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
