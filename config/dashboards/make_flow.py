"""Builds node-red-flow.json from page.html: the page is edited as HTML, the flow is what Node-RED imports.

Run `python config/dashboards/make_flow.py` after changing page.html or this file; tests/test_dashboard.py fails when
the shipped JSON is not the one this script writes. Core Node-RED nodes only: nothing to install in Node-RED.

Who presses a button: on a line with `access:` linectl wants every command from a verified user. The operator logs
in on the page; the flow sends `<root>/cmd/login` for every line it shows (each line has its own users) with an
MQTT 5 ResponseTopic only Node-RED reads, and keeps the returned tokens in its own memory, per dashboard session.
A dashboard session is a random id the page draws with the browser's crypto and keeps in sessionStorage (one per
tab, gone when the tab closes) and sends as the X-Linectl-Session header: so two panels never share an operator, the
token never reaches a browser, and a cross-site form cannot send commands (it cannot set that header). Commands then
carry `auth: {token}` and no actor (linectl sets it); a line without `access:` refuses the login as `unsupported`
and its commands go without auth, as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

TAB = "lc.tab"
#: where linectl answers this dashboard's commands (MQTT 5 ResponseTopic): the broker's ACL lets only Node-RED read
#: it, since a login reply carries a session token. Outside every linectl topic root (the bridge refuses those).
REPLY_TOPIC = "linectl-dashboard/node-red/reply"
#: the MQTT 5 user property `origin` of every command (the session tokens are bound to it; mqtt.authorized_origins)
ORIGIN = "node-red-dashboard"
#: a dashboard session no page has polled for this long is logged out at its lines and forgotten
SESSION_IDLE_S = 900
#: a command without an answer for this long is shown as unanswered
PENDING_S = 60
MAX_SESSIONS = 200

# shared by the function nodes that take commands from the page (pasted in: function nodes share no code)
SESSION_JS = f"""const SID_RE = /^[0-9a-f]{{32}}$/;
const sid = String((msg.req && msg.req.headers && msg.req.headers['x-linectl-session']) || '');
const sessions = flow.get('sessions') || {{}};
const pending = flow.get('pending') || {{}};
const refuse = (code, text) => {{ msg.statusCode = code; msg.payload = {{ok: false, error: text}}; return [null, msg]; }};
const newId = () => 'nr-' + Date.now().toString(36) + '-' + Math.random().toString(36).slice(2, 10);
const command = (root, name, body) => ({{topic: root + '/cmd/' + name, payload: JSON.stringify(body), qos: 1, retain: false,
  responseTopic: '{REPLY_TOPIC}', userProperties: {{origin: '{ORIGIN}'}}}});
function session() {{
  // the page's own id (sessionStorage): created here on its first command or login, bounded in number
  let s = sessions[sid];
  if (!s) {{
    const ids = Object.keys(sessions);
    if (ids.length >= {MAX_SESSIONS}) {{
      const idle = ids.filter(i => !Object.values(sessions[i].lines).some(x => x.token)).sort((a, b) => sessions[a].seen - sessions[b].seen);
      if (!idle.length) return null;
      delete sessions[idle[0]];
    }}
    s = sessions[sid] = {{lines: {{}}, replies: {{}}, seen: Date.now()}};
  }}
  s.seen = Date.now();
  return s;
}}"""

STATE_FN = """// retained <root>/state: the line's whole picture. Its data age is measured on Node-RED's clock from the arrival of
// the last *live* message (the mqtt-in has "retain as published" off, so only the broker's stored copy, sent when
// Node-RED subscribes, has msg.retain): neither the line PC's clock nor the browser's enters it
const root = msg.topic.replace(/\\/state$/, '');
const lines = flow.get('lines') || {};
if (msg.payload === '' || msg.payload === null) { delete lines[root]; flow.set('lines', lines); return null; }
if (typeof msg.payload !== 'object') { node.warn('state on ' + msg.topic + ' is not JSON'); return null; }
const l = lines[root] || {};
l.state = msg.payload;
if (!msg.retain) l.received_ms = Date.now();   // a stored copy says nothing about how old it is: the age stays as it was
else if (l.received_ms === undefined) l.received_ms = null;
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

