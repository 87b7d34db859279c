"""Line config: every example in config/ loads, and bad files fail with one located line per problem."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from linectl.config import load_config
from linectl.yamlsource import ConfigFileError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "config").glob("*.yaml"))

MINIMAL = """\
line:
  enterprise: acme
  site: lyon
  area: packaging
  name: line1
  gln: "5412345000013"
  company_prefix_length: 7
products:
  - gtin: "09501101530003"
    name: Paracetamol 500 mg
    company_prefix_length: 7
    serials:
      scheme: random
      length: 12
      planned_volume: 1000000
mqtt:
  password: ${LINECTL_TEST_SECRET}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "line.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "linectl", *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_is_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINECTL_MQTT_PASSWORD", "x")
    cfg = load_config(path)
    assert cfg.products and cfg.line.name
    r = subprocess.run([sys.executable, "-m", "linectl", "check-config", str(path)], capture_output=True, text=True, cwd=ROOT,
        env={**__import__("os").environ, "LINECTL_MQTT_PASSWORD": "x"})
    assert r.returncode == 0, r.stdout + r.stderr


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert "demo-line.yaml" in names and len(names) >= 2


def test_env_substitution(tmp_path: Path) -> None:
    p = write(tmp_path, MINIMAL)
    cfg = load_config(p, env={"LINECTL_TEST_SECRET": "s3cret"})
    assert cfg.mqtt.password == "s3cret"
    with pytest.raises(ConfigFileError) as ei:
        load_config(p, env={})
    [prob] = ei.value.problems
    assert prob.line == 17 and prob.path == "mqtt.password" and "LINECTL_TEST_SECRET" in prob.message


def test_every_problem_listed_with_its_line(tmp_path: Path) -> None:
    text = MINIMAL.replace('gln: "5412345000013"', 'gln: "5412345000014"')  # bad check digit, line 6
    text = text.replace("    name: Paracetamol 500 mg\n", "    name: Paracetamol 500 mg\n    colour: blue\n")  # unknown key, line 11
    text = text.replace("      length: 12\n", "      length: 3\n")  # guess probability too high
    p = write(tmp_path, text)
    r = cli("check-config", str(p), env={"LINECTL_TEST_SECRET": "x"})
    assert r.returncode == 2
    lines = r.stdout.strip().splitlines()
    assert f"{p}:6: line.gln: GLN check digit is 4, expected 3" in lines
    assert any(ln.startswith(f"{p}:11: products.0.colour: ") and "Extra inputs" in ln for ln in lines), lines
    assert any(ln.startswith(f"{p}:13: products.0.serials") and "1 in 10,000" in ln for ln in lines), lines
    assert len(lines) == 3


def test_malformed_yaml_reports_line(tmp_path: Path) -> None:
    p = write(tmp_path, "line:\n  enterprise: acme\n  site: [unclosed\n  area: x\n")
    r = cli("check-config", str(p))
    assert r.returncode == 2
    assert r.stdout.startswith(f"{p}:") and "YAML syntax" in r.stdout


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    p = write(tmp_path, MINIMAL.replace("  area: packaging\n", "  area: packaging\n  area: other\n"))
    r = cli("check-config", str(p))
    assert r.returncode == 2 and "YAML syntax" in r.stdout and ":5:" in r.stdout


def test_sequential_refused_for_eu_market(tmp_path: Path) -> None:
    p = write(tmp_path, MINIMAL.replace("      scheme: random\n      length: 12\n      planned_volume: 1000000\n", "      scheme: sequential\n"))
    with pytest.raises(ConfigFileError) as ei:
        load_config(p, env={"LINECTL_TEST_SECRET": "x"})
    assert any("sequential" in pr.message for pr in ei.value.problems)


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    r = cli("check-config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "cannot read file" in r.stdout
    (tmp_path / "empty.yaml").write_text("")
    r = cli("check-config", str(tmp_path / "empty.yaml"))
    assert r.returncode == 2 and "empty" in r.stdout
