"""Reading rule files: a rule's YAML (docs/rules.md has the format) read strictly into a
`Rule` (exchange.compare.rules), every key, type, agency, dataset, view and column
checked against the data contract, a problem a RuleError naming the file and line. The
strict YAML layer itself is exchange.specfile's, shared with playbooks.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from agents import AGENCIES, datasets_of, views_of
from agents.common.schema import Dataset, Kind
from agents.common.view import View
from agents.lookup import PRINCIPAL_DATES
from exchange.compare import duck
from exchange.compare.rules import (
    INPUTS_MAX,
    PARAMETER_TYPES,
    PERIOD_PARAMETER,
    SEVERITIES,
    SHAPES,
    SUBJECT_TYPES,
    VERSION_MAX,
    InputColumn,
    OwnSpec,
    Parameter,
    QuerySpec,
    Rule,
    RuleError,
    check_sql,
)
from exchange.ledger.sealing import canonical_json
from exchange.specfile import (
    NAME_SHAPE,
    TAG_BOOL,
    TAG_INT,
    TAG_NULL,
    StrictYaml,
    check_named_after_file,
    compose_yaml,
    load_owned_folder,
    read_checked_file,
)

RULE_FILE_SUFFIX = ".yaml"
RULE_FILE_BYTES_MAX = 256 * 1024
SQL_CHARS_MAX = 64 * 1024
DESCRIPTION_CHARS_MAX = 4_000

RULE_KEYS = ("id", "version", "owner", "description", "severity", "parameters", "queries",
             "own", "sql", "output")
RULE_REQUIRED = ("id", "version", "owner", "description", "severity", "sql")
PARAMETER_KEYS = ("type", "required")
QUERY_KEYS = ("name", "agency", "dataset", "shape", "subjects_from", "subject_key",
              "period", "fields")
QUERY_REQUIRED = ("name", "agency", "dataset", "shape")
OWN_KEYS = ("name", "dataset", "period", "fields")
OWN_REQUIRED = ("name", "dataset")

_ID_SHAPE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_REFERENCE_SHAPE = re.compile(r"\$([a-z][a-z0-9_]{0,63})")


# -- loading ---------------------------------------------------------------------------

def rules_dir(agency: str) -> Path:
    """Where an agency's rule files are: agents/<agency>/rules."""
    if agency not in AGENCIES:
        raise ValueError(f"unknown agency {agency!r} (one of {', '.join(AGENCIES)})")
    import agents

    return Path(agents.__file__).resolve().parent / agency / "rules"


def load_rules(agency: str, folder: Path | None = None) -> list[Rule]:
    """Every rule of `agency` (its `*.yaml` files, by file name), each owned by it."""
    folder = rules_dir(agency) if folder is None else Path(folder)
    return load_owned_folder(folder, RULE_FILE_SUFFIX, agency, load_rule, "rule", RuleError)


def load_rule(path: Path) -> Rule:
    """The rule in the file at `path`; its id must be the file's name."""
    path = Path(path)
    data = read_checked_file(path, RULE_FILE_BYTES_MAX, RuleError, "rule")
    rule = load_rule_bytes(data, str(path))
    check_named_after_file(path, RULE_FILE_SUFFIX, rule.id, "rule", RuleError)
    return rule


def load_rule_bytes(data: bytes, source: str = "<rule>") -> Rule:
    """The rule in `data` (a rule file, or a rule's canonical bytes)."""
    if len(data) > RULE_FILE_BYTES_MAX:
        raise RuleError(source, None, f"{len(data)} bytes, more than the "
                        f"{RULE_FILE_BYTES_MAX} a rule file may have")
    root = compose_yaml(data, source, RuleError)
    if root is None:
        raise RuleError(source, 1, "empty file: a rule is a mapping of id, version, "
                        "owner, description, severity, parameters, queries, own, sql")
    return _Parser(source).rule(root)


