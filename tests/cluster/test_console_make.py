"""`make console` (scripts/console.sh) as a person runs it: the local cluster with sample
data, then a URL for a tax analyst's console and one for a tax supervisor's, each of
which signs a browser in; stopping it (Ctrl-C, or SIGTERM) stops every console and node
it started."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from exchange.testing.localnet import free_base_port

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("console_make")]

REPO = Path(__file__).resolve().parents[2]
START_WAIT_S = 240.0
STOP_WAIT_S = 30.0
URL = re.compile(r"^\s+tax (analyst|supervisor)\s.*(http://127\.0\.0\.1:\d+/\?token=\S+)$")


def _free_port_pair() -> int:
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return int(port)
    raise AssertionError("no two free ports in a row")


def _alive(pattern: str) -> list[int]:
    """Pids of this user's processes whose command line holds `pattern`."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if pattern in cmdline:
            out.append(int(proc.name))
    return out


def test_make_console_prints_an_analyst_and_a_supervisor_url_that_sign_in(
        tmp_path: Path) -> None:
    var = tmp_path / "console"
    env = {**os.environ, "CONSOLE_VAR": str(var), "COMPANIES": "150",
           "CONSOLE_BASE_PORT": str(free_base_port(4)), "CONSOLE_PORT": str(_free_port_pair())}
    env.pop("EXCHANGE_PROFILE", None)
    log = tmp_path / "console.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "scripts/console.sh"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        urls: dict[str, str] = {}
        deadline = time.monotonic() + START_WAIT_S
        while len(urls) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            for line in log.read_text().splitlines():
                m = URL.match(line)
                if m:
                    urls[m.group(1)] = m.group(2)
            time.sleep(0.5)
        for who, url in urls.items():
            opener = urllib.request.build_opener(_NoRedirect)
            with pytest.raises(urllib.error.HTTPError) as first:
                opener.open(url, timeout=10)
            assert first.value.code == 303, who
            assert "exchange_console=" in first.value.headers["set-cookie"], who
            with pytest.raises(urllib.error.HTTPError) as again:
                opener.open(url, timeout=10)
            assert again.value.code == 403, who  # the token is spent
        assert _alive(str(var / "net")), "the cluster's nodes run"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # as Ctrl-C reaches the whole group
        try:
            proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_WAIT_S)
    deadline = time.monotonic() + STOP_WAIT_S
    while _alive(str(var)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(str(var)), "a console or node outlived make console"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None
