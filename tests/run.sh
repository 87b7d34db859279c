#!/usr/bin/env bash
# The test command of the README: sets itself up on a fresh Debian/Ubuntu machine, runs the static checks (ruff,
# mypy --strict; a finding fails fast, before the 10-minute suite), then runs the whole suite.
#   - a virtualenv in .venv (created if missing) with linectl and its test extras installed
#   - mosquitto (the tests talk to a real broker), libdmtx, chromium, nodejs + npm and slapd (OpenLDAP, for the directory-login
#     tests, which start their own server) installed with apt-get when missing; Node-RED 4 from npm into build/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test,dmtx]'
# system packages the tests need: mosquitto (a real broker), libdmtx (the optional second DataMatrix decoder)
missing=()
command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || missing+=(mosquitto)
ldconfig -p 2>/dev/null | grep -q libdmtx || missing+=(libdmtx0b)
# Chromium: the dashboard test renders the shipped Node-RED page headless; Node-RED itself comes from npm (below)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
{ command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; } || missing+=(nodejs npm)
# OpenLDAP's server: tests/test_access_ldap.py runs its own slapd on a free port (the package's own service stays unused)
command -v slapd >/dev/null 2>&1 || [[ -x /usr/sbin/slapd ]] || missing+=(slapd)
if (( ${#missing[@]} )); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Node-RED 4 from npm into build/node-red, here rather than inside the dashboard test (cached; a first install may
# take minutes, which belong to the set-up, not to a test's time limit)
.venv/bin/python tests/dashboard/nodered.py || echo "Node-RED could not be installed: tests/test_dashboard.py will fail" >&2
.venv/bin/ruff check
tests/typecheck.sh
# one worker more than cores (at most 8): most tests wait on real processes, brokers and sockets, so with one worker
# per core the 2 cores stay ~40 % idle; three workers on 2 cores keep them busy (measured on the at-speed PLC-epoch,
# fault, daemon and store-owner tests: 256 s -> 193 s, all green) and the at-speed tests give their simulated lines
# room for that load. LINECTL_TEST_WORKERS overrides.
workers=${LINECTL_TEST_WORKERS:-$(( $(nproc) + 1 ))}
(( workers > 8 )) && workers=8
exec .venv/bin/python -m pytest -q -n "$workers" "$@"
