"""One committed input for all of an owner's rules that read it alike.

Several of an owner's rules often read the same own dataset with the same period and
fields (tax's three false-invoicing rules read the month's whole invoice register). Each
run committing it as its own input (decision 9) seals and puts the same rows on the
ledger once per rule. Here such an input is asked once, on behalf of every rule that
reads it (Query.on_behalf_of lists their digests, its purpose names each rule and input),
and every run references the same committed query: replay, findings and evidence bundles
read it like any other input. The same holds for a period-wide view of another agency
that several rules ask alike (pboc's company_flows, for two of tax's rules): asked once,
its owner computes and seals it once.

Exactly once: the query's envelope is kept in `pending` (the jobs runner's state file)
before it is submitted. A rerun after a crash submits that same envelope again, which the
ledger commits once (a second submission returns the stored outcome), and reuses it while
it is open or answered; a query that never committed and can no longer (its deadline has
passed), or that expired or was refused, is replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from exchange.client import ExchangeClient, Signer
from exchange.client.crossquery import QuerySpec, build_query
from exchange.compare.rules import Rule
from exchange.errors import ExchangeError, NotFound
from exchange.identity.default_policies import LEGAL_BASIS_TAX_CRIME
from exchange.ledger.findings import RULE_DIGESTS_SEPARATOR
from exchange.ledger.queries import STATUS_ANSWERED, STATUS_OPEN
from exchange.v1 import identity_pb2, ledger_pb2

PENDING_PREFIX = "own-input/"
PURPOSE_SEPARATOR = "; "


@dataclass(frozen=True)
class SharedRead:
    """What makes two inputs the same input: the agency asked (the owner for its own
    inputs), dataset or view, period, fields; asked whole (an own read, a period-wide
    view), never a subject set (its subjects come from the run's other inputs)."""

    target: str
    dataset: str
    period: str
    fields: tuple[str, ...]

    def pending_key(self, tag: str, digests: Sequence[str]) -> str:
        return (f"{PENDING_PREFIX}{tag}/{self.target}/{self.dataset}/{self.period}/"
                f"{','.join(self.fields)}/{RULE_DIGESTS_SEPARATOR.join(sorted(digests))}")


def input_purpose(rule_id: str, version: int, name: str) -> str:
    """The purpose of a rule's input query; replay reads the input's name from it."""
    return f"rule {rule_id} v{version}: input {name}"


def input_name_in(purpose: str, rule_id: str, version: int) -> str | None:
    """The input name the purpose gives for this rule: of its own part when the query was
    asked for several rules, else of the only part (None: it names no input)."""
    marker = ": input "
    parts = purpose.split(PURPOSE_SEPARATOR)
    if len(parts) > 1:
        mine = f"rule {rule_id} v{version}{marker}"
        return next((p[len(mine):] for p in parts if p.startswith(mine)), None)
    if marker not in purpose:
        return None
    return purpose.rsplit(marker, 1)[1]


@dataclass(frozen=True)
class PlannedRun:
    """One run a shared input may serve: the rule and its own reads (name -> read)."""

    rule_id: str
    version: int
    digest_hex: str
    reads: Mapping[str, SharedRead]


class SharedOwnInputs:
    """Commits, once, each own input two or more of the planned runs read alike."""

    def __init__(self, client: ExchangeClient, signer: Signer,
                 genesis: identity_pb2.Genesis, deadline_s: int,
                 pending: MutableMapping[str, str] | None = None,
                 save: Callable[[], None] | None = None, tag: str = "",
                 progress: Callable[[str], None] | None = None) -> None:
        """`pending` (with `save`, which makes it durable) keeps each shared input's
        envelope from before its submission until no planned run still needs it; `tag`
        (the owner's load-log fingerprint) makes new data a new input."""
        self.client = client
        self.signer = signer
        self.genesis = genesis
        self.deadline_s = deadline_s
        self.pending: MutableMapping[str, str] = pending if pending is not None else {}
        self.save = save or (lambda: None)
        self.tag = tag
        self.progress = progress or (lambda _msg: None)

    def commit(self, runs: Sequence[PlannedRun]) -> list[dict[str, bytes]]:
        """For each run, its input names answered by a shared committed query (its id).
        Raises ExchangeError when a shared input cannot be committed."""
        groups: dict[SharedRead, list[tuple[int, str]]] = {}
        for index, run in enumerate(runs):
            for name, read in run.reads.items():
                groups.setdefault(read, []).append((index, name))
        out: list[dict[str, bytes]] = [{} for _ in runs]
        wanted: set[str] = set()
        for read, users in groups.items():
            digests = {runs[i].digest_hex for i, _ in users}
            key = self._pending_for(read, digests)
            if key is None and len({i for i, _ in users}) < 2:
                continue  # one run reads it: the run asks it itself, as before
            qid, key = self._committed(read, [(runs[i], name) for i, name in users], key)
            wanted.add(key)
            for i, name in users:
                out[i][name] = qid
        for key in [k for k in self.pending if k.startswith(PENDING_PREFIX)]:
            if key not in wanted:  # every run it served has committed
                del self.pending[key]
        self.save()
        return out

    def _pending_for(self, read: SharedRead, digests: set[str]) -> str | None:
        """A kept input of this read (and data) asked on behalf of all these rules."""
        prefix = read.pending_key(self.tag, [])
        for key in self.pending:
            if key.startswith(prefix) and \
                    digests <= set(key[len(prefix):].split(RULE_DIGESTS_SEPARATOR)):
                return key
        return None

    def _committed(self, read: SharedRead, users: list[tuple[PlannedRun, str]],
                   key: str | None) -> tuple[bytes, str]:
        """The id of the committed query answering `read` for `users`, and its key."""
        if key is not None:
            envelope = bytes.fromhex(self.pending[key])
            qid = _tx_id(envelope)
            if self._usable(qid, envelope):
                self.progress(f"{read.target} {read.dataset}: the input committed "
                              "earlier, reused")
                return qid, key
            del self.pending[key]
        runs = sorted({(r.rule_id, r.version, r.digest_hex, name) for r, name in users})
        digests = sorted({d for _, _, d, _ in runs})
        spec = QuerySpec(
            target=read.target, dataset=read.dataset, subjects=(),
            period=read.period or None,
            purpose=PURPOSE_SEPARATOR.join(input_purpose(r, v, n) for r, v, _, n in runs),
            legal_basis=LEGAL_BASIS_TAX_CRIME, fields=read.fields,
            shape=int(ledger_pb2.QueryShape.QUERY_SHAPE_AGGREGATE),
            deadline_s=self.deadline_s,
            on_behalf_of=RULE_DIGESTS_SEPARATOR.join(digests))
        members = list(self.client.status().member_entries) or list(self.genesis.members)
        envelope, qid = build_query(spec, self.signer, self.genesis, members=members)
        key = read.pending_key(self.tag, digests)
        self.pending[key] = envelope.hex()
        self.save()  # durable before it can commit: a rerun finds it
        [result] = self.client.submit_batch([envelope], wait=True)
        if result.error_code or result.result != "OK":
            raise ExchangeError(f"input {read.target} {read.dataset} refused: "
                                f"{result.error_code or result.result}: {result.error}")
        self.progress(f"{read.target} {read.dataset}: one input for {len(runs)} rules")
        return qid, key

    def _usable(self, qid: bytes, envelope: bytes) -> bool:
        """Whether the kept query is (now) committed and still open or answered."""
        try:
            self.client.get_transaction(qid)
        except NotFound:
            [result] = self.client.submit_batch([envelope], wait=True)
            if result.error_code or result.result != "OK":
                return False  # past its deadline, say: it never committed, none will
        try:
            parts = self.client.stream_answer(qid)
            head = next(iter(parts))
        except ExchangeError:
            return False  # committed but judged invalid: no query to answer
        close = getattr(parts, "close", None)
        if close is not None:
            close()
        return str(head.query.status) in (STATUS_OPEN, STATUS_ANSWERED)


def _tx_id(envelope: bytes) -> bytes:
    from exchange.ledger.block import tx_id

    return tx_id(ledger_pb2.Envelope.FromString(envelope).body)


def planned_run(rule: Rule, params: Mapping[str, str]) -> PlannedRun:
    """The run of `rule` with `params`, as far as the inputs it asks whole go: its own
    reads and its period-wide views of other agencies."""
    plan = rule.plan(params)
    reads = {o.name: SharedRead(plan.owner, o.dataset, o.period or "", tuple(o.fields))
             for o in plan.own}
    reads.update({q.name: SharedRead(q.agency, q.dataset, q.period or "", tuple(q.fields))
                  for q in plan.queries if q.shape == "aggregate"})
    return PlannedRun(rule.id, rule.version, rule.digest_hex, reads)
