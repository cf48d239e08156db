#!/usr/bin/env bash
# Install the programs the tests drive beyond Python packages (`make test` runs this): headless
# Chromium for the dashboard's browser tests and promtool (Debian's `prometheus` package) for
# the metrics and alert-rule checks. Installed with apt-get when missing and this runs as root
# (CI is a fresh machine); otherwise the tests that need them skip (or fail under CI=true).
# Services in the packages are not started (policy-rc.d refuses every start during install).
set -uo pipefail

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v promtool >/dev/null || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "not installed (needs root and apt-get): ${missing[*]}" >&2
    exit 0
fi
echo "installing ${missing[*]}" >&2
policy=/usr/sbin/policy-rc.d
had_policy=0
[ -e "$policy" ] && had_policy=1
[ $had_policy = 1 ] || { printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; }
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || echo "apt-get install ${missing[*]} failed" >&2
[ $had_policy = 1 ] || rm -f "$policy"
exit 0
