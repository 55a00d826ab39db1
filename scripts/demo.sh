#!/usr/bin/env bash
# `make demo`: the system as it stands, narrated step by step on a real four-node
# cluster. Exits non-zero as soon as a step fails and always stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
EXCHANGE=.venv/bin/exchange
PY=.venv/bin/python
export NET=var/demo/net VAR=var/demo
export INIT_ARGS="--base-port ${DEMO_BASE_PORT:-7600}"
rm -rf var/demo
mkdir -p var/demo
trap 'bash scripts/cluster.sh stop >/dev/null 2>&1 || true' EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
as() { local agency=$1; shift; "$EXCHANGE" "$@" --profile "$NET/$agency/profile.toml"; }

step "1. Key ceremony for four agencies, then the four nodes (exchange init, exchange node)"
bash scripts/cluster.sh start

step "2. Sample data for 2,000 companies, each agency's part loaded into its own store"
$EXCHANGE data generate --seed 7 --companies 2000 --out var/demo/data
for agency in tax police customs pboc; do
  $EXCHANGE data load --config "$NET/$agency/node.toml" "var/demo/data/$agency" --json \
    | $PY -c 'import json,sys; r=json.load(sys.stdin); print("%-8s %s" % (sys.argv[1], ", ".join("%s %d rows" % (f["dataset"], f["rows_after"]) for f in r["files"])))' "$agency"
done

step "3. Cluster status as the tax bureau's analyst sees it (exchange status)"
as tax status
sleep 2  # each node publishes its agency's catalog on the ledger as it starts
echo
as customs catalog
as customs policy show --owner police

step "4. Cross-queries: each agency asks another; the target's node answers on its own"
GT=var/demo/data/ground_truth.csv
REBATE=$(grep '^export-rebate-without-exports,' $GT | head -1 | cut -d, -f2)
PAIR=$(grep '^officer-with-police-record,' $GT | head -1 | cut -d, -f2)
OFFICER_CO=${PAIR%%/*}; OFFICER=${PAIR##*/}
CASE=SZ-2026-001
echo "tax asks customs what $REBATE declared (it claimed export rebates):"
as tax query --to customs --dataset declarations --subject "uscc=$REBATE" --case $CASE \
  --purpose "export rebate claimed; exports declared?" --wait
echo; echo "customs asks tax who the company is:"
as customs query --to tax --dataset taxpayers --subject "uscc=$OFFICER_CO" --case $CASE \
  --purpose "company behind a shipment" --wait
echo; echo "pboc asks customs for that company's monthly trade (a catalog view):"
as pboc query --to customs --dataset company_trade --subject "uscc=$REBATE" --period 2026-09 \
  --case $CASE --purpose "payments against imports" --wait

step "5. Policies at work: a refusal with its reason, then the same query co-signed"
set +e
as tax query --to police --dataset records --subject "person_id=$OFFICER" --case $CASE \
  --purpose "legal representative's record" --wait
CODE=$?
set -e
[ "$CODE" = 3 ] || { echo "expected a refusal (exit 3), got $CODE" >&2; exit 1; }
echo "(refused by the police's policy: a supervisor must co-sign queries about persons)"
echo
QJSON=$(as tax query --to police --dataset records --subject "person_id=$OFFICER" --case $CASE \
  --purpose "legal representative's record" --cosign "$NET/tax/analysts/supervisor-1.toml" \
  --wait --json)
QID=$(echo "$QJSON" | $PY -c 'import json,sys; print(json.load(sys.stdin)["query"])')
echo "answered: query $QID; the tax analyst reads it again later:"
as tax answer "$QID"

step "6. A comparison job's bulk question: every company's bank flows for a month"
"$EXCHANGE" query --to pboc --dataset company_flows --period 2026-09 --purpose "revenue vs inflows" \
  --wait --json --profile "$NET/tax/analysts/automation.toml" \
  | $PY -c 'import json,sys; r=json.load(sys.stdin); print("%s rows in %s sealed chunk(s), commitments checked, %s ms" % (r["rows"], r["chunks"], r["latency_ms"]))'

step "7. The audit trail of the case, each line checked against the ledger"
as tax audit --case $CASE --verify
echo; echo "the same trail at the customs node: metadata in clear, other agencies' subjects sealed"
as customs audit --case $CASE --agency police

