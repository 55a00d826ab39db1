#!/usr/bin/env bash
# `make console`: the local four-node cluster with sample data, the tax bureau's
# comparisons run, and two consoles: one for a tax analyst, one for a tax supervisor
# (four eyes: open both URLs, in two browsers or two private windows). Runs until
# Ctrl-C, then stops exactly the consoles and nodes it started.
# Overrides (environment): CONSOLE_BASE_PORT=7700 (nodes), CONSOLE_PORT=8470 (the
# analyst's console; the supervisor's is the next port), COMPANIES=2000,
# CONSOLE_VAR=var/console (everything this run writes; removed when it starts).
set -euo pipefail
cd "$(dirname "$0")/.."
EXCHANGE=.venv/bin/exchange
CONSOLE_VAR=${CONSOLE_VAR:-var/console}
export NET=$CONSOLE_VAR/net VAR=$CONSOLE_VAR
export INIT_ARGS="--base-port ${CONSOLE_BASE_PORT:-7700}"
PORT=${CONSOLE_PORT:-8470}
COMPANIES=${COMPANIES:-2000}
PERIOD=2026-09
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  bash scripts/cluster.sh stop >/dev/null 2>&1 || true
}
trap stop_all EXIT
trap 'exit 0' INT TERM

rm -rf "$CONSOLE_VAR"
mkdir -p "$CONSOLE_VAR"
echo "== the local cluster ($NET), sample data for $COMPANIES companies"
bash scripts/cluster.sh start
$EXCHANGE data generate --seed 7 --companies "$COMPANIES" --out "$VAR/data" >/dev/null
for agency in tax police customs pboc; do
  $EXCHANGE data load --config "$NET/$agency/node.toml" "$VAR/data/$agency" >/dev/null
done
echo "== the tax bureau's comparisons for $PERIOD (findings to open cases from)"
for rule in agents/tax/rules/*.yaml; do
  $EXCHANGE rules register "$rule" --profile "$NET/tax/analysts/supervisor-1.toml" >/dev/null
  $EXCHANGE compare run "$(basename "$rule" .yaml)" --period $PERIOD \
    --profile "$NET/tax/analysts/automation.toml" --json >/dev/null
done
start_console() {  # who profile port
  local url_file="$VAR/console-$1.url"
  rm -f "$url_file"
  $EXCHANGE console --profile "$2" --port "$3" --url-file "$url_file" \
    >"$VAR/console-$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [[ -s "$url_file" ]] && return 0; sleep 0.2; done
  echo "console of $1 did not start:" >&2; cat "$VAR/console-$1.log" >&2; exit 1
}
start_console analyst "$NET/tax/profile.toml" "$PORT"
start_console supervisor "$NET/tax/analysts/supervisor-1.toml" "$((PORT + 1))"
GT=$VAR/data/ground_truth.csv
OFFICER=$(grep '^officer-with-police-record,' $GT | head -1 | cut -d, -f2); OFFICER=${OFFICER##*/}
cat <<TEXT

The consoles (each link signs one browser in, once):
  tax analyst    (tax/analyst-1):    $(cat "$VAR/console-analyst.url")
  tax supervisor (tax/supervisor-1): $(cat "$VAR/console-supervisor.url")

Try four eyes: as the analyst, Ask the police's "records" about person_id=$OFFICER with a
case id; the supervisor co-signs it under 双人复核 (Four eyes); the answer appears to the
analyst. Findings -> open a case -> its graph. Ctrl-C stops the consoles and the cluster.
TEXT
wait "${pids[@]}"
