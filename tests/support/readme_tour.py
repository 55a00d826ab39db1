"""README's tour as a program: its `console` blocks parsed into commands and the output
they show, and a reader's way of matching shown output against what a command printed
(carrying the ids they see into the commands they type next).

Pure: text in, steps, patterns and substitutions out. tests/cluster/test_readme_tour.py runs the
steps in a shell against a real cluster."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

FENCE = re.compile(r"^```(\S*)\s*$")
PROMPT = "$ "
ELLIPSIS = "..."
# a run of hex digits holding at least one decimal digit: an id, a height, an amount,
# a time; README shows one value, the command prints another of the same shape
VALUE_RUN = re.compile(r"[0-9A-Za-z]*[0-9][0-9A-Za-z]*")
# a token worth carrying into later commands: as long as an id prefix, with a digit
ID_TOKEN_CHARS_MIN = 8
TYPED_TOKEN = re.compile(r"[0-9A-Za-z][0-9A-Za-z-]{7,}")


@dataclass
class Step:
    """One command of a console block and the output README shows under it."""

    command: str
    shown: list[str] = field(default_factory=list)
    line: int = 0  # README line of the prompt

    def __str__(self) -> str:
        return f"README line {self.line}: $ {self.command}"


def console_steps(markdown: str) -> list[Step]:
    """Every `$ ` command of every ```console block, in order; a line ending in a
    backslash continues on the next; lines starting with `#` are comments."""
    steps: list[Step] = []
    in_console = False
    continuing = False
    for number, raw in enumerate(markdown.splitlines(), start=1):
        fence = FENCE.match(raw.strip()) if raw.startswith("```") else None
        if fence is not None:
            in_console = not in_console and fence.group(1) == "console"
            continuing = False
            continue
        if not in_console:
            continue
        if continuing:
            steps[-1].command += "\n" + raw
            continuing = raw.rstrip().endswith("\\")
            continue
        if raw.startswith(PROMPT):
            steps.append(Step(raw[len(PROMPT):], line=number))
            continuing = raw.rstrip().endswith("\\")
        elif raw.startswith("#") or not steps:
            continue
        elif raw.strip():
            steps[-1].shown.append(raw)
    return steps


def _token_pattern(token: str, groups: list[str]) -> str:
    """A shown token as a regex: its values (runs of letters and digits holding a digit:
    hex ids, USCCs, identity numbers, counts) match any value; the rest literally. An
    id-like token is captured to bind it."""
    whole = len(token) >= ID_TOKEN_CHARS_MIN and VALUE_RUN.search(token) is not None
    if whole:
        groups.append(token)
        name = f"g{len(groups) - 1}"
    parts: list[str] = []
    last = 0
    for m in VALUE_RUN.finditer(token):
        parts.append(re.escape(token[last:m.start()]))
        if len(m.group(0)) >= ID_TOKEN_CHARS_MIN and m.group(0) != token:
            # an id inside a longer token (a CSV line, key=value, uscc/person_id) is
            # bound on its own too, so a command can take it alone
            groups.append(m.group(0))
            parts.append(f"(?P<g{len(groups) - 1}>[0-9A-Za-z]+)")
        else:
            parts.append("[0-9A-Za-z]+")
        last = m.end()
    parts.append(re.escape(token[last:]))
    body = "".join(parts)
    return f"(?P<{name}>{body})" if whole else body


def line_pattern(shown: str) -> tuple[re.Pattern[str], list[str]]:
    """A shown line as a regex over a printed line (whitespace collapsed): `...` stands
    for anything; tokens as _token_pattern. Also the id-like tokens it captures."""
    groups: list[str] = []
    segments = []
    for segment in shown.split(ELLIPSIS):
        tokens = segment.split()
        segments.append(r"\s+".join(_token_pattern(t, groups) for t in tokens))
    pattern = ".*?".join(s for s in segments)
    return re.compile(pattern), groups


def normalized(line: str) -> str:
    return " ".join(line.split())


@dataclass
class Mismatch:
    shown: str
    after_line: int


def match_output(shown: Sequence[str], printed: Sequence[str],
                 bindings: dict[str, str]) -> Mismatch | None:
    """Each shown line must match a printed line, in order; id-like tokens are bound to
    what was printed in their place (the first binding of a token stays)."""
    position = 0
    lines = [normalized(p) for p in printed]
    for text in shown:
        if text.strip() == ELLIPSIS:
            continue
        pattern, groups = line_pattern(normalized(text))
        for index in range(position, len(lines)):
            m = pattern.search(lines[index])
            if m is None:
                continue
            for g, token in enumerate(groups):
                bindings.setdefault(token, m.group(f"g{g}"))
            position = index + 1
            break
        else:
            return Mismatch(text, position)
    return None


def substituted(command: str, bindings: dict[str, str]) -> str:
    """The command as a reader types it: every token README took from earlier output
    (whole, or its first 8 or more characters) replaced by what was printed there."""
    def replace(m: re.Match[str]) -> str:
        typed = m.group(0)
        if typed in bindings:
            return bindings[typed]
        for shown, printed in bindings.items():
            if shown != printed and VALUE_RUN.search(typed) and \
                    shown.lower().startswith(typed.lower()) and len(printed) >= len(typed):
                return printed[:len(typed)]
        return typed
    return TYPED_TOKEN.sub(replace, command)


def ids_in(text: str) -> Iterator[str]:
    yield from (m.group(0) for m in TYPED_TOKEN.finditer(text))
