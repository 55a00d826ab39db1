"""A fresh clone's layout in a temporary folder, for tests that run the project's own
top-level commands (the README tour, `make demo`): the sources linked, deploy/ made
fresh (init writes into it), and an environment without the test's virtualenv on PATH,
as a reader's shell has."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# what a fresh clone holds that the commands use; deploy/ is made fresh
LINKED = (".venv", "agents", "exchange", "protos", "scripts", "docs", "Makefile",
          "pyproject.toml", "requirements.lock", "requirements-runtime.lock",
          "package.json", "package-lock.json", "README.md")
COPIED = ("deploy/examples",)


def fresh_clone(where: Path) -> Path:
    clone = where / "clone"
    clone.mkdir()
    for name in LINKED:
        (clone / name).symlink_to(ROOT / name)
    for name in COPIED:
        shutil.copytree(ROOT / name, clone / name)
    return clone


def reader_env() -> dict[str, str]:
    """The test's environment as a reader's terminal has it: no profile, no virtualenv
    on PATH (the commands find .venv themselves), no colours."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("EXCHANGE_PROFILE", "VIRTUAL_ENV", "PYTHONPATH")}
    venv_bin = (ROOT / ".venv" / "bin").resolve()
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != venv_bin)
    env["TERM"] = "dumb"
    return env
