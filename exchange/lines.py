"""Human-readable lines as a message id and its values, so one line reads the same in
English wherever the command line prints it and in the reader's language in the console.

A message id is the English text with `%(name)s` placeholders (the console's catalogues
translate it); a value is a string or number (data, shown as is), another `Msg`, or a
list of `Msg`s joined by `SEPARATOR` (itself a message). Message ids are written as
literal first arguments of `Msg(...)` so the catalogue test finds every one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

SEPARATOR = "; "

Gettext = Callable[[str], str]


def english(message: str) -> str:
    """The message id itself: English is the id's own language."""
    return message


@dataclass(frozen=True)
class Msg:
    """One line to show: `id` (English, `%(name)s` placeholders) and its values."""

    id: str
    values: dict[str, object] = field(default_factory=dict)

    def __init__(self, id: str, **values: object) -> None:  # noqa: A002 - the msgid
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "values", values)

    def render(self, gettext: Gettext = english) -> str:
        text = gettext(self.id)
        if not self.values:
            return text
        return text % {k: render(v, gettext) for k, v in self.values.items()}

    def __str__(self) -> str:
        return self.render()


def render(value: object, gettext: Gettext = english) -> str:
    """A value of a line as text: a Msg rendered, a list of them joined, data as is."""
    if isinstance(value, Msg):
        return value.render(gettext)
    if isinstance(value, list | tuple):
        return gettext(SEPARATOR).join(render(v, gettext) for v in value)
    return str(value)
