#!/usr/bin/env bash
# Install what scripts/pg-cluster.sh and scripts/galera-cluster.sh need, from Debian, when
# it is missing: the PostgreSQL server binaries (initdb, pg_basebackup), and MariaDB's
# Galera provider with the rsync and socat its state transfers run. The failover tests
# (tests/test_database_replicas.py) skip, saying why, on a machine without them.
set -euo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v mariadbd >/dev/null || missing+=(mariadb-server)
[ -e /usr/lib/galera/libgalera_smm.so ] || missing+=(galera-4)
command -v rsync >/dev/null || missing+=(rsync)
command -v socat >/dev/null || missing+=(socat)
if [ ${#missing[@]} -eq 0 ]; then
  echo "cluster tools are installed"
  exit 0
fi
echo "installing ${missing[*]} (Debian)"
sudo=$(command -v sudo || true)
[ "$(id -u)" = 0 ] && sudo=
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
