#!/usr/bin/env bash
# Install what building mysqlclient (a dependency in pyproject.toml: the C MySQL driver that
# `driver=mysqlclient` in a MySQL URL selects) needs from Debian: libmariadb's headers,
# pkg-config and a C compiler, unless already there. Idempotent; `make venv` and .ci/run call it.
set -euo pipefail

missing=()
dpkg -s libmariadb-dev >/dev/null 2>&1 || missing+=(libmariadb-dev)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v cc >/dev/null || missing+=(gcc)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
sudo=$(command -v sudo || true)
echo "installing ${missing[*]} (to build mysqlclient)"
if ! apt-cache show libmariadb-dev >/dev/null 2>&1; then
  $sudo apt-get update -q
fi
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
