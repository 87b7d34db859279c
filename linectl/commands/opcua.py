"""`linectl opcua hash-password`: the argon2 hash for a user of the OPC UA server (`opcua_server.users[].password_hash`).

The config holds only hashes, so a leaked line YAML does not give a SCADA login. The password is read from the
terminal (twice, without echo) or, with --stdin, from the first line of standard input (for provisioning scripts);
never from the command line, where it would land in shell history and the process list.

Exit codes: 0 the hash printed, 2 bad input (empty password, the two entries differ, no terminal without --stdin).
"""

from __future__ import annotations

import argparse
import getpass
import sys

EXIT_OK, EXIT_BAD_INPUT = 0, 2
MIN_LENGTH = 8


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("opcua", help="OPC UA server (PackML) helpers")
    cmds = p.add_subparsers(dest="opcua_command", metavar="SUBCOMMAND", required=True)
    h = cmds.add_parser("hash-password", help="print the argon2 hash of a password for opcua_server.users[].password_hash")
    h.add_argument("--stdin", action="store_true", help="read the password from the first line of standard input")
    h.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linectl.opcua_server import hash_password

    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            print("error: no terminal to ask for the password; pipe it with --stdin", file=sys.stderr)
            return EXIT_BAD_INPUT
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("error: the two entries differ", file=sys.stderr)
            return EXIT_BAD_INPUT
    if len(password) < MIN_LENGTH:
        print(f"error: the password must have at least {MIN_LENGTH} characters", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(hash_password(password))
    return EXIT_OK
