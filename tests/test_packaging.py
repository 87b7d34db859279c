"""The wheel is the product: built from this tree, installed into a fresh virtualenv, run from an unrelated directory.

`pip wheel` builds it the way a release would (isolated build, pyproject.toml
only). The fresh virtualenv has no pip and no linectl; the wheel is installed
into it with `--no-deps --no-index`, and a .pth line lends it the test
environment's site-packages for the third-party dependencies only (installing
them again from an index would test the index, not the wheel). A .pth line is
not a site dir: the editable-install hook of this checkout that lives there is
never run, so `linectl` can only come from the wheel; the test asserts it.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (ROOT / "config").glob("*.yaml"))
_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "tests", "bench", "*.db*")


def _env() -> dict[str, str]:
    """The environment of an operator's shell: nothing that points Python at this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # build from a copy: an in-tree build leaves build/ in the checkout, and stale files in build/lib end up in wheels
    src = tmp_path_factory.mktemp("src") / "linectl"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    out = tmp_path_factory.mktemp("wheelhouse")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    (whl,) = out.glob("linectl-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, env=_env()).stdout.strip()
    deps = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(purelib, "zz-test-dependencies.pth").write_text("".join(f"{d}\n" for d in deps if d != purelib))
    return venv


def test_wheel_installs_linectl_packages_only_under_the_linectl_namespace_with_the_examples(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"linectl"}, top
    # every package of the source tree is in the wheel (the package list in pyproject.toml is explicit)
    sources = {p.parent.name for p in Path(ROOT, "linectl").glob("*/__init__.py")}
    for pkg in sorted(sources | {"drivers", "simulators", "examples"}):
        assert f"linectl/{pkg}/__init__.py" in names, pkg
    for pkg in sorted(sources | {"drivers", "simulators"}):  # and every module of it
        src = Path(ROOT, pkg if pkg in ("drivers", "simulators") else f"linectl/{pkg}")
        missing = [p.name for p in src.glob("*.py") if f"linectl/{pkg}/{p.name}" not in names]
        assert not missing, (pkg, missing)
    assert "linectl/drivers/registry.py" in names and "linectl/simulators/line.py" in names
    for name in EXAMPLES:
        assert f"linectl/examples/{name}" in names, name
    assert "linectl/examples/dashboards/node-red-flow.json" in names
    assert "linectl/commands/backup.py" in names and "linectl/py.typed" in names
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "linectl = linectl.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_wheel_in_a_fresh_venv_runs_the_demo_from_an_unrelated_directory(venv: Path, tmp_path: Path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    py, exe = venv / "bin" / "python", venv / "bin" / "linectl"
    where = subprocess.run(
        [str(py), "-c", ("import json, linectl, linectl.drivers, linectl.simulators, linectl.examples as e; "
         "print(json.dumps([linectl.__file__, linectl.drivers.__file__, linectl.simulators.__file__, e.__file__]))")],
        check=False, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=60,
    )
    assert where.returncode == 0, where.stderr
    for f in json.loads(where.stdout):
        assert Path(f).resolve().is_relative_to(venv.resolve()), f"{f} is not from the wheel installed in {venv}"
    for top in ("drivers", "simulators"):  # the generic top-level names are gone
        r = subprocess.run([str(py), "-c", f"import {top}"], check=False, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=60)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, (top, r.stdout, r.stderr)

    res = subprocess.run(
        [str(exe), "--log-level", "warning", "demo", "--units", "50", "--json"],
        check=False, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:] + res.stdout[-2000:]
    assert "Traceback" not in res.stderr
    s = json.loads(res.stdout.strip().splitlines()[-1])
    assert s["commissioned"] == 50 and s["missed_rejects"] == 0 and s["false_rejects"] == 0 and s["balanced"] is True
    assert s["challenge"]["passed"] is True and s["truth"]["passed"] == 50
    assert s["units"] == 50 + sum(s["rejected"].values())
    assert s["events_stored"] > 50 and s["events_forwarded"] == s["events_stored"]
    db = Path(s["db"])
    assert db.is_file() and not db.resolve().is_relative_to(ROOT)
    assert list(cwd.iterdir()) == [], "the demo must not leave files in the directory it was started from"

    # the store it left answers the installed CLI's record commands
    audit = subprocess.run([str(exe), "audit", "verify", "--db", str(db)], check=False, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=60)
    assert audit.returncode == 0 and audit.stdout.startswith("audit trail OK"), audit.stdout + audit.stderr
    shutil.rmtree(db.parent, ignore_errors=True)


def test_wheel_ships_the_examples_as_configs_that_check(venv: Path, tmp_path: Path):
    exe = venv / "bin" / "linectl"
    listed = subprocess.run([str(exe), "example"], check=False, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert sorted(line.split()[0] for line in listed.stdout.splitlines()) == sorted(n.removesuffix(".yaml") for n in EXAMPLES)
    for name in EXAMPLES:
        out = tmp_path / name
        w = subprocess.run([str(exe), "example", name, "--out", str(out)], check=False, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=60)
        assert w.returncode == 0, w.stderr
        assert out.read_text(encoding="utf-8") == (ROOT / "config" / name).read_text(encoding="utf-8")
        env = {**_env(), "LINECTL_MQTT_PASSWORD": "x"}  # two-station-line takes its broker password from the environment
        chk = subprocess.run([str(exe), "check-config", str(out)], check=False, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
        assert chk.returncode == 0 and ": OK: " in chk.stdout, chk.stdout + chk.stderr
    missing = subprocess.run([str(exe), "demo", "--config", "no-such-line"], check=False, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=60)
    assert missing.returncode == 2 and "not a shipped example" in missing.stderr and "Traceback" not in missing.stderr


def test_the_controller_does_not_import_the_simulators():
    """`linectl run` needs none of the simulators: config, daemon and CLI load without linectl.simulators."""
    code = (
        "import sys, linectl.cli, linectl.config, linectl.daemon\n"
        "linectl.cli.build_parser()\n"
        f"cfg = linectl.config.load_config({str(ROOT / 'config' / 'demo-line.yaml')!r})\n"
        "assert isinstance(cfg.simulation, dict) and cfg.simulation['rate_upm'] == 600, cfg.simulation\n"
        "print(sorted(m for m in sys.modules if m.startswith('linectl.simulators')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_every_command_module_is_registered():
    """Registration is explicit: each module in linectl/commands/ is a subcommand (a missing import fails the CLI)."""
    from linectl.cli import COMMANDS, build_parser

    modules = {p.stem for p in (ROOT / "linectl" / "commands").glob("*.py") if p.stem != "__init__"}
    assert {m.__name__.rsplit(".", 1)[1] for m in COMMANDS} == modules
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    names = set(sub.choices)  # type: ignore[arg-type]
    assert {"backup", "restore", "example", "demo", "run", "check-config", "audit"} <= names
