"""requirements.lock, which `make install` installs from, and requirements-runtime.lock,
which the container image installs, cover what pyproject.toml asks for: a dependency
added without `make lock` fails here, not in a clone next year."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _locked(lock: str = "requirements.lock") -> dict[str, tuple[str, int]]:
    """Each locked package: its exact version and how many hashes it carries."""
    text = (ROOT / lock).read_text()
    out: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=[A-Za-z])", text):
        head = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        if head:
            out[_name(head.group(1))] = (head.group(2), block.count("--hash=sha256:"))
    return out


def test_every_dependency_of_pyproject_is_pinned_with_hashes_in_the_lock() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + list(project["optional-dependencies"]["dev"])
    locked = _locked()
    missing = sorted({_name(r) for r in wanted} - set(locked))
    assert not missing, f"not in requirements.lock (run `make lock`): {missing}"
    assert all(hashes > 0 for _, hashes in locked.values()), locked
    assert {"pip", "setuptools", "wheel"} <= set(locked)  # the build tools are pinned too


def test_the_runtime_lock_pins_the_package_dependencies_as_the_full_lock_does() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, full = _locked("requirements-runtime.lock"), _locked()
    missing = sorted({_name(r) for r in project["dependencies"]} - set(runtime))
    assert not missing, f"not in requirements-runtime.lock (run `make lock`): {missing}"
    dev_only = {_name(r) for r in project["optional-dependencies"]["dev"]}
    assert not dev_only & set(runtime), dev_only & set(runtime)
    assert {n: v for n, (v, _) in runtime.items()} == \
        {n: full[n][0] for n in runtime}, "the two locks pin different versions"
    assert all(hashes > 0 for _, hashes in runtime.values())
