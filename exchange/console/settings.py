"""What a person chose in the console and keeps across its restarts (their language),
in `console-settings.json` beside their profile, keyed by the profile's person
("agency/subject"), so the profiles of one folder share the file without sharing their
choices. A write takes the file's lock, reads, changes the person's entry and replaces
the file (written whole, fsync'd, mode 0600); an unreadable file counts as no choice."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any

import structlog

from exchange.console.i18n import LANGUAGES

log = structlog.get_logger("exchange.console")

SETTINGS_FILE = "console-settings.json"
SETTINGS_BYTES_MAX = 1 << 20  # one small entry per person of a profile folder


class PersonSettings:
    """One person's settings, read once and written through on every change."""

    def __init__(self, folder: Path, person: str) -> None:
        self.path = folder / SETTINGS_FILE
        self.person = person
        self._lock = threading.Lock()
        self._mine: dict[str, Any] = self._read().get(person, {})
        if not isinstance(self._mine, dict):
            self._mine = {}

    @property
    def language(self) -> str | None:
        chosen = self._mine.get("language")
        return chosen if chosen in LANGUAGES else None

    def set_language(self, language: str) -> None:
        """Keep `language` (one of LANGUAGES) as the person's choice."""
        if language not in LANGUAGES:
            raise ValueError(f"{language!r} is not one of {', '.join(LANGUAGES)}")
        self._update({"language": language})

    def _read(self) -> dict[str, Any]:
        try:
            with self.path.open("rb") as f:
                data = json.loads(f.read(SETTINGS_BYTES_MAX + 1)[:SETTINGS_BYTES_MAX])
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("console settings unreadable; using the defaults",
                        path=str(self.path), error=str(exc))
            return {}
        return data if isinstance(data, dict) else {}

    def _update(self, changes: dict[str, Any]) -> None:
        lock_path = self.path.with_name(SETTINGS_FILE + ".lock")
        with self._lock, lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another console of this folder waits
            everyone = self._read()
            mine = everyone.get(self.person)
            mine = {**(mine if isinstance(mine, dict) else {}), **changes}
            everyone[self.person] = mine
            text = json.dumps(everyone, ensure_ascii=False, sort_keys=True, indent=1)
            if len(text.encode()) > SETTINGS_BYTES_MAX:
                raise ValueError(f"{self.path} would exceed {SETTINGS_BYTES_MAX} bytes")
            tmp = self.path.with_name(f".{SETTINGS_FILE}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._mine = mine
