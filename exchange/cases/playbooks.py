"""Playbook files: what an agency does automatically with a finding.

A playbook is a YAML file ``agents/<owner>/playbooks/<id>.yaml`` (docs/playbooks.md has
the format): a trigger (rule ids, a minimum severity, a minimum amount, or any new finding
on a subject of one of the owner's open cases) and steps, in order: the case step (open
a case, or add the finding to the open case that already holds its subject), follow-up
cross-queries about the finding's subjects and what earlier answers named, further rules
of the owner run restricted to the case's subjects, and notifications. Every key, agency,
dataset, column, subject reference and period is checked against the data contract; a
problem is a PlaybookError naming the file and line (the same strict reader as rule
files). The canonical bytes are the canonical JSON of what the file means; their digest
is what the ledger registers, and each step's key (``<index>-<name>``) is what makes the
ledger accept each step only once per finding.

Over 600 lines on purpose: the playbook file format and its checks, key by key, as
compare/rules.py is for rules.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import yaml

from agents import AGENCIES, datasets_of, views_of
from agents.common.schema import Kind
from agents.lookup import PRINCIPAL_DATES, lookup_keys
from exchange.compare.rule_file import load_rule, rules_dir
from exchange.compare.rules import SEVERITIES
from exchange.ledger.sealing import canonical_json
from exchange.specfile import (
    TAG_BOOL,
    TAG_FLOAT,
    TAG_INT,
    TAG_STR,
    SpecError,
    StrictYaml,
    check_named_after_file,
    compose_yaml,
    load_owned_folder,
    read_checked_file,
)

PLAYBOOK_FILE_SUFFIX = ".yaml"
PLAYBOOK_FILE_BYTES_MAX = 64 * 1024
DESCRIPTION_CHARS_MAX = 4_000
MESSAGE_CHARS_MAX = 500
REASON_CHARS_MAX = 500
VERSION_MAX = 2**32 - 1
STEPS_MAX = 32
QUERY_STEPS_MAX = 16
SUBJECT_REFS_MAX = 8
MONTHS_BACK_MAX = 12
AMOUNT_MAX = Decimal("1e15")

PLAYBOOK_KEYS = ("id", "version", "owner", "description", "trigger", "steps")
TRIGGER_KEYS = ("rules", "severity_min", "amount_min", "open_cases")
STEP_KINDS = ("case", "query", "rule", "notify")
CASE_KEYS = ("case", "prefix", "reason")
QUERY_KEYS = ("query", "agency", "dataset", "subjects", "period", "fields")
RULE_KEYS = ("rule", "months")
NOTIFY_KEYS = ("notify",)
CASE_MODES = ("open", "add")
PERIOD_CHOICES = ("finding",)
# What a notification's text may name: all of it in clear on the ledger (never a subject).
MESSAGE_FIELDS = ("case", "finding", "rule", "severity", "period", "playbook")
FINDING_SOURCE = "finding"
FINDING_COLUMNS = {"uscc": "uscc", "person_id": "person_id"}
SUBJECT_KINDS = ("uscc", "person_id")

_ID_SHAPE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_NAME_SHAPE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_PREFIX_SHAPE = re.compile(r"[A-Z][A-Z0-9-]{0,23}")
_REF_SHAPE = re.compile(r"(?:([a-z][a-z0-9_]{0,63})=)?([a-z][a-z0-9_]{0,63})\.([a-z][a-z0-9_]{0,63})")


class PlaybookError(SpecError):
    """A playbook file that is not a valid playbook: the message names the file and,
    where one is known, the line."""


# -- the playbook ----------------------------------------------------------------------

def severity_rank(severity: str) -> int:
    """high 3, medium 2, low 1, anything else 0."""
    return len(SEVERITIES) - SEVERITIES.index(severity) if severity in SEVERITIES else 0


@dataclass(frozen=True)
class Trigger:
    """Which findings a playbook takes: findings of `rules` at or above the minimum
    severity and amount, and (with `open_cases`) any new finding about a subject of one
    of the owner's open cases."""

    rules: tuple[str, ...]
    severity_min: str | None = None
    amount_min: Decimal | None = None
    open_cases: bool = False

    def matches(self, rule_id: str, severity: str, amount: Decimal | None,
                on_open_case: bool) -> bool:
        if not (rule_id in self.rules or (self.open_cases and on_open_case)):
            return False
        if self.severity_min is not None and \
                severity_rank(severity) < severity_rank(self.severity_min):
            return False
        return self.amount_min is None or (amount is not None and amount >= self.amount_min)


