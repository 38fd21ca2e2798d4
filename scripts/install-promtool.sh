#!/usr/bin/env bash
# Install promtool (Debian's prometheus package), which tests/test_metrics.py runs on the
# server's /metrics output, unless it is already on PATH. Idempotent.
#
# The package's postinst asks invoke-rc.d to start a Prometheus server on :9090. Where no
# init system runs (the CI and development containers: no systemd, and policy-rc.d denies
# service starts) nothing is started; checked with `ss -ltn` after installing. The suite
# binds only port 0 (free ports) in any case.
set -euo pipefail

if command -v promtool >/dev/null; then
  exit 0
fi
sudo=$(command -v sudo || true)
echo "installing promtool (Debian: prometheus)"
if ! apt-cache show prometheus >/dev/null 2>&1; then
  $sudo apt-get update -q
fi
$sudo apt-get install -y -q --no-install-recommends prometheus
command -v promtool >/dev/null || { echo "error: promtool is still missing" >&2; exit 1; }
