"""The three false-invoicing rules (DATA_CONTRACT.md, "False invoicing") on hand-made
inputs: every threshold at its edge and one fen beyond, self-invoices and export
invoices excluded, pair totals summed over invoices, rings of length 2 to 6 found and 7
not, a figure-eight counted once per company, issuers of each status, and the month's
edges through a real store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path

import agents
from agents.common import checks
from exchange.compare import duck, load_rule, run_rule
from exchange.compare.local import run_locally
from exchange.compare.rule_file import rules_dir

P = "2026-09"
BEYOND = "invoices-beyond-inflows"
RING = "invoice-ring"
ABNORMAL = "invoices-from-abnormal-issuers"

Rows = list[dict[str, object]]


def uscc(n: int) -> str:
    body = f"91440300{n:08d}0"
    return body + checks.uscc_check_char(body)


def person(n: int) -> str:
    body = f"44030019800101{n:03d}"
    return body + checks.person_id_check_char(body)


def d(text: str) -> Decimal:
    return checks.fen_to_decimal(checks.decimal_to_fen(Decimal(text)))


def inv(issuer: str, buyer: str, amount: str, kind: str = "domestic") -> dict[str, object]:
    return {"issuer_uscc": issuer, "buyer_uscc": buyer, "amount_cny": d(amount), "kind": kind}


def found(rule_id: str, inputs: Mapping[str, Rows]) -> dict[str, dict]:
    rule = load_rule(rules_dir("tax") / f"{rule_id}.yaml")
    out = run_rule(rule, inputs, {"period": P})
    return {str(row["subject"]): row for row in out.rows}


def ring(members: Sequence[str], amount: str = "100000.00") -> Rows:
    return [inv(a, members[(i + 1) % len(members)], amount) for i, a in enumerate(members)]


# -- invoices-beyond-inflows ------------------------------------------------------------

def test_beyond_inflows_needs_more_than_three_times_inflows_and_more_than_a_million() -> None:
    ratio_at, ratio_above, million_at, million_above = uscc(1), uscc(2), uscc(3), uscc(4)
    no_flows, exports, selfish, summed, b = uscc(5), uscc(6), uscc(7), uscc(8), uscc(99)
    invoices = [
        inv(ratio_at, b, "1500000.00"),  # exactly 3 x 500,000
        inv(ratio_above, b, "1500000.01"),
        inv(million_at, b, "1000000.00"),  # no inflows, exactly 1,000,000
        inv(million_above, b, "1000000.01"),
        inv(no_flows, b, "2000000.00"),
        inv(exports, b, "1000000.00"), inv(exports, b, "5000000.00", "export"),
        inv(selfish, b, "1000000.00"), inv(selfish, selfish, "5000000.00"),
        inv(summed, b, "600000.00"), inv(summed, uscc(98), "400000.01"),
    ]
    flows = [{"uscc": ratio_at, "inflows_cny": d("500000.00")},
             {"uscc": ratio_above, "inflows_cny": d("500000.00")},
             {"uscc": b, "inflows_cny": d("1.00")}]
    got = found(BEYOND, {"invoices": invoices, "flows": flows})
    assert sorted(got) == sorted([ratio_above, million_above, no_flows, summed])
    assert got[ratio_above]["amount"] == "1000000.01"
    assert got[ratio_above]["inflows_cny"] == "500000.00"
    assert got[million_above]["inflows_cny"] == "0.00"  # no inflows count as 0
    assert got[million_above]["amount"] == "1000000.01"
    assert got[summed]["invoiced_cny"] == "1000000.01"  # summed over buyers and invoices


# -- invoices-from-abnormal-issuers ------------------------------------------------------

def test_abnormal_issuers_need_more_than_100000_from_deregistered_or_abnormal() -> None:
    active, dereg, abnormal, dereg2 = uscc(1), uscc(2), uscc(3), uscc(4)
    at, above, mixed, two, exported, with_active = (uscc(i) for i in range(10, 16))
    taxpayers = [{"uscc": active, "status": "active"}, {"uscc": dereg, "status": "deregistered"},
                 {"uscc": abnormal, "status": "abnormal"},
                 {"uscc": dereg2, "status": "deregistered"}]
    invoices = [
        inv(abnormal, at, "100000.00"),  # exactly 100,000: no finding
        inv(abnormal, above, "60000.00"), inv(abnormal, above, "40000.01"),
        inv(dereg, two, "50000.00"), inv(abnormal, two, "50000.01"),  # two issuers
        inv(abnormal, exported, "100000.00"), inv(abnormal, exported, "900000.00", "export"),
        inv(abnormal, with_active, "100000.00"), inv(active, with_active, "900000.00"),
        inv(dereg2, dereg2, "500000.00"),  # a self-invoice counts for nothing
        inv(uscc(50), mixed, "500000.00"),  # an issuer unknown to tax is not abnormal
        inv(dereg, mixed, "100000.00"),
    ]
    got = found(ABNORMAL, {"invoices": invoices, "taxpayers": taxpayers})
    assert sorted(got) == sorted([above, two])
    assert got[above]["amount"] == "100000.01" and got[above]["invoices"] == 2
    assert got[two]["amount"] == "100000.01" and got[two]["issuers"] == 2


# -- invoice-ring ------------------------------------------------------------------------

def test_rings_of_two_to_six_companies_are_found_and_of_seven_not() -> None:
    invoices: Rows = []
    members: dict[int, list[str]] = {}
    for length in range(2, 8):
        members[length] = [uscc(100 * length + i) for i in range(length)]
        invoices += ring(members[length])
    got = found(RING, {"invoices": invoices})
    assert sorted(got) == sorted(m for length in range(2, 7) for m in members[length])
    first = members[4][0]
    assert got[first]["amount"] == "100000.00" and got[first]["ring_buyers"] == 1
    assert got[first]["linked_uscc"] == members[4][1]


def test_a_ring_pair_is_summed_over_its_invoices_at_or_above_the_threshold() -> None:
    a, b, c = uscc(1), uscc(2), uscc(3)
    x, y, z = uscc(4), uscc(5), uscc(6)
    invoices = [inv(a, b, "40000.00"), inv(a, b, "60000.00"),  # 100,000.00 in two invoices
                inv(b, c, "100000.00"), inv(c, a, "250000.00"),
                inv(x, y, "50000.00"), inv(x, y, "49999.99"),  # 99,999.99: broken
                inv(y, z, "100000.00"), inv(z, x, "100000.00")]
    got = found(RING, {"invoices": invoices})
    assert sorted(got) == sorted([a, b, c])
    assert got[a]["amount"] == "100000.00" and got[c]["amount"] == "250000.00"


def test_export_and_self_invoices_never_close_a_ring() -> None:
    a, b, c, s = uscc(1), uscc(2), uscc(3), uscc(4)
    invoices = [inv(a, b, "60000.00"), inv(a, b, "40000.00", "export"),  # 60,000 domestic
                inv(b, c, "100000.00"), inv(c, a, "100000.00"),
                inv(s, s, "900000.00"),  # a ring of one is no ring
                inv(b, b, "900000.00")]
    assert found(RING, {"invoices": invoices}) == {}


def test_a_figure_eight_counts_each_company_once_and_each_successor_once() -> None:
    hub = uscc(1)
    left = [hub, uscc(2), uscc(3)]
    right = [hub, uscc(4), uscc(5), uscc(6)]
    # a third ring that shares the hub's edge to uscc(2): hub -> 2 -> 7 -> hub
    shared = [inv(uscc(2), uscc(7), "100000.00"), inv(uscc(7), hub, "100000.00")]
    invoices = ring(left, "100000.00") + ring(right, "200000.00") + shared
    invoices.append(inv(hub, uscc(9), "700000.00"))  # off every ring: not in its amount
    got = found(RING, {"invoices": invoices})
    assert sorted(got) == sorted({*left, *right, uscc(7)})
    assert got[hub]["amount"] == "300000.00"  # to uscc(2) once, to uscc(4) once
    assert got[hub]["ring_buyers"] == 2
    assert got[hub]["linked_uscc"] == " ".join(sorted([uscc(2), uscc(4)]))
    assert got[uscc(2)]["amount"] == "200000.00"  # to uscc(3) and to uscc(7)


def test_a_ring_with_a_long_tail_and_a_seven_ring_chord() -> None:
    """A 7-ring with a chord that makes a 6-ring: only the 6-ring's members are found;
    a chain hanging off a ring (peeled or not) adds no one."""
    seven = [uscc(i) for i in range(1, 8)]
    invoices = ring(seven)
    invoices.append(inv(seven[5], seven[0], "100000.00"))  # 1 -> .. -> 6 -> 1: six
    chain = [uscc(20 + i) for i in range(12)]
    invoices += [inv(chain[i], chain[i + 1], "500000.00") for i in range(11)]
    invoices += [inv(seven[0], chain[0], "500000.00"), inv(chain[-1], uscc(40), "500000.00")]
    got = found(RING, {"invoices": invoices})
    assert sorted(got) == sorted(seven[:6])
    assert got[seven[5]]["amount"] == "100000.00"  # only its edge back to the first


def test_the_false_invoicing_rules_run_sql_the_allow_list_takes() -> None:
    for rule_id, sensitive in ((BEYOND, False), (RING, True), (ABNORMAL, False)):
        rule = load_rule(rules_dir("tax") / f"{rule_id}.yaml")
        con = duck.connect()
        try:
            shape = duck.check_statement(con, rule.sql, list(rule.input_names))
        finally:
            con.close()
        # the ring's list of buyers (string_agg) makes it run on one thread
        assert (shape.order_sensitive is not None) == sensitive, (rule_id, shape)


# -- through real stores: the month's edges ----------------------------------------------

def _write(folder: Path, name: str, header: str, rows: Sequence[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.csv").write_text(header + "\n" + "".join(r + "\n" for r in rows),
                                        encoding="utf-8")


def test_invoices_outside_the_month_count_for_none_of_the_rules(tmp_path: Path) -> None:
    a, b, c, big, dereg, buyer = (uscc(i) for i in range(1, 7))
    reps = [person(i) for i in range(1, 7)]
    _write(tmp_path / "tax", "taxpayers", "uscc,name,legal_rep_id,status,registered_on", [
        f"{u},N,{rep},{'deregistered' if u == dereg else 'active'},2020-01-01"
        for u, rep in zip((a, b, c, big, dereg, buyer), reps, strict=True)])
    header = "invoice_no,issuer_uscc,buyer_uscc,amount_cny,tax_cny,issued_on,kind"
    rows = [
        # a ring a -> b -> c -> a, its closing pair reaching 100,000 only with an invoice
        # of the last day of the month before
        f"1,{a},{b},100000.00,13000.00,{P}-01,domestic",
        f"2,{b},{c},100000.00,13000.00,{P}-30,domestic",
        f"3,{c},{a},60000.00,7800.00,{P}-15,domestic",
        f"4,{c},{a},40000.00,5200.00,2026-08-31,domestic",
        # 1,000,000.01 issued only counting an invoice of the first day of the next month
        f"5,{big},{buyer},999999.00,0.01,{P}-30,domestic",
        f"6,{big},{buyer},1.01,0.01,2026-10-01,domestic",
        # from a deregistered issuer: 100,000.01 only with the month before
        f"7,{dereg},{buyer},100000.00,0.01,{P}-01,domestic",
        f"8,{dereg},{buyer},0.01,0.01,2026-08-31,domestic",
    ]
    _write(tmp_path / "tax", "vat_invoices", header, rows)
    stores = {}
    for agency in agents.AGENCIES:
        store = agents.open_store(agency, tmp_path / "db" / f"{agency}.db")
        if (tmp_path / agency).exists():
            agents.load_dataset_dir(agency, tmp_path / agency, store)
        stores[agency] = store
    try:
        for rule_id in (BEYOND, RING, ABNORMAL):
            rule = load_rule(rules_dir("tax") / f"{rule_id}.yaml")
            assert not run_locally(rule, {"period": P}, stores).rows, rule_id
        # moving the ring's invoice of August into September closes the ring
        rows[3] = f"4,{c},{a},40000.00,5200.00,{P}-01,domestic"
        _write(tmp_path / "tax2", "vat_invoices", header, rows)
        agents.load_dataset_dir("tax", tmp_path / "tax2", stores["tax"])
        rule = load_rule(rules_dir("tax") / f"{RING}.yaml")
        assert sorted(str(r["subject"]) for r in run_locally(rule, {"period": P},
                                                             stores).rows) == sorted([a, b, c])
    finally:
        for store in stores.values():
            store.close()
