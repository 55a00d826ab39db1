"""README's tour works as written: its console blocks run in order, in one shell, in a
fresh copy of the repository's layout, against the cluster `make cluster` starts there;
each command must succeed and print what README shows under it, and the ids README
takes from earlier output are the ones those commands printed (a reader copies them).

The one departure from README: `make cluster` gets INIT_ARGS with a free base port, so
the test never collides with a cluster already running on the default ports."""

from __future__ import annotations

import queue
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from exchange.testing.localnet import free_base_port
from tests.support.clone import ROOT, fresh_clone, reader_env
from tests.support.readme_tour import (
    console_steps,
    line_pattern,
    match_output,
    normalized,
    substituted,
)

README = ROOT / "README.md"
COMMAND_TIMEOUT_S = 300.0

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.xdist_group("readme_tour"),
              pytest.mark.timeout(900)]


class Shell:
    """One bash process the steps run in, in order, as a reader's terminal (so `source`,
    `export` and variables carry over); output and exit code per command."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc"], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, command: str, timeout_s: float = COMMAND_TIMEOUT_S) -> tuple[int, list[str]]:
        marker = f"__tour_done_{uuid.uuid4().hex}"
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command}\nprintf '\\n{marker} %s\\n' $?\n")
        self.proc.stdin.flush()
        out: list[str] = []
        while True:
            try:
                line = self.lines.get(timeout=timeout_s)
            except queue.Empty:
                raise AssertionError(f"no end of `{command}` after {timeout_s} s; printed:\n"
                                     + "".join(out)) from None
            if line is None:
                raise AssertionError(f"the shell ended during `{command}`:\n" + "".join(out))
            if line.startswith(marker):
                code = int(line.split()[1])
                if out and out[-1] == "\n":
                    out.pop()  # the newline printed before the marker
                return code, [line_.rstrip("\n") for line_ in out]
            out.append(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_readme_has_a_tour_of_console_blocks():
    steps = console_steps(README.read_text(encoding="utf-8"))
    commands = [s.command for s in steps]
    assert commands[0].startswith("make cluster")
    assert commands[-1] == "make stop"
    assert not any(c.startswith(".venv/") for c in commands), \
        "the tour runs `exchange` from PATH (source .venv/bin/activate), not .venv/bin/"


def test_readme_links_stay_inside_the_repository():
    for doc in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        assert "../shared" not in text, f"{doc.name} points outside the repository"
    assert (ROOT / "docs" / "design.md").is_file()


def test_readme_tour_runs_as_written(tmp_path: Path):
    steps = console_steps(README.read_text(encoding="utf-8"))
    clone = fresh_clone(tmp_path)
    env = reader_env()
    env["INIT_ARGS"] = f"--base-port {free_base_port(4)}"
    shell = Shell(clone, env)
    bindings: dict[str, str] = {}
    try:
        for step in steps:
            command = substituted(step.command, bindings)
            code, printed = shell.run(command)
            shown = "\n".join(step.shown)
            assert code == 0, (f"{step} exited {code}"
                               + (f" (ran as: {command})" if command != step.command else "")
                               + "\nprinted:\n" + "\n".join(printed))
            mismatch = match_output(step.shown, printed, bindings)
            assert mismatch is None, (
                f"{step}: README shows\n  {mismatch.shown}\nbut no line printed after line "
                f"{mismatch.after_line} matches "
                f"/{line_pattern(normalized(mismatch.shown))[0].pattern}/;\n"
                f"README shows:\n{shown}\nprinted:\n" + "\n".join(printed))
    finally:
        shell.close()
        subprocess.run(["bash", "scripts/cluster.sh", "stop"], cwd=clone, env=env,
                       capture_output=True, timeout=120, check=False)


# -- the reader's matching, without a cluster --------------------------------------------

def test_shown_output_binds_ids_that_later_commands_use_by_prefix():
    bindings: dict[str, str] = {}
    shown = ["aaaa1111bbbb2222cccc  committed  height 5  index 0  OK  17.8 ms"]
    printed = ["noise", "0123456789abcdef0123  committed  height 12  index 0  OK  3.1 ms"]
    assert match_output(shown, printed, bindings) is None
    assert bindings["aaaa1111bbbb2222cccc"] == "0123456789abcdef0123"
    assert substituted("exchange tx show aaaa1111bbbb", bindings) == \
        "exchange tx show 0123456789ab"
    assert substituted("exchange data generate --seed 7", bindings) == \
        "exchange data generate --seed 7"


def test_shown_output_that_was_not_printed_is_a_mismatch():
    shown = ["replayed rule 2026-09: 1 findings, output digest ... matches the ledger"]
    assert match_output(shown, ["replayed rule 2026-09: 1 findings, output digest ab12 "
                                "does not match"], {}) is not None
    assert match_output(shown, ["replayed rule 2026-09: 4 findings, output digest ab12 "
                                "matches the ledger"], {}) is None


def test_shown_lines_must_appear_in_their_order():
    assert match_output(["second 2", "first 1"], ["first 1", "second 2"], {}) is not None
    assert match_output(["first 1", "...", "second 2"], ["first 1", "x", "second 2"],
                        {}) is None


def test_literal_words_around_values_must_match():
    bindings: dict[str, str] = {}
    assert match_output(["│ TAX-RV-4968F86A8554 │ tax │ open │"],
                        ["│ TAX-RB-0000AAAA1111 │ tax │ open │",
                         "│ TAX-RV-1234ABCD5678 │ tax │ open │"], bindings) is None
    assert bindings["TAX-RV-4968F86A8554"] == "TAX-RV-1234ABCD5678"


def test_console_steps_join_continuations_and_skip_other_blocks():
    text = "\n".join([
        "```sh", "$ exchange not run", "```",
        "```console", "# a comment", "$ exchange query --to customs \\",
        "    --wait", "answered", "$ make stop", "```"])
    steps = console_steps(text)
    assert [s.command for s in steps] == ["exchange query --to customs \\\n    --wait",
                                          "make stop"]
    assert steps[0].shown == ["answered"]
