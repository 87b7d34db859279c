"""The example line configs shipped with linectl (package `linectl.examples`, the repository's config/ folder).

Found through importlib.resources, never relative to this file: in a wheel the
repository layout (config/ beside linectl/) does not exist, and a demo that
only runs from a clone is not a demo of the installed product. A pip-installed
package sits in a directory, so the resources are plain files and a Path to
them stays valid for the life of the process.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

EXAMPLES_PACKAGE = "linectl.examples"
#: the line `linectl demo` runs when given no --config
DEFAULT_EXAMPLE = "demo-line"


class ExampleNotFound(LookupError):
    """A name that is neither an existing file nor a shipped example."""


def examples_dir() -> Path:
    """The folder holding the shipped examples (config/ in a checkout, site-packages/linectl/examples in a wheel)."""
    return Path(str(resources.files(EXAMPLES_PACKAGE)))


def example_names() -> list[str]:
    """Names of the shipped example line configs (file names without .yaml), sorted."""
    return sorted(p.stem for p in examples_dir().glob("*.yaml"))


def example_config(name: str) -> Path:
    """The shipped example `name` (`demo-line` or `demo-line.yaml`); ExampleNotFound lists the known ones."""
    stem = name.removesuffix(".yaml")
    path = examples_dir() / f"{stem}.yaml"
    if "/" in stem or not path.is_file():
        raise ExampleNotFound(f"no example config {name!r}; shipped examples: {', '.join(example_names())}")
    return path


def resolve_config(arg: str | Path) -> Path:
    """A config argument: an existing file as given, else the name of a shipped example.

    So `linectl demo --config demo-aggregation` works after a wheel install from
    any directory, while `--config config/demo-aggregation.yaml` keeps working in
    a clone. A path that exists always wins: an example never shadows a real file,
    and only a bare name (no directory) is looked up among the examples.
    """
    p = Path(arg)
    if p.exists() or p.name != str(arg):
        if not p.exists():
            raise ExampleNotFound(f"{arg}: no such file (shipped examples, by name: {', '.join(example_names())})")
        return p
    try:
        return example_config(str(arg))
    except ExampleNotFound:
        raise ExampleNotFound(
            f"{arg}: no such file, and not a shipped example ({', '.join(example_names())})"
        ) from None
