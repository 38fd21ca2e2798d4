#!/usr/bin/env bash
# Install promtool (Debian's prometheus package), which tests/test_metrics.py runs on the
# server's /metrics output, unless it is already on PATH. Idempotent. The package would
# also start a Prometheus server (:9090) where an init system runs its service; on a
# machine without one (CI containers) nothing is started, which this checks.
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