@dataclass(frozen=True)
class SubjectRef:
    """One subject source of a follow-up: `source.column` (the finding's uscc or
    person_id, or a column of an earlier follow-up's answer), asked as `key`."""

    key: str
    source: str  # "finding" or an earlier query step's name
    column: str

    @property
    def text(self) -> str:
        return f"{self.source}.{self.column}"


@dataclass(frozen=True)
class CaseStep:
    mode: str  # "open": open a case or add to the open one holding the subject; "add"
    prefix: str  # case ids are <prefix>-<12 hex digits>
    reason: str
    name: str = "case"
    kind: str = "case"


@dataclass(frozen=True)
class QueryStep:
    name: str
    agency: str
    dataset: str
    subjects: tuple[SubjectRef, ...]
    period: str | None  # "finding": the finding's month; None: no month
    fields: tuple[str, ...]
    column_kinds: Mapping[str, str] = field(default_factory=dict, compare=False)
    month_required: bool = False  # a view per month: without the finding's month, no ask
    kind: str = "query"


@dataclass(frozen=True)
class RuleStep:
    rule: str
    months: tuple[int, ...]  # offsets from the finding's month; () for a rule without period
    name: str = ""
    kind: str = "rule"


@dataclass(frozen=True)
class NotifyStep:
    message: str
    name: str = "notify"
    kind: str = "notify"

    def render(self, values: Mapping[str, str]) -> str:
        return self.message.format_map({k: values.get(k, "") for k in MESSAGE_FIELDS})


Step = CaseStep | QueryStep | RuleStep | NotifyStep


@dataclass(frozen=True)
class Playbook:
    source: str
    id: str
    version: int
    owner: str
    description: str
    trigger: Trigger
    steps: tuple[Step, ...]
    canonical_bytes: bytes = field(repr=False)

    @property
    def digest(self) -> bytes:
        """SHA-256 of the canonical bytes: what the ledger registers."""
        return hashlib.sha256(self.canonical_bytes).digest()

    @property
    def digest_hex(self) -> str:
        return self.digest.hex()

    @property
    def case_step(self) -> CaseStep:
        step = self.steps[0]
        assert isinstance(step, CaseStep)
        return step

    def step_key(self, index: int) -> str:
        """The key the ledger knows a step by: its place and name."""
        return f"{index}-{self.steps[index].name}"

    @property
    def query_steps(self) -> list[tuple[int, QueryStep]]:
        return [(i, s) for i, s in enumerate(self.steps) if isinstance(s, QueryStep)]


# -- loading ---------------------------------------------------------------------------

def playbooks_dir(agency: str) -> Path:
    """Where an agency's playbook files are: agents/<agency>/playbooks."""
    return rules_dir(agency).parent / "playbooks"


def load_playbooks(agency: str, folder: Path | None = None) -> list[Playbook]:
    """Every playbook of `agency` (its `*.yaml` files, by file name), each owned by it."""
    folder = playbooks_dir(agency) if folder is None else Path(folder)
    return load_owned_folder(folder, PLAYBOOK_FILE_SUFFIX, agency, load_playbook, "playbook",
                             PlaybookError)


def load_playbook(path: Path) -> Playbook:
    """The playbook in the file at `path`; its id must be the file's name."""
    path = Path(path)
    data = read_checked_file(path, PLAYBOOK_FILE_BYTES_MAX, PlaybookError, "playbook")
    playbook = load_playbook_bytes(data, str(path))
    check_named_after_file(path, PLAYBOOK_FILE_SUFFIX, playbook.id, "playbook", PlaybookError)
    return playbook


def load_playbook_bytes(data: bytes, source: str = "<playbook>") -> Playbook:
    """The playbook in `data` (a playbook file, or a playbook's canonical bytes)."""
    if len(data) > PLAYBOOK_FILE_BYTES_MAX:
        raise PlaybookError(source, None, f"{len(data)} bytes, more than the "
                            f"{PLAYBOOK_FILE_BYTES_MAX} a playbook file may have")
    root = compose_yaml(data, source, PlaybookError)
    if root is None:
        raise PlaybookError(source, 1, "empty file: a playbook is a mapping of id, version, "
                            "owner, description, trigger, steps")
    return _Parser(source).playbook(root)


