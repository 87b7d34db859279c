"""The operators' dashboard as a person sees it: the shipped Node-RED flow (Node-RED from npm, core nodes only)
against a real Mosquitto and demo lines (`linectl run` + `linectl simulate` processes), rendered in headless
Chromium and checked on the page: state, colours, local time, stale flag, broker banner, alarms after a Node-RED
restart, two lines, commands from the buttons. Screenshots of every scenario go to build/artifacts/dashboard/.

The broker is a private mosquitto (not the shared one at 1883): the dashboard shows every line on its broker, and
the shared broker holds retained states of other tests' lines; the broker-frozen scenario also needs SIGSTOP.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from dashboard.browser import Browser
from dashboard.line import DemoLine
from dashboard.nodered import FLOW, PASSWORD, REPO, USER, NodeRed
from mqtt_fixtures import Broker

pytestmark = pytest.mark.slow

ARTIFACTS = REPO / "build" / "artifacts" / "dashboard"
TZ = "Asia/Tokyo"  # UTC+9 all year: a panel's local time can never be mistaken for UTC here
RED = "rgb(198, 40, 40)"
GREEN = "rgb(46, 125, 50)"

CORE_NODES = {"tab", "mqtt-broker", "mqtt in", "mqtt out", "function", "template", "http in", "http response", "status", "catch", "inject",
              "link in", "link out", "comment"}


def test_shipped_flow_is_generated_and_uses_core_nodes_only():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_flow", REPO / "config" / "dashboards" / "make_flow.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert FLOW.read_text(encoding="utf-8") == mod.render(), "node-red-flow.json is stale: run python config/dashboards/make_flow.py"
    types = {n["type"] for n in json.loads(FLOW.read_text(encoding="utf-8"))}
    assert types <= CORE_NODES, f"not a core Node-RED node: {types - CORE_NODES}"


def panel(line: DemoLine) -> str:
    return f"document.querySelector('section.panel[data-line=\"{line.root}\"]')"


def shot(br: Browser, name: str, sizes: tuple[tuple[int, int], ...] = ((1280, 800),)) -> None:
    """A screenshot per panel size, and the page must fit it: no horizontal scrolling on a line panel PC."""
    for w, h in sizes:
        br.resize(w, h)
        br.wait_for(f"innerWidth === {w}", 10, f"viewport {w}")
        time.sleep(1.2)  # one poll/render at this size
        overflow = br.evaluate("[document.documentElement.scrollWidth, innerWidth, Array.from(document.querySelectorAll('section.panel *'))"
                               ".filter(e => e.getBoundingClientRect().right > innerWidth + 1).map(e => e.outerHTML.slice(0, 80))]")
        br.screenshot(ARTIFACTS / f"{name}-{w}x{h}.png")
        assert overflow[0] <= overflow[1] and not overflow[2], f"{name}: page overflows {w}px: {overflow}"
    br.resize(1280, 800)


def color(br: Browser, expr: str, prop: str) -> str:
    return str(br.evaluate(f"getComputedStyle({expr})['{prop}']"))


def test_dashboard_scenarios(tmp_path: Path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in [*ARTIFACTS.glob("*.png"), *ARTIFACTS.glob("*.log")]:  # a screenshot is of this run or of none
        old.unlink()
    broker = Broker(tmp_path / "broker").start()
    nr: NodeRed | None = None
    br: Browser | None = None
    a = DemoLine(tmp_path / "lineA", broker.port, seed=5)
    b = DemoLine(tmp_path / "lineB", broker.port, seed=7)
    try:
        nr = NodeRed(tmp_path / "nr", broker.port).start()
        # protected: no password, no page (httpNodeAuth); the API too
        for path in ("", "/api/lines"):
            with pytest.raises(urllib.error.HTTPError) as ei:
                urllib.request.urlopen(nr.url + path, timeout=10)
            assert ei.value.code == 401
        a.start()
        a.start_batch(f"DA{os.getpid()}")
        br = Browser(tmp_path / "chromium", user=USER, password=PASSWORD)
        br.call("Emulation.setTimezoneOverride", timezoneId=TZ)
        br.goto(nr.url)

        # 1. line running: green, not stale, local time, fits 1280x800 and 1024x768
        br.wait_for(f"{panel(a)} && {panel(a)}.dataset.state === 'running' && {panel(a)}.dataset.stale === 'false'", 60, "line A running")
        assert color(br, f"{panel(a)}.querySelector('.badge.state')", "backgroundColor") == GREEN
        assert br.evaluate("document.getElementById('banner-broker').classList.contains('on')") is False
        shown = br.evaluate(f"{panel(a)}.querySelector('.local-ts').textContent")
        tokyo = br.evaluate("new Date().toLocaleString('en-US', {timeZone: 'Asia/Tokyo', hour: 'numeric', hour12: true}).replace(/ [AP]M/, '')")
        utc = br.evaluate("new Date().toLocaleString('en-US', {timeZone: 'UTC', hour: 'numeric', hour12: true}).replace(/ [AP]M/, '')")
        assert f" {tokyo}:" in shown and tokyo != utc, f"time not shown in the panel's local zone ({TZ}): {shown!r}"
        shot(br, "1-running", ((1280, 800), (1024, 768)))

        # 2. the buttons go through linectl's command path: pause (amber), resume (green)
        br.evaluate(f"{panel(a)}.querySelector('button[data-cmd=pause_batch]').click()")
        br.wait_for(f"{panel(a)}.dataset.state === 'paused'", 30, "paused from the Pause button")
        assert color(br, f"{panel(a)}.querySelector('.badge.state')", "backgroundColor") == "rgb(249, 168, 37)"
        br.wait_for(f"{panel(a)}.querySelector('.cmdres') && {panel(a)}.querySelector('.cmdres').textContent === 'pause_batch: done'", 20, "reply shown")
        shot(br, "2-paused")
        br.evaluate(f"{panel(a)}.querySelector('button[data-cmd=resume_batch]').click()")
        br.wait_for(f"{panel(a)}.dataset.state === 'running'", 30, "running again from the Resume button")

        # 3. a fault: the printer refuses a job; the alarm in red, the line in the fault colour
        a.sim_cmd(cmd="inject", device="coder1", fault="nak", code="07", count=1)
        br.wait_for(f"{panel(a)}.querySelector('tr[data-code=printer_error]') && {panel(a)}.dataset.severity === 'fault'", 60, "printer_error, fault")
        assert br.evaluate(f"{panel(a)}.querySelector('tr[data-code=printer_error] td').textContent") == "critical"
        assert color(br, f"{panel(a)}.querySelector('tr[data-code=printer_error] td')", "backgroundColor") == RED
        assert color(br, f"{panel(a)}.querySelector('.badge.fault')", "backgroundColor") == RED
        shot(br, "3-fault", ((1280, 800), (1024, 768)))
        # acknowledged from its own button: the row loses its Ack button
        br.evaluate(f"{panel(a)}.querySelector('tr[data-code=printer_error] button.ack').click()")
        br.wait_for(f"!{panel(a)}.querySelector('tr[data-code=printer_error] button.ack')", 30, "printer_error acknowledged")

        # 4. e-stop: critical alarm in red, the panel in the fault colour
        a.sim_cmd(cmd="set", device="plc1", tags={"estop": True})
        br.wait_for(f"{panel(a)}.querySelector('tr[data-code=estop]') && {panel(a)}.dataset.severity === 'fault'", 60, "estop alarm and fault colour")
        assert color(br, f"{panel(a)}.querySelector('tr[data-code=estop] td')", "backgroundColor") == RED
        assert color(br, panel(a), "borderLeftColor") == RED
        shot(br, "4-estop", ((1280, 800), (1024, 768)))
        a.sim_cmd(cmd="set", device="plc1", tags={"estop": False})

        # 5. Node-RED restarted: the page says the server is gone, then shows the alarm list again (retained state)
        nr.stop()
        br.wait_for("document.getElementById('banner-server').classList.contains('on')", 20, "server-unreachable banner")
        nr.start()
        br.goto(nr.url)
        br.wait_for(f"{panel(a)} && {panel(a)}.querySelector('tr[data-code=estop]')", 60, "alarm list after Node-RED restart")
        shot(br, "5-node-red-restarted")

        # 6. two lines: one panel each, both fit the small panel
        b.start()
        br.wait_for(f"{panel(b)} && {panel(b)}.dataset.stale === 'false' && document.querySelectorAll('section.panel').length === 2", 60, "second line")
        shot(br, "6-two-lines", ((1280, 800), (1024, 768)))

        # 7. controller killed: line A stale and offline (Last Will), line B still live
        a.kill_daemon()
        br.wait_for(f"{panel(a)}.dataset.stale === 'true' && {panel(a)}.querySelector('.badge.offline')", 60, "line A stale and offline")
        assert br.evaluate(f"{panel(b)}.dataset.stale") == "false"
        assert br.evaluate(f"{panel(a)}.querySelector('.badge.stale-flag').textContent") == "stale"
        assert br.evaluate(f"{panel(a)}.querySelector('button[data-cmd=pause_batch]').disabled") is True
        shot(br, "7-controller-killed")

        # 8. broker frozen (SIGSTOP): Node-RED loses its connection -> banner; every line stale; back when it thaws
        broker.pause()
        try:
            br.wait_for("document.getElementById('banner-broker').classList.contains('on')", 90, "broker banner")
            br.wait_for(f"{panel(b)}.dataset.stale === 'true'", 30, "line B stale while the broker is frozen")
            shot(br, "8-broker-frozen", ((1280, 800), (1024, 768)))
        finally:
            broker.resume()
        br.wait_for("!document.getElementById('banner-broker').classList.contains('on')", 90, "banner gone after the broker thawed")
        br.wait_for(f"{panel(b)}.dataset.stale === 'false'", 60, "line B live again")
    except BaseException:
        if br is not None:
            br.screenshot(ARTIFACTS / "failure.png")
        if nr is not None:
            (ARTIFACTS / "node-red.log").write_text(nr.log()[-20000:])
        raise
    finally:
        if br is not None:
            br.close()
        for line in (a, b):
            line.close()
        if nr is not None:
            nr.stop()
        broker.close()