API_FN = """// GET linectl/api/lines: everything the page renders, one JSON. age_s: seconds since the line's last live state
// arrived here (null: only the broker's stored copy so far); `me`: this page's session (who is signed in where,
// the answers to its commands), never a token
const now = Date.now();
const lines = flow.get('lines') || {};
const out = {};
for (const root of Object.keys(lines)) {
  const l = lines[root];
  out[root] = {state: l.state || null, availability: l.availability || null, age_s: l.received_ms ? (now - l.received_ms) / 1000 : null};
}
const me = {lines: {}, replies: {}};
const sid = String((msg.req && msg.req.headers && msg.req.headers['x-linectl-session']) || '');
const sessions = flow.get('sessions') || {};
const s = /^[0-9a-f]{32}$/.test(sid) ? sessions[sid] : undefined;
if (s) {
  s.seen = now;
  for (const root of Object.keys(s.lines)) {
    const x = s.lines[root];
    me.lines[root] = {signed_in: !!x.token, username: x.username || null, roles: x.roles || [], expires_at: x.expires_at || null,
                      pending: !!x.pending, access_off: !!x.access_off, error: x.error || null, message: x.message || null};
  }
  me.replies = s.replies;
}
msg.payload = {broker: flow.get('broker') || {connected: false, text: 'not connected yet'}, lines: out, me: me};
msg.headers = {'Cache-Control': 'no-store'};
return msg;"""

CMD_FN = SESSION_JS + """
// POST linectl/api/cmd {line, name, alarm_id?, reason?}: only the commands an operator may give from here, sent on
// linectl's normal command path (<root>/cmd/<name>, QoS 1, a fresh command_id) and audited by linectl. With this
// page's token for the line: auth {token}, no actor (linectl names the user). Without: no auth, which a line with
// access refuses (unauthenticated, shown to the operator) and a line without access takes as before
const ALLOWED = ['ack_alarm', 'pause_batch', 'resume_batch', 'stop_batch'];
const b = (typeof msg.payload === 'object' && msg.payload) || {};
const lines = flow.get('lines') || {};
if (ALLOWED.indexOf(b.name) < 0) return refuse(400, 'command not allowed from the dashboard: ' + b.name);
if (typeof b.line !== 'string' || !lines[b.line]) return refuse(400, 'unknown line: ' + b.line);
if (!SID_RE.test(sid)) return refuse(400, 'no dashboard session: reload the page');
if (!(flow.get('broker') || {}).connected) return refuse(503, 'Node-RED is not connected to the broker: command not sent');
const s = session();
if (!s) return refuse(503, 'too many dashboard sessions signed in: command not sent');
const id = newId();
const body = {name: b.name, command_id: id};
const mine = s.lines[b.line] || {};
if (mine.token) {
  body.auth = {token: mine.token};
} else {
  let user = 'dashboard';
  const basic = (msg.req && msg.req.headers && msg.req.headers.authorization) || '';
  if (basic.startsWith('Basic ')) { user = 'dashboard:' + Buffer.from(basic.slice(6), 'base64').toString().split(':')[0]; }
  body.actor = user.slice(0, 128);
}
if (b.name === 'ack_alarm' && typeof b.alarm_id === 'string' && b.alarm_id) body.alarm_id = b.alarm_id;
if (b.name === 'stop_batch') body.reason = String(b.reason || 'stopped from the dashboard').slice(0, 200);
pending[id] = {sid: sid, line: b.line, name: b.name, at: Date.now(), token: !!mine.token};
s.replies[b.line] = {command_id: id, name: b.name, sent_at: new Date().toISOString(), reply: null};
flow.set('pending', pending); flow.set('sessions', sessions);
msg.payload = {ok: true, command_id: id};
return [command(b.line, b.name, body), msg];"""