# -- what a follow-up can ask ----------------------------------------------------------

def _dataset_keys_and_kinds(agency: str, dataset: str
                            ) -> tuple[dict[str, str], dict[str, str], bool, bool] | None:
    """(lookup key -> kind of value, column -> kind, may name a month, must name a month)
    of an agency's dataset or view; None if it offers no such thing."""
    datasets = {d.name: d for d in datasets_of(agency)}
    if dataset in datasets:
        d = datasets[dataset]
        columns = {c.name: c.kind.value for c in d.columns}
        keys = {k: columns[k] for k in lookup_keys(d)}
        for kind in SUBJECT_KINDS:
            if any(c.kind in (Kind(kind), Kind.HOLDER_ID) for c in d.columns):
                keys.setdefault(kind, kind)
        names = d.column_names
        periodic = "period" in names or any(p in names for p in PRINCIPAL_DATES)
        return keys, columns, periodic, False
    views = views_of(agency)
    if dataset in views:
        v = views[dataset]
        columns = {c.name: c.type for c in v.columns}
        keys = {c.name: c.type for c in v.columns if c.type in SUBJECT_KINDS}
        for kind in SUBJECT_KINDS:
            if kind in keys.values():
                keys.setdefault(kind, kind)
        return keys, columns, v.period_bound, v.period_bound
    return None


def _fits(source_kind: str, key_kind: str) -> bool:
    """Whether values of `source_kind` can be looked up by a key taking `key_kind`."""
    if key_kind == "holder_id":
        return source_kind in ("uscc", "person_id", "holder_id")
    return source_kind == key_kind


