"""`linectl check-config PATH`: exit 0 when valid, else exit 2 with one `PATH:LINE: field: message` per problem.

The `simulation:` section belongs to the line simulator, so the controller's
config model keeps it as a plain mapping (the daemon never imports the
simulators). A config that has the section gets it checked here against the
simulator's model, so a misspelt simulation key is refused like any other.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from linectl.yamlsource import Problem


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check-config", help="validate a line YAML")
    p.add_argument("path")
    p.set_defaults(func=run)


def simulation_problems(path: str, section: dict[str, Any]) -> list[Problem]:
    """The `simulation:` section checked by the simulator's model, each problem at its YAML line."""
    from pydantic import ValidationError

    from linectl.simulators.config import SimulationConfig
    from linectl.yamlsource import dotted, line_of, load_yaml

    try:
        SimulationConfig.model_validate(section)
    except ValidationError as exc:
        source = load_yaml(path)
        out = []
        for err in exc.errors(include_url=False):
            loc = ("simulation", *(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))))
            msg = str(err["msg"]).removeprefix("Value error, ")
            out.append(Problem(dotted(loc), line_of(source, loc), msg))
        return out
    return []


def run(args: argparse.Namespace) -> int:
    from linectl.config import load_config
    from linectl.yamlsource import ConfigFileError

    try:
        cfg = load_config(args.path)
        problems = simulation_problems(args.path, cfg.simulation) if cfg.simulation is not None else []
    except ConfigFileError as exc:
        problems = exc.problems
    if problems:
        for prob in problems:
            print(prob.format(args.path), file=sys.stdout)
        return 2
    print(
        f"{args.path}: OK: line {cfg.topic_root}, {len(cfg.products)} product(s), "
        f"{len(cfg.devices)} device(s), {len(cfg.stations)} station(s)"
    )
    return 0
