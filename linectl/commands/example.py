"""`linectl example [NAME] [--out FILE]`: the example line configs shipped with linectl.

Without NAME, lists them; with NAME, prints one (or writes it to FILE, never
over an existing file) as the starting point of a real line's YAML. They are
package data, so this works from a wheel install where there is no config/
folder to copy from.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("example", help="list the shipped example line configs, or print / write one")
    p.add_argument("name", nargs="?", help="example name (e.g. two-station-line); omit to list them")
    p.add_argument("--out", metavar="FILE", help="write the example here instead of stdout (refused if FILE exists)")
    p.set_defaults(func=run)


def _first_comment(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def run(args: argparse.Namespace) -> int:
    from linectl.packaged import ExampleNotFound, example_config, example_names

    if not args.name:
        for name in example_names():
            print(f"{name:<20} {_first_comment(example_config(name).read_text(encoding='utf-8'))}")
        return 0
    try:
        path = example_config(args.name)
    except ExampleNotFound as exc:
        print(f"linectl example: {exc}", file=sys.stderr)
        return 2
    text = path.read_text(encoding="utf-8")
    if not args.out:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.out, "x", encoding="utf-8") as fh:
            fh.write(text)
    except FileExistsError:
        print(f"linectl example: {args.out} exists; not overwritten", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"linectl example: {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: written from example {args.name} ({path}); edit it, then `linectl check-config {args.out}`")
    return 0
