"""`linectl run -c CONFIG [--db PATH]`: the daemon.

It owns its store for its whole lifetime (exclusive lock on `<db>.lock`): a
second `linectl run` on the same store exits 3 naming the holder's PID and
touches nothing. A missing store is refused (exit 3): `linectl init` creates
one, so a mistyped --db never starts a new, empty serial registry.
"""

from __future__ import annotations

import argparse
import asyncio
import sys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the line controller daemon")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--db", help="store path (default: store.path of the config)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linectl.config import load_config
    from linectl.daemon import run_daemon
    from linectl.store import StoreError
    from linectl.yamlsource import ConfigFileError

    try:
        cfg = load_config(args.config)
    except ConfigFileError as exc:
        for prob in exc.problems:
            print(prob.format(args.config), file=sys.stderr)
        return 2
    if cfg.mqtt.enabled:
        from linectl.upstream.mqtt_client import SecretRefused, broker_password

        try:
            broker_password(cfg.mqtt)  # a secret that cannot be used stops the start here, not at each reconnect
        except SecretRefused as exc:
            print(f"linectl: {args.config}: {exc}", file=sys.stderr)
            return 2
    try:
        return asyncio.run(run_daemon(cfg, args.db))
    except StoreError as exc:
        print(f"linectl: store refused: {exc}", file=sys.stderr)
        return 3
