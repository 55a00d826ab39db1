"""What lets several of an owner's rules share one committed input: which inputs are
shared (asked whole, read alike), how the shared query names each rule's input for
replay, which rules the ledger accepts as its users, and the jobs config's bound on
rule runs side by side."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from exchange.compare.own_inputs import SharedRead, input_name_in, input_purpose, planned_run
from exchange.compare.rule_file import load_rules
from exchange.errors import MalformedInput
from exchange.ledger.findings import RULE_DIGESTS_SEPARATOR, rule_digests_of


def test_tax_rules_read_the_invoice_register_and_pbocs_flows_alike() -> None:
    rules = {r.id: r for r in load_rules("tax")}
    runs = {rid: planned_run(r, {"period": "2026-09"}) for rid, r in rules.items()}
    invoices = SharedRead("tax", "vat_invoices", "2026-09",
                          ("issuer_uscc", "buyer_uscc", "amount_cny", "kind"))
    readers = sorted(rid for rid, run in runs.items() if invoices in run.reads.values())
    assert readers == ["invoice-ring", "invoices-beyond-inflows",
                       "invoices-from-abnormal-issuers"]
    flows = SharedRead("pboc", "company_flows", "2026-09", ("uscc", "inflows_cny"))
    assert sorted(rid for rid, run in runs.items() if flows in run.reads.values()) == [
        "invoices-beyond-inflows", "revenue-below-bank-inflows"]
    # a subject set depends on the run's other inputs: never shared
    assert "trade" not in runs["export-rebate-without-exports"].reads
    # another month is another input
    other = planned_run(rules["invoice-ring"], {"period": "2026-08"})
    assert invoices not in other.reads.values()


def test_a_shared_querys_purpose_names_each_rules_input_for_replay() -> None:
    joint = "; ".join([input_purpose("invoice-ring", 1, "invoices"),
                       input_purpose("invoices-beyond-inflows", 2, "register")])
    assert input_name_in(joint, "invoice-ring", 1) == "invoices"
    assert input_name_in(joint, "invoices-beyond-inflows", 2) == "register"
    assert input_name_in(joint, "invoices-beyond-inflows", 1) is None  # another version
    assert input_name_in(joint, "revenue-below-bank-inflows", 1) is None
    # a query of one rule, as before
    assert input_name_in(input_purpose("invoice-ring", 1, "invoices"), "x", 9) == "invoices"
    assert input_name_in("a follow-up", "invoice-ring", 1) is None


def test_the_ledger_accepts_as_users_of_an_input_exactly_the_rules_it_names() -> None:
    a, b = "a" * 64, "b" * 64
    assert rule_digests_of(a) == {a}
    assert rule_digests_of(RULE_DIGESTS_SEPARATOR.join([a, b])) == {a, b}
    assert "c" * 64 not in rule_digests_of(RULE_DIGESTS_SEPARATOR.join([a, b]))
    assert rule_digests_of("") == frozenset()


def test_the_jobs_config_bounds_rule_runs_side_by_side(tmp_path: Path) -> None:
    from exchange.compare.jobs import RULE_RUNS_CONCURRENT_MAX_DEFAULT, JobsConfig

    path = tmp_path / "jobs.toml"
    path.write_text('profile = "p.toml"\n', encoding="utf-8")
    assert JobsConfig.load(path).rule_runs_concurrent_max == \
        RULE_RUNS_CONCURRENT_MAX_DEFAULT == 2
    path.write_text('profile = "p.toml"\nrule_runs_concurrent_max = 1\n', encoding="utf-8")
    assert JobsConfig.load(path).rule_runs_concurrent_max == 1
    for bad in ("0", "17", '"2"', "true"):
        path.write_text(f'profile = "p.toml"\nrule_runs_concurrent_max = {bad}\n',
                        encoding="utf-8")
        with pytest.raises(MalformedInput,
                           match=re.escape("rule_runs_concurrent_max is an integer 1..16")):
            JobsConfig.load(path)
