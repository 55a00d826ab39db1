"""Ids as people type them (exchange/ids.py), and the CLI contract of issue 17: every
command takes --json, policies round-trip, credentials show their state, and a case
graph does not list a holder's own account as a counterparty of another."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import click
import pytest

from exchange.cases.graph import COUNTERPARTY, HOLDS, build_graph
from exchange.errors import AmbiguousId, MalformedInput, UnknownId
from exchange.ids import choose, choose_text, find_transactions, parse_id_prefix, resolve_tx_id
from exchange.v1 import node_pb2
from tests.support.ledger_net import make_net, write_chain


def test_a_prefix_needs_eight_hex_digits():
    with pytest.raises(MalformedInput, match="at least 8"):
        parse_id_prefix("bd6d90f")
    with pytest.raises(MalformedInput, match="not hex"):
        parse_id_prefix("bd6d90fz")
    with pytest.raises(MalformedInput, match="longer than 64"):
        parse_id_prefix("0" * 65)
    prefix = parse_id_prefix("BD6D90FF21...")
    assert prefix.text == "bd6d90ff21"
    assert prefix.low == bytes.fromhex("bd6d90ff21" + "0" * 54)
    assert prefix.high == bytes.fromhex("bd6d90ff21" + "f" * 54)
    assert parse_id_prefix("a" * 64).complete


def test_an_odd_number_of_digits_covers_the_nibble_range():
    prefix = parse_id_prefix("abcdef012")
    assert prefix.matches(bytes.fromhex("abcdef0120" + "00" * 27))
    assert prefix.matches(bytes.fromhex("abcdef012f" + "ff" * 27))
    assert not prefix.matches(bytes.fromhex("abcdef0130" + "00" * 27))


def test_an_ambiguous_prefix_names_the_ids_it_matches():
    one = bytes.fromhex("abcdef01" + "11" * 28)
    two = bytes.fromhex("abcdef01" + "22" * 28)
    with pytest.raises(AmbiguousId) as exc:
        choose(parse_id_prefix("abcdef01"), [one, two])
    assert one.hex() in str(exc.value) and two.hex() in str(exc.value)
    assert choose(parse_id_prefix("abcdef0122"), [one, two]) == two
    with pytest.raises(UnknownId, match="no transaction id begins with 12345678"):
        choose(parse_id_prefix("12345678"), [one, two])


def test_case_ids_resolve_by_an_unambiguous_beginning():
    cases = ["TAX-RV-4968F86A8554", "TAX-RV-49AA00000000", "TAX-RB-A993F297FE00"]
    assert choose_text("TAX-RV-4968", cases, "case") == "TAX-RV-4968F86A8554"
    assert choose_text("tax-rb", cases, "case") == "TAX-RB-A993F297FE00"
    with pytest.raises(AmbiguousId, match="TAX-RV-4968F86A8554, TAX-RV-49AA00000000"):
        choose_text("TAX-RV-49", cases, "case")
    with pytest.raises(UnknownId):
        choose_text("CUS-", cases, "case")


def test_block_store_resolves_prefixes_of_its_transactions(tmp_path: Path):
    net = make_net()
    with write_chain(net, tmp_path / "s.db", blocks=4, txs_per_block=5) as store:
        ids = sorted(r for h in range(1, store.height + 1) for r in store.raw_rows(h)[1])
        target = ids[7]
        assert resolve_tx_id(target.hex()[:12], store) == target
        assert resolve_tx_id(target.hex(), store) == target
        assert store.tx_ids_between(parse_id_prefix(target.hex()[:10]).low,
                                    parse_id_prefix(target.hex()[:10]).high, 10) == [target]
        # the node's side: every id in range, bounded, saying when there are more
        everything = find_transactions(store, node_pb2.FindTransactionsRequest(
            tx_id_prefix_hex="0" * 8, limit=1))
        assert len(everything.tx_ids) <= 1
        with pytest.raises(MalformedInput, match="at most 100"):
            find_transactions(store, node_pb2.FindTransactionsRequest(
                tx_id_prefix_hex="0" * 8, limit=101))
        absent = next(p for p in (f"{i:08x}" for i in range(1 << 16))
                      if not any(t.hex().startswith(p) for t in ids))
        with pytest.raises(UnknownId):
            resolve_tx_id(absent, store)


def _leaf_commands() -> list[tuple[str, click.Command]]:
    from exchange.cli import main

    main._register()
    out: list[tuple[str, click.Command]] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
            if not cmd.invoke_without_command:
                return
        out.append((" ".join(path), cmd))

    walk(main.cli, [])
    return out


def test_every_command_takes_json_except_the_two_servers():
    """The node daemon and the web console run until stopped and print no result."""
    lacking = [name for name, cmd in _leaf_commands()
               if not any("--json" in getattr(p, "opts", []) for p in cmd.params)]
    assert sorted(lacking) == ["console", "node"], lacking


def test_policy_file_versions_take_the_next_one_or_are_refused_when_stale():
    from exchange.cli.policy_cmd import next_version

    assert next_version(0, 3, bump=False) == 4      # no version in the file
    assert next_version(3, 3, bump=False) == 4      # shown from the ledger, edited
    assert next_version(7, 3, bump=False) == 7      # an explicit newer version
    assert next_version(2, 3, bump=True) == 4
    with pytest.raises(MalformedInput, match="changed since the file was read"):
        next_version(2, 3, bump=False)


def test_credential_state_shows_revoked_expired_and_valid():
    from exchange.cli.credential_cmd import state_of

    view = node_pb2.CredentialView(not_before_ms=1_000, not_after_ms=5_000)
    assert state_of(view, height=10, now_ms=2_000) == "valid"
    assert state_of(view, height=10, now_ms=5_000) == "expired"
    view.revoked_at_height = 9
    assert state_of(view, height=10, now_ms=2_000) == "revoked at height 9"


def test_case_graph_shows_transfers_between_own_accounts_on_the_accounts():
    uscc = "91440307050104764P"
    answers = [
        ("accounts", [{"account_no": "A1", "holder_kind": "company", "holder_id": uscc},
                      {"account_no": "A2", "holder_kind": "company", "holder_id": uscc}]),
        ("transactions", [
            {"account_no": "A1", "counterparty_account": "A2", "amount_cny": Decimal("5.00"),
             "direction": "out"},
            {"account_no": "A2", "counterparty_account": "A1", "amount_cny": Decimal("5.00"),
             "direction": "in"},
            {"account_no": "A2", "counterparty_account": "X9", "amount_cny": Decimal("1.00"),
             "direction": "in"},
            {"account_no": "X9", "counterparty_account": "A2", "amount_cny": Decimal("1.00"),
             "direction": "out"}]),
    ]
    g = build_graph([uscc], answers)
    edges = {(e.source, e.relation, e.target) for e in g.edges.values()}
    assert ("account:A1", COUNTERPARTY, "account:A2") not in edges
    assert ("account:A2", COUNTERPARTY, "account:A1") not in edges
    assert (f"company:{uscc}", HOLDS, "account:A1") in edges
    assert g.nodes["account:A1"].notes["own transfers"] == "with A2: out 5.00 CNY"
    # the same transfers seen from both sides are one link
    assert [e for e in edges if e[1] == COUNTERPARTY] == [
        ("account:A2", COUNTERPARTY, "account:X9")]
