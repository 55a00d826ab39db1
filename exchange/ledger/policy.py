"""Data owners' policies and their deterministic evaluation (design decision 7).

A policy belongs to the agency that owns the dataset: it takes effect only in a
transaction signed by that agency (or from genesis), and a later version of the same
policy id replaces an earlier one. Evaluation is a pure function of the policies in
force at the query's block and the query's metadata, so every node, and an offline
verifier, reaches the same decision for the same query.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from exchange.errors import MalformedInput, PermissionDenied
from exchange.v1 import ledger_pb2

SHAPE = ledger_pb2.QueryShape

# Reason codes of a refusal (stable: they appear on the ledger).
NO_POLICY = "NO_POLICY"
NOT_GRANTED = "NOT_GRANTED"
ROLE_NOT_GRANTED = "ROLE_NOT_GRANTED"
FIELD_NOT_GRANTED = "FIELD_NOT_GRANTED"
LEGAL_BASIS_NOT_GRANTED = "LEGAL_BASIS_NOT_GRANTED"
CASE_REQUIRED = "CASE_REQUIRED"
SHAPE_NOT_GRANTED = "SHAPE_NOT_GRANTED"
COSIGNATURE_REQUIRED = "COSIGNATURE_REQUIRED"
RATE_LIMITED = "RATE_LIMITED"

@dataclass(frozen=True, slots=True)
class QueryFacts:
    """What a policy decision depends on, all in clear on the ledger."""

    requester_agency: str
    requester_roles: frozenset[str]
    target_agency: str
    dataset: str
    fields: tuple[str, ...]
    case_id: str
    legal_basis: str
    shape: int
    supervisor_cosigned: bool = False
    queries_last_hour: int = 0  # by the same analyst, before this one


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    code: str = ""
    reason: str = ""
    fields: tuple[str, ...] = ()
    row_limit: int = 0
    policy_id: str = ""
    policy_version: int = 0


@dataclass
class PolicyBook:
    """The policies in force: (owner agency, dataset) -> the latest version."""

    policies: dict[tuple[str, str], ledger_pb2.Policy] = field(default_factory=dict)

    @classmethod
    def from_genesis(cls, policies: Iterable[ledger_pb2.Policy]) -> PolicyBook:
        book = cls()
        for policy in policies:
            book.apply(policy, signer_agency=policy.owner_agency)
        return book

    def apply(self, policy: ledger_pb2.Policy, signer_agency: str) -> None:
        """Put a policy in force; raise unless its owner signed it and it is newer."""
        if not policy.policy_id or not policy.dataset or not policy.owner_agency:
            raise MalformedInput("a policy needs an id, an owner and a dataset")
        if signer_agency != policy.owner_agency:
            raise PermissionDenied(f"{signer_agency} may not set the policy of "
                                   f"{policy.owner_agency}'s dataset {policy.dataset}")
        key = (policy.owner_agency, policy.dataset)
        current = self.policies.get(key)
        if current is not None and policy.version <= current.version:
            raise MalformedInput(f"policy {policy.policy_id} version {policy.version} is not "
                                 f"newer than version {current.version}")
        self.policies[key] = policy

    def get(self, owner: str, dataset: str) -> ledger_pb2.Policy | None:
        return self.policies.get((owner, dataset))

    def evaluate(self, q: QueryFacts) -> Decision:
        """Allow or refuse a query, with the first reason that refuses it."""
        policy = self.get(q.target_agency, q.dataset)
        if policy is None:
            return Decision(False, NO_POLICY,
                            f"{q.target_agency} publishes no policy for {q.dataset}")
        grants = [g for g in policy.grants if g.requester_agency == q.requester_agency]
        if not grants:
            return _refuse(policy, NOT_GRANTED, f"{q.dataset} of {q.target_agency} is not "
                                                f"open to {q.requester_agency}")
        best: Decision | None = None
        for grant in grants:
            decision = _evaluate_grant(policy, grant, q)
            if decision.allowed:
                return decision
            # the reason of a grant made for the asker's role says more than "not your role"
            if best is None or (best.code == ROLE_NOT_GRANTED
                                and decision.code != ROLE_NOT_GRANTED):
                best = decision
        assert best is not None
        return best


def _refuse(policy: ledger_pb2.Policy, code: str, reason: str) -> Decision:
    return Decision(False, code, reason, policy_id=policy.policy_id,
                    policy_version=policy.version)


def _evaluate_grant(policy: ledger_pb2.Policy, grant: ledger_pb2.PolicyGrant,
                    q: QueryFacts) -> Decision:
    if grant.roles and not q.requester_roles & set(grant.roles):
        return _refuse(policy, ROLE_NOT_GRANTED,
                       f"needs one of the roles {', '.join(grant.roles)}")
    if grant.shapes and q.shape not in grant.shapes:
        return _refuse(policy, SHAPE_NOT_GRANTED,
                       f"{SHAPE.Name(q.shape)} queries are not granted on {q.dataset}")
    if grant.legal_bases and q.legal_basis not in grant.legal_bases:
        return _refuse(policy, LEGAL_BASIS_NOT_GRANTED,
                       f"legal basis {q.legal_basis!r} is not one of "
                       f"{', '.join(grant.legal_bases)}")
    if grant.case_required and not q.case_id:
        return _refuse(policy, CASE_REQUIRED, f"queries on {q.dataset} must name a case")
    granted = tuple(grant.fields)
    fields = q.fields or granted
    if granted:
        missing = [f for f in fields if f not in granted]
        if missing:
            return _refuse(policy, FIELD_NOT_GRANTED,
                           f"fields not granted: {', '.join(missing)}")
    if grant.supervisor_cosign_required and not q.supervisor_cosigned:
        return _refuse(policy, COSIGNATURE_REQUIRED,
                       "a supervisor of the requesting agency must co-sign this query")
    if grant.rate_per_hour and q.queries_last_hour >= grant.rate_per_hour:
        return _refuse(policy, RATE_LIMITED,
                       f"at most {grant.rate_per_hour} queries per analyst per hour")
    return Decision(True, fields=tuple(fields), row_limit=grant.row_limit,
                    policy_id=policy.policy_id, policy_version=policy.version)


def describe(policy: ledger_pb2.Policy) -> Mapping[str, object]:
    """A policy as plain data, for `exchange policy show`."""
    return {
        "policy_id": policy.policy_id, "owner": policy.owner_agency,
        "dataset": policy.dataset, "version": policy.version,
        "grants": [{
            "to": g.requester_agency, "roles": list(g.roles), "fields": list(g.fields),
            "legal_bases": list(g.legal_bases), "case_required": g.case_required,
            "row_limit": g.row_limit, "rate_per_hour": g.rate_per_hour,
            "supervisor_cosign": g.supervisor_cosign_required,
            "shapes": [SHAPE.Name(s) for s in g.shapes]} for g in policy.grants],
    }




_POLICY_KEYS = {"policy_id", "owner", "dataset", "version", "grants"}
_GRANT_KEYS = {"to", "roles", "fields", "legal_bases", "case_required", "row_limit",
               "rate_per_hour", "supervisor_cosign", "shapes"}


def policy_from_dict(obj: object) -> ledger_pb2.Policy:
    """The inverse of `describe`: a policy from plain data (a file an owner edits).
    Strict: an unknown key or a value of the wrong type raises MalformedInput. A
    missing version is 0 (the caller sets the next one)."""
    if not isinstance(obj, Mapping):
        raise MalformedInput("a policy is an object")
    unknown = set(obj) - _POLICY_KEYS
    if unknown:
        raise MalformedInput(f"policy: unknown key(s) {', '.join(sorted(unknown))}")
    owner, dataset = obj.get("owner"), obj.get("dataset")
    if not isinstance(owner, str) or not owner or not isinstance(dataset, str) or not dataset:
        raise MalformedInput("policy: owner and dataset are required strings")
    version = obj.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise MalformedInput("policy: version is a non-negative integer")
    grants = obj.get("grants", [])
    if not isinstance(grants, list):
        raise MalformedInput("policy: grants is a list")
    policy = ledger_pb2.Policy(policy_id=str(obj.get("policy_id") or f"{owner}/{dataset}"),
                               owner_agency=owner, dataset=dataset, version=version)
    for i, g in enumerate(grants):
        policy.grants.append(_grant_from_dict(g, f"policy: grant {i}"))
    return policy


def _grant_from_dict(g: object, where: str) -> ledger_pb2.PolicyGrant:
    if not isinstance(g, Mapping):
        raise MalformedInput(f"{where} is not an object")
    unknown = set(g) - _GRANT_KEYS
    if unknown:
        raise MalformedInput(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")

    def strings(key: str) -> list[str]:
        value = g.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise MalformedInput(f"{where}: {key} is a list of strings")
        return list(value)

    def number(key: str) -> int:
        value = g.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
            raise MalformedInput(f"{where}: {key} is a non-negative integer")
        return value

    def flag(key: str) -> bool:
        value = g.get(key, False)
        if not isinstance(value, bool):
            raise MalformedInput(f"{where}: {key} is true or false")
        return value

    to = g.get("to")
    if not isinstance(to, str) or not to:
        raise MalformedInput(f"{where}: 'to' (the requesting agency) is required")
    shapes: list[ledger_pb2.QueryShape] = []
    for name in strings("shapes"):
        full = name if name.startswith("QUERY_SHAPE_") else "QUERY_SHAPE_" + name.upper()
        if full not in SHAPE.keys() or full == "QUERY_SHAPE_UNSPECIFIED":  # noqa: SIM118
            raise MalformedInput(f"{where}: unknown shape {name!r}")
        shapes.append(SHAPE.Value(full))  # type: ignore[arg-type]
    return ledger_pb2.PolicyGrant(
        requester_agency=to, roles=strings("roles"), fields=strings("fields"),
        legal_bases=strings("legal_bases"), case_required=flag("case_required"),
        row_limit=number("row_limit"), rate_per_hour=number("rate_per_hour"),
        supervisor_cosign_required=flag("supervisor_cosign"), shapes=shapes)
