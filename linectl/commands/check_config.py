"""`linectl check-config PATH`: exit 0 when valid, else exit 2 with one `PATH:LINE: field: message` per problem."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check-config", help="validate a line YAML")
    p.add_argument("path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linectl.config import load_config
    from linectl.yamlsource import ConfigFileError

    try:
        cfg = load_config(args.path)
    except ConfigFileError as exc:
        for prob in exc.problems:
            print(prob.format(args.path), file=sys.stdout)
        return 2
    print(
        f"{args.path}: OK: line {cfg.topic_root}, {len(cfg.products)} product(s), "
        f"{len(cfg.devices)} device(s), {len(cfg.stations)} station(s)"
    )
    return 0
