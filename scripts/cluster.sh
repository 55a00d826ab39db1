#!/usr/bin/env bash
# The local four-node cluster: `make cluster`, `make status`, `make logs`, `make stop`.
#
#   scripts/cluster.sh start    make deploy/local (exchange init) if it has no genesis, start
#                               every agency's node in the background, wait for a leader
#                               and for every node to answer
#   scripts/cluster.sh status   `exchange status` of every node
#   scripts/cluster.sh logs     follow the nodes' logs (LINES=N lines of history)
#   scripts/cluster.sh stop     stop exactly the nodes this script started
#
# Nodes log to var/log/<agency>.log; their pids are in var/run/<agency>.pid. `stop` signals
# a pid only if /proc/<pid>/cmdline is still an `exchange node` process.
# Overrides (environment): NET=deploy/local, VAR=var, INIT_ARGS="--base-port 7100",
# READY_TIMEOUT_S=60, LINES=50.
set -euo pipefail
cd "$(dirname "$0")/.."

NET=${NET:-deploy/local}
EXCHANGE=${EXCHANGE:-.venv/bin/exchange}
VAR=${VAR:-var}
LOG_DIR=$VAR/log
RUN_DIR=$VAR/run
READY_TIMEOUT_S=${READY_TIMEOUT_S:-60}
STOP_TIMEOUT_S=10
LINES=${LINES:-50}

die() { echo "cluster: $*" >&2; exit 1; }

agencies() {
  local d
  for d in "$NET"/*/; do
    [[ -f "$d/node.toml" ]] && basename "$d"
  done
}

pid_of() {  # the pid recorded for an agency, if its process is still our node
  local file="$RUN_DIR/$1.pid" pid
  [[ -f "$file" ]] || return 1
  pid=$(<"$file")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  is_our_node "$pid" || return 1
  echo "$pid"
}

is_our_node() {
  local cmdline
  [[ -r "/proc/$1/cmdline" ]] || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
  [[ "$cmdline" == *"exchange node"* ]]
}

show_log_tails() {
  local a
  for a in "$@"; do
    echo "--- $LOG_DIR/$a.log (last 20 lines)" >&2
    tail -n 20 "$LOG_DIR/$a.log" >&2 2>/dev/null || echo "(no log)" >&2
  done
}

healthy() {  # exit 0 when the node answers status as leader or follower of a known leader
  local out
  out=$("$EXCHANGE" status --json --timeout 2 --profile "$NET/$1/profile.toml" 2>/dev/null) ||
    return 1
  .venv/bin/python -c '
import json, sys
s = json.loads(sys.argv[1])
sys.exit(0 if s.get("role") in ("leader", "follower") and s.get("leader") else 1)' "$out"
}

cmd_start() {
  [[ -x "$EXCHANGE" ]] || die "$EXCHANGE not found (run make install)"
  if [[ ! -f "$NET/genesis.pb" ]]; then
    # shellcheck disable=SC2086  # INIT_ARGS is a list of options, e.g. "--base-port 27100"
    "$EXCHANGE" init --out "$NET" ${INIT_ARGS:-}
  fi
  mapfile -t names < <(agencies)
  (( ${#names[@]} > 0 )) || die "no node.toml under $NET"
  mkdir -p "$LOG_DIR" "$RUN_DIR"
  local a pid
  for a in "${names[@]}"; do
    if pid=$(pid_of "$a"); then
      echo "$a: already running (pid $pid)"
      continue
    fi
    echo "=== start $(date -u +%FT%TZ)" >>"$LOG_DIR/$a.log"
    # setsid: the node leaves this terminal's session, so a later Ctrl-C here does not
    # reach it; in a script without job control it execs, so $! is the node itself.
    setsid "$EXCHANGE" node --config "$NET/$a/node.toml" >>"$LOG_DIR/$a.log" 2>&1 </dev/null &
    echo $! >"$RUN_DIR/$a.pid"
    echo "$a: started (pid $!, log $LOG_DIR/$a.log)"
  done

  local deadline=$((SECONDS + READY_TIMEOUT_S)) waiting
  while :; do
    waiting=()
    for a in "${names[@]}"; do
      if ! pid_of "$a" >/dev/null; then
        echo "cluster: node $a exited" >&2
        show_log_tails "$a"
        exit 1
      fi
      healthy "$a" || waiting+=("$a")
    done
    (( ${#waiting[@]} == 0 )) && break
    if (( SECONDS >= deadline )); then
      echo "cluster: no leader with every node answering after ${READY_TIMEOUT_S} s;" \
           "waiting for: ${waiting[*]}" >&2
      show_log_tails "${names[@]}"
      exit 1
    fi
    sleep 1
  done

  local first=${names[0]}
  [[ " ${names[*]} " == *" tax "* ]] && first=tax
  cat <<EOF

The cluster is up: ${names[*]} (logs in $LOG_DIR/, pids in $RUN_DIR/).

  source .venv/bin/activate                 # puts \`exchange\` on PATH
  export EXCHANGE_PROFILE=$NET/$first/profile.toml
  exchange status                           # role, term, leader, heights, peers
  exchange submit-probe --count 5           # signed probe transactions, committed
  exchange chain follow --from 1            # blocks as they are applied (Ctrl-C stops)
  exchange block show tip
  exchange tx show <tx id or 8+ digits>     # with its inclusion proof checked locally
  exchange chain verify                     # fetch every block and verify it from genesis

  make status | make logs | make stop
EOF
}

cmd_status() {
  mapfile -t names < <(agencies)
  (( ${#names[@]} > 0 )) || die "no network in $NET (make cluster creates one)"
  local a rc=0
  for a in "${names[@]}"; do
    "$EXCHANGE" status --profile "$NET/$a/profile.toml" || rc=1
  done
  return $rc
}

cmd_logs() {
  shopt -s nullglob
  local logs=("$LOG_DIR"/*.log)
  (( ${#logs[@]} > 0 )) || die "no logs in $LOG_DIR"
  exec tail -n "$LINES" -F "${logs[@]}"
}

stop_one() {  # $1 = pid file
  local file=$1 a pid
  a=$(basename "$file" .pid)
  pid=$(<"$file")
  if ! [[ "$pid" =~ ^[0-9]+$ ]] || ! is_our_node "$pid"; then
    echo "$a: not running"
    rm -f "$file"
    return
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT_S))
  while is_our_node "$pid" && (( SECONDS < deadline )); do
    sleep 0.2
  done
  if is_our_node "$pid"; then
    echo "$a: did not stop within ${STOP_TIMEOUT_S} s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
  echo "$a: stopped (pid $pid)"
}

cmd_stop() {
  shopt -s nullglob
  local files=("$RUN_DIR"/*.pid) f
  if (( ${#files[@]} == 0 )); then
    echo "cluster: nothing to stop"
    return
  fi
  for f in "${files[@]}"; do
    stop_one "$f" &
  done
  wait
}

case "${1:-}" in
  start) cmd_start ;;
  status) cmd_status ;;
  logs) cmd_logs ;;
  stop) cmd_stop ;;
  *) echo "usage: $0 start|status|logs|stop" >&2; exit 2 ;;
esac
