"""`make demo`, the headline command, runs to its end in a fresh clone's layout: every
step, a case opened by a playbook, its evidence bundle verified offline and a tampered
copy refused; and it stops every node it started."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from exchange.testing.localnet import free_base_port
from tests.support.clone import fresh_clone, reader_env

DEMO_TIMEOUT_S = 900.0
STEPS = 20

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo"), pytest.mark.timeout(1200)]


def test_make_demo_runs_every_step_and_stops_its_cluster(tmp_path: Path) -> None:
    clone = fresh_clone(tmp_path)
    env = reader_env()
    env["DEMO_BASE_PORT"] = str(free_base_port(4))
    result = subprocess.run(["bash", "scripts/demo.sh"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    for n in range(1, STEPS + 1):
        assert f"== {n}. " in out, f"step {n} missing"
    assert "(refused, as it must be)" in out
    assert out.rstrip().endswith("Demo complete.")
    assert (clone / "var/demo/case.evidence").stat().st_size > 0
    assert not _processes_in(clone), "the demo left processes running"


def _processes_in(folder: Path) -> list[int]:
    """Processes whose working directory is `folder` (the demo's nodes run there)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if Path(proc / "cwd").resolve() == folder.resolve():
                found.append(int(proc.name))
        except OSError:
            continue
    return found
