"""The graph of a case: the companies, persons and accounts its answers link, through
legal representatives (the tax register), account holders (the bank's accounts),
counterparties (the bank's transactions) and invoices (the tax bureau's VAT invoices,
issuer to buyer), with what the other answers say about each
(police records, customs declarations). Built from the rows on record only, so it shows
exactly what the agency was told. Pure: a CaseFile's contents in, nodes and edges out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from agents.common.checks import is_valid_person_id, is_valid_uscc

COMPANY = "company"
PERSON = "person"
ACCOUNT = "account"
LEGAL_REP = "legal representative"
HOLDS = "holds"
COUNTERPARTY = "counterparty"
INVOICED = "invoiced"


def node_id(kind: str, key: str) -> str:
    return f"{kind}:{key}"


@dataclass
class Node:
    kind: str
    key: str
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return node_id(self.kind, self.key)


@dataclass
class Edge:
    source: str
    relation: str
    target: str
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class CaseGraph:
    roots: list[str] = field(default_factory=list)
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: dict[tuple[str, str, str], Edge] = field(default_factory=dict)

    def node(self, kind: str, key: str) -> Node:
        nid = node_id(kind, key)
        if nid not in self.nodes:
            self.nodes[nid] = Node(kind, key)
        return self.nodes[nid]

    def link(self, source: Node, relation: str, target: Node) -> Edge:
        key = (source.id, relation, target.id)
        if key not in self.edges:
            self.edges[key] = Edge(source.id, relation, target.id)
        return self.edges[key]

    def out_of(self, nid: str) -> list[Edge]:
        return [e for (s, _r, _t), e in self.edges.items() if s == nid]

    def as_dict(self) -> dict[str, Any]:
        return {"roots": self.roots,
                "nodes": [{"id": n.id, "kind": n.kind, "key": n.key, "notes": n.notes}
                          for n in sorted(self.nodes.values(), key=lambda n: n.id)],
                "edges": [{"from": e.source, "relation": e.relation, "to": e.target,
                           "notes": e.notes} for e in self.edges.values()]}


def _holder(kind: str, holder_id: str) -> tuple[str, str] | None:
    if kind == "company" or (not kind and is_valid_uscc(holder_id)):
        return COMPANY, holder_id
    if kind == "person" or (not kind and is_valid_person_id(holder_id)):
        return PERSON, holder_id
    return None


def build_graph(subjects: Iterable[str],
                answers: Iterable[tuple[str, Iterable[Mapping[str, Any]]]]) -> CaseGraph:
    """The graph of a case whose findings are about `subjects` (uscc, person_id or
    "uscc/person_id") and whose answers are (dataset, rows)."""
    g = CaseGraph()
    for subject in subjects:
        for part in str(subject).split("/"):
            kind = COMPANY if is_valid_uscc(part) else PERSON if is_valid_person_id(part) \
                else ""
            if kind:
                n = g.node(kind, part)
                if n.id not in g.roots:
                    g.roots.append(n.id)
    seen = _Sums()
    for dataset, rows in answers:
        for row in rows:
            _add_row(g, seen, dataset, row)
    _link_flows(g, seen.flows)
    _link_invoices(g, seen.invoiced)
    for person_id, kinds in seen.records.items():
        g.node(PERSON, person_id).notes["police records"] = ", ".join(sorted(kinds))
    for uscc, (count, exports, imports) in seen.declared.items():
        g.node(COMPANY, uscc).notes["customs"] = (
            f"{count} declarations, exports {exports:.2f} CNY, imports {imports:.2f} CNY")
    return g


@dataclass
class _Sums:
    """What the answers' rows add up to before it becomes notes and edges: police
    record kinds by person, money in and out by (account, counterparty), customs
    declarations (count, exports, imports) by company."""

    records: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    flows: dict[tuple[str, str], list[Decimal]] = field(
        default_factory=lambda: defaultdict(lambda: [Decimal(0)] * 2))
    declared: dict[str, list[Decimal]] = field(
        default_factory=lambda: defaultdict(lambda: [Decimal(0)] * 3))
    # (issuer, buyer) -> invoice numbers seen, domestic and export totals
    invoiced: dict[tuple[str, str], tuple[set[str], list[Decimal]]] = field(
        default_factory=lambda: defaultdict(lambda: (set(), [Decimal(0)] * 2)))


def _add_row(g: CaseGraph, seen: _Sums, dataset: str, row: Mapping[str, Any]) -> None:
    """One answer row: nodes, notes and edges it names, or sums for later."""
    if dataset in ("taxpayers", "active_legal_reps") and row.get("uscc"):
        company = g.node(COMPANY, str(row["uscc"]))
        if row.get("name"):
            company.notes["name"] = str(row["name"])
        if row.get("status"):
            company.notes["status"] = str(row["status"])
        if row.get("legal_rep_id"):
            g.link(company, LEGAL_REP, g.node(PERSON, str(row["legal_rep_id"])))
    elif dataset == "accounts" and row.get("account_no"):
        holder = _holder(str(row.get("holder_kind", "")), str(row.get("holder_id", "")))
        account = g.node(ACCOUNT, str(row["account_no"]))
        if row.get("bank"):
            account.notes["bank"] = str(row["bank"])
        if holder is not None:
            g.link(g.node(*holder), HOLDS, account)
    elif dataset == "transactions" and row.get("account_no") and \
            row.get("counterparty_account"):
        key = (str(row["account_no"]), str(row["counterparty_account"]))
        amount = Decimal(str(row.get("amount_cny") or 0))
        seen.flows[key][0 if row.get("direction") == "in" else 1] += amount
    elif dataset == "vat_invoices" and row.get("issuer_uscc") and \
            row.get("buyer_uscc") and row.get("issuer_uscc") != row.get("buyer_uscc"):
        numbers, sums = seen.invoiced[(str(row["issuer_uscc"]), str(row["buyer_uscc"]))]
        number = str(row.get("invoice_no") or len(numbers))
        if number not in numbers:  # one invoice in two answers counts once
            numbers.add(number)
            amount = Decimal(str(row.get("amount_cny") or 0))
            sums[1 if row.get("kind") == "export" else 0] += amount
    elif dataset == "persons" and row.get("person_id"):
        person = g.node(PERSON, str(row["person_id"]))
        if row.get("name"):
            person.notes["name"] = str(row["name"])
    elif dataset == "records" and row.get("person_id"):
        seen.records[str(row["person_id"])].append(str(row.get("kind", "record")))
    elif dataset == "declarations" and row.get("uscc"):
        sums = seen.declared[str(row["uscc"])]
        sums[0] += 1
        value = Decimal(str(row.get("declared_value_cny") or 0))
        sums[1 if row.get("direction") == "export" else 2] += value


def _link_flows(g: CaseGraph, flows: Mapping[tuple[str, str], list[Decimal]]) -> None:
    """Counterparty edges between accounts, with the money in and out; transfers
    between one holder's own accounts are a note on the account instead."""
    holders: dict[str, set[str]] = defaultdict(set)
    for (source, relation, target) in g.edges:
        if relation == HOLDS:
            holders[target].add(source)
    for (own, other), (inflow, outflow) in sorted(flows.items()):
        amounts = ", ".join(f"{what} {value:.2f} CNY"
                            for what, value in (("in", inflow), ("out", outflow)) if value)
        if holders[node_id(ACCOUNT, own)] & holders[node_id(ACCOUNT, other)]:
            # both accounts are one holder's: a transfer between its own accounts is a
            # note on the account, not the holder's account again as a counterparty
            own_node = g.node(ACCOUNT, own)
            previous = own_node.notes.get("own transfers")
            entry = f"with {other}: {amounts}"
            own_node.notes["own transfers"] = f"{previous}; {entry}" if previous else entry
            continue
        if (node_id(ACCOUNT, other), COUNTERPARTY, node_id(ACCOUNT, own)) in g.edges:
            continue  # the same transfers seen from the other side, already linked
        edge = g.link(g.node(ACCOUNT, own), COUNTERPARTY, g.node(ACCOUNT, other))
        if inflow:
            edge.notes["in"] = f"{inflow:.2f} CNY"
        if outflow:
            edge.notes["out"] = f"{outflow:.2f} CNY"