class _Parser(StrictYaml):
    error_class = PlaybookError

    def playbook(self, root: yaml.Node) -> Playbook:
        top = self.mapping(root, "the playbook", PLAYBOOK_KEYS, PLAYBOOK_KEYS)
        playbook_id = self.text(top["id"], "id")
        if _ID_SHAPE.fullmatch(playbook_id) is None:
            raise self.error(top["id"], f"id {playbook_id!r} is not a playbook id (lower-case "
                             "letters, digits and -, at most 64)")
        version = self.scalar(top["version"], TAG_INT, "version", "an integer")
        if not 1 <= version <= VERSION_MAX:
            raise self.error(top["version"], f"version must be between 1 and {VERSION_MAX}")
        owner = self.choice(top["owner"], "owner", AGENCIES)
        description = " ".join(self.text(top["description"], "description",
                                         DESCRIPTION_CHARS_MAX).split())
        trigger = self.trigger(top["trigger"])
        steps = self.steps(top["steps"], owner, description)
        content = {
            "id": playbook_id, "version": version, "owner": owner,
            "description": description,
            "trigger": _trigger_json(trigger),
            "steps": [_step_json(s) for s in steps],
        }
        return Playbook(source=self.source, id=playbook_id, version=version, owner=owner,
                        description=description, trigger=trigger, steps=tuple(steps),
                        canonical_bytes=canonical_json(content))

    # -- trigger ------------------------------------------------------------------------

    def trigger(self, node: yaml.Node) -> Trigger:
        spec = self.mapping(node, "trigger", TRIGGER_KEYS, ())
        rules: list[str] = []
        if "rules" in spec:
            seen: set[str] = set()
            for item in self.sequence(spec["rules"], "trigger: rules"):
                rule_id = self.text(item, "trigger: a rule id")
                if _ID_SHAPE.fullmatch(rule_id) is None:
                    raise self.error(item, f"trigger: {rule_id!r} is not a rule id")
                if rule_id in seen:
                    raise self.error(item, f"trigger: rule {rule_id!r} given twice")
                seen.add(rule_id)
                rules.append(rule_id)
        severity = (self.choice(spec["severity_min"], "trigger: severity_min", SEVERITIES)
                    if "severity_min" in spec else None)
        amount = self.amount(spec["amount_min"]) if "amount_min" in spec else None
        open_cases = False
        if "open_cases" in spec:
            open_cases = bool(self.scalar(spec["open_cases"], TAG_BOOL, "trigger: open_cases",
                                          "true or false"))
        if not rules and not open_cases:
            raise self.error(node, "trigger: name rules, or set open_cases: true, or both")
        return Trigger(tuple(rules), severity, amount, open_cases)

    def amount(self, node: yaml.Node) -> Decimal:
        what = "trigger: amount_min"
        if not isinstance(node, yaml.ScalarNode) or node.tag not in (TAG_INT, TAG_FLOAT, TAG_STR):
            raise self.error(node, f"{what} must be an amount in CNY, as 1000000 or "
                             "\"1000000.00\"")
        try:
            value = Decimal(str(node.value).replace("_", ""))
        except InvalidOperation:
            raise self.error(node, f"{what} {node.value!r} is not an amount") from None
        if not value.is_finite() or value < 0 or value > AMOUNT_MAX or \
                value != value.quantize(Decimal("0.01")):
            raise self.error(node, f"{what} must be 0 to {AMOUNT_MAX:,.0f} CNY with at most "
                             "two decimals")
        return value.quantize(Decimal("0.01"))

    # -- steps --------------------------------------------------------------------------

    def steps(self, node: yaml.Node, owner: str, description: str) -> list[Step]:
        items = self.sequence(node, "steps")
        if not items:
            raise self.error(node, "steps: a playbook has at least its case step")
        if len(items) > STEPS_MAX:
            raise self.error(node, f"steps: more than {STEPS_MAX}")
        steps: list[Step] = []
        answers: dict[str, Mapping[str, str]] = {}  # query step -> its columns' kinds
        rules_seen: set[str] = set()
        for index, item in enumerate(items):
            if not isinstance(item, yaml.MappingNode):
                raise self.error(item, "a step is a mapping with one of "
                                 f"{', '.join(STEP_KINDS)}")
            kinds = [k.value for k, _v in item.value
                     if isinstance(k, yaml.ScalarNode) and k.value in STEP_KINDS]
            if len(kinds) != 1:
                raise self.error(item, "a step names exactly one of "
                                 f"{', '.join(STEP_KINDS)} (got {', '.join(kinds) or 'none'})")
            kind = kinds[0]
            if index == 0 and kind != "case":
                raise self.error(item, "the first step is the case step (case: open or "
                                 "case: add): every later step belongs to the case")
            if index > 0 and kind == "case":
                raise self.error(item, "a playbook has one case step, the first")
            if kind == "case":
                steps.append(self.case_step(item, description))
            elif kind == "query":
                step = self.query_step(item, owner, answers)
                if sum(1 for s in steps if isinstance(s, QueryStep)) >= QUERY_STEPS_MAX:
                    raise self.error(item, f"more than {QUERY_STEPS_MAX} follow-up queries")
                answers[step.name] = step.column_kinds
                steps.append(step)
            elif kind == "rule":
                rule_step = self.rule_step(item, owner)
                if rule_step.rule in rules_seen:
                    raise self.error(item, f"rule {rule_step.rule} is run by an earlier step")
                rules_seen.add(rule_step.rule)
                steps.append(rule_step)
            else:
                steps.append(self.notify_step(item))
        return steps

    def case_step(self, node: yaml.Node, description: str) -> CaseStep:
        spec = self.mapping(node, "the case step", CASE_KEYS, ("case",))
        mode = self.choice(spec["case"], "case", CASE_MODES)
        if mode == "open" and "prefix" not in spec:
            raise self.error(node, "case: open needs a prefix (case ids are "
                             "<prefix>-<12 hex digits>)")
        prefix = ""
        if "prefix" in spec:
            prefix = self.text(spec["prefix"], "case: prefix")
            if _PREFIX_SHAPE.fullmatch(prefix) is None:
                raise self.error(spec["prefix"], f"case: prefix {prefix!r} is not upper-case "
                                 "letters, digits and -, starting with a letter, at most 24")
        reason = (" ".join(self.text(spec["reason"], "case: reason", REASON_CHARS_MAX).split())
                  if "reason" in spec else description[:REASON_CHARS_MAX])
        return CaseStep(mode, prefix, reason)

    def step_name(self, node: yaml.Node, what: str) -> str:
        value = self.text(node, what)
        if _NAME_SHAPE.fullmatch(value) is None:
            raise self.error(node, f"{what} {value!r} is not a name (a lower-case letter, "
                             "then lower-case letters, digits and _, at most 32)")
        return value

    def query_step(self, node: yaml.Node, owner: str,
                   answers: Mapping[str, Mapping[str, str]]) -> QueryStep:
        spec = self.mapping(node, "a query step", QUERY_KEYS,
                            ("query", "agency", "dataset", "subjects"))
        name = self.step_name(spec["query"], "query")
        what = f"query {name}"
        if name in answers or name == FINDING_SOURCE:
            raise self.error(spec["query"], f"{what}: the name is taken")
        agency = self.choice(spec["agency"], f"{what}: agency", AGENCIES)
        dataset = self.text(spec["dataset"], f"{what}: dataset")
        found = _dataset_keys_and_kinds(agency, dataset)
        if found is None:
            offered = ", ".join([d.name for d in datasets_of(agency)] + list(views_of(agency)))
            raise self.error(spec["dataset"], f"{what}: {agency} offers no dataset or view "
                             f"{dataset!r} (it offers {offered})")
        keys, columns, periodic, needs_period = found
        fields: tuple[str, ...] = ()
        if "fields" in spec:
            chosen = []
            for value, item in self.names(spec["fields"], f"{what}: fields"):
                if value not in columns:
                    raise self.error(item, f"{what}: {dataset} has no column {value!r} (it "
                                     f"has {', '.join(columns)})")
                chosen.append(value)
            fields = tuple(c for c in columns if c in chosen)
        period = None
        if "period" in spec:
            period = self.choice(spec["period"], f"{what}: period", PERIOD_CHOICES)
            if not periodic:
                raise self.error(spec["period"], f"{what}: {dataset} has no month to filter "
                                 "on; leave period out")
        elif needs_period:
            raise self.error(node, f"{what}: view {dataset} is per month: give period: "
                             "finding")
        subjects = self.subject_refs(spec["subjects"], what, agency, keys, answers)
        kept = fields or tuple(columns)
        return QueryStep(name, agency, dataset, subjects, period, fields,
                         {c: columns[c] for c in kept}, month_required=needs_period)

    def subject_refs(self, node: yaml.Node, what: str, agency: str, keys: Mapping[str, str],
                     answers: Mapping[str, Mapping[str, str]]) -> tuple[SubjectRef, ...]:
        items = self.sequence(node, f"{what}: subjects")
        if not items:
            raise self.error(node, f"{what}: subjects is empty (a follow-up asks about the "
                             "finding's subjects or what earlier answers named)")
        if len(items) > SUBJECT_REFS_MAX:
            raise self.error(node, f"{what}: more than {SUBJECT_REFS_MAX} subject sources")
        out: list[SubjectRef] = []
        for item in items:
            text = self.text(item, f"{what}: a subject source")
            found = _REF_SHAPE.fullmatch(text)
            if found is None:
                raise self.error(item, f"{what}: subject {text!r} is not <source>.<column> "
                                 "or <key>=<source>.<column> (source: finding or an earlier "
                                 "query)")
            explicit, source, column = found.groups()
            if source == FINDING_SOURCE:
                if column not in FINDING_COLUMNS:
                    raise self.error(item, f"{what}: a finding gives {' and '.join(FINDING_COLUMNS)}"
                                     f", not {column!r}")
                kind = FINDING_COLUMNS[column]
            elif source in answers:
                available = answers[source]
                if column not in available:
                    raise self.error(item, f"{what}: the answer of {source} has no column "
                                     f"{column!r} (it has {', '.join(available)})")
                kind = available[column]
            else:
                raise self.error(item, f"{what}: {source!r} is neither the finding nor an "
                                 "earlier query")
            if explicit is not None:
                key = explicit
                if key not in keys:
                    raise self.error(item, f"{what}: {agency}'s dataset is not looked up by "
                                     f"{key!r} (it is by {', '.join(keys)})")
            elif column in keys and _fits(kind, keys[column]):
                key = column
            elif kind in keys:
                key = kind
            else:
                raise self.error(item, f"{what}: {text} holds {kind} values, which "
                                 f"{agency}'s dataset cannot be looked up by (it is by "
                                 f"{', '.join(keys)}); name the key as <key>={text}")
            if not _fits(kind, keys[key]):
                raise self.error(item, f"{what}: {text} holds {kind} values; key {key} takes "
                                 f"{keys[key]} values")
            ref = SubjectRef(key, source, column)
            if ref in out:
                raise self.error(item, f"{what}: subject {text} given twice")
            out.append(ref)
        return tuple(out)

    def rule_step(self, node: yaml.Node, owner: str) -> RuleStep:
        spec = self.mapping(node, "a rule step", RULE_KEYS, ("rule",))
        rule_id = self.text(spec["rule"], "rule")
        if _ID_SHAPE.fullmatch(rule_id) is None:
            raise self.error(spec["rule"], f"rule {rule_id!r} is not a rule id")
        path = rules_dir(owner) / f"{rule_id}.yaml"
        if not path.is_file():
            raise self.error(spec["rule"], f"{owner} has no rule {rule_id!r} (a playbook runs "
                             f"rules of its owner: agents/{owner}/rules)")
        period_bound = load_rule(path).period_bound
        months: tuple[int, ...] = ()
        if "months" in spec:
            if not period_bound:
                raise self.error(spec["months"], f"rule {rule_id} is not per month; leave "
                                 "months out")
            values: list[int] = []
            for item in self.sequence(spec["months"], f"rule {rule_id}: months"):
                value = self.scalar(item, TAG_INT, f"rule {rule_id}: a month offset",
                                    "an integer")
                if not -MONTHS_BACK_MAX <= value <= 0:
                    raise self.error(item, f"rule {rule_id}: a month offset is 0 (the "
                                     f"finding's month) down to -{MONTHS_BACK_MAX}")
                if value in values:
                    raise self.error(item, f"rule {rule_id}: month {value} given twice")
                values.append(value)
            if not values:
                raise self.error(spec["months"], f"rule {rule_id}: months is empty")
            months = tuple(values)
        elif period_bound:
            months = (0,)
        return RuleStep(rule_id, months, name=rule_id)

    def notify_step(self, node: yaml.Node) -> NotifyStep:
        spec = self.mapping(node, "a notify step", NOTIFY_KEYS, NOTIFY_KEYS)
        message = " ".join(self.text(spec["notify"], "notify", MESSAGE_CHARS_MAX).split())
        try:
            names = [f for _text, f, _spec, _conv in string.Formatter().parse(message)
                     if f is not None]
        except ValueError as exc:
            raise self.error(spec["notify"], f"notify: {exc}") from None
        for name in names:
            if name not in MESSAGE_FIELDS:
                raise self.error(spec["notify"], f"notify: {{{name}}} is not one of "
                                 f"{', '.join('{' + f + '}' for f in MESSAGE_FIELDS)} (the "
                                 "message is in clear on the ledger: no subjects)")
        return NotifyStep(message)