LOGIN_FN = SESSION_JS + """
// POST linectl/api/login {username, password}: cmd/login to every line shown where this page is not signed in yet
// (each line checks its own users); the tokens come back on the private reply topic and stay in this flow
const b = (typeof msg.payload === 'object' && msg.payload) || {};
if (!SID_RE.test(sid)) return refuse(400, 'no dashboard session: reload the page');
if (typeof b.username !== 'string' || !b.username || b.username.length > 128) return refuse(400, 'user name missing');
if (typeof b.password !== 'string' || !b.password || b.password.length > 1024) return refuse(400, 'password missing');
if (!(flow.get('broker') || {}).connected) return refuse(503, 'Node-RED is not connected to the broker: cannot log in');
const roots = Object.keys(flow.get('lines') || {});
if (!roots.length) return refuse(409, 'no line to log in to yet');
const s = session();
if (!s) return refuse(503, 'too many dashboard sessions signed in');
const other = Object.values(s.lines).find(x => x.token && x.username !== b.username);
if (other) return refuse(409, 'signed in as ' + other.username + ': log out first');
const out = [];
for (const root of roots) {
  if (s.lines[root] && (s.lines[root].token || s.lines[root].access_off)) continue;
  const id = newId();
  pending[id] = {sid: sid, line: root, name: 'login', at: Date.now()};
  s.lines[root] = {pending: true, username: b.username};
  out.push(command(root, 'login', {name: 'login', command_id: id, username: b.username, password: b.password}));
}
flow.set('pending', pending); flow.set('sessions', sessions);
msg.payload = {ok: true, sent: out.length};
return [out, msg];"""

LOGOUT_FN = SESSION_JS + """
// POST linectl/api/logout: every token of this page revoked at its line (cmd/logout) and forgotten here at once
if (!SID_RE.test(sid)) return refuse(400, 'no dashboard session');
const s = sessions[sid];
const out = [];
if (s) {
  for (const root of Object.keys(s.lines)) {
    const x = s.lines[root];
    if (!x.token) continue;
    const id = newId();
    pending[id] = {sid: sid, line: root, name: 'logout', at: Date.now()};
    out.push(command(root, 'logout', {name: 'logout', command_id: id, auth: {token: x.token}}));
  }
  delete sessions[sid];
}
flow.set('pending', pending); flow.set('sessions', sessions);
msg.payload = {ok: true, closed: out.length};
return [out, msg];"""

REPLY_FN = """// linectl's answers to this dashboard's commands, on its private reply topic, matched by command_id. A login's token
// is kept for its page's session (never passed on); a token the line no longer takes is dropped
const r = msg.payload;
if (typeof r !== 'object' || !r || typeof r.command_id !== 'string') return null;
const pending = flow.get('pending') || {};
const p = pending[r.command_id];
if (!p) return null;
delete pending[r.command_id];
flow.set('pending', pending);
const sessions = flow.get('sessions') || {};
const s = sessions[p.sid];
const err = r.ok ? {} : (r.error || {});
const result = r.result || {};
if (p.name === 'login') {
  if (r.ok && typeof result.token === 'string') {
    if (!s || !s.lines[p.line] || !s.lines[p.line].pending) {  // the page logged out meanwhile: close this session too
      return {topic: p.line + '/cmd/logout', payload: JSON.stringify({name: 'logout', command_id: 'nr-orphan-' + Date.now().toString(36), auth: {token: result.token}}),
              qos: 1, retain: false, responseTopic: '@REPLY@', userProperties: {origin: '@ORIGIN@'}};
    }
    s.lines[p.line] = {token: result.token, username: result.username, roles: result.roles || [], expires_at: result.expires_at || null};
  } else if (s) {
    s.lines[p.line] = err.code === 'unsupported' ? {access_off: true} : {error: err.code || 'refused', message: err.message || ''};
  }
} else if (p.name !== 'logout' && s) {
  s.replies[p.line] = {command_id: r.command_id, name: p.name, reply: {ok: !!r.ok, code: err.code || null, message: err.message || null}};
  const gone = ['token_expired', 'token_revoked', 'token_client_mismatch', 'locked', 'deactivated', 'password_expired'];
  if (!r.ok && p.token && (gone.indexOf(err.code) >= 0 || err.code === 'unauthenticated')) {
    s.lines[p.line] = {error: err.code, message: err.message || ''};
  } else if (r.ok && !p.token && !(s.lines[p.line] || {}).token) {
    s.lines[p.line] = {access_off: true};  // the line executed an anonymous command: it has no access control
  }
}
if (s) flow.set('sessions', sessions);
return null;""".replace("@REPLY@", REPLY_TOPIC).replace("@ORIGIN@", ORIGIN)

