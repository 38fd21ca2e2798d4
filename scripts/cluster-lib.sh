# Helpers of scripts/pg-cluster.sh and scripts/galera-cluster.sh (sourced, not run).

as_user() {  # as_user USER COMMAND...: run COMMAND as USER when we are root, else as ourselves
  local user=$1; shift
  if [ "$(id -u)" = 0 ]; then
    setpriv --reuid="$user" --regid="$user" --init-groups -- "$@"
  else
    "$@"
  fi
}

free_port() {  # a loopback port nobody listens on now
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
