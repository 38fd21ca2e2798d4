#!/usr/bin/env bash
# A local PostgreSQL primary with streaming standbys on free loopback ports, for the
# failover tests (tests/test_database_replicas.py) and for trying replicas by hand.
#
#   scripts/pg-cluster.sh start DIR [STANDBYS]   initdb a primary, pg_basebackup STANDBYS
#                                                (default 2) standbys of it, start them all
#   scripts/pg-cluster.sh promote DIR NAME       promote standby NAME (s1, s2...) and point
#                                                the other standbys at it
#   scripts/pg-cluster.sh stop DIR               stop every server of DIR by its PID
#
# Everything lives under DIR (created; its parents must be searchable by the postgres
# user). `start` prints and writes DIR/cluster.env: PG_PRIMARY_PORT, PG_STANDBY_PORTS
# (space separated) and PG_PIDS (name=pid ...). The servers trust every local user
# (no passwords: a test cluster) and run as the postgres user when started by root,
# since PostgreSQL refuses to run as root. fsync is off: a killed server loses nothing
# the OS had, and nothing survives the tests anyway.
set -euo pipefail

usage() { sed -n '2,16p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
command=$1
dir=$(realpath -m "$2")

bindir=$(pg_config --bindir 2>/dev/null || true)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then  # Debian keeps them per version
  bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
fi
[ -n "$bindir" ] && [ -x "$bindir/initdb" ] \
  || { echo "error: PostgreSQL server binaries (initdb) not found" >&2; exit 3; }

# shellcheck source=scripts/cluster-lib.sh
. "$(dirname "$0")/cluster-lib.sh"
as_postgres() { as_user postgres "$@"; }

server_pid() {  # server_pid NAME: the postmaster's PID, or nothing
  local file=$dir/$1/postmaster.pid
  [ -f "$file" ] && head -n 1 "$file" || true
}

write_env() {
  local pids=()
  for data in "$dir"/p0 "$dir"/s*; do
    [ -d "$data" ] || continue
    pids+=("$(basename "$data")=$(server_pid "$(basename "$data")")")
  done
  {
    echo "PG_PRIMARY_PORT=$primary_port"
    echo "PG_STANDBY_PORTS=\"${standby_ports[*]}\""
    echo "PG_PIDS=\"${pids[*]}\""
  } >"$dir/cluster.env"
  cat "$dir/cluster.env"
}

configure() {  # configure NAME PORT: settings of one server, appended last so they win
  cat >>"$dir/$1/postgresql.conf" <<EOF
port = $2
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
fsync = off
full_page_writes = off
shared_buffers = 16MB
max_connections = 60
wal_level = replica
max_wal_senders = 8
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = 1s
wal_retrieve_retry_interval = 500ms
log_min_messages = warning
EOF
}

start_server() {  # start_server NAME
  as_postgres "$bindir/pg_ctl" -D "$dir/$1" -l "$dir/$1.log" -w -t 60 -o "-c logging_collector=off" start >/dev/null
}

case $command in
  start)
    standbys=${3:-2}
    if [ -e "$dir/p0" ]; then echo "error: $dir already holds a cluster" >&2; exit 1; fi
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    as_postgres test -w "$dir" \
      || { echo "error: $dir is not writable by postgres (are its parents searchable?)" >&2; exit 1; }
    primary_port=$(free_port)
    as_postgres "$bindir/initdb" -D "$dir/p0" -U postgres --auth=trust -N -E UTF8 --locale=C.UTF-8 >"$dir/p0.initdb.log"
    configure p0 "$primary_port"
    start_server p0
    as_postgres "$bindir/psql" -h 127.0.0.1 -p "$primary_port" -U postgres -qAt -c "CREATE DATABASE tasknode" postgres
    standby_ports=()
    for i in $(seq 1 "$standbys"); do standby_ports+=("$(free_port)"); done
    for i in $(seq 1 "$standbys"); do  # copied and started side by side
      (
        as_postgres "$bindir/pg_basebackup" -h 127.0.0.1 -p "$primary_port" -U postgres \
          -D "$dir/s$i" -c fast -X stream -R
        configure "s$i" "${standby_ports[$((i - 1))]}"
        start_server "s$i"
      ) &
    done
    for _ in $(seq 1 "$standbys"); do wait -n || { echo "error: a standby did not start" >&2; exit 1; }; done
    write_env
    ;;
  promote)
    [ $# -eq 3 ] || usage
    # shellcheck disable=SC1091
    . "$dir/cluster.env"
    read -r -a standby_ports <<<"$PG_STANDBY_PORTS"
    target=$3
    new_port=${standby_ports[$((${target#s} - 1))]}
    as_postgres "$bindir/pg_ctl" -D "$dir/$target" -w -t 60 promote >/dev/null
    for data in "$dir"/s*; do
      name=$(basename "$data")
      [ "$name" = "$target" ] && continue
      pid=$(server_pid "$name")
      [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || continue
      port=${standby_ports[$((${name#s} - 1))]}
      # A standby follows the new primary's timeline once pointed at it (recovery_target_timeline
      # is 'latest' by default); primary_conninfo takes effect on reload.
      as_postgres "$bindir/psql" -h 127.0.0.1 -p "$port" -U postgres -qAt \
        -c "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=$new_port user=postgres'" \
        -c "SELECT pg_reload_conf()" postgres >/dev/null
    done
    echo "promoted $target (127.0.0.1:$new_port)"
    ;;
  stop)
    for data in "$dir"/p0 "$dir"/s*; do
      [ -d "$data" ] || continue
      pid=$(server_pid "$(basename "$data")")
      [ -n "$pid" ] && kill -INT "$pid" 2>/dev/null || continue  # fast shutdown
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    done
    echo "stopped the servers of $dir"
    ;;
  *) usage ;;
esac
