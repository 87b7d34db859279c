"""Every config key works end to end or is refused: a walk of the config models against the code that reads them.

Each field of every pydantic model a line YAML can reach (linectl.config, the driver configs of the registry,
the simulator's) must be read somewhere in linectl/, drivers/ or simulators/ (tests do not count). A key that
is accepted and read nowhere is the defect issue 11 found (`low_water` for random serials, `(11)` in a
code_template): it passes `check-config` and changes nothing on the line.

How a read is found (static, so every key is judged, not only those a test run happens to touch):
- `x.<field>` attribute loads, `getattr(x, "<field>")`, `x["<field>"]` / `x.get("<field>")`, and field names
  listed in a literal tuple that a loop hands to getattr (the station -> device reference check);
- a read counts for a model only where the model is in sight: the field's name is defined by that model
  alone, or the module of the read names the model's class (a shared name such as `low_water` read by the
  pool allocator is no proof that RandomSerials.low_water does anything);
- a field is attributed to the class that declares it (DriverConfig.name once, not once per driver);
- discriminator tags (`driver:`, `type:`, `scheme:`) are read by pydantic itself when it picks the model.

`test_scanner_finds_an_unread_key` proves the walk can fail.
"""

from __future__ import annotations

import ast
import typing
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from linectl.config import LineConfig

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("linectl", "drivers", "simulators")

#: keys found hollow in areas another engineer is restructuring (linectl/engine/ stations, the MQTT bridge /
#: upstream): reported to the coordinator, not fixed here. Each entry: "Model.field". Remove an entry when fixed
#: (the test fails on a stale one).
KNOWN_HOLLOW: frozenset[str] = frozenset()
#: keys that document the config for people and by design change nothing on the line
DOCUMENTATION_KEYS: frozenset[str] = frozenset({
    "DriverConfig.description",  # free text naming the device for whoever reads the YAML
})


# --------------------------------------------------------------------------- the models


def _models_in(annotation: Any) -> Iterable[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def config_models(root: type[BaseModel] = LineConfig) -> list[type[BaseModel]]:
    """Every model reachable from the root's field annotations (unions of drivers and stations included)."""
    seen: list[type[BaseModel]] = []
    todo = [root]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.append(m)
        for f in m.model_fields.values():
            todo.extend(x for x in _models_in(f.annotation) if x not in seen)
    return seen


def declaring_class(model: type[BaseModel], name: str) -> type[BaseModel]:
    for klass in model.__mro__:
        if name in getattr(klass, "__annotations__", {}):
            return klass
    return model


def is_tag(model: type[BaseModel], name: str) -> bool:
    """A one-value Literal field: a discriminator pydantic reads to choose the model."""
    ann = model.model_fields[name].annotation
    return typing.get_origin(ann) is Literal and len(typing.get_args(ann)) == 1


@dataclass(frozen=True)
class Key:
    owner: str  # declaring class
    name: str
    module_names: frozenset[str]  # class names whose mention in a module makes a read there count


def parent_fields(models: Iterable[type[BaseModel]]) -> dict[type[BaseModel], set[str]]:
    """Model -> names of the fields that hold exactly it (`mqtt` -> MqttConfig, `rules` -> VerifyRules).

    Only a field holding one model (or None) names it: `serials` holds any of three schemes, so reading
    `product.serials.low_water` does not show which scheme's low_water is meant."""
    out: dict[type[BaseModel], set[str]] = defaultdict(set)
    for m in models:
        for name, f in m.model_fields.items():
            held = set(_models_in(f.annotation))
            if len(held) == 1:
                out[held.pop()].add(name)
    return out


def config_keys(models: Iterable[type[BaseModel]]) -> list[Key]:
    models = list(models)
    parents = parent_fields(models)
    out: dict[tuple[str, str], set[str]] = {}
    for m in models:
        for name in m.model_fields:
            if is_tag(m, name):
                continue
            owner = declaring_class(m, name)
            # a field of a base class is in sight where any model that inherits it is named, or a field holding it
            out.setdefault((owner.__name__, name), set()).update({owner.__name__, m.__name__} | parents.get(m, set()))
    return [Key(o, n, frozenset(c)) for (o, n), c in sorted(out.items())]


# --------------------------------------------------------------------------- the reads


@dataclass
class Reads:
    #: field name -> module paths where it is read
    by_name: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    #: module path -> every identifier the module mentions (names and attributes)
    mentions: dict[str, set[str]] = field(default_factory=dict)


def scan(sources: dict[str, str]) -> Reads:
    """Reads of every name in the given modules (path -> source)."""
    r = Reads()
    for path, text in sources.items():
        tree = ast.parse(text, filename=path)
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
                if isinstance(node.ctx, ast.Load):
                    r.by_name[node.attr].add(path)
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                r.by_name[node.slice.value].add(path)
            elif isinstance(node, ast.Call):
                fn = node.func
                is_getattr = isinstance(fn, ast.Name) and fn.id in ("getattr", "hasattr")
                is_get = isinstance(fn, ast.Attribute) and fn.attr == "get"
                if (is_getattr and len(node.args) >= 2) or (is_get and node.args):
                    arg = node.args[1] if is_getattr else node.args[0]
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        r.by_name[arg.value].add(path)
            elif isinstance(node, ast.For) and _calls_getattr(node.body):
                for const in ast.walk(node.iter):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str):
                        r.by_name[const.value].add(path)
            elif isinstance(node, ast.ClassDef):
                names.add(node.name)
        r.mentions[path] = names
    return r