def _trigger_json(trigger: Trigger) -> dict[str, object]:
    out: dict[str, object] = {"rules": list(trigger.rules), "open_cases": trigger.open_cases}
    if trigger.severity_min is not None:
        out["severity_min"] = trigger.severity_min
    if trigger.amount_min is not None:
        out["amount_min"] = f"{trigger.amount_min:.2f}"
    return out


def _step_json(step: Step) -> dict[str, object]:
    """A step as its canonical JSON, in the file's own form (so canonical bytes are a
    playbook file too)."""
    out: dict[str, object]
    if isinstance(step, CaseStep):
        out = {"case": step.mode, "reason": step.reason}
        if step.prefix:
            out["prefix"] = step.prefix
    elif isinstance(step, QueryStep):
        out = {"query": step.name, "agency": step.agency, "dataset": step.dataset,
               "subjects": [f"{s.key}={s.text}" for s in step.subjects]}
        if step.period is not None:
            out["period"] = step.period
        if step.fields:
            out["fields"] = list(step.fields)
    elif isinstance(step, RuleStep):
        out = {"rule": step.rule}
        if step.months:
            out["months"] = list(step.months)
    else:
        out = {"notify": step.message}
    return out


def describe_steps(playbook: Playbook) -> Sequence[str]:
    """One line per step, for people."""
    out = []
    for i, step in enumerate(playbook.steps):
        if isinstance(step, CaseStep):
            out.append(f"{i}. case: {step.mode}" + (f" ({step.prefix}-...)" if step.prefix
                                                     else ""))
        elif isinstance(step, QueryStep):
            out.append(f"{i}. ask {step.agency} {step.dataset} about "
                       f"{', '.join(s.text for s in step.subjects)}"
                       + (" in the finding's month" if step.period else ""))
        elif isinstance(step, RuleStep):
            months = ", ".join(str(m) for m in step.months) or "no month"
            out.append(f"{i}. run rule {step.rule} on the case's subjects (months {months})")
        else:
            out.append(f"{i}. notify: {step.message}")
    return out
