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
from typing import Any

import pytest
from dashboard.browser import Browser
from dashboard.line import DemoLine
from dashboard.nodered import FLOW, NPM_TIMEOUT_S, PASSWORD, REPO, USER, NodeRed
from engine_helpers import TEST_PASSWORDS
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


def text(br: Browser, expr: str) -> str:
    return str(br.evaluate(f"({expr}).textContent"))


def shown_state(br: Browser, line: DemoLine) -> dict[str, Any]:
    """The state message as the page last fetched it from Node-RED (what it rendered from)."""
    return dict(br.evaluate(f"last.lines[{json.dumps(line.root)}].state"))


def log_in(br: Browser, user: str, password: str) -> None:
    """As an operator does it: the header's form, filled and submitted."""
    br.wait_for("!document.getElementById('login').classList.contains('hidden')", 10, "the login form")
    br.evaluate(f"document.getElementById('login-user').value = {json.dumps(user)}; document.getElementById('login-pw').value = {json.dumps(password)};"
                "document.querySelector('#login button[type=submit]').click()")


def click(br: Browser, expr: str) -> None:
    assert br.evaluate(f"({expr}).disabled") is False, f"{expr} is disabled"
    br.evaluate(f"({expr}).click()")


@pytest.mark.timeout(NPM_TIMEOUT_S + 300)  # above pyproject's 300 s: a first run may still install Node-RED from npm
def test_dashboard_scenarios(tmp_path: Path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in [*ARTIFACTS.glob("*.png"), *ARTIFACTS.glob("*.log")]:  # a screenshot is of this run or of none
        old.unlink()
    broker = Broker(tmp_path / "broker").start()
    nr: NodeRed | None = None
    br: Browser | None = None
    a = DemoLine(tmp_path / "lineA", broker.port, seed=5, access=True)  # access control on, as every shipped config
    b = DemoLine(tmp_path / "lineB", broker.port, seed=7)  # a line without `access:`: anonymous commands, as before
    op, op_pw = "operator", TEST_PASSWORDS["operator"]
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

        # 1. line running: green, not stale, local time, fits 1280x800 and 1024x768; nobody signed in yet
        br.wait_for(f"{panel(a)} && {panel(a)}.dataset.state === 'running' && {panel(a)}.dataset.stale === 'false'", 60, "line A running")
        assert color(br, f"{panel(a)}.querySelector('.badge.state')", "backgroundColor") == GREEN
        assert br.evaluate("document.getElementById('banner-broker').classList.contains('on')") is False
        shown = text(br, f"{panel(a)}.querySelector('.local-ts')")
        tokyo = br.evaluate("new Date().toLocaleString('en-US', {timeZone: 'Asia/Tokyo', hour: 'numeric', hour12: true}).replace(/ [AP]M/, '')")
        utc = br.evaluate("new Date().toLocaleString('en-US', {timeZone: 'UTC', hour: 'numeric', hour12: true}).replace(/ [AP]M/, '')")
        assert f" {tokyo}:" in shown and tokyo != utc, f"time not shown in the panel's local zone ({TZ}): {shown!r}"
        assert br.evaluate(f"!!{panel(a)}.querySelector('.who.not-signed-in')") is True
        assert text(br, f"{panel(a)}.querySelector('.packml')") == shown_state(br, a)["packml"]["State"] == "Execute"
        shot(br, "1-running", ((1280, 800), (1024, 768)))

        # 2. access control: a button pressed by nobody is refused by the line, and the page says why
        click(br, f"{panel(a)}.querySelector('button[data-cmd=pause_batch]')")
        br.wait_for(f"{panel(a)}.querySelector('.cmdres[data-code=unauthenticated]')", 20, "anonymous Pause refused: unauthenticated")
        assert "pause_batch: refused – unauthenticated" in text(br, f"{panel(a)}.querySelector('.cmdres')")
        assert br.evaluate(f"{panel(a)}.dataset.state") == "running"
        log_in(br, op, "not-the-password-1")
        br.wait_for(f"{panel(a)}.querySelector('.who.refused[data-code=wrong_password]')", 20, "wrong password refused by the line")
        log_in(br, op, op_pw)
        br.wait_for(f"{panel(a)}.querySelector('.who.signed-in[data-user=operator]')", 20, "operator signed in on line A")
        assert text(br, "document.getElementById('who-name')") == f"Operator: {op}"
        assert br.evaluate("document.getElementById('login').classList.contains('hidden')") is True
        # the buttons now go through linectl's command path as that operator: pause (amber), resume (green), stop
        click(br, f"{panel(a)}.querySelector('button[data-cmd=pause_batch]')")
        br.wait_for(f"{panel(a)}.dataset.state === 'paused'", 30, "paused from the Pause button")
        assert color(br, f"{panel(a)}.querySelector('.badge.state')", "backgroundColor") == "rgb(249, 168, 37)"
        br.wait_for(f"{panel(a)}.querySelector('.cmdres') && {panel(a)}.querySelector('.cmdres').textContent === 'pause_batch: done'", 20, "reply shown")
        shot(br, "2-paused")
        click(br, f"{panel(a)}.querySelector('button[data-cmd=resume_batch]')")
        br.wait_for(f"{panel(a)}.dataset.state === 'running'", 30, "running again from the Resume button")
        # Stop asks for the reason in the page's own dialog (not window.prompt); the first-out names it
        click(br, f"{panel(a)}.querySelector('button[data-cmd=stop_batch]')")
        br.wait_for("!document.getElementById('stop-dlg').classList.contains('hidden')", 5, "stop dialog")
        br.evaluate("document.getElementById('stop-reason').value = 'end of shift test'; document.getElementById('stop-ok').click()")
        br.wait_for(f"{panel(a)}.dataset.state === 'stopped' && {panel(a)}.querySelector('.cmdres[data-code=ok]')", 30, "stopped from the Stop button")
        assert text(br, f"{panel(a)}.querySelector('.cmdres')") == "stop_batch: done"
        assert br.evaluate(f"{panel(a)}.querySelector('.reason').dataset.code") == "stop"
        assert "end of shift test" in text(br, f"{panel(a)}.querySelector('.reason')")
        a.batch_ok("start")  # started again from the CLI (signed) for the next scenarios
        br.wait_for(f"{panel(a)}.dataset.state === 'running'", 30, "running again")

        # 3. e-stop on the running line: the first-out is the e-stop, in red, with PackML's state
        a.sim_cmd(cmd="set", device="plc1", tags={"estop": True})
        br.wait_for(f"{panel(a)}.querySelector('tr[data-code=estop]') && {panel(a)}.dataset.severity === 'fault' && {panel(a)}.querySelector('.reason')",
                    60, "estop alarm, fault colour, first-out")
        st = shown_state(br, a)
        assert st["stop_reason"]["code"] == "estop", st["stop_reason"]
        assert br.evaluate(f"{panel(a)}.querySelector('.reason').dataset.code") == "estop"
        assert text(br, f"{panel(a)}.querySelector('.reason')").startswith(st["stop_reason"]["message"])
        assert text(br, f"{panel(a)}.querySelector('.packml')") == st["packml"]["State"] != "Execute"
        assert color(br, f"{panel(a)}.querySelector('tr[data-code=estop] td')", "backgroundColor") == RED
        assert color(br, panel(a), "borderLeftColor") == RED
        # rejects by reason, as the state counts them (the simulated line makes defects at 3 %)
        rejects = {k: v for k, v in st["batch"]["rejected_by_reason"].items() if v}  # seed 5: a few by now (4 in every run seen)
        assert text(br, f"{panel(a)}.querySelector('.batch-rejects')") == (", ".join(f"{k} {v}" for k, v in sorted(rejects.items())) or "none")
        shot(br, "3-estop", ((1280, 800), (1024, 768)))
        a.sim_cmd(cmd="set", device="plc1", tags={"estop": False})
        # acknowledged from its own button by the signed-in operator: the row says who
        click(br, f"{panel(a)}.querySelector('tr[data-code=estop] button.ack')")
        br.wait_for(f"{panel(a)}.querySelector('tr[data-code=estop] .acked-by')", 30, "estop acknowledged")
        assert text(br, f"{panel(a)}.querySelector('tr[data-code=estop] .acked-by')") == f"ack {op}@mqtt:node-red-dashboard"
        a.batch_ok("reset")
        a.batch_ok("start")  # an e-stop stops the batch: started again (signed, as access.signatures asks)
        br.wait_for(f"{panel(a)}.dataset.state === 'running' && !{panel(a)}.querySelector('tr[data-code=estop]')", 30, "running after reset")

        # 4. a fault: the printer refuses a job; the alarm in red, the line in the fault colour; the printer's health
        a.sim_cmd(cmd="inject", device="coder1", fault="nak", code="07", count=1)
        br.wait_for(f"{panel(a)}.querySelector('tr[data-code=printer_error]') && {panel(a)}.dataset.severity === 'fault'", 60, "printer_error, fault")
        assert text(br, f"{panel(a)}.querySelector('tr[data-code=printer_error] td')") == "critical"
        assert color(br, f"{panel(a)}.querySelector('tr[data-code=printer_error] td')", "backgroundColor") == RED
        assert color(br, f"{panel(a)}.querySelector('.badge.fault')", "backgroundColor") == RED
        a.sim_cmd(cmd="inject", device="coder1", fault="fault", code="202")
        br.wait_for(f"{panel(a)}.querySelector('.devs [data-device=coder1]:not(.dev-ok)')", 30, "printer health bad")
        dev = shown_state(br, a)["devices"]["coder1"]
        assert dev["state"] != "connected" and dev["reason"], dev
        assert text(br, f"{panel(a)}.querySelector('.devs [data-device=coder1]')") == f"coder1: {dev['state']} – {dev['reason']}"
        shot(br, "4-fault", ((1280, 800), (1024, 768)))
        a.sim_cmd(cmd="inject", device="coder1", fault="clear_fault")

        # 5. Node-RED restarted: the page says the server is gone, then shows the alarm list again (retained state);
        # the operator's session was in Node-RED's memory: signed out
        nr.stop()
        br.wait_for("document.getElementById('banner-server').classList.contains('on')", 20, "server-unreachable banner")
        assert br.evaluate(f"Array.from({panel(a)}.querySelectorAll('button')).every(b => b.disabled)") is True
        nr.start()
        br.goto(nr.url)
        br.wait_for(f"{panel(a)} && {panel(a)}.querySelector('tr[data-code=printer_error]')", 60, "alarm list after Node-RED restart")
        assert br.evaluate(f"!!{panel(a)}.querySelector('.who.not-signed-in')") is True
        shot(br, "5-node-red-restarted")

        # 6. signed in again (the session was in Node-RED's memory)
        log_in(br, op, op_pw)
        br.wait_for(f"{panel(a)}.querySelector('.who.signed-in[data-user=operator]')", 30, "signed in again")

        # 7. two lines: one panel each, both fit the small panel; the line without access takes anonymous commands
        b.start()
        br.wait_for(f"{panel(b)} && {panel(b)}.dataset.stale === 'false' && document.querySelectorAll('section.panel').length === 2", 60, "second line")
        click(br, f"{panel(b)}.querySelector('button[data-cmd=ack_alarm]')")
        br.wait_for(f"{panel(b)}.querySelector('.cmdres[data-code=ok]') && {panel(b)}.querySelector('.who.access-off')", 20,
                    "anonymous Ack all taken by the line without access")
        shot(br, "6-two-lines", ((1280, 800), (1024, 768)))
        # logged out: the tokens revoked, the form back, nobody signed in on line A
        br.evaluate("document.getElementById('logout').click()")
        br.wait_for(f"{panel(a)}.querySelector('.who.not-signed-in') && !document.getElementById('login').classList.contains('hidden')", 20, "logged out")
        assert br.evaluate("document.getElementById('who').classList.contains('hidden')") is True
        # in line A's store: the last dashboard session (the second login) revoked by the operator; the one Node-RED
        # forgot in its restart is still open (it expires); everything done from the page is the operator's
        sessions = a.query("SELECT username, revoked_by FROM sessions WHERE client_id = 'node-red-dashboard' ORDER BY id")
        assert sessions == [(op, None), (op, op)], sessions
        done = [r for r in a.query("SELECT actor, action FROM audit WHERE origin = 'mqtt:node-red-dashboard' ORDER BY seq") if r[1] != "access_refused"]
        assert done == [(op, "session_opened"), (op, "pause_batch"), (op, "resume_batch"), (op, "stop_batch"), (op, "ack_alarm"),
                        (op, "session_opened"), (op, "session_closed")], done

        # 8. controller killed: line A stale and offline (Last Will), every button on it disabled; line B still live
        a.kill_daemon()
        br.wait_for(f"{panel(a)}.dataset.stale === 'true' && {panel(a)}.querySelector('.badge.offline')", 60, "line A stale and offline")
        assert br.evaluate(f"{panel(b)}.dataset.stale") == "false"
        assert text(br, f"{panel(a)}.querySelector('.badge.stale-flag')") == "stale"
        assert br.evaluate(f"{panel(a)}.querySelectorAll('button.ack').length") >= 1
        assert br.evaluate(f"Array.from({panel(a)}.querySelectorAll('button')).every(b => b.disabled)") is True
        assert br.evaluate(f"{panel(b)}.querySelector('button[data-cmd=pause_batch]').disabled") is False
        shot(br, "7-controller-killed")

        # 9. broker frozen (SIGSTOP): Node-RED loses its connection -> banner; every line stale, no button enabled
        broker.pause()
        try:
            br.wait_for("document.getElementById('banner-broker').classList.contains('on')", 90, "broker banner")
            br.wait_for(f"{panel(b)}.dataset.stale === 'true'", 30, "line B stale while the broker is frozen")
            assert br.evaluate("Array.from(document.querySelectorAll('section.panel button')).every(b => b.disabled)") is True
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
