"""The console's message ids, extracted from its templates (what `_()` is called with)
and from the code whose lines it shows (the literal first argument of every
`Msg(...)`: the evidence report's lines, the case timeline's), and the check that every
catalogue translates every one of them. `python -m exchange.console.messages` prints the
ids no catalogue or one catalogue lacks."""

from __future__ import annotations

import sys
from pathlib import Path

from babel.messages.extract import extract, extract_from_dir

from exchange import lines
from exchange.console.i18n import LANGUAGES, catalog

TEMPLATES_DIR = Path(__file__).parent / "templates"
PACKAGE_DIR = Path(__file__).parent.parent
# the modules whose lines (Msg) the console shows
CODE_FILES = ("ledger/report.py", "cases/view.py", "lines.py", "console/app.py",
              "console/session.py")
METHOD_MAP = [("**.html", "jinja2.ext:babel_extract")]
OPTIONS = {"**.html": {"extensions": "", "silent": "false"}}


def template_msgids() -> dict[str, str]:
    """Every message id the templates use, with where it is first used."""
    found: dict[str, str] = {}
    for filename, lineno, message, _comments, _context in extract_from_dir(
            str(TEMPLATES_DIR), METHOD_MAP, OPTIONS):
        ids = message if isinstance(message, tuple) else (message,)
        for msgid in ids:
            if msgid:
                found.setdefault(str(msgid), f"{filename}:{lineno}")
    return found


def code_msgids() -> dict[str, str]:
    """Every message id the code shows through the console (`Msg("...")`), with where."""
    found: dict[str, str] = {lines.SEPARATOR: "lines.py:SEPARATOR"}
    for name in CODE_FILES:
        with (PACKAGE_DIR / name).open("rb") as f:
            for lineno, message, _comments, _context in extract(
                    "python", f, keywords={"Msg": None}):
                if message:
                    found.setdefault(str(message), f"{name}:{lineno}")
    return found


def all_msgids() -> dict[str, str]:
    """The templates' and the code's message ids."""
    return {**code_msgids(), **template_msgids()}


def missing() -> dict[str, list[str]]:
    """Per language, the ids its catalogue does not translate (an empty string counts
    as untranslated)."""
    ids = all_msgids()
    out: dict[str, list[str]] = {}
    for language in LANGUAGES:
        translated = {str(m.id) for m in catalog(language) if m.id and m.string}
        out[language] = sorted(set(ids) - translated)
    return out


def main() -> int:
    gaps = missing()
    for language, ids in gaps.items():
        for msgid in ids:
            print(f"{language}: {msgid!r}")
    return 1 if any(gaps.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