class _Parser(StrictYaml):
    """A rule file's tree, read strictly."""

    error_class = RuleError

    def rule(self, root: yaml.Node) -> Rule:
        top = self.mapping(root, "the rule", RULE_KEYS, RULE_REQUIRED)
        rule_id = self.text(top["id"], "id")
        if _ID_SHAPE.fullmatch(rule_id) is None:
            raise self.error(top["id"], f"id {rule_id!r} is not a rule id (lower-case "
                             "letters, digits and -, at most 64)")
        version = self.scalar(top["version"], TAG_INT, "version", "an integer")
        if not 1 <= version <= VERSION_MAX:
            raise self.error(top["version"], f"version must be between 1 and {VERSION_MAX}")
        owner = self.choice(top["owner"], "owner", AGENCIES)
        description = " ".join(self.text(top["description"], "description",
                                         DESCRIPTION_CHARS_MAX).split())
        severity = self.choice(top["severity"], "severity", SEVERITIES)
        parameters = self.parameters(top.get("parameters"))
        declared = {p.name for p in parameters}
        inputs: dict[str, tuple[InputColumn, ...]] = {}
        input_types: dict[str, dict[str, str]] = {}  # input -> column -> contract type
        own = []
        for item in self.sequence(top["own"], "own") if "own" in top else []:
            own_spec, types = self.own(item, owner, declared, inputs)
            own.append(own_spec)
            inputs[own_spec.name] = own_spec.columns
            input_types[own_spec.name] = types
        queries = []
        for item in self.sequence(top["queries"], "queries") if "queries" in top else []:
            query_spec, types = self.query(item, owner, declared, inputs, input_types)
            queries.append(query_spec)
            inputs[query_spec.name] = query_spec.columns
            input_types[query_spec.name] = types
        if not inputs:
            raise self.error(root, "a rule has at least one input (own or queries)")
        if len(inputs) > INPUTS_MAX:
            raise self.error(root, f"more than {INPUTS_MAX} inputs")
        sql_node = top["sql"]
        sql = self.text(sql_node, "sql", SQL_CHARS_MAX)
        style = getattr(sql_node, "style", None)
        sql_block = style == "|"
        sql_line = sql_node.start_mark.line + (2 if sql_block else 1)
        output_notes = []
        if "output" in top:
            for key_node, value_node in self.free_mapping(top["output"], "output"):
                output_notes.append((str(key_node.value),
                                     " ".join(self.text(value_node, "an output note",
                                                        DESCRIPTION_CHARS_MAX).split()),
                                     key_node))
        content = {
            "id": rule_id, "version": version, "owner": owner, "description": description,
            "severity": severity,
            "parameters": {p.name: {"type": p.type, "required": p.required}
                           for p in parameters},
            "own": [_own_json(o) for o in own],
            "queries": [_query_json(q) for q in queries],
            "sql": sql,
            "output": {name: note for name, note, _node in output_notes},
        }
        rule = Rule(source=self.source, id=rule_id, version=version, owner=owner,
                    description=description, severity=severity,
                    parameters=tuple(parameters), queries=tuple(queries), own=tuple(own),
                    sql=sql, output=tuple((n, t) for n, t, _ in output_notes),
                    output_columns=(), canonical_bytes=canonical_json(content),
                    sql_line=sql_line, sql_block=sql_block)
        columns = check_sql(rule)
        names = {name for name, _type in columns}
        for name, _note, key_node in output_notes:
            if name not in names:
                raise self.error(key_node, f"output: the SQL returns no column {name!r} "
                                 f"(it returns {', '.join(n for n, _ in columns)})")
        return _replace_columns(rule, tuple(columns))

    def parameters(self, node: yaml.Node | None) -> list[Parameter]:
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == TAG_NULL):
            return []
        out = []
        for key_node, value_node in self.free_mapping(node, "parameters"):
            name = str(key_node.value)
            spec = self.mapping(value_node, f"parameter {name}", PARAMETER_KEYS, ("type",))
            kind = self.choice(spec["type"], f"parameter {name}: type", PARAMETER_TYPES)
            required = True
            if "required" in spec:
                required = self.scalar(spec["required"], TAG_BOOL, f"parameter {name}: required",
                                       "true or false")
            if name == PERIOD_PARAMETER and kind != "period":
                raise self.error(key_node, "parameter period must be of type period")
            out.append(Parameter(name, kind, bool(required)))
        return out

    def reference(self, node: yaml.Node, what: str, declared: set[str]) -> str:
        value = self.text(node, what)
        found = _REFERENCE_SHAPE.fullmatch(value)
        if found is None:
            raise self.error(node, f"{what} must name a parameter, as $period; "
                             f"got {value!r}")
        name = found.group(1)
        if name not in declared:
            raise self.error(node, f"{what}: no parameter {name!r} is declared")
        return name

    def input_name(self, node: yaml.Node, what: str,
                   inputs: Mapping[str, object]) -> str:
        name = self.name(node, what)
        if name in inputs:
            raise self.error(node, f"{what}: an input named {name!r} is already declared")
        return name

    def fields(self, spec: Mapping[str, yaml.Node], what: str, available: Sequence[str]
               ) -> tuple[str, ...]:
        if "fields" not in spec:
            return tuple(available)
        chosen = []
        for value, item in self.names(spec["fields"], f"{what}: fields"):
            if value not in available:
                raise self.error(item, f"{what}: no column {value!r} (it has "
                                 f"{', '.join(available)})")
            chosen.append(value)
        # the table's columns come in the dataset's order, whatever the list's
        return tuple(c for c in available if c in chosen)

    def own(self, node: yaml.Node, owner: str, declared: set[str],
            inputs: Mapping[str, object]) -> tuple[OwnSpec, dict[str, str]]:
        spec = self.mapping(node, "an own input", OWN_KEYS, OWN_REQUIRED)
        name = self.input_name(spec["name"], "own input name", inputs)
        what = f"own input {name}"
        dataset_name = self.name(spec["dataset"], f"{what}: dataset")
        datasets = {d.name: d for d in datasets_of(owner)}
        views = views_of(owner)
        period = (self.reference(spec["period"], f"{what}: period", declared)
                  if "period" in spec else None)
        if dataset_name in datasets:
            dataset = datasets[dataset_name]
            if period is not None and not _periodic(dataset):
                raise self.error(spec["period"], f"{what}: {dataset_name} has neither a "
                                 "period nor a date column; leave period out")
            available = dataset.column_names
            fields = self.fields(spec, what, available)
            columns = tuple(_dataset_column(dataset, f) for f in fields)
            types = {f: _dataset_type(dataset, f) for f in fields}
            return OwnSpec(name, dataset_name, False, period, fields, columns,
                           node.start_mark.line + 1), types
        if dataset_name in views:
            view = views[dataset_name]
            self.check_view_period(view, spec, period, what)
            available = tuple(c.name for c in view.columns)
            fields = self.fields(spec, what, available)
            columns = tuple(_view_column(view, f) for f in fields)
            types = {c.name: c.type for c in view.columns if c.name in fields}
            return OwnSpec(name, dataset_name, True, period, fields, columns,
                           node.start_mark.line + 1), types
        offered = ", ".join(list(datasets) + list(views))
        raise self.error(spec["dataset"], f"{what}: {owner} has no dataset or view "
                         f"{dataset_name!r} (it has {offered})")

    def check_view_period(self, view: View[Any], spec: Mapping[str, yaml.Node],
                          period: str | None, what: str) -> None:
        if view.period_bound and period is None:
            raise self.error(spec["dataset"], f"{what}: view {view.name} is per month: "
                             "give period: $period")
        if not view.period_bound and period is not None:
            raise self.error(spec["period"], f"{what}: view {view.name} is not per month: "
                             "leave period out")

    def query(self, node: yaml.Node, owner: str, declared: set[str],
              inputs: Mapping[str, tuple[InputColumn, ...]],
              input_types: Mapping[str, Mapping[str, str]]
              ) -> tuple[QuerySpec, dict[str, str]]:
        spec = self.mapping(node, "a query", QUERY_KEYS, QUERY_REQUIRED)
        name = self.input_name(spec["name"], "query name", inputs)
        what = f"query {name}"
        agency = self.choice(spec["agency"], f"{what}: agency", AGENCIES)
        if agency == owner:
            raise self.error(spec["agency"], f"{what}: {owner} owns the rule; its own data "
                             "is an own input, not a query")
        view_name = self.name(spec["dataset"], f"{what}: dataset")
        views = views_of(agency)
        if view_name not in views:
            offered = ", ".join(views) or "none"
            raise self.error(spec["dataset"], f"{what}: {agency} offers no catalog view "
                             f"{view_name!r} (its views: {offered}); rules ask for "
                             "aggregates, never raw datasets")
        view = views[view_name]
        shape = self.choice(spec["shape"], f"{what}: shape", SHAPES)
        period = (self.reference(spec["period"], f"{what}: period", declared)
                  if "period" in spec else None)
        self.check_view_period(view, spec, period, what)
        available = tuple(c.name for c in view.columns)
        fields = self.fields(spec, what, available)
        types = {c.name: c.type for c in view.columns if c.name in fields}
        columns = tuple(_view_column(view, f) for f in fields)
        subjects_from = None
        subject_key = None
        if shape == "aggregate":
            for key in ("subjects_from", "subject_key"):
                if key in spec:
                    raise self.error(spec[key], f"{what}: {key} is for shape subject_set")
        else:
            if "subjects_from" not in spec:
                raise self.error(node, f"{what}: shape subject_set needs subjects_from: "
                                 "<input>.<column>")
            subjects_from, kind = self.subjects_from(spec["subjects_from"], what, input_types)
            keys = _view_subject_keys(view)
            if "subject_key" in spec:
                subject_key = self.name(spec["subject_key"], f"{what}: subject_key")
                if subject_key not in keys:
                    raise self.error(spec["subject_key"], f"{what}: view {view_name} is not "
                                     f"looked up by {subject_key!r} (it is by "
                                     f"{', '.join(keys)})")
            else:
                column = subjects_from[1]
                subject_key = column if column in keys else kind
                if subject_key not in keys:
                    raise self.error(spec["subjects_from"], f"{what}: view {view_name} "
                                     f"cannot be looked up by a {kind} (it is by "
                                     f"{', '.join(keys)})")
            if keys[subject_key] != kind:
                raise self.error(spec["subjects_from"], f"{what}: subjects of {view_name} by "
                                 f"{subject_key} are {keys[subject_key]}s, "
                                 f"{'.'.join(subjects_from)} holds {kind}s")
        return QuerySpec(name, agency, view_name, shape, period, fields, columns,
                         subjects_from, subject_key, node.start_mark.line + 1), types

    def subjects_from(self, node: yaml.Node, what: str,
                      input_types: Mapping[str, Mapping[str, str]]
                      ) -> tuple[tuple[str, str], str]:
        value = self.text(node, f"{what}: subjects_from")
        source, dot, column = value.partition(".")
        if not dot or not NAME_SHAPE.fullmatch(source) or not NAME_SHAPE.fullmatch(column):
            raise self.error(node, f"{what}: subjects_from {value!r} is not "
                             "<input>.<column>")
        if source not in input_types:
            raise self.error(node, f"{what}: subjects_from names {source!r}, which is no "
                             "own input nor an earlier query")
        types = input_types[source]
        if column not in types:
            raise self.error(node, f"{what}: input {source} has no column {column!r} (it "
                             f"has {', '.join(types)})")
        kind = types[column]
        if kind not in SUBJECT_TYPES:
            raise self.error(node, f"{what}: {value} holds {kind} values, not subjects "
                             f"({' or '.join(SUBJECT_TYPES)})")
        return (source, column), kind


