"""Policies: the owner's alone, the latest version in force, evaluated the same way
everywhere, and the defaults a new network starts with."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from exchange.errors import MalformedInput, PermissionDenied
from exchange.identity import default_policies as defaults
from exchange.ledger import policy as pol
from exchange.ledger.apply import LedgerApplier
from exchange.ledger.block import new_body, seal_envelope
from exchange.ledger.store import BlockStore
from exchange.v1 import ledger_pb2
from tests.support.ledger_net import make_net

AGENCIES = ("tax", "police", "customs", "pboc")
SHAPE = ledger_pb2.QueryShape


def _facts(**kw: object) -> pol.QueryFacts:
    base: dict[str, object] = dict(
        requester_agency="tax", requester_roles=frozenset({"analyst"}),
        target_agency="pboc", dataset="accounts", fields=(), case_id="CASE-1",
        legal_basis=defaults.LEGAL_BASIS_TAX_CRIME, shape=SHAPE.QUERY_SHAPE_SUBJECT)
    base.update(kw)
    return pol.QueryFacts(**base)  # type: ignore[arg-type]


@pytest.fixture
def book() -> pol.PolicyBook:
    return pol.PolicyBook.from_genesis(defaults.default_policies(AGENCIES))


def test_default_policy_allows_an_analyst_within_a_case(book: pol.PolicyBook) -> None:
    decision = book.evaluate(_facts())
    assert decision.allowed and decision.row_limit == defaults.ROW_LIMIT_RECORDS
    assert decision.fields == ("account_no", "holder_kind", "holder_id", "bank", "opened_on")
    assert decision.policy_id == "pboc/accounts"


@pytest.mark.parametrize(("change", "code"), [
    (dict(case_id=""), pol.CASE_REQUIRED),
    (dict(legal_basis="curiosity"), pol.LEGAL_BASIS_NOT_GRANTED),
    (dict(requester_roles=frozenset({"auditor"})), pol.ROLE_NOT_GRANTED),
    (dict(requester_roles=frozenset({"automation"}), case_id=""), pol.CASE_REQUIRED),
    (dict(fields=("account_no", "balance")), pol.FIELD_NOT_GRANTED),
    (dict(dataset="secret_files"), pol.NO_POLICY),
    (dict(requester_agency="pboc"), pol.NOT_GRANTED),
    (dict(shape=SHAPE.QUERY_SHAPE_AGGREGATE), pol.SHAPE_NOT_GRANTED),
    (dict(queries_last_hour=defaults.RATE_PER_HOUR_ANALYST), pol.RATE_LIMITED),
])
def test_refusals_name_their_reason(book: pol.PolicyBook, change: dict[str, object],
                                    code: str) -> None:
    decision = book.evaluate(_facts(**change))
    assert not decision.allowed and decision.code == code, decision


def test_queries_to_the_police_about_persons_need_a_supervisor(book: pol.PolicyBook) -> None:
    facts = _facts(target_agency="police", dataset="records")
    assert book.evaluate(facts).code == pol.COSIGNATURE_REQUIRED
    assert book.evaluate(_facts(target_agency="police", dataset="records",
                                supervisor_cosigned=True)).allowed


def test_catalog_views_are_open_to_automations_without_a_case(book: pol.PolicyBook) -> None:
    facts = _facts(requester_roles=frozenset({"automation"}), target_agency="customs",
                   dataset="company_trade", case_id="", shape=SHAPE.QUERY_SHAPE_AGGREGATE)
    decision = book.evaluate(facts)
    assert decision.allowed and decision.row_limit == defaults.ROW_LIMIT_AGGREGATE


def test_only_the_owner_sets_a_policy_and_only_newer_versions(book: pol.PolicyBook) -> None:
    closed = ledger_pb2.Policy(policy_id="pboc/accounts", owner_agency="pboc",
                               dataset="accounts", version=2)
    with pytest.raises(PermissionDenied):
        book.apply(closed, signer_agency="tax")
    book.apply(closed, signer_agency="pboc")
    assert book.evaluate(_facts()).code == pol.NOT_GRANTED
    with pytest.raises(MalformedInput, match="not newer"):
        book.apply(ledger_pb2.Policy(policy_id="pboc/accounts", owner_agency="pboc",
                                     dataset="accounts", version=2), signer_agency="pboc")


def test_policy_transactions_take_effect_on_the_ledger_only_from_their_owner(
        tmp_path: Path) -> None:
    net = make_net()
    store = BlockStore.create(tmp_path / "s.db", net.signed_genesis)
    applier = LedgerApplier(store)
    now = int(time.time() * 1000)

    def policy_tx(signer_agency: str, version: int) -> bytes:
        body = new_body(net.chain_id, signer_agency, now)
        body.policy.CopyFrom(ledger_pb2.Policy(
            policy_id="customs/declarations", owner_agency="customs",
            dataset="declarations", version=version, grants=[ledger_pb2.PolicyGrant(
                requester_agency="tax", roles=["analyst"], case_required=False)]))
        return seal_envelope(body, net.supervisors[signer_agency])

    by_analyst = new_body(net.chain_id, "customs", now)
    by_analyst.policy.CopyFrom(ledger_pb2.Policy(policy_id="customs/declarations",
                                                 owner_agency="customs",
                                                 dataset="declarations", version=9))
    applied = applier.apply(applier.cut(
        [policy_tx("tax", 5), seal_envelope(by_analyst, net.analysts["customs"]),
         policy_tx("customs", 1), policy_tx("customs", 1)], now, net.nodes["tax"], "tax"))
    # not the owner; an analyst of the owner; in force; a version not newer
    assert applied.codes == ("REJECTED", "REJECTED", "OK", "REJECTED")
    in_force = applier.policies.get("customs", "declarations")
    assert in_force is not None and in_force.version == 1
    # a restarted node rebuilds the same book from its store
    assert LedgerApplier(store).policies.get("customs", "declarations") == in_force
    assert applier.policies.evaluate(pol.QueryFacts(
        "tax", frozenset({"analyst"}), "customs", "declarations", (), "",
        defaults.LEGAL_BASIS_TAX_CRIME, SHAPE.QUERY_SHAPE_SUBJECT)).allowed


def test_init_writes_the_default_policies_into_genesis(tmp_path: Path) -> None:
    from exchange.identity.config import read_signed_genesis
    from exchange.identity.genesis import verify_genesis
    from exchange.identity.local_network import init_network

    layout = init_network(tmp_path / "net")
    genesis = verify_genesis(read_signed_genesis(layout.genesis))
    ids = {p.policy_id for p in genesis.policies}
    assert {"police/records", "pboc/company_flows", "customs/company_trade",
            "tax/active_legal_reps"} <= ids
    assert pol.describe(next(p for p in genesis.policies
                             if p.policy_id == "police/persons"))["grants"]
