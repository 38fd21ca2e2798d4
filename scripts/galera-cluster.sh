#!/usr/bin/env bash
# A local MariaDB Galera cluster on free loopback ports, for the failover tests
# (tests/test_database_replicas.py) and for trying replicas by hand.
#
#   scripts/galera-cluster.sh start DIR [NODES]   bootstrap node n1, join NODES (default 3)
#                                                 in all by state transfer (rsync)
#   scripts/galera-cluster.sh stop DIR            stop every node of DIR by its PID
#
# Everything lives under DIR (created; its parents must be searchable by the mysql
# user). `start` prints and writes DIR/cluster.env: GALERA_PORTS (the nodes' SQL ports,
# space separated) and GALERA_PIDS (name=pid ...). User root has no password on
# 127.0.0.1 (a test cluster); database `tasknode` exists. Started by root, the servers
# run as the mysql user: a state transfer fails when they run as root.
set -euo pipefail

usage() { sed -n '2,13p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
command=$1
dir=$(realpath -m "$2")
provider=${GALERA_PROVIDER:-/usr/lib/galera/libgalera_smm.so}

# shellcheck source=scripts/cluster-lib.sh
. "$(dirname "$0")/cluster-lib.sh"
as_mysql() { as_user mysql "$@"; }

node_pid() {  # node_pid NAME: the server's PID, or nothing
  local file=$dir/$1.pid
  [ -f "$file" ] && cat "$file" || true
}

sql() {  # sql NAME STATEMENT...: run statements on a node through its socket, as root
  local name=$1; shift
  mariadb --no-defaults --socket="$dir/$name.sock" -uroot -NBe "$*"
}

wait_synced() {  # wait_synced NAME: until the node is a synced member of the cluster
  local name=$1 pid
  for _ in $(seq 1 240); do
    pid=$(node_pid "$name")
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      echo "error: node $name exited; see $dir/$name.err" >&2; tail -n 20 "$dir/$name.err" >&2; return 1
    fi
    if [ "$(sql "$name" "SHOW STATUS LIKE 'wsrep_local_state_comment'" 2>/dev/null | cut -f2)" = Synced ]; then
      return 0
    fi
    sleep 0.25
  done
  echo "error: node $name did not sync in 60 s; see $dir/$name.err" >&2
  return 1
}

configure() {  # configure NAME SQL_PORT GCOMM_PORT IST_PORT SST_PORT CLUSTER_ADDRESS
  cat >"$dir/$1.cnf" <<EOF
[mysqld]
datadir=$dir/$1
socket=$dir/$1.sock
pid-file=$dir/$1.pid
log-error=$dir/$1.err
port=$2
bind-address=127.0.0.1
skip-name-resolve
skip-log-bin
binlog_format=ROW
default_storage_engine=InnoDB
innodb_autoinc_lock_mode=2
innodb_buffer_pool_size=32M
innodb_log_file_size=16M
innodb_flush_log_at_trx_commit=0
max_connections=100
wsrep_on=ON
wsrep_provider=$provider
wsrep_cluster_name=tasknode-$(basename "$dir")
wsrep_cluster_address=$6
wsrep_node_name=$1
wsrep_node_address=127.0.0.1:$3
wsrep_node_incoming_address=127.0.0.1:$2
wsrep_sst_method=rsync
wsrep_sst_receive_address=127.0.0.1:$5
# A node silent for evs.suspect_timeout (the default, 5 s) is suspected and, by the others'
# agreement, evicted; until then the others wait on it for writes and for causal reads
# (wsrep_sync_wait). Shorter makes a busy machine's nodes suspect one another.
wsrep_provider_options="gmcast.listen_addr=tcp://127.0.0.1:$3;ist.recv_addr=127.0.0.1:$4;evs.suspect_timeout=PT5S;evs.inactive_timeout=PT10S;gcache.size=32M"
EOF
}

start_node() {  # start_node NAME [--wsrep-new-cluster]: in the background; writes its PID file
  local name=$1; shift
  mkdir -p "$dir/$name"
  [ "$(id -u)" = 0 ] && chown mysql: "$dir/$name"
  as_mysql mariadbd --defaults-file="$dir/$name.cnf" "$@" </dev/null >>"$dir/$name.out" 2>&1 &
}

case $command in
  start)
    nodes=${3:-3}
    if [ -e "$dir/n1" ]; then echo "error: $dir already holds a cluster" >&2; exit 1; fi
    [ -e "$provider" ] || { echo "error: no Galera provider at $provider (Debian: galera-4)" >&2; exit 3; }
    for tool in mariadbd mariadb-install-db rsync socat; do
      command -v "$tool" >/dev/null || { echo "error: $tool not found" >&2; exit 3; }
    done
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown mysql: "$dir"
    as_mysql test -w "$dir" \
      || { echo "error: $dir is not writable by mysql (are its parents searchable?)" >&2; exit 1; }
    ports=() gcomm=()
    for i in $(seq 1 "$nodes"); do ports+=("$(free_port)"); gcomm+=("$(free_port)"); done
    address="gcomm://$(printf '127.0.0.1:%s,' "${gcomm[@]}" | sed 's/,$//')"
    for i in $(seq 1 "$nodes"); do
      configure "n$i" "${ports[$((i - 1))]}" "${gcomm[$((i - 1))]}" "$(free_port)" "$(free_port)" "$address"
    done
    # Only the first node needs a data directory of its own: the others receive a copy
    # of it by state transfer when they join.
    as_mysql mariadb-install-db --defaults-file="$dir/n1.cnf" --skip-test-db \
      --auth-root-authentication-method=normal >"$dir/n1.install.log" 2>&1 \
      || { cat "$dir/n1.install.log" >&2; exit 1; }
    start_node n1 --wsrep-new-cluster
    wait_synced n1
    sql n1 "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'; GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;" \
      "CREATE DATABASE tasknode CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
    # The joiners start together; a donor serves one state transfer at a time, and a
    # joiner that finds none free asks again every second (or picks a joiner that synced).
    for i in $(seq 2 "$nodes"); do start_node "n$i"; done
    for i in $(seq 2 "$nodes"); do wait_synced "n$i"; done
    pids=()
    for i in $(seq 1 "$nodes"); do pids+=("n$i=$(node_pid "n$i")"); done
    {
      echo "GALERA_PORTS=\"${ports[*]}\""
      echo "GALERA_PIDS=\"${pids[*]}\""
    } >"$dir/cluster.env"
    cat "$dir/cluster.env"
    ;;
  stop)
    for cnf in "$dir"/n*.cnf; do
      [ -f "$cnf" ] || continue
      name=$(basename "$cnf" .cnf)
      pid=$(node_pid "$name")
      [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || continue
      for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    done
    echo "stopped the nodes of $dir"
    ;;
  *) usage ;;
esac
