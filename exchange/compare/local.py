"""A rule's inputs gathered from stores at hand, as the network would gather them: the
owner's own reads through agents.own_inputs, and each query answered by the target's
own lookup (agents.lookup, what the target's node runs to answer). For tests,
benchmarks and a verifier holding every agency's data; a node asks over the network.
"""

from __future__ import annotations

from collections.abc import Mapping

from agents.common.store import AgencyStore
from agents.lookup import lookup
from agents.own_inputs import read_own
from exchange.compare.engine import RuleOutput, run_rule
from exchange.compare.rules import Rule, RulePlan

ROW_LIMIT_DEFAULT = 50_000_000


def gather_inputs(plan: RulePlan, stores: Mapping[str, AgencyStore],
                  row_limit: int = ROW_LIMIT_DEFAULT) -> dict[str, list[dict[str, object]]]:
    """Every input of the run `plan` describes, by name; `stores` by agency must hold
    the owner's store and each queried agency's."""
    assert all(agency == store.agency for agency, store in stores.items()), list(stores)
    owner = stores[plan.owner]
    inputs: dict[str, list[dict[str, object]]] = {}
    for read in plan.own:
        inputs[read.name] = read_own(owner, read.dataset, read.period, read.fields)
    for query in plan.queries:
        rows: list[dict[str, object]] = []
        for request in query.requests(inputs):
            rows.extend(lookup(stores[query.agency], request, row_limit))
        inputs[query.name] = rows
    return inputs


def run_locally(rule: Rule, params: Mapping[str, str], stores: Mapping[str, AgencyStore],
                row_limit: int = ROW_LIMIT_DEFAULT) -> RuleOutput:
    """Gather the rule's inputs from `stores` (by agency) and run it."""
    plan = rule.plan(params)
    return run_rule(rule, gather_inputs(plan, stores, row_limit), params)
