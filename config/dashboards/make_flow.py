"""Builds node-red-flow.json from page.html: the page is edited as HTML, the flow is what Node-RED imports.

Run `python config/dashboards/make_flow.py` after changing page.html or this file; tests/test_dashboard.py fails when
the shipped JSON is not the one this script writes. Core Node-RED nodes only: nothing to install in Node-RED.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

TAB = "lc.tab"

STATE_FN = """// retained <root>/state: the line's whole picture; the page computes the data age from payload.ts
const root = msg.topic.replace(/\\/state$/, '');
const lines = flow.get('lines') || {};
const l = lines[root] || {};
if (msg.payload === '' || msg.payload === null) { delete lines[root]; flow.set('lines', lines); return null; }
if (typeof msg.payload !== 'object') { node.warn('state on ' + msg.topic + ' is not JSON'); return null; }
l.state = msg.payload;
l.received_at = new Date().toISOString();
lines[root] = l;
flow.set('lines', lines);
node.status({fill: 'green', shape: 'dot', text: Object.keys(lines).length + ' line(s)'});
return null;"""

STATUS_FN = """// retained <root>/status: "online" after every connect of the line, "offline" as its Last Will
const root = msg.topic.replace(/\\/status$/, '');
const lines = flow.get('lines') || {};
if (msg.payload === '') { if (lines[root]) { delete lines[root].availability; flow.set('lines', lines); } return null; }
const l = lines[root] || {};
l.availability = String(msg.payload);
l.availability_at = new Date().toISOString();
lines[root] = l;
flow.set('lines', lines);
return null;"""

LINK_FN = """// Node-RED's own MQTT connection, as the mqtt-in node shows it: green = connected; anything else = banner
const s = msg.status || {};
const connected = s.fill === 'green';
const prev = flow.get('broker') || {};
if (prev.connected !== connected) {
  flow.set('broker', {connected: connected, text: String(s.text || '').replace(/^node-red:common\\.status\\./, ''), since: new Date().toISOString()});
}
return null;"""

API_FN = """// GET linectl/api/lines: everything the page renders, one JSON
msg.payload = {now: new Date().toISOString(), broker: flow.get('broker') || {connected: false, text: 'not connected yet'}, lines: flow.get('lines') || {}};
msg.headers = {'Cache-Control': 'no-store'};
return msg;"""

CMD_FN = """// POST linectl/api/cmd {line, name, alarm_id?, reason?}: only the commands an operator may give from here,
// sent on linectl's normal command path (<root>/cmd/<name>, QoS 1, a fresh command_id) and audited by linectl
const ALLOWED = ['ack_alarm', 'pause_batch', 'resume_batch', 'stop_batch'];
const b = (typeof msg.payload === 'object' && msg.payload) || {};
const lines = flow.get('lines') || {};
const refuse = (code, text) => { msg.statusCode = code; msg.payload = {ok: false, error: text}; return [null, msg]; };
if (ALLOWED.indexOf(b.name) < 0) return refuse(400, 'command not allowed from the dashboard: ' + b.name);
if (typeof b.line !== 'string' || !lines[b.line]) return refuse(400, 'unknown line: ' + b.line);
const broker = flow.get('broker') || {};
if (!broker.connected) return refuse(503, 'Node-RED is not connected to the broker: command not sent');
let user = 'dashboard';
const auth = (msg.req && msg.req.headers && msg.req.headers.authorization) || '';
if (auth.startsWith('Basic ')) { user = 'dashboard:' + Buffer.from(auth.slice(6), 'base64').toString().split(':')[0]; }
const id = 'nr-' + Date.now().toString(36) + '-' + Math.random().toString(36).slice(2, 10);
const body = {name: b.name, command_id: id, actor: user.slice(0, 128)};
if (b.name === 'ack_alarm' && typeof b.alarm_id === 'string' && b.alarm_id) body.alarm_id = b.alarm_id;
if (b.name === 'stop_batch') body.reason = String(b.reason || 'stopped from the dashboard').slice(0, 200);
const l = lines[b.line];
l.last_reply = {command_id: id, name: b.name, sent_at: new Date().toISOString(), reply: null};
flow.set('lines', lines);
const out = {topic: b.line + '/cmd/' + b.name, payload: JSON.stringify(body), qos: 1, retain: false, userProperties: {origin: 'node-red-dashboard'}};
msg.payload = {ok: true, command_id: id};
return [out, msg];"""

REPLY_FN = """// <root>/cmd/<name>/reply: linectl's answer to a command this dashboard sent (matched by command_id)
const m = msg.topic.match(/^(.*)\\/cmd\\/[^/]+\\/reply$/);
if (!m || typeof msg.payload !== 'object' || !msg.payload) return null;
const lines = flow.get('lines') || {};
const l = lines[m[1]];
if (l && l.last_reply && l.last_reply.command_id === msg.payload.command_id) {
  l.last_reply.reply = msg.payload;
  flow.set('lines', lines);
}
return null;"""


def fn(nid: str, name: str, func: str, x: int, y: int, wires: list[list[str]], outputs: int = 1) -> dict[str, Any]:
    return {"id": nid, "type": "function", "z": TAB, "name": name, "func": func, "outputs": outputs, "timeout": 0, "noerr": 0,
            "initialize": "", "finalize": "", "libs": [], "x": x, "y": y, "wires": wires}


def mqtt_in(nid: str, name: str, topic: str, datatype: str, x: int, y: int, wires: list[list[str]]) -> dict[str, Any]:
    return {"id": nid, "type": "mqtt in", "z": TAB, "name": name, "topic": topic, "qos": "1", "datatype": datatype, "broker": "lc.broker",
            "nl": False, "rap": True, "rh": 0, "inputs": 0, "x": x, "y": y, "wires": wires}


def flow() -> list[dict[str, Any]]:
    page = (HERE / "page.html").read_text(encoding="utf-8")
    return [
        {"id": TAB, "type": "tab", "label": "linectl lines", "disabled": False,
         "info": "Operators' view of every linectl line on the broker: http://<node-red>:1880/linectl\n"
                 "Reads the retained <root>/state and <root>/status of lines whose topic root has four levels "
                 "(<enterprise>/<site>/<area>/<line>, linectl's default); change the mqtt-in topics for another depth.\n"
                 "Commands (ack, pause, resume, stop batch) go to <root>/cmd/<name> with MQTT 5 user property origin=node-red-dashboard.\n"
                 "Protect the page with httpNodeAuth (and https) in settings.js: README \"Operators' view: the dashboard\"."},
        {"id": "lc.broker", "type": "mqtt-broker", "name": "site broker", "broker": "127.0.0.1", "port": "1883", "clientid": "",
         "autoConnect": True, "usetls": False, "protocolVersion": "5", "keepalive": "10", "cleansession": True,
         "autoUnsubscribe": True, "birthTopic": "", "birthQos": "0", "birthPayload": "", "birthMsg": {}, "closeTopic": "", "closeQos": "0",
         "closePayload": "", "closeMsg": {}, "willTopic": "", "willQos": "0", "willPayload": "", "willMsg": {}, "userProps": "", "sessionExpiry": ""},
        mqtt_in("lc.in.state", "state (retained)", "+/+/+/+/state", "json", 150, 60, [["lc.fn.state"]]),
        mqtt_in("lc.in.status", "availability (retained)", "+/+/+/+/status", "utf8", 150, 120, [["lc.fn.status"]]),
        mqtt_in("lc.in.reply", "command replies", "+/+/+/+/cmd/+/reply", "json", 150, 180, [["lc.fn.reply"]]),
        fn("lc.fn.state", "line state", STATE_FN, 400, 60, [[]]),
        fn("lc.fn.status", "availability", STATUS_FN, 400, 120, [[]]),
        fn("lc.fn.reply", "command reply", REPLY_FN, 400, 180, [[]]),
        {"id": "lc.st.link", "type": "status", "z": TAB, "name": "broker link", "scope": ["lc.in.state"], "x": 130, "y": 240, "wires": [["lc.fn.link"]]},
        fn("lc.fn.link", "broker connected?", LINK_FN, 400, 240, [[]]),
        {"id": "lc.http.page", "type": "http in", "z": TAB, "name": "", "url": "/linectl", "method": "get", "upload": False, "swaggerDoc": "",
         "x": 120, "y": 320, "wires": [["lc.tpl.page"]]},
        {"id": "lc.tpl.page", "type": "template", "z": TAB, "name": "page", "field": "payload", "fieldType": "msg", "format": "html",
         "syntax": "plain", "template": page, "output": "str", "x": 400, "y": 320, "wires": [["lc.http.pageout"]]},
        {"id": "lc.http.pageout", "type": "http response", "z": TAB, "name": "", "statusCode": "",
         "headers": {"content-type": "text/html; charset=utf-8", "cache-control": "no-store"}, "x": 620, "y": 320, "wires": []},
        {"id": "lc.http.api", "type": "http in", "z": TAB, "name": "", "url": "/linectl/api/lines", "method": "get", "upload": False,
         "swaggerDoc": "", "x": 140, "y": 380, "wires": [["lc.fn.api"]]},
        fn("lc.fn.api", "lines as JSON", API_FN, 400, 380, [["lc.http.apiout"]]),
        {"id": "lc.http.apiout", "type": "http response", "z": TAB, "name": "", "statusCode": "", "headers": {}, "x": 620, "y": 380, "wires": []},
        {"id": "lc.http.cmd", "type": "http in", "z": TAB, "name": "", "url": "/linectl/api/cmd", "method": "post", "upload": False,
         "swaggerDoc": "", "x": 140, "y": 440, "wires": [["lc.fn.cmd"]]},
        fn("lc.fn.cmd", "operator command", CMD_FN, 400, 440, [["lc.out.cmd"], ["lc.http.cmdout"]], outputs=2),
        {"id": "lc.out.cmd", "type": "mqtt out", "z": TAB, "name": "<root>/cmd/<name>", "topic": "", "qos": "1", "retain": "false",
         "respTopic": "", "contentType": "", "userProps": "", "correl": "", "expiry": "", "broker": "lc.broker", "x": 640, "y": 420, "wires": []},
        {"id": "lc.http.cmdout", "type": "http response", "z": TAB, "name": "", "statusCode": "", "headers": {}, "x": 620, "y": 460, "wires": []},
    ]


def render() -> str:
    return json.dumps(flow(), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    (HERE / "node-red-flow.json").write_text(render(), encoding="utf-8")
