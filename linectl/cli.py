"""The `linectl` command. Each subcommand lives in its own module under linectl/commands/.

Exit codes: 0 success, 1 a check failed (e.g. audit chain broken), 2 bad
input (invalid config, bad arguments), 3 the store refused (missing, corrupt,
foreign, another line's, or held by another process).
"""

from __future__ import annotations

import argparse
import sys

from linectl import __version__
from linectl.commands import (
    audit,
    backup,
    batch,
    check_config,
    decode,
    demo,
    epc,
    example,
    export,
    init,
    opcua,
    recall,
    report,
    rework,
    run,
    serials,
    simulate,
    trace,
    upstream,
    users,
    verify,
)

#: every subcommand, in `linectl --help` order. Imported explicitly: a command module that is missing or does not
#: import is a packaging bug, and must fail every invocation (and the tests) rather than silently drop the command.
#: The modules import little at the top; what a command needs is imported when it runs, so `linectl --help`
#: and the daemon do not load the simulators, the camera stack or the exporters.
COMMANDS = (
    check_config,
    init,
    serials,
    trace,
    audit,
    users,
    batch,
    report,
    run,
    simulate,
    demo,
    example,
    export,
    recall,
    verify,
    rework,
    decode,
    epc,
    backup,
    upstream,
    opcua,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linectl", description="Serialization and track & trace line controller")
    parser.add_argument("--version", action="version", version=f"linectl {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="console", choices=["console", "json"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS:
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
