"""The `linectl` command. Each subcommand lives in its own module under linectl/commands/.

Exit codes: 0 success, 1 a check failed (e.g. audit chain broken), 2 bad
input (invalid config, bad arguments), 3 the store refused (missing, corrupt,
foreign, another line's, or held by another process).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from linectl import __version__

COMMAND_MODULES = (
    "linectl.commands.check_config",
    "linectl.commands.init",
    "linectl.commands.serials",
    "linectl.commands.trace",
    "linectl.commands.audit",
    "linectl.commands.batch",
    "linectl.commands.report",
    "linectl.commands.run",
    "linectl.commands.simulate",
    "linectl.commands.demo",
    "linectl.commands.export",
    "linectl.commands.recall",
    "linectl.commands.verify",
    "linectl.commands.rework",
    "linectl.commands.decode",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linectl", description="Serialization and track & trace line controller")
    parser.add_argument("--version", action="version", version=f"linectl {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="console", choices=["console", "json"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # TODO(bootstrap): strict once all command modules exist
            if exc.name != name:
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from linectl.logging import setup_logging

    setup_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