# -- the catalog's types ---------------------------------------------------------------

def _periodic(dataset: Dataset) -> bool:
    return "period" in dataset.column_names or any(
        d in dataset.column_names for d in PRINCIPAL_DATES)


def _dataset_column(dataset: Dataset, name: str) -> InputColumn:
    column = dataset.column_map[name]
    sql_type = {Kind.AMOUNT: duck.DECIMAL, Kind.FLAG: duck.BIGINT}.get(column.kind,
                                                                       duck.VARCHAR)
    return InputColumn(name, sql_type, column.optional)


def _dataset_type(dataset: Dataset, name: str) -> str:
    """The contract type of a dataset column, in the words view columns use."""
    kind = dataset.column_map[name].kind
    return {Kind.USCC: "uscc", Kind.PERSON_ID: "person_id", Kind.AMOUNT: "decimal",
            Kind.FLAG: "integer", Kind.PERIOD: "period"}.get(kind, kind.value)


def _view_column(view: View[Any], name: str) -> InputColumn:
    type_name = {c.name: c.type for c in view.columns}[name]
    sql_type = {"decimal": duck.DECIMAL, "integer": duck.BIGINT}.get(type_name, duck.VARCHAR)
    return InputColumn(name, sql_type)


def _view_subject_keys(view: View[Any]) -> dict[str, str]:
    """The lookup keys of a view (agents.lookup): its subject columns, and the kinds
    uscc and person_id, which match every column of their kind; key -> kind."""
    keys = {c.name: c.type for c in view.columns if c.type in SUBJECT_TYPES}
    for kind in SUBJECT_TYPES:
        if kind in keys.values():
            keys.setdefault(kind, kind)
    return keys


# -- canonical content -----------------------------------------------------------------

def _own_json(spec: OwnSpec) -> dict[str, object]:
    out: dict[str, object] = {"name": spec.name, "dataset": spec.dataset,
                              "fields": list(spec.fields)}
    if spec.period is not None:
        out["period"] = f"${spec.period}"
    return out


def _query_json(spec: QuerySpec) -> dict[str, object]:
    out: dict[str, object] = {"name": spec.name, "agency": spec.agency,
                              "dataset": spec.dataset, "shape": spec.shape,
                              "fields": list(spec.fields)}
    if spec.period is not None:
        out["period"] = f"${spec.period}"
    if spec.subjects_from is not None:
        out["subjects_from"] = ".".join(spec.subjects_from)
        out["subject_key"] = spec.subject_key
    return out


def _replace_columns(rule: Rule, columns: tuple[tuple[str, str], ...]) -> Rule:
    return dataclasses.replace(rule, output_columns=columns)
