"""The console's safety and language without a cluster: the one-time token, the session
cookie, CSRF on every POST, the Content-Security-Policy and the Host check; templates
with no inline script and no asset from another origin; the two catalogues translating
every message the templates use; amounts in yuan and times in Asia/Shanghai."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from exchange.cli.main import _register, cli
from exchange.console.app import create_app
from exchange.console.i18n import LANGUAGES, Formats, catalog, translator
from exchange.console.messages import code_msgids, missing, template_msgids
from exchange.console.security import COOKIE_NAME, CSRF_FIELD, Gate

CONSOLE = Path(__file__).resolve().parents[3] / "exchange" / "console"
HOST = "testserver"


def _client() -> tuple[TestClient, Gate]:
    gate = Gate()
    app = create_app(None, gate, frozenset({HOST}))
    return TestClient(app, base_url=f"http://{HOST}", follow_redirects=False), gate


def _signed_in() -> tuple[TestClient, Gate]:
    client, gate = _client()
    response = client.get(f"/evidence?token={gate.token}")
    assert response.status_code == 303
    return client, gate


def test_the_token_signs_one_browser_in_and_is_then_spent() -> None:
    client, gate = _client()
    token = gate.token
    assert client.get("/evidence").status_code == 401
    first = client.get(f"/evidence?token={token}")
    assert first.status_code == 303 and first.headers["location"] == "/evidence"
    assert COOKIE_NAME in first.cookies
    assert "httponly" in first.headers["set-cookie"].lower()
    assert "samesite=strict" in first.headers["set-cookie"].lower()
    assert client.get("/evidence").status_code == 200
    stranger = TestClient(client.app, base_url=f"http://{HOST}", follow_redirects=False)
    assert stranger.get(f"/evidence?token={token}").status_code == 403
    assert stranger.get("/evidence").status_code == 401


def test_a_wrong_token_signs_nobody_in_and_leaves_the_right_one_usable() -> None:
    client, gate = _client()
    assert client.get("/evidence?token=not-the-token").status_code == 403
    assert client.get(f"/evidence?token={gate.token}").status_code == 303


def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing() -> None:
    client, gate = _signed_in()
    session = next(iter(gate.sessions.values()))
    refused = client.post("/lang", data={"lang": "en", "next": "/evidence"})
    assert refused.status_code == 403 and session.language == "zh_CN"
    wrong = client.post("/lang", data={"lang": "en", CSRF_FIELD: "x" * 43})
    assert wrong.status_code == 403 and session.language == "zh_CN"
    accepted = client.post("/lang", data={"lang": "en", "next": "/evidence",
                                          CSRF_FIELD: session.csrf})
    assert accepted.status_code == 303 and session.language == "en"
    assert 'lang="en"' in client.get("/evidence").text


def test_a_language_switch_never_redirects_to_another_site() -> None:
    client, gate = _signed_in()
    csrf = next(iter(gate.sessions.values())).csrf
    for target in ("https://evil.example/", "//evil.example/x"):
        response = client.post("/lang", data={"lang": "en", "next": target,
                                              CSRF_FIELD: csrf})
        assert response.headers["location"] == "/"


def test_every_response_carries_a_strict_content_security_policy() -> None:
    client, _ = _signed_in()
    for response in (client.get("/evidence"), client.get("/nowhere"),
                     client.get("/static/console.js")):
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert "frame-ancestors 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"


def test_a_request_naming_another_host_is_refused() -> None:
    client, gate = _client()
    response = client.get(f"/evidence?token={gate.token}",
                          headers={"host": "attacker.example:8470"})
    assert response.status_code == 421
    assert gate.token is not None  # the token was not spent


def test_an_evidence_only_console_serves_no_page_that_needs_a_profile() -> None:
    client, _ = _signed_in()
    assert client.get("/").headers["location"] == "/evidence"
    for path in ("/network", "/ask", "/findings", "/cases", "/audit", "/chain", "/live"):
        assert client.get(path).status_code == 404, path


def test_a_bundle_that_is_not_one_is_refused_on_the_evidence_page() -> None:
    client, gate = _signed_in()
    csrf = next(iter(gate.sessions.values())).csrf
    response = client.post("/evidence", data={CSRF_FIELD: csrf},
                           files={"bundle": ("x.bundle", b"not a bundle", "application/x")})
    assert response.status_code == 422
    assert 'id="refused"' in response.text and 'id="verified"' not in response.text


def test_templates_hold_no_inline_script_style_or_handler_and_no_other_origin() -> None:
    for path in sorted((CONSOLE / "templates").glob("*.html")):
        text = path.read_text(encoding="utf-8")
        for tag in re.findall(r"<script\b[^>]*>", text):
            assert "src=" in tag, (path.name, tag)
        assert not re.search(r"\sstyle=", text), path.name
        assert not re.search(r"\son[a-z]+=", text), path.name
        assert "<style" not in text, path.name
    for path in [*CONSOLE.joinpath("templates").glob("*.html"),
                 *CONSOLE.joinpath("static").glob("*.*")]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(src|href)=\"(https?:)?//", text), path.name
        assert "http://" not in text and "https://" not in text, path.name


def test_the_catalogues_translate_every_message_the_templates_use() -> None:
    ids = template_msgids()
    assert len(ids) > 100
    _assert_translated(ids)


def test_the_catalogues_translate_every_line_of_the_report_and_the_case_timeline() -> None:
    ids = code_msgids()
    assert "%(who)s asked %(target)s for %(dataset)s (%(why)s)" in ids  # the report's
    assert "finding %(finding)s: %(reason)s" in ids  # the case timeline's
    assert "The node refused: %(error)s" in template_msgids()
    _assert_translated(ids)


def _assert_translated(ids: dict[str, str]) -> None:
    assert missing() == {language: [] for language in LANGUAGES}
    zh = {str(m.id): str(m.string) for m in catalog("zh_CN") if m.id}
    en = {str(m.id): str(m.string) for m in catalog("en") if m.id}
    assert set(zh) == set(en), "the catalogues hold different messages"
    for msgid in ids:
        wanted = sorted(re.findall(r"%\((\w+)\)s", msgid))
        for language, text in (("zh_CN", zh[msgid]), ("en", en[msgid])):
            assert sorted(re.findall(r"%\((\w+)\)s", text)) == wanted, (language, msgid)
        assert en[msgid] == msgid, ("English is the message id", msgid)
        if re.search(r"[A-Za-z]", re.sub(r"%\(\w+\)s", "", msgid)):
            assert re.search(r"[\u4e00-\u9fff]", zh[msgid]), ("not Chinese", msgid)


def test_the_evidence_page_shows_the_reports_lines_and_times_in_the_persons_language(
        tmp_path: Path) -> None:
    from exchange.ledger.report import build_report
    from exchange.lines import Msg
    from tests.unit.ledger.test_evidence_report import _build

    built = _build(tmp_path)
    report = build_report(built.data, 1_790_000_000_000)
    english = translator("en")
    for t in report.timeline:  # English through the catalogue is the CLI's line itself
        assert isinstance(t.line_msg, Msg) and t.line_msg.render(english) == t.line
    for x in report.exchanges:
        assert isinstance(x.outcome_msg, Msg) and x.outcome_msg.render(english) == x.outcome
    assert not {"line_msg", "time_ms", "outcome_msg"} & set(report.as_dict()["timeline"][0])  # type: ignore[index]

    client, gate = _signed_in()
    csrf = next(iter(gate.sessions.values())).csrf
    response = client.post("/evidence", data={CSRF_FIELD: csrf},
                           files={"bundle": ("case.bundle", built.data, "application/x")})
    assert response.status_code == 200 and 'id="verified"' in response.text
    page = response.text
    timeline = page[page.index('id="report-timeline"'):]
    exchanges = page[page.index('id="exchanges"'):page.index('id="report-timeline"')]
    q1 = next(t for t in report.timeline if t.tx_id == built.tx["q1"])
    assert q1.line not in page  # the English line is not shown...
    assert "向 customs 查询" in timeline  # ...its Chinese one is
    assert "已答复：2 行（已披露）" in exchanges
    assert "asked" not in timeline and "answered query" not in timeline
    assert " UTC" not in timeline and " UTC" not in exchanges  # times in Shanghai time
    assert Formats("zh_CN").time_ms(q1.time_ms) in timeline


def test_a_case_timelines_lines_are_messages_for_the_console_and_english_for_the_cli(
        ) -> None:
    from exchange.cases.view import CaseFile
    from exchange.lines import render

    casefile = CaseFile("SZ-1", "open", events=[
        {"height": 3, "time_ms": 1, "action": "open", "tx": "ab", "agency": "tax",
         "playbook": "", "finding": "F-1", "reason": "rebate claimed"}], queries=[
        {"height": 4, "time_ms": 2, "tx": "cd", "from": "tax", "analyst": "analyst-1",
         "to": "customs", "dataset": "exports", "subjects": [], "purpose": "check",
         "playbook": "", "status": "answered", "row_count": 3, "outcome_height": 5,
         "outcome_time_ms": 3, "outcome_tx": "ef"}])
    plain = casefile.timeline()
    assert [i["what"] for i in plain] == ["finding F-1: rebate claimed", "check", "3 rows"]
    assert all("what_msg" not in i for i in plain)
    zh = [render(i["what_msg"], translator("zh_CN")) for i in casefile.timeline(True)]
    assert zh == ["发现 F-1：rebate claimed", "check", "3 行"]


def test_a_node_error_keeps_its_words_under_a_heading_in_the_persons_language() -> None:
    from starlette.requests import Request

    from exchange.console.app import failure
    from exchange.errors import NodeUnavailable, PermissionDenied

    client, gate = _signed_in()
    browser = next(iter(gate.sessions.values()))

    def page(exc: Exception) -> str:
        scope = {"type": "http", "method": "GET", "path": "/ask", "query_string": b"",
                 "scheme": "http", "server": (HOST, 80), "root_path": "",
                 "headers": [], "app": client.app}
        request = Request(scope)
        request.state.browser = browser
        return bytes(failure(request, exc).body).decode()

    refused = page(PermissionDenied("node at 127.0.0.1:1 refused: not a supervisor"))
    assert "节点拒绝：node at 127.0.0.1:1 refused: not a supervisor" in refused
    down = page(NodeUnavailable("node at 127.0.0.1:1 is not reachable"))
    assert "节点答复：node at 127.0.0.1:1 is not reachable" in down
    from exchange.errors import MalformedInput

    assert "节点" not in page(MalformedInput("choose a bundle file"))


def test_a_message_is_formatted_in_the_chosen_language() -> None:
    assert translator("zh_CN")("Network") == "网络"
    assert translator("en")("Network") == "Network"
    assert translator("fr")("Network") == "网络"  # an unknown language: the default
    assert translator("zh_CN")("%(n)s rows", n="1,234") == "1,234 行"


def test_amounts_are_yuan_with_grouping_and_times_are_shanghai_time() -> None:
    zh, en = Formats("zh_CN"), Formats("en")
    assert zh.amount("1932099.35") == "¥1,932,099.35"
    assert en.amount("1932099.35") == "CN¥1,932,099.35"
    assert zh.amount("") == "" and zh.amount("n/a") == "n/a"
    assert zh.number(1234567) == "1,234,567"
    assert zh.time_ms(1_788_220_800_000).startswith("2026-09-01 08:00:00")  # 00:00 UTC


def test_the_console_listens_beyond_loopback_only_when_told() -> None:
    _register()
    result = CliRunner().invoke(cli, ["console", "--evidence-only", "--host", "0.0.0.0",
                                      "--port", "0"])
    assert result.exit_code == 2
    assert "--allow-remote" in result.output


@pytest.mark.parametrize("language", LANGUAGES)
def test_each_catalogue_reads(language: str) -> None:
    assert len(list(catalog(language))) > 150


def _profile_with_key(tmp_path: Path, passphrase: bytes | None,
                      passphrase_env: str | None = None) -> Path:
    from exchange.identity.keys import SigningKey

    (tmp_path / "analyst.key").write_bytes(SigningKey.generate().to_pem(passphrase))
    for name in ("tls.pem", "tls.key", "ca.pem"):
        (tmp_path / name).write_text("not read here\n")
    lines = ['agency = "tax"', 'subject = "analyst-1"', 'node = "127.0.0.1:1"',
             'signing_key = "analyst.key"', 'credential = "analyst.cred"',
             'tls_cert = "tls.pem"', 'tls_key = "tls.key"', 'ca_bundle = "ca.pem"']
    if passphrase_env:
        lines.append(f'passphrase_env = "{passphrase_env}"')
    path = tmp_path / "profile.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_passphrase_is_asked_once_in_the_terminal_until_it_opens_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exchange.cli import console_cmd

    profile = _profile_with_key(tmp_path, b"right")
    answers = iter(["wrong", "right"])
    monkeypatch.setattr(console_cmd.sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(console_cmd.click, "prompt", lambda *a, **k: next(answers))
    assert console_cmd._passphrase(profile) == b"right"


def test_a_plain_key_needs_no_passphrase_and_the_profiles_variable_is_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exchange.cli import console_cmd

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert console_cmd._passphrase(_profile_with_key(tmp_path / "a", None)) is None
    profile = _profile_with_key(tmp_path / "b", b"secret", "CONSOLE_TEST_PASSPHRASE")
    monkeypatch.setenv("CONSOLE_TEST_PASSPHRASE", "secret")
    assert console_cmd._passphrase(profile) == b"secret"


def test_an_encrypted_key_without_a_terminal_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exchange.cli import console_cmd
    from exchange.errors import MalformedInput

    profile = _profile_with_key(tmp_path, b"right")
    monkeypatch.setattr(console_cmd.sys.stdin, "isatty", lambda: False)
    with pytest.raises(MalformedInput, match="no terminal"):
        console_cmd._passphrase(profile)


def test_a_person_who_chooses_another_time_zone_sees_it_named() -> None:
    gate = Gate()
    client = TestClient(create_app(None, gate, frozenset({HOST}), "Europe/Paris"),
                        base_url=f"http://{HOST}", follow_redirects=False)
    client.get(f"/evidence?token={gate.token}")
    assert "Europe/Paris" in client.get("/evidence").text
    assert Formats("en", "Europe/Paris").time_ms(1_788_220_800_000).startswith(
        "2026-09-01 02:00:00")
    _register()
    result = CliRunner().invoke(cli, ["console", "--evidence-only", "--timezone", "Mars/Base",
                                      "--port", "0"])
    assert result.exit_code == 2 and "not a time zone" in result.output


def test_a_console_prints_a_fresh_sign_in_url_on_sigusr1(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    url_file = tmp_path / "url"
    proc = subprocess.Popen([sys.executable, "-m", "exchange.cli.main", "console",
                             "--evidence-only", "--port", "0", "--url-file", str(url_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    def status(url: str) -> int:
        try:
            return int(urllib.request.build_opener(NoRedirect).open(url, timeout=10).status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def url_after(old: str) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = url_file.read_text().strip() if url_file.is_file() else ""
            if text and text != old:
                return text
            assert proc.poll() is None
            time.sleep(0.05)
        raise AssertionError("no URL written")

    try:
        first = url_after("")
        assert oct(url_file.stat().st_mode & 0o777) == "0o600"
        assert status(first) == 303 and status(first) == 403
        os.kill(proc.pid, signal.SIGUSR1)
        second = url_after(first)
        assert second != first and status(second) == 303
    finally:
        proc.terminate()
        proc.wait(10)
