"""Spec files: the strict YAML layer that rule files (exchange.compare.rules) and
playbooks (exchange.cases.playbooks) share.

A spec file is read whole under a size bound, composed as YAML with line marks, and
read node by node with typed, strict reads (`StrictYaml`): an unknown key, a key given
twice, a wrong type or an empty text is an error naming the file and the line. Each
kind of file has its own error type (RuleError, PlaybookError), siblings under
SpecError, so catching one kind never catches the other.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml

from exchange.errors import MalformedInput

TAG_STR = "tag:yaml.org,2002:str"
TAG_INT = "tag:yaml.org,2002:int"
TAG_FLOAT = "tag:yaml.org,2002:float"
TAG_BOOL = "tag:yaml.org,2002:bool"
TAG_NULL = "tag:yaml.org,2002:null"
NAME_SHAPE = re.compile(r"[a-z][a-z0-9_]{0,63}")


class SpecError(MalformedInput):
    """A spec file that is not valid: the message names the file and, where one is
    known, the line. Each kind of file raises its own subclass."""

    def __init__(self, source: str, line: int | None, message: str) -> None:
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {message}")
        self.source = source
        self.line = line
        self.message = message


def read_checked_file(path: Path, bytes_max: int, error: type[SpecError],
                      what: str) -> bytes:
    """A spec file's bytes, refused (naming the file) when unreadable or
    larger than `bytes_max`."""
    try:
        size = path.stat().st_size
        if size > bytes_max:
            raise error(str(path), None, f"{size} bytes, more than the {bytes_max} a "
                        f"{what} file may have")
        return path.read_bytes()
    except OSError as exc:
        raise error(str(path), None, f"cannot read: {exc.strerror}") from None


class OwnedSpec(Protocol):
    """A spec file's object: its id and the agency that owns it."""

    @property
    def id(self) -> str: ...
    @property
    def owner(self) -> str: ...


S = TypeVar("S", bound=OwnedSpec)


def load_owned_folder(folder: Path, suffix: str, agency: str, load: Callable[[Path], S],
                      kind: str, error: type[SpecError]) -> list[S]:
    """Every spec of `agency` in `folder` (its files ending in `suffix`, by name), each
    owned by it: what rules and playbooks folders share."""
    out = []
    for path in sorted(folder.glob(f"*{suffix}")):
        spec = load(path)
        if spec.owner != agency:
            raise error(str(path), None, f"{kind} {spec.id} is owned by {spec.owner}, "
                        f"but it is in {agency}'s {kind}s")
        out.append(spec)
    return out


def check_named_after_file(path: Path, suffix: str, spec_id: str, kind: str,
                           error: type[SpecError]) -> None:
    """A spec read from a file of its kind must carry the file's name as its id."""
    if path.suffix == suffix and path.stem != spec_id:
        raise error(str(path), 1, f"{kind} id {spec_id!r} differs from the file name "
                    f"{path.name!r}")


def compose_yaml(data: bytes, source: str,
                 error: type[SpecError]) -> yaml.Node | None:
    """The YAML node tree of `data` (None for an empty document), with line marks for
    messages; `error` (a SpecError class) names the file and line of a problem."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(source, None, f"not UTF-8 (byte {exc.start})") from None
    try:
        root: yaml.Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else mark.line + 1
        raise error(source, line, f"not valid YAML: {exc.problem or exc.context}"
                    ) from None
    except yaml.YAMLError as exc:
        raise error(source, None, f"not valid YAML: {exc}") from None
    return root


class StrictYaml:
    """Typed reads of a composed YAML tree: every problem is an error of `error_class`
    naming the file and the node's line. A file kind's parser subclasses it and sets
    its own error class."""

    error_class: type[SpecError] = SpecError

    def __init__(self, source: str) -> None:
        self.source = source
        self._constructor = yaml.SafeLoader("")

    def error(self, node: yaml.Node | None, message: str) -> SpecError:
        return self.error_class(self.source,
                                None if node is None else node.start_mark.line + 1, message)

    # -- YAML shapes ------------------------------------------------------------------

    def mapping(self, node: yaml.Node, what: str, keys: Sequence[str],
                required: Sequence[str]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"{what} must be a mapping")
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != TAG_STR:
                raise self.error(key_node, f"{what}: keys are names")
            key = str(key_node.value)
            if key in out:
                raise self.error(key_node, f"{what}: key {key!r} given twice")
            if key not in keys:
                raise self.error(key_node, f"{what}: unknown key {key!r} (allowed: "
                                 f"{', '.join(keys)})")
            out[key] = value_node
        missing = [k for k in required if k not in out]
        if missing:
            raise self.error(node, f"{what}: missing {', '.join(missing)}")
        return out

    def free_mapping(self, node: yaml.Node, what: str) -> list[tuple[yaml.Node, yaml.Node]]:
        """A mapping whose keys are names of the file's choosing."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"{what} must be a mapping")
        seen: set[str] = set()
        for key_node, _value in node.value:
            key = self.name(key_node, f"{what}: a key")
            if key in seen:
                raise self.error(key_node, f"{what}: {key!r} given twice")
            seen.add(key)
        return list(node.value)

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if isinstance(node, yaml.ScalarNode) and node.tag == TAG_NULL:
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, f"{what} must be a list")
        return list(node.value)

    def scalar(self, node: yaml.Node, tag: str, what: str, kind: str) -> Any:
        if not isinstance(node, yaml.ScalarNode) or node.tag != tag:
            raise self.error(node, f"{what} must be {kind}")
        return self._constructor.construct_object(node, deep=True)

    def text(self, node: yaml.Node, what: str, chars_max: int = 200) -> str:
        value = self.scalar(node, TAG_STR, what, "text")
        assert isinstance(value, str)
        if not value.strip():
            raise self.error(node, f"{what} is empty")
        if len(value) > chars_max:
            raise self.error(node, f"{what} is longer than {chars_max} characters")
        return value

    def name(self, node: yaml.Node, what: str) -> str:
        value = self.text(node, what)
        if NAME_SHAPE.fullmatch(value) is None:
            raise self.error(node, f"{what} {value!r} is not a name (a lower-case letter, "
                             "then lower-case letters, digits and _)")
        return value

    def choice(self, node: yaml.Node, what: str, allowed: Sequence[str]) -> str:
        value = self.text(node, what)
        if value not in allowed:
            raise self.error(node, f"{what} {value!r} is not one of {', '.join(allowed)}")
        return value

    def names(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node]]:
        items = self.sequence(node, what)
        out = []
        seen: set[str] = set()
        for item in items:
            value = self.name(item, f"{what} item")
            if value in seen:
                raise self.error(item, f"{what}: {value!r} given twice")
            seen.add(value)
            out.append((value, item))
        if not out:
            raise self.error(node, f"{what} is empty (leave it out for every column)")
        return out
