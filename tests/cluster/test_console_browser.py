"""The console in a real browser (issue 21): Debian's Chromium driven by Playwright against
a real four-node cluster with sample data, and consoles started as a person starts them
(`exchange console --profile ... --port 0`). An analyst composes a query the police's
policy wants co-signed, a supervisor co-signs it in a second browser session, and the
answer appears in the first; a finding opens a case whose graph shows its subject; a
tampered evidence bundle is refused and the genuine one verifies, in a console with no
profile; every page switches between Chinese and English with no untranslated string.
Each test writes a screenshot of each page it visits under var/screenshots/."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from exchange.console.i18n import catalog
from exchange.console.messages import template_msgids
from exchange.testing.localnet import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow,
              pytest.mark.xdist_group("console_browser")]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "var" / "screenshots"
CYTOSCAPE = REPO / "exchange" / "console" / "static" / "vendor" / "cytoscape.min.js"
SEED = 7
COMPANIES = 300
PERIOD = "2026-09"
RULE = "export-rebate-without-exports"
URL_WAIT_S = 60.0
UI_WAIT_MS = 60_000
STOP_WAIT_S = 10.0
CHROMIUM_NAMES = ("chromium", "chromium-browser")


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("Chromium not installed (Debian package chromium)")


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright not installed (PyPI package playwright)")
    return sync_playwright


@dataclass
class Consoles:
    cluster: Cluster
    urls: dict[str, str]
    officer: str  # a person id the police hold a record of (ground truth)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def base(self, who: str) -> str:
        return self.urls[who].split("/?", 1)[0]


def _start_console(cluster: Cluster, who: str, *args: str) -> tuple[subprocess.Popen[bytes],
                                                                      str]:
    url_file = cluster.root / f"console-{who}.url"
    url_file.unlink(missing_ok=True)
    log = open(cluster.root / f"console-{who}.log", "wb")  # noqa: SIM115 - closed by the OS
    proc = subprocess.Popen([sys.executable, "-m", "exchange.cli.main", "console", "--port",
                             "0", "--url-file", str(url_file), *args],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=cluster.env, cwd=cluster.root)
    deadline = time.monotonic() + URL_WAIT_S
    while not url_file.is_file() or not url_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"console {who} did not start: "
                                 + (cluster.root / f"console-{who}.log").read_text()[-2000:])
        time.sleep(0.1)
    return proc, url_file.read_text().strip()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_WAIT_S)


@pytest.fixture(scope="module")
def consoles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consoles]:
    _chromium()
    _playwright()
    root = tmp_path_factory.mktemp("console")
    cluster = Cluster(root)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cluster.init()
        data = cluster.load_sample(SEED, COMPANIES)
        cluster.start()
        supervisor = str(cluster.net / "tax" / "analysts" / "supervisor-1.toml")
        automation = str(cluster.net / "tax" / "analysts" / "automation.toml")
        for args in (("rules", "register", RULE, "--profile", supervisor),
                     ("compare", "run", RULE, "--period", PERIOD, "--profile", automation)):
            result = cluster.run_exchange(*args, timeout_s=300)
            assert result.returncode == 0, result.stderr[-2000:]
        officer = next(line.split(",")[1].split("/")[1] for line in
                       (data / "ground_truth.csv").read_text().splitlines()
                       if line.startswith("officer-with-police-record,"))
        urls = {}
        for who, args in (("analyst", ("--profile", str(cluster.profile("tax")))),
                          ("supervisor", ("--profile", supervisor)),
                          ("clerk", ("--evidence-only",))):
            proc, url = _start_console(cluster, who, *args)
            procs.append(proc)
            urls[who] = url
        yield Consoles(cluster, urls, officer, procs)
    finally:
        for proc in procs:
            _stop(proc)
        cluster.stop()


@pytest.fixture(scope="module")
def browser(consoles: Consoles) -> Iterator[Any]:
    sync_playwright = _playwright()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=_chromium(),
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield chromium
        finally:
            chromium.close()


class Session:
    """One signed-in browser session of a console, collecting what the page complains of
    (script errors, CSP violations) so each test can refuse them."""

    def __init__(self, browser: Any, consoles: Consoles, who: str) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                           accept_downloads=True)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.statuses_expected: set[int] = set()  # error statuses a test asks for
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("console", lambda m: self.problems.append(f"{m.type}: {m.text}")
                     if m.type == "error" else None)
        self.base = consoles.base(who)
        response = self.page.goto(consoles.urls[who])
        assert response is not None and response.ok, "the one-time token did not sign in"

    def go(self, path: str) -> Any:
        response = self.page.goto(self.base + path, wait_until="load")
        assert response is not None
        return response

    def shot(self, test: str, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{test}-{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


@contextlib.contextmanager
def session(browser: Any, consoles: Consoles, who: str) -> Iterator[Session]:
    s = Session(browser, consoles, who)
    try:
        yield s
    finally:
        s.close()
    problems = [p for p in s.problems if not any(
        f"status of {code} " in p for code in s.statuses_expected)]
    assert not problems, problems


def _restart_console(consoles: Consoles, who: str, *args: str) -> None:
    """A fresh console (and token) for `who`: each token signs one browser in."""
    index = list(consoles.urls).index(who)
    _stop(consoles.procs[index])
    proc, url = _start_console(consoles.cluster, who, *args)
    consoles.procs[index] = proc
    consoles.urls[who] = url


def test_a_supervisor_cosigns_in_their_own_console_and_the_answer_appears_to_the_analyst(
        consoles: Consoles, browser: Any) -> None:
    from playwright.sync_api import expect

    name = "four-eyes"
    with session(browser, consoles, "analyst") as analyst, \
            session(browser, consoles, "supervisor") as supervisor:
        analyst.go("/ask?target=police&dataset=records")
        analyst.shot(name, "ask")
        analyst.page.fill("#subjects", f"person_id={consoles.officer}")
        analyst.page.fill("#case_id", "SZ-CONSOLE-4E")
        analyst.page.fill("#purpose", "legal representative's record")
        analyst.page.click("#preview")
        analyst.shot(name, "ask-review")
        decision = analyst.page.locator("#decision")
        expect(decision).to_have_class(re.compile(r"\bwait\b"))
        expect(decision).to_contain_text("COSIGNATURE_REQUIRED")
        expect(analyst.page.locator("#signed")).to_contain_text(consoles.officer)
        analyst.page.click("#submit")
        expect(analyst.page).to_have_url(re.compile(r"/cosign/[0-9a-f]{32}$"))
        expect(analyst.page.locator("#request-status")).to_have_attribute("data-status",
                                                                          "pending")
        analyst.shot(name, "waiting")

        supervisor.go("/cosign")
        waiting = supervisor.page.locator("#waiting tbody tr")
        expect(waiting).to_have_count(1)
        expect(waiting).to_contain_text(f"person_id={consoles.officer}")
        supervisor.shot(name, "supervisor-list")
        waiting.locator("a.open-request").click()
        expect(supervisor.page.locator("#purpose")).to_have_text(
            "legal representative's record")
        expect(supervisor.page.locator("#policy-code")).to_have_text("COSIGNATURE_REQUIRED")
        supervisor.shot(name, "supervisor-review")
        supervisor.page.click("#approve")
        expect(supervisor.page.locator("#request-status")).to_have_attribute(
            "data-status", "cosigned")
        supervisor.shot(name, "supervisor-cosigned")

        # the analyst's page notices, signs the co-signed query and shows its answer
        expect(analyst.page).to_have_url(re.compile(r"/queries/[0-9a-f]{64}$"),
                                         timeout=UI_WAIT_MS)
        expect(analyst.page.locator("#answer-summary")).to_be_visible(timeout=UI_WAIT_MS)
        expect(analyst.page.locator("#answer")).to_contain_text(consoles.officer)
        assert "supervisor-1" in analyst.page.locator("table.facts").inner_text()
        analyst.shot(name, "answer")
        with analyst.page.expect_download() as download:
            analyst.page.click("#csv")
        csv_text = Path(download.value.path()).read_text(encoding="utf-8")
        assert consoles.officer in csv_text and csv_text.splitlines()[0].startswith(
            ("record_id", "person_id", "kind", "case_no", "recorded_on"))

        # and nothing waits any more
        supervisor.go("/cosign")
        expect(supervisor.page.locator("#none-waiting")).to_be_visible()


def test_a_restarted_console_signs_a_cosigned_query_only_after_the_analyst_reviews_it(
        consoles: Consoles, browser: Any) -> None:
    from playwright.sync_api import expect

    name = "four-eyes-restart"
    _restart_console(consoles, "analyst", "--profile", str(consoles.cluster.profile("tax")))
    _restart_console(consoles, "supervisor", "--profile", str(
        consoles.cluster.net / "tax" / "analysts" / "supervisor-1.toml"))
    with session(browser, consoles, "analyst") as analyst:
        analyst.go("/ask?target=police&dataset=persons")
        analyst.page.fill("#subjects", f"person_id={consoles.officer}")
        analyst.page.fill("#case_id", "SZ-CONSOLE-4E2")
        analyst.page.fill("#purpose", "who the officer is")
        analyst.page.click("#preview")
        analyst.page.click("#submit")
        expect(analyst.page).to_have_url(re.compile(r"/cosign/[0-9a-f]{32}$"))
        request_path = analyst.page.url.split(analyst.base, 1)[1]
    # the analyst's console restarts: it no longer holds what it sent
    _restart_console(consoles, "analyst", "--profile", str(consoles.cluster.profile("tax")))
    with session(browser, consoles, "supervisor") as supervisor:
        supervisor.go(request_path)
        supervisor.page.click("#approve")
        expect(supervisor.page.locator("#request-status")).to_have_attribute(
            "data-status", "cosigned")
    with session(browser, consoles, "analyst") as analyst:
        analyst.go("/cosign")
        expect(analyst.page.locator("#mine")).to_contain_text("已会签")
        analyst.go(request_path)  # shown for review, not signed behind the analyst's back
        expect(analyst.page.locator("#purpose")).to_have_text("who the officer is")
        analyst.shot(name, "review")
        analyst.page.click("#sign-cosigned")
        expect(analyst.page).to_have_url(re.compile(r"/queries/[0-9a-f]{64}$"))
        expect(analyst.page.locator("#answer-summary")).to_be_visible(timeout=UI_WAIT_MS)
        analyst.shot(name, "answer")


def test_a_finding_opens_a_case_whose_graph_shows_its_subject(consoles: Consoles,
                                                              browser: Any) -> None:
    from playwright.sync_api import expect

    if not CYTOSCAPE.is_file():
        pytest.skip("Cytoscape.js not installed (npm package cytoscape: make console-assets)")
    name = "case"
    _restart_console(consoles, "analyst", "--profile", str(consoles.cluster.profile("tax")))
    with session(browser, consoles, "analyst") as analyst:
        analyst.go(f"/findings?rule={RULE}&period={PERIOD}")
        analyst.shot(name, "findings")
        row = analyst.page.locator("#findings tbody tr").first
        subject = row.locator("td").nth(5).inner_text().strip()
        assert re.fullmatch(r"[0-9A-Z]{18}", subject), subject
        row.locator("input[name=case_id]").fill("SZ-CONSOLE-G1")
        row.locator("input[name=reason]").fill("rebate claimed, no exports")
        row.locator("button").click()
        expect(analyst.page).to_have_url(re.compile(r"/cases/SZ-CONSOLE-G1$"))
        expect(analyst.page.locator("#case-status")).to_have_text("办理中")
        graph = analyst.page.locator("#graph")
        expect(graph).to_have_attribute("data-ready", re.compile(r"^[1-9]"),
                                        timeout=UI_WAIT_MS)
        # the graph's nodes are the case's subjects: the finding's company among them
        labels = analyst.page.evaluate(
            "fetch(document.getElementById('graph').dataset.src).then(r => r.json())"
            ".then(g => g.nodes.map(n => n.key))")
        assert subject in labels
        expect(analyst.page.locator("#case-findings")).to_contain_text(subject)
        expect(analyst.page.locator("#timeline")).to_contain_text("rebate claimed, no exports")
        analyst.shot(name, "graph")

        # a query within the case (allowed without a co-signature): its answer's
        # accounts join the graph, linked to the company
        analyst.page.click("#ask-in-case")
        analyst.page.select_option("#dataset", "pboc/accounts")
        analyst.page.fill("#subjects", f"holder_id={subject}")
        analyst.page.fill("#purpose", "accounts of the company")
        analyst.page.click("#preview")
        expect(analyst.page.locator("#decision")).to_have_class(re.compile(r"\bok\b"))
        expect(analyst.page.locator("#signed")).to_contain_text("SZ-CONSOLE-G1")
        analyst.page.click("#submit")
        expect(analyst.page).to_have_url(re.compile(r"/queries/[0-9a-f]{64}$"))
        expect(analyst.page.locator("#answer-summary")).to_be_visible(timeout=UI_WAIT_MS)
        analyst.shot(name, "accounts-answer")
        accounts = analyst.page.locator("#answer tbody tr").count()
        analyst.go("/cases/SZ-CONSOLE-G1")
        expect(graph).to_have_attribute("data-ready", str(1 + accounts), timeout=UI_WAIT_MS)
        kinds = analyst.page.evaluate(
            "fetch(document.getElementById('graph').dataset.src).then(r => r.json())"
            ".then(g => g.nodes.map(n => n.kind))")
        assert kinds.count("account") == accounts
        analyst.page.evaluate(f"window.caseGraph.getElementById('company:{subject}').emit('tap')")
        expect(analyst.page.locator("#graph-detail")).to_contain_text(subject)
        analyst.shot(name, "graph-with-accounts")

        with analyst.page.expect_download() as download:
            analyst.page.click("#export")
        from exchange.ledger.evidence_verify import verify_bundle

        verified = verify_bundle(Path(download.value.path()).read_bytes())
        assert len(verified.transactions) >= 3  # the case event, the query, its answer

        analyst.go("/cases")
        expect(analyst.page.locator("#cases")).to_contain_text("SZ-CONSOLE-G1")
        analyst.shot(name, "cases")

        analyst.go("/cases/SZ-CONSOLE-G1")
        analyst.page.fill("#close-reason", "referred to the prosecutor")
        analyst.page.click("#close")
        expect(analyst.page.locator("#case-status")).to_have_text("已结案")
        expect(analyst.page.locator("#timeline")).to_contain_text("referred to the prosecutor")
        analyst.shot(name, "closed")


def test_a_tampered_bundle_is_refused_and_the_genuine_one_verifies_without_a_profile(
        consoles: Consoles, browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    name = "evidence"
    cluster = consoles.cluster
    case_id = "SZ-CONSOLE-EV"
    listing = cluster.cli_json("findings", "--rule", RULE)
    finding = listing["findings"][0]["finding"]  # type: ignore[index]
    opened = cluster.run_exchange("findings", "open", finding, "--case", case_id,
                                  "--profile", str(cluster.profile("tax")))
    assert opened.returncode == 0, opened.stderr[-2000:]
    genuine = tmp_path / "case.bundle"
    exported = cluster.run_exchange("evidence", "export", "--store",
                                    str(cluster.net / "tax" / "data" / "blocks.db"),
                                    "--case", case_id, "--profile",
                                    str(cluster.profile("tax")), "--reveal-with",
                                    str(cluster.net / "tax" / "keys" / "data.key"),
                                    "--out", str(genuine))
    assert exported.returncode == 0, exported.stderr[-2000:]
    data = bytearray(genuine.read_bytes())
    tampered = tmp_path / "tampered.bundle"
    position = data.find(case_id.encode())  # the case id as a signed body carries it
    assert position > 0
    data[position + len(case_id) - 1] ^= 0x01
    tampered.write_bytes(bytes(data))

    with session(browser, consoles, "clerk") as clerk:
        clerk.statuses_expected = {404, 422}  # no network page; a refused bundle
        clerk.go("/evidence")
        expect(clerk.page.locator("#who")).to_have_text("仅证据核验（无身份配置）")
        assert clerk.go("/network").status == 404  # nothing but evidence without a profile
        clerk.go("/evidence")
        clerk.shot(name, "empty")
        clerk.page.set_input_files("#bundle", str(tampered))
        clerk.page.click("#verify")
        expect(clerk.page.locator("#refused")).to_be_visible()
        expect(clerk.page.locator("#verified")).to_have_count(0)
        expect(clerk.page.locator("#report-timeline")).to_have_count(0)
        clerk.shot(name, "tampered")
        clerk.page.set_input_files("#bundle", str(genuine))
        clerk.page.click("#verify")
        expect(clerk.page.locator("#verified")).to_be_visible()
        expect(clerk.page.locator("#report-timeline")).to_contain_text(case_id)
        # the finding's revealed row, checked against its digest, names its subject
        expect(clerk.page.locator("#report-timeline tr.revealed").first).to_be_visible()
        import hashlib

        expect(clerk.page.locator("#bundle-sha")).to_have_text(
            hashlib.sha256(genuine.read_bytes()).hexdigest())
        clerk.shot(name, "verified")


LEAF_TEXTS_JS = """() => {
  const out = [];
  const walk = (el) => {
    if (["SCRIPT", "STYLE"].includes(el.tagName)) return;
    for (const attr of ["placeholder", "title"]) {
      if (el.getAttribute && el.getAttribute(attr)) out.push(el.getAttribute(attr).trim());
    }
    for (const child of el.childNodes) {
      if (child.nodeType === Node.TEXT_NODE) {
        const t = child.textContent.trim();
        if (t) out.push(t);
      } else if (child.nodeType === Node.ELEMENT_NODE) walk(child);
    }
  };
  walk(document.body);
  out.push(document.title);
  return out;
}"""

PAGES = ("/network", "/ask", "/cosign", "/findings", "/cases", "/audit?verify=1", "/chain",
         "/live", "/evidence")


def _untranslated(texts: list[str], foreign: set[str]) -> list[str]:
    """The texts of a page, or the parts of them between separators, that are a
    message of the other language."""
    found = []
    for text in texts:
        parts = {text, *(p.strip() for p in re.split(r"[·:：()（）|/]", text))}
        found += [p for p in parts if p in foreign]
    return sorted(set(found))


def test_every_page_switches_between_chinese_and_english_with_no_untranslated_string(
        consoles: Consoles, browser: Any) -> None:
    from playwright.sync_api import expect

    ids = template_msgids()
    zh = {str(m.id): str(m.string) for m in catalog("zh_CN") if m.id}
    en = {str(m.id): str(m.string) for m in catalog("en") if m.id}
    # words a page may show as data too (dataset names, codes) are not evidence
    # an English message of more than one word, or a page's name, is never data
    english_only = {en[i] for i in ids if en[i] != zh[i] and (" " in en[i] or en[i] in {
        "Network", "Findings", "Cases", "Audit", "Evidence", "Height", "Subjects",
        "Purpose", "Timeline"})}
    chinese_only = {zh[i] for i in ids if en[i] != zh[i]}
    _restart_console(consoles, "analyst", "--profile", str(consoles.cluster.profile("tax")))
    with session(browser, consoles, "analyst") as analyst:
        for path in PAGES:
            analyst.go(path)
            assert analyst.page.locator("html").get_attribute("lang") == "zh-CN"
            texts = analyst.page.evaluate(LEAF_TEXTS_JS)
            assert not _untranslated(texts, english_only), (path, _untranslated(
                texts, english_only))
            analyst.shot("language", f"zh{path.split('?')[0].replace('/', '-')}")
        analyst.go("/network")
        analyst.page.click("#lang-en")
        expect(analyst.page.locator("html")).to_have_attribute("lang", "en")
        expect(analyst.page.locator("#nav-network")).to_have_text("Network")
        for path in PAGES:
            analyst.go(path)
            texts = analyst.page.evaluate(LEAF_TEXTS_JS)
            assert not _untranslated(texts, chinese_only), (path, _untranslated(
                texts, chinese_only))
            analyst.shot("language", f"en{path.split('?')[0].replace('/', '-')}")
        analyst.page.click("#lang-zh_CN")
        expect(analyst.page.locator("#nav-network")).to_have_text("网络")


def test_the_live_page_shows_a_case_event_as_it_commits(consoles: Consoles,
                                                         browser: Any) -> None:
    from playwright.sync_api import expect

    _restart_console(consoles, "analyst", "--profile", str(consoles.cluster.profile("tax")))
    with session(browser, consoles, "analyst") as analyst:
        analyst.go("/live")
        expect(analyst.page.locator("#live-state")).to_have_text("已连接", timeout=UI_WAIT_MS)
        listing = consoles.cluster.cli_json("findings", "--rule", RULE)
        finding = listing["findings"][-1]["finding"]  # type: ignore[index]
        opened = consoles.cluster.run_exchange(
            "findings", "open", finding, "--case", "SZ-CONSOLE-LIVE", "--profile",
            str(consoles.cluster.profile("tax")))
        assert opened.returncode == 0, opened.stderr[-2000:]
        expect(analyst.page.locator("#live-rows")).to_contain_text("SZ-CONSOLE-LIVE",
                                                                   timeout=UI_WAIT_MS)
        analyst.shot("live", "event")
        for path in ("/chain", "/audit?verify=1", "/network"):
            analyst.go(path)
            analyst.shot("pages", path.split("?")[0].strip("/"))
        analyst.go("/chain")
        analyst.page.locator("#blocks tbody tr a").first.click()
        tx_link = analyst.page.locator("#block-txs a").first
        tx_link.click()
        expect(analyst.page.locator("#tx-verdict")).to_have_class(re.compile(r"\bok\b"))
        expect(analyst.page.locator("#inclusion")).to_have_text("已核验")
        analyst.shot("pages", "tx")

