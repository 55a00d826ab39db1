"""The console's message ids, extracted from its templates (what `_()` is called with),
and the check that every catalogue translates every one of them. `python -m
exchange.console.messages` prints the ids no catalogue or one catalogue lacks."""

from __future__ import annotations

import sys
from pathlib import Path

from babel.messages.extract import extract_from_dir

from exchange.console.i18n import LANGUAGES, catalog

TEMPLATES_DIR = Path(__file__).parent / "templates"
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


def missing() -> dict[str, list[str]]:
    """Per language, the ids its catalogue does not translate (an empty string counts
    as untranslated)."""
    ids = template_msgids()
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
