"""Seed the test QU4RTET through its own ORM (run with the QU4RTET venv's python).

Written for linectl. Two commands, each answering one JSON document on stdout:

  python seed.py init  < {"username": ..., "password": ..., "token": ...}
      the API user (not a superuser: it holds serialbox.allocate_numbers and the
      model permissions of the QU4RTET apps), its DRF token, the EPCIS capture
      rule (quartet_epcis' own `create_epcis_rule` command), and the number-range
      response templates (response_templates/*.xml) with one quartet_capture
      rule per reply shape and number kind.

  python seed.py pools < [{"machine_name": ..., "kind": "random"|"sequential",
                            "minimum": ..., "maximum": ..., "request_threshold": ...,
                            "response": "sap"|"unitrace"|"tracelink"|"tracelink-gs1"|null}]
      pools with one region each, and a serialbox.ResponseRule (content type
      xml) pointing at the rule of the chosen reply shape.

The server may be running while this writes: SQLite's lock timeout (settings)
serialises the two processes.
"""

import contextlib
import json
import os
import sys
from pathlib import Path

SITE_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(SITE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")

import django  # noqa: E402

django.setup()

from django.contrib.auth.models import Permission, User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import transaction  # noqa: E402
from quartet_capture.models import Rule, Step, StepParameter  # noqa: E402
from quartet_templates.models import Template  # noqa: E402
from random_flavorpack.models import RandomizedRegion  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402
from serialbox.models import Pool, ResponseRule, SequentialRegion  # noqa: E402

PERMISSION_APPS = (
    "serialbox",
    "random_flavorpack",
    "list_based_flavorpack",
    "quartet_capture",
    "quartet_epcis",
    "quartet_output",
    "quartet_templates",
    "quartet_masterdata",
)

# reply shape -> (template file, step parameters beyond the template name)
SHAPES = {
    "sap": ("sap.xml", {}),
    "unitrace": ("unitrace.xml", {}),
    "tracelink": ("tracelink.xml", {}),
    "tracelink-gs1": ("tracelink.xml", {"Element Strings": "true"}),
}
KINDS = ("random", "sequential")


def rule_name(shape: str, kind: str) -> str:
    return "linectl %s %s reply" % (shape, kind)


def init(spec: dict) -> dict:
    with transaction.atomic():
        user = User.objects.create_user(spec["username"], password=spec["password"])
        perms = Permission.objects.filter(content_type__app_label__in=PERMISSION_APPS)
        user.user_permissions.set(perms)
        if not user.user_permissions.filter(codename="allocate_numbers").exists():
            raise SystemExit("serialbox.allocate_numbers permission not found")
        Token.objects.create(user=user, key=spec["token"])
        with contextlib.redirect_stdout(sys.stderr):  # it print()s
            call_command("create_epcis_rule")
        for shape, (filename, params) in SHAPES.items():
            content = (SITE_DIR / "response_templates" / filename).read_text()
            template, _ = Template.objects.get_or_create(
                name="linectl %s" % filename,
                defaults={"content": content, "description": "linectl test reply"},
            )
            for kind in KINDS:
                rule = Rule.objects.create(name=rule_name(shape, kind))
                step = Step.objects.create(
                    name="Render reply",
                    rule=rule,
                    step_class="quartet_templates.steps.TemplateStep",
                    order=1,
                )
                all_params = {"Template Name": template.name, "Number Kind": kind}
                all_params.update(params)
                for name, value in all_params.items():
                    StepParameter.objects.create(step=step, name=name, value=value)
    return {"user": user.username, "rules": sorted(Rule.objects.values_list("name", flat=True))}


def pools(specs: list) -> dict:
    created = []
    with transaction.atomic():
        for spec in specs:
            name = spec["machine_name"]
            kind = spec.get("kind", "random")
            if kind not in KINDS:
                raise SystemExit("unknown kind %r (random or sequential)" % kind)
            pool = Pool.objects.create(
                readable_name=spec.get("readable_name") or name,
                machine_name=name,
                request_threshold=spec["request_threshold"],
            )
            region_name = "%s-region" % name
            if kind == "random":
                RandomizedRegion.objects.create(
                    readable_name=region_name,
                    machine_name=region_name,
                    min=spec["minimum"],
                    max=spec["maximum"],
                    pool=pool,
                )
            else:
                SequentialRegion.objects.create(
                    readable_name=region_name,
                    machine_name=region_name,
                    start=spec["minimum"],
                    end=spec["maximum"],
                    pool=pool,
                )
            response = spec.get("response")
            if response:
                if response not in SHAPES:
                    raise SystemExit("unknown response %r (%s)" % (response, ", ".join(SHAPES)))
                ResponseRule.objects.create(
                    pool=pool, content_type="xml", rule=Rule.objects.get(name=rule_name(response, kind))
                )
            created.append(name)
    return {"pools": created}


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    spec = json.load(sys.stdin)
    if command == "init":
        out = init(spec)
    elif command == "pools":
        out = pools(spec)
    else:
        raise SystemExit("usage: seed.py init|pools < spec.json")
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