step "8. Comparison jobs and playbooks: each owner registers its rules and playbooks; its runner runs them"
for agency in tax customs pboc police; do
  for rule in agents/$agency/rules/*.yaml; do
    "$EXCHANGE" rules register "$rule" --profile "$NET/$agency/analysts/supervisor-1.toml"
  done
  for playbook in agents/$agency/playbooks/*.yaml; do
    "$EXCHANGE" playbooks register "$playbook" --profile "$NET/$agency/analysts/supervisor-1.toml"
  done
done
as tax playbooks list
echo "(each runner runs its rules, then its playbooks on the findings it may read)"
for agency in tax customs pboc police; do
  cat > "var/demo/jobs-$agency.toml" <<TOML
profile = "../../$NET/$agency/analysts/automation.toml"
periods = ["2026-09"]
agency_store = "../../$NET/$agency/data/agency.db"
state_file = "jobs-$agency.state.json"
interval_s = 60
follow_ups_per_finding_max = 8
follow_ups_per_hour_per_agency = 500
TOML
  "$EXCHANGE" jobs serve --config "var/demo/jobs-$agency.toml" --rounds 1
done
as customs findings
RUN=$(as tax findings --rule export-rebate-without-exports --json | $PY -c 'import json,sys; print(json.load(sys.stdin)["findings"][0]["run"])')
echo "replaying run $RUN from the ledger:"
"$EXCHANGE" compare replay "$RUN" --profile "$NET/tax/analysts/automation.toml"
echo "planted cases for 2026-09 in ground_truth.csv: $(grep -c ',2026-09$' $GT) period-bound, $(grep -c '^officer-with-police-record,' $GT) officer"

step "9. The playbooks opened a case per finding and asked its follow-ups, every step on the ledger"
as tax case list
CASE2=$(as tax case list --json | $PY -c 'import json,sys; print(next(c["case"] for c in json.load(sys.stdin)["cases"] if c["case"].startswith("TAX-RV")))')
echo "the tax bureau's case $CASE2, opened by its playbook from a revenue-below-bank-inflows finding:"
as tax case show $CASE2
echo; echo "what the answers on record link (exchange case graph):"
as tax case graph $CASE2
echo; echo "the case's steps as exchange watch showed them when they committed:"
TIP=$(as tax status --json | $PY -c 'import json,sys; print(json.load(sys.stdin)["height"])')
as tax watch --case $CASE2 --from-height 1 --until-height "$TIP"

echo; echo "a ring of companies invoicing each other round (invoice-ring): every member is a"
echo "finding naming the members that follow it, so one case holds the whole ring, with each"
echo "member's follow-ups (its invoices, accounts, transactions, inflows, representative):"
RING=$(as tax case list --json | $PY -c 'import json,sys; print(next((c["case"] for c in json.load(sys.stdin)["cases"] if c["case"].startswith("TAX-IR")), ""))')
[ -n "$RING" ] || { echo "no ring case was opened" >&2; exit 1; }
as tax case show $RING
echo; echo "the ring's graph: companies linked by their invoices, and by their accounts:"
as tax case graph $RING

step "10. Analysts of every agency also submit plain signed transactions to their own node"
for agency in tax police customs pboc; do
  as "$agency" submit-probe --count 2
done
TX=$(as police submit-probe --count 1 --json | $PY -c 'import json,sys; print(json.loads(sys.stdin.readline())["tx_id"])')
sleep 0.5

step "11. The police transaction seen from the customs node, its proofs checked locally"
as customs tx show "$TX"

step "12. The tip block, with every member's attestation (exchange block show tip)"
as pboc block show tip

step "13. Every node's chain fetched and verified from genesis (exchange chain verify)"
for agency in tax police customs pboc; do
  as "$agency" chain verify --json | $PY -c 'import json,sys; r=json.load(sys.stdin); print("%-8s ok=%s blocks=%s final=%s" % (sys.argv[1], r["ok"], r["height"], r["final_height"]))' "$agency"
done

step "14. The leader is killed (kill -9); the others elect a new one and go on"
LEADER=$(as tax status --json | $PY -c 'import json,sys; print(json.load(sys.stdin)["leader"])')
kill -9 "$(cat var/demo/run/$LEADER.pid)"
echo "killed $LEADER's node"
sleep 2
OTHER=$(for a in tax police customs pboc; do [ "$a" != "$LEADER" ] && echo "$a" && break; done)
as "$OTHER" submit-probe --count 2 --retry 10
as "$OTHER" status --json | $PY -c 'import json,sys; s=json.load(sys.stdin); print("new leader %s in term %s" % (s["leader"], s["term"]))'

step "15. The killed node restarts and catches up"
bash scripts/cluster.sh start >/dev/null
as "$LEADER" status --json | $PY -c 'import json,sys; s=json.load(sys.stdin); print("%s: height %s, role %s" % (s["agency"], s["height"], s["role"]))'

step "16. The case's evidence bundle, exported from the tax bureau's node with its reveals"
echo "(the finding, its rule and every input, the case events and the follow-up queries and"
echo " answers; tax adds the plaintext of what it may read, checked against the commitments)"
as tax submit-probe --count 1 >/dev/null  # one more block carries the last attestations
$EXCHANGE evidence export --store "$NET/tax/data/blocks.db" --case $CASE2 \
  --reveal-with "$NET/tax/keys/data.key" --profile "$NET/tax/profile.toml" \
  --out var/demo/case.evidence

step "17. Offline verification, as a court would run it (exchange evidence verify)"
$EXCHANGE evidence verify var/demo/case.evidence

echo
$EXCHANGE evidence report var/demo/case.evidence --html var/demo/case.html
echo "the court's readable report: var/demo/case.html"

step "18. One altered byte is detected and named"
$PY - var/demo/case.evidence <<'PYEOF'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
data[len(data) // 2] ^= 0x01
open(sys.argv[1] + ".tampered", "wb").write(bytes(data))
PYEOF
if $EXCHANGE evidence verify var/demo/case.evidence.tampered; then
  echo "a tampered bundle was accepted" >&2; exit 1
fi
echo "(refused, as it must be)"

step "19. The tax analyst closes the case (the close is on the ledger too)"
as tax case close $CASE2 --reason "referred to the procuratorate"

step "20. Stopping the cluster"
bash scripts/cluster.sh stop
printf '\nDemo complete.\n'