def _calls_getattr(body: list[ast.stmt]) -> bool:
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "getattr"
        for stmt in body for n in ast.walk(stmt)
    )


def unread(keys: Iterable[Key], reads: Reads) -> list[str]:
    """Keys no module reads where their model is in sight."""
    keys = list(keys)
    owners_of: dict[str, set[str]] = defaultdict(set)
    for k in keys:
        owners_of[k.name].add(k.owner)
    out = []
    for k in keys:
        where = reads.by_name.get(k.name, set())
        if len(owners_of[k.name]) > 1:
            where = {p for p in where if reads.mentions.get(p, set()) & k.module_names}
        if not where:
            out.append(f"{k.owner}.{k.name}")
    return out


def project_sources() -> dict[str, str]:
    out = {}
    for top in SOURCES:
        for p in sorted((REPO / top).rglob("*.py")):
            out[str(p.relative_to(REPO))] = p.read_text(encoding="utf-8")
    return out


# --------------------------------------------------------------------------- the tests


def test_every_config_key_is_read_or_refused():
    from linectl.simulators.config import SimulationConfig

    # the simulation: section of a line YAML is validated by the simulators' own model (production never imports it)
    models = config_models()
    models += [m for m in config_models(SimulationConfig) if m not in models]
    names = {m.__name__ for m in models}
    # the walk reaches the parts a line YAML has: products, serial schemes, stations, drivers, simulation
    assert {"Product", "RandomSerials", "SequentialSerials", "PoolSerials", "PrintVerifyStation", "VerifyRules",
            "MqttConfig", "SimulationConfig"} <= names, names
    assert any(n.endswith("Config") and n not in ("MqttConfig", "StoreConfig", "EpcisConfig", "SimulationConfig") for n in names)
    hollow = set(unread(config_keys(models), scan(project_sources()))) - DOCUMENTATION_KEYS
    unexpected = sorted(hollow - KNOWN_HOLLOW)
    assert not unexpected, f"config keys accepted but read by no code (make them work or refuse them): {unexpected}"
    stale = sorted(KNOWN_HOLLOW - hollow)
    assert not stale, f"KNOWN_HOLLOW lists keys that are read now: remove them {stale}"


def test_scanner_finds_an_unread_key():
    """The walk can fail: a model with a key nothing reads is flagged; reading it (in sight) clears it."""

    class Serials(BaseModel):
        scheme: Literal["pool"]
        low_water: int = 0

    class Other(BaseModel):
        scheme: Literal["random"]
        low_water: int = 0  # same name: a read elsewhere must not vouch for it
        zz_never_read_anywhere: int = 0

    class Root(BaseModel):
        a: Serials
        b: Other

    keys = config_keys(config_models(Root))
    assert {f"{k.owner}.{k.name}" for k in keys} == {"Root.a", "Root.b", "Serials.low_water", "Other.low_water", "Other.zz_never_read_anywhere"}
    src = {
        "m0.py": "def parts(root):\n    return root.a, root.b\n",
        "m1.py": "def use(s: Serials):\n    return s.low_water\n",
    }
    assert sorted(unread(keys, scan(src))) == ["Other.low_water", "Other.zz_never_read_anywhere"]
    src["m2.py"] = "def f(o: Other):\n    return getattr(o, 'zz_never_read_anywhere'), o.low_water\n"
    assert unread(keys, scan(src)) == []
    # a tuple of names handed to getattr in a loop is a read, as in config._reference_problems
    src["m2.py"] = "def f(o: Other):\n    for n in ('zz_never_read_anywhere', 'low_water'):\n        print(getattr(o, n))\n"
    assert unread(keys, scan(src)) == []
    # the real models: the refused key stays refused (not a field), so nothing can read it
    from linectl.config import RandomSerials, SequentialSerials

    assert "low_water" not in RandomSerials.model_fields and "low_water" not in SequentialSerials.model_fields