PRUNE_FN = f"""// every minute: commands unanswered for {PENDING_S} s are marked so; a session no page polled for {SESSION_IDLE_S} s
// (its tab closed) is logged out at its lines and forgotten
const now = Date.now();
const pending = flow.get('pending') || {{}};
const sessions = flow.get('sessions') || {{}};
for (const id of Object.keys(pending)) {{
  const p = pending[id];
  if (now - p.at < {PENDING_S * 1000}) continue;
  delete pending[id];
  const s = sessions[p.sid];
  if (!s) continue;
  if (p.name === 'login' && s.lines[p.line] && s.lines[p.line].pending) s.lines[p.line] = {{error: 'no_reply', message: 'the line did not answer the login'}};
  else if (s.replies[p.line] && s.replies[p.line].command_id === id) s.replies[p.line].reply = {{ok: false, code: 'no_reply', message: 'no answer from the line within {PENDING_S} s'}};
}}
const out = [];
for (const sid of Object.keys(sessions)) {{
  const s = sessions[sid];
  if (now - s.seen < {SESSION_IDLE_S * 1000}) continue;
  for (const root of Object.keys(s.lines)) {{
    if (!s.lines[root].token) continue;
    out.push({{topic: root + '/cmd/logout', payload: JSON.stringify({{name: 'logout', command_id: 'nr-idle-' + now.toString(36) + out.length, auth: {{token: s.lines[root].token}}}}),
              qos: 1, retain: false, responseTopic: '{REPLY_TOPIC}', userProperties: {{origin: '{ORIGIN}'}}}});
  }}
  delete sessions[sid];
}}
flow.set('pending', pending); flow.set('sessions', sessions);
return [out];"""


def fn(nid: str, name: str, func: str, x: int, y: int, wires: list[list[str]], outputs: int = 1) -> dict[str, Any]:
    return {"id": nid, "type": "function", "z": TAB, "name": name, "func": func, "outputs": outputs, "timeout": 0, "noerr": 0,
            "initialize": "", "finalize": "", "libs": [], "x": x, "y": y, "wires": wires}


def mqtt_in(nid: str, name: str, topic: str, datatype: str, x: int, y: int, wires: list[list[str]], *, rap: bool = True) -> dict[str, Any]:
    return {"id": nid, "type": "mqtt in", "z": TAB, "name": name, "topic": topic, "qos": "1", "datatype": datatype, "broker": "lc.broker",
            "nl": False, "rap": rap, "rh": 0, "inputs": 0, "x": x, "y": y, "wires": wires}


def http_in(nid: str, url: str, method: str, x: int, y: int, wires: list[list[str]]) -> dict[str, Any]:
    return {"id": nid, "type": "http in", "z": TAB, "name": "", "url": url, "method": method, "upload": False, "swaggerDoc": "",
            "x": x, "y": y, "wires": wires}


def http_out(nid: str, x: int, y: int) -> dict[str, Any]:
    return {"id": nid, "type": "http response", "z": TAB, "name": "", "statusCode": "", "headers": {"cache-control": "no-store"},
            "x": x, "y": y, "wires": []}