def label(node: Node) -> str:
    notes = "; ".join(f"{k}: {v}" for k, v in node.notes.items())
    return f"{node.kind} {node.key}" + (f" ({notes})" if notes else "")


def render_tree(g: CaseGraph, title: str) -> Any:
    """The graph as a rich Tree from the finding's subjects, each node expanded once."""
    from rich.tree import Tree

    tree = Tree(title)
    seen: set[str] = set()

    def grow(branch: Any, nid: str) -> None:
        seen.add(nid)
        for edge in g.out_of(nid):
            target = g.nodes[edge.target]
            notes = ", ".join(f"{k} {v}" for k, v in edge.notes.items())
            text = f"[dim]{edge.relation}{' (' + notes + ')' if notes else ''}[/dim] " \
                   f"{label(target)}"
            if edge.target in seen:
                branch.add(text + " [dim](above)[/dim]")
                continue
            grow(branch.add(text), edge.target)

    roots = g.roots + [n for n in g.nodes if n not in g.roots and not any(
        e.target == n for e in g.edges.values())]
    for nid in roots:
        if nid in seen:
            continue
        grow(tree.add(f"[bold]{label(g.nodes[nid])}[/bold]"), nid)
    return tree


def _link_invoices(g: CaseGraph,
                   invoiced: Mapping[tuple[str, str], tuple[set[str], list[Decimal]]]) -> None:
    """Issuer-to-buyer edges with how many invoices and their domestic and export sums."""
    for (issuer, buyer), (numbers, (domestic, export)) in sorted(invoiced.items()):
        edge = g.link(g.node(COMPANY, issuer), INVOICED, g.node(COMPANY, buyer))
        edge.notes["invoices"] = str(len(numbers))
        if domestic:
            edge.notes["domestic"] = f"{domestic:.2f} CNY"
        if export:
            edge.notes["export"] = f"{export:.2f} CNY"
