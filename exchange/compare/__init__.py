"""The comparison engine: rules (`rules`) and reading their files (`rule_file`), the
pure DuckDB run of a rule over its inputs (`engine`), gathering a rule's inputs from
local stores (`local`, for tests, benchmarks and a verifier; a node asks the other
agencies over the network instead) and the benchmark (`bench`).

    rule = load_rule(Path("agents/tax/rules/export-rebate-without-exports.yaml"))
    plan = rule.plan({"period": "2026-09"})        # what to read and what to ask
    output = run_rule(rule, inputs, {"period": "2026-09"})
    output.canonical_bytes, output.digest          # reproducible findings

DESIGN.md decision 9: a rule's digest is SHA-256 of its canonical bytes; its output is
canonical (rows sorted by subject, decimals with two places, JSON Lines with sorted
keys) and carries the DuckDB version it ran on.
"""

from __future__ import annotations

from exchange.compare.engine import RuleOutput, inputs_digest, run_rule
from exchange.compare.rule_file import load_rule, load_rule_bytes, load_rules, rules_dir
from exchange.compare.rules import (
           InputColumn,
           OwnRead,
           OwnSpec,
           Parameter,
           PlannedQuery,
           QuerySpec,
           Rule,
           RuleError,
           RulePlan,
)

__all__ = ["InputColumn", "OwnRead", "OwnSpec", "Parameter", "PlannedQuery", "QuerySpec",
           "Rule", "RuleError", "RuleOutput", "RulePlan", "inputs_digest", "load_rule",
           "load_rule_bytes", "load_rules", "rules_dir", "run_rule"]