def flow() -> list[dict[str, Any]]:
    page = (HERE / "page.html").read_text(encoding="utf-8")
    return [
        {"id": TAB, "type": "tab", "label": "linectl lines", "disabled": False,
         "info": "Operators' view of every linectl line on the broker: http://<node-red>:1880/linectl\n"
                 "Reads the retained <root>/state and <root>/status of lines whose topic root has four levels "
                 "(<enterprise>/<site>/<area>/<line>, linectl's default); change the mqtt-in topics for another depth.\n"
                 "Commands (ack, pause, resume, stop batch) go to <root>/cmd/<name> with MQTT 5 user property "
                 f"origin={ORIGIN}; on a line with access control they carry the token of the operator logged in on "
                 f"the page (cmd/login). linectl answers on {REPLY_TOPIC}: only Node-RED may read it (broker ACL).\n"
                 "Protect the page with httpNodeAuth (and https) in settings.js: README \"Operators' view: the dashboard\"."},
        {"id": "lc.broker", "type": "mqtt-broker", "name": "site broker", "broker": "127.0.0.1", "port": "1883", "clientid": "",
         "autoConnect": True, "usetls": False, "protocolVersion": "5", "keepalive": "10", "cleansession": True,
         "autoUnsubscribe": True, "birthTopic": "", "birthQos": "0", "birthPayload": "", "birthMsg": {}, "closeTopic": "", "closeQos": "0",
         "closePayload": "", "closeMsg": {}, "willTopic": "", "willQos": "0", "willPayload": "", "willMsg": {}, "userProps": "", "sessionExpiry": ""},
        mqtt_in("lc.in.state", "state (retained)", "+/+/+/+/state", "json", 150, 60, [["lc.fn.state"]], rap=False),
        mqtt_in("lc.in.status", "availability (retained)", "+/+/+/+/status", "utf8", 150, 120, [["lc.fn.status"]]),
        mqtt_in("lc.in.reply", "replies to this dashboard", REPLY_TOPIC, "json", 150, 180, [["lc.fn.reply"]]),
        fn("lc.fn.state", "line state", STATE_FN, 400, 60, [[]]),
        fn("lc.fn.status", "availability", STATUS_FN, 400, 120, [[]]),
        fn("lc.fn.reply", "command reply", REPLY_FN, 400, 180, [["lc.out.cmd"]]),
        {"id": "lc.st.link", "type": "status", "z": TAB, "name": "broker link", "scope": ["lc.in.state"], "x": 130, "y": 240, "wires": [["lc.fn.link"]]},
        fn("lc.fn.link", "broker connected?", LINK_FN, 400, 240, [[]]),
        http_in("lc.http.page", "/linectl", "get", 120, 320, [["lc.tpl.page"]]),
        {"id": "lc.tpl.page", "type": "template", "z": TAB, "name": "page", "field": "payload", "fieldType": "msg", "format": "html",
         "syntax": "plain", "template": page, "output": "str", "x": 400, "y": 320, "wires": [["lc.http.pageout"]]},
        {"id": "lc.http.pageout", "type": "http response", "z": TAB, "name": "", "statusCode": "",
         "headers": {"content-type": "text/html; charset=utf-8", "cache-control": "no-store"}, "x": 620, "y": 320, "wires": []},
        http_in("lc.http.api", "/linectl/api/lines", "get", 140, 380, [["lc.fn.api"]]),
        fn("lc.fn.api", "lines as JSON", API_FN, 400, 380, [["lc.http.apiout"]]),
        http_out("lc.http.apiout", 620, 380),
        http_in("lc.http.cmd", "/linectl/api/cmd", "post", 140, 440, [["lc.fn.cmd"]]),
        fn("lc.fn.cmd", "operator command", CMD_FN, 400, 440, [["lc.out.cmd"], ["lc.http.cmdout"]], outputs=2),
        http_out("lc.http.cmdout", 620, 460),
        http_in("lc.http.login", "/linectl/api/login", "post", 140, 500, [["lc.fn.login"]]),
        fn("lc.fn.login", "operator login", LOGIN_FN, 400, 500, [["lc.out.cmd"], ["lc.http.loginout"]], outputs=2),
        http_out("lc.http.loginout", 620, 520),
        http_in("lc.http.logout", "/linectl/api/logout", "post", 140, 560, [["lc.fn.logout"]]),
        fn("lc.fn.logout", "operator logout", LOGOUT_FN, 400, 560, [["lc.out.cmd"], ["lc.http.logoutout"]], outputs=2),
        http_out("lc.http.logoutout", 620, 580),
        {"id": "lc.inj.prune", "type": "inject", "z": TAB, "name": "every minute", "props": [], "repeat": "60", "crontab": "", "once": False,
         "onceDelay": 0.1, "topic": "", "x": 140, "y": 620, "wires": [["lc.fn.prune"]]},
        fn("lc.fn.prune", "idle sessions out", PRUNE_FN, 400, 620, [["lc.out.cmd"]]),
        {"id": "lc.out.cmd", "type": "mqtt out", "z": TAB, "name": "<root>/cmd/<name>", "topic": "", "qos": "1", "retain": "false",
         "respTopic": "", "contentType": "", "userProps": "", "correl": "", "expiry": "", "broker": "lc.broker", "x": 700, "y": 420, "wires": []},
    ]


def render() -> str:
    return json.dumps(flow(), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    (HERE / "node-red-flow.json").write_text(render(), encoding="utf-8")
