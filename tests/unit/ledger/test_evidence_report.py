"""`exchange evidence report`: a verified bundle as a page a judge reads. The bundles are
real: queries, answers, a refusal, a rule, its findings and a case cut into blocks that
every member attests, exported with reveals, then verified before anything is shown."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from exchange.cli.main import _register, cli
from exchange.client import Signer
from exchange.client.crossquery import QuerySpec, build_query
from exchange.identity.default_policies import LEGAL_BASIS_TAX_CRIME, default_policies
from exchange.identity.genesis import verify_genesis
from exchange.identity.keys import CachedSigner
from exchange.ledger.apply import LedgerApplier
from exchange.ledger.block import RESULT_OK, attest, new_body, seal_envelope, tx_id
from exchange.ledger.evidence import build_bundle, encode_bundle
from exchange.ledger.findings import inputs_digest, summary_of
from exchange.ledger.queries import CODE_ALREADY_ANSWERED
from exchange.ledger.report import build_report, render_html
from exchange.ledger.sealing import canonical_json, canonical_json_lines, seal
from exchange.ledger.store import BlockStore
from exchange.v1 import evidence_pb2, identity_pb2, ledger_pb2
from tests.support.ledger_net import AGENCIES, Net, make_net

CASE = "CASE-2024-0042"
USCC = "91440300MA5F000001"
INJECTED = "<script>alert('pwned')</script>"
PURPOSE = f"export rebate check {INJECTED}"
REFUSAL_REASON = "a supervisor must co-sign queries about persons"
RULE_ID = "export-rebate-without-exports"
PERIOD = "2026-09"
FINDING_ID = f"{RULE_ID}/{PERIOD}/1"
FINDING_AMOUNT = "1234567.89"
DECLARATIONS = [
    {"decl_no": "DECL-0001", "uscc": USCC, "direction": "export", "hs_code": "8471",
     "declared_value_cny": "250000.00", "declared_on": "2026-09-03", "port": "Shenzhen"},
    {"decl_no": "DECL-0002", "uscc": USCC, "direction": "export", "hs_code": "8517",
     "declared_value_cny": "98000.50", "declared_on": "2026-09-17", "port": "Yantian"},
]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_TIMEOUT_S = 60
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None


# -- a real ledger, cut into attested blocks ------------------------------------------

@dataclass
class Ledger:
    net: Net
    genesis: identity_pb2.Genesis
    applier: LedgerApplier
    now_ms: int

    def block(self, *envelopes: bytes) -> tuple[str, ...]:
        """Cut, apply and have every member attest one block stamped `now_ms`."""
        block = self.applier.cut(list(envelopes), self.now_ms, self.net.nodes["tax"], "tax")
        applied = self.applier.apply(block)
        self.applier.store.add_attestations([
            attest(self.net.chain_id, a, applied.checked.header.height, applied.checked.hash,
                   applied.codes, self.net.nodes[a]) for a in self.net.nodes])
        return applied.codes

    def signed(self, agency: str, key: CachedSigner, fill: str,
               message: object) -> tuple[bytes, bytes]:
        body = new_body(self.net.chain_id, agency, self.now_ms)
        getattr(body, fill).CopyFrom(message)
        envelope = seal_envelope(body, key)
        return envelope, tx_id(ledger_pb2.Envelope.FromString(envelope).body)


def _data_keys(net: Net, agencies: Sequence[str]) -> list[bytes]:
    return [net.data_keys[a].public_key for a in agencies]


def _answer(led: Ledger, query_tx: bytes, rows: Sequence[object], by: str,
            to: str = "tax") -> tuple[bytes, bytes, evidence_pb2.Reveal]:
    plaintext = canonical_json_lines(rows)
    sealed, salt = seal(plaintext, _data_keys(led.net, [to]), chain_id=led.net.chain_id,
                        context_tx_id=query_tx, chunk=0)
    envelope, txid = led.signed(by, led.net.nodes[by], "answer_manifest",
                                ledger_pb2.AnswerManifest(
                                    query_tx_id=query_tx, chunk_count=1, row_count=len(rows),
                                    commitment=sealed.commitment, inline_chunk=sealed))
    return envelope, txid, evidence_pb2.Reveal(tx_id=txid, salt=salt, plaintext=plaintext)


@dataclass
class Built:
    data: bytes
    tx: dict[str, str]  # name -> tx id (hex)


def build_ledger(tmp: Path) -> tuple[Ledger, dict[str, bytes], list[evidence_pb2.Reveal]]:
    """A real ledger of a small investigation, cut into attested blocks: two queries (one
    refused), a rule, its input answered, its findings and a case opened with them; the
    tx ids by name and the reveals of what tax may read. The store is left open."""
    net = make_net(policies=default_policies(AGENCIES))
    store = BlockStore.create(tmp / "store.db", net.signed_genesis)
    genesis = verify_genesis(net.signed_genesis)
    led = Ledger(net, genesis, LedgerApplier(store), int(time.time() * 1000) - 600_000)
    analyst = Signer("tax", "analyst-1", net.chain_id, net.analysts["tax"])
    automation = Signer("tax", "automation", net.chain_id, net.automations["tax"])

    # 1: tax's analyst asks customs (allowed) and the police (needs a co-signature)
    q1, q1_id = build_query(QuerySpec(target="customs", dataset="declarations",
                                      subjects=(("uscc", USCC),), case_id=CASE,
                                      purpose=PURPOSE), analyst, genesis, now_ms=led.now_ms)
    q2, q2_id = build_query(QuerySpec(target="police", dataset="records",
                                      subjects=(("uscc", USCC),), case_id=CASE,
                                      purpose="legal representative's record"),
                            analyst, genesis, now_ms=led.now_ms)
    assert led.block(q1, q2) == (RESULT_OK, RESULT_OK)

    # 2: customs answers, the police refuse, tax's supervisor registers a rule
    led.now_ms += 60_000
    a1, a1_id, a1_reveal = _answer(led, q1_id, DECLARATIONS, by="customs")
    r2, r2_id = led.signed("police", net.nodes["police"], "refusal", ledger_pb2.Refusal(
        query_tx_id=q2_id, code="COSIGNATURE_REQUIRED", reason=REFUSAL_REASON))
    canonical = f"id: {RULE_ID}\nversion: 1\nowner: tax\n".encode()
    digest = hashlib.sha256(canonical).digest()
    reg, reg_id = led.signed("tax", net.supervisors["tax"], "rule_registration",
                             ledger_pb2.RuleRegistration(rule_id=RULE_ID, version=1,
                                                         digest=digest, canonical=canonical))
    assert led.block(a1, r2, reg) == (RESULT_OK,) * 3

    # 3: the rule's automation asks customs period-wide; customs answers q1 again (invalid)
    led.now_ms += 60_000
    q3, q3_id = build_query(QuerySpec(target="customs", dataset="company_trade",
                                      period=PERIOD, purpose="rule input",
                                      on_behalf_of=digest.hex()),
                            automation, genesis, now_ms=led.now_ms)
    again, again_id, _ = _answer(led, q1_id, DECLARATIONS[:1], by="customs")
    assert led.block(q3, again) == (RESULT_OK, CODE_ALREADY_ANSWERED)

    # 4: customs answers the rule's query
    led.now_ms += 60_000
    trade = [{"uscc": USCC, "period": PERIOD, "export_value_cny": "0.00",
              "import_value_cny": "10.00", "import_declarations": 1}]
    a3, a3_id, _ = _answer(led, q3_id, trade, by="customs")
    assert led.block(a3) == (RESULT_OK,)

    # 5: the rule's findings, sealed to tax and customs
    led.now_ms += 60_000
    finding = {"subject": USCC, "amount": FINDING_AMOUNT, "rule_id": RULE_ID,
               "rule_digest": digest.hex(), "period": PERIOD, "severity": "high"}
    line = canonical_json(finding) + b"\n"
    sealed, salt = seal(line, _data_keys(net, ["tax", "customs"]), chain_id=net.chain_id,
                        context_tx_id=inputs_digest([q3_id]), chunk=0)
    f5, f5_id = led.signed("tax", net.automations["tax"], "findings", ledger_pb2.Findings(
        rule_digest=digest, rule_id=RULE_ID, period=PERIOD, parameters=b'{"period":"2026-09"}',
        input_tx_ids=[q3_id], output_digest=hashlib.sha256(line).digest(), finding_count=1,
        findings=[summary_of(FINDING_ID, "high", line)], sealed_output=sealed,
        engine_version="duckdb test"))
    assert led.block(f5) == (RESULT_OK,)

    # 6: tax's analyst opens a case with the finding
    led.now_ms += 60_000
    c6, c6_id = led.signed("tax", net.analysts["tax"], "case_event", ledger_pb2.CaseEvent(
        case_id="CASE-F1", action="open", ref_tx_id=f5_id, finding_id=FINDING_ID,
        reason="exports claimed, none declared"))
    assert led.block(c6) == (RESULT_OK,)

    ids = {"q1": q1_id, "q2": q2_id, "a1": a1_id, "r2": r2_id, "reg": reg_id, "q3": q3_id,
           "again": again_id, "a3": a3_id, "f5": f5_id, "c6": c6_id}
    reveals = [a1_reveal, evidence_pb2.Reveal(tx_id=f5_id, salt=salt, plaintext=line)]
    return led, ids, reveals


def _build(tmp: Path) -> Built:
    led, ids, reveals = build_ledger(tmp)
    store = led.applier.store
    data = encode_bundle(build_bundle(store, list(ids.values()), reveals))
    store.close()
    return Built(data, {k: v.hex() for k, v in ids.items()})


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        yield _build(Path(tmp))


VERIFIED_AT_MS = 1_790_000_000_000


def _text(html: str) -> str:
    """What a reader sees: the text content, white space collapsed."""

    class Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.parts: list[str] = []
            self.skip = 0

        def handle_starttag(self, tag: str, attrs: object) -> None:
            self.skip += tag in ("style", "script", "title")

        def handle_endtag(self, tag: str) -> None:
            self.skip -= tag in ("style", "script", "title")

        def handle_data(self, data: str) -> None:
            if not self.skip:
                self.parts.append(data)

    parser = Text()
    parser.feed(html)
    return " ".join(" ".join(parser.parts).split())


def _in_order(text: str, needles: Sequence[str]) -> bool:
    at = 0
    for needle in needles:
        at = text.find(needle, at)
        if at < 0:
            return False
        at += len(needle)
    return True


# -- the report model and its HTML -----------------------------------------------------

def test_report_describes_the_verified_bundle_in_plain_language(built: Built) -> None:
    report = build_report(built.data, VERIFIED_AT_MS, "case.bundle")
    assert report.verification == "verified offline: 10 transactions, 2 reveals checked"
    assert report.bundle_sha256 == hashlib.sha256(built.data).hexdigest()
    assert (report.members, report.quorum) == (sorted(AGENCIES), 3)
    assert report.verified_at == "2026-09-21 14:13:20 UTC"
    order = ["q1", "q2", "a1", "r2", "reg", "q3", "again", "a3", "f5", "c6"]
    assert [t.tx_id for t in report.timeline] == [built.tx[n] for n in order]
    lines = {t.tx_id: t for t in report.timeline}
    tx = built.tx
    assert lines[tx["q1"]].line == (
        f"tax/analyst-1 asked customs for declarations (case {CASE}; purpose: {PURPOSE}; "
        f"legal basis: {LEGAL_BASIS_TAX_CRIME})")
    assert lines[tx["a1"]].line == f"customs answered query {tx['q1'][:16]}: 2 rows"
    assert lines[tx["r2"]].line == (f"police refused query {tx['q2'][:16]}: "
                                    f"COSIGNATURE_REQUIRED {REFUSAL_REASON}")
    assert lines[tx["f5"]].line == f"tax's rule {RULE_ID} (period {PERIOD}) found 1 finding"
    assert lines[tx["c6"]].line == (f"case CASE-F1 opened by tax with finding {FINDING_ID} "
                                    "(exports claimed, none declared)")
    assert lines[tx["reg"]].line.startswith(f"tax registered rule {RULE_ID} version 1")
    # the second answer was recorded and judged invalid
    again = lines[tx["again"]]
    assert (again.valid, again.result) == (False, CODE_ALREADY_ANSWERED)
    assert all(t.valid for t in report.timeline if t is not again)
    assert all(t.attested_by == sorted(AGENCIES) and t.inclusion_checked
               for t in report.timeline)
    # revealed rows: the customs answer and the finding's subject and amount
    (rows,) = lines[tx["a1"]].reveals
    assert rows.rows_total == 2 and rows.columns[0] == "uscc"
    assert [r[rows.columns.index("decl_no")] for r in rows.rows] == ["DECL-0001", "DECL-0002"]
    (found,) = lines[tx["f5"]].reveals
    assert found.columns[:2] == ["subject", "amount"] and found.rows[0][:2] == [
        USCC, FINDING_AMOUNT]
    assert lines[tx["q2"]].reveals == [] and not lines[tx["q2"]].revealed
    # who asked whom
    table = {e.query_tx_id: e for e in report.exchanges}
    assert list(table) == [tx["q1"], tx["q2"], tx["q3"]]
    e1, e2, e3 = table[tx["q1"]], table[tx["q2"]], table[tx["q3"]]
    assert (e1.requester, e1.target, e1.dataset, e1.case_id) == (
        "tax/analyst-1", "customs", "declarations", CASE)
    assert e1.outcome == "answered: 2 rows (revealed)" and e1.outcome_tx_id == tx["a1"]
    assert e1.asked_at < e1.answered_at
    assert e2.outcome == f"refused: COSIGNATURE_REQUIRED {REFUSAL_REASON}"
    assert (e3.requester, e3.dataset, e3.outcome) == ("tax/automation", "company_trade",
                                                      "answered: 1 row")
    assert json.loads(json.dumps(report.as_dict()))["transactions"] == 10


def test_html_is_self_contained_and_escapes_what_the_bundle_says(built: Built) -> None:
    html = render_html(build_report(built.data, VERIFIED_AT_MS, "case<b>.bundle"))
    assert INJECTED not in html and "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in html
    assert "case&lt;b&gt;.bundle" in html
    for external in ("http://", "https://", "<link", "src=", "@import", "url("):
        assert external not in html, external
    text = _text(html)
    assert "Verified offline: 10 transactions, 2 reveals checked on 2026-09-21" in text
    assert f"export rebate check {INJECTED}" in text  # shown to the reader as text
    assert f"COSIGNATURE_REQUIRED {REFUSAL_REASON}" in text
    assert FINDING_AMOUNT in text and "DECL-0002" in text
    assert f"INVALID (recorded): {CODE_ALREADY_ANSWERED}" in text
    assert _in_order(text, ["Who asked whom", "tax/analyst-1", "customs", "declarations",
                            "answered: 2 rows (revealed)", "tax/analyst-1", "police",
                            "refused: COSIGNATURE_REQUIRED"])


# -- the command line ----------------------------------------------------------------

def _run(*args: str) -> tuple[int, str, str]:
    _register()
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_report_command_writes_html_and_json(built: Built, tmp_path: Path) -> None:
    bundle = tmp_path / "case.bundle"
    bundle.write_bytes(built.data)
    out = tmp_path / "report.html"
    code, stdout, _ = _run("evidence", "report", str(bundle), "--html", str(out), "--json")
    assert code == 0
    model = json.loads(stdout)
    assert model["ok"] and model["verification"].startswith("verified offline: 10")
    assert model["bundle_sha256"] == hashlib.sha256(built.data).hexdigest()
    assert "Who asked whom" in out.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_tampered_bundle_exits_1_naming_the_failure_and_writes_no_report(
        built: Built, tmp_path: Path) -> None:
    data = bytearray(built.data)
    # a byte inside the refusal's reason: still parses, no longer signed
    at = bytes(data).index(REFUSAL_REASON.encode()) + 2
    data[at] ^= 0x01
    bundle = tmp_path / "tampered.bundle"
    bundle.write_bytes(bytes(data))
    out = tmp_path / "report.html"
    code, stdout, stderr = _run("evidence", "report", str(bundle), "--html", str(out))
    assert code == 1
    assert "evidence invalid, no report written" in stderr and "transactions[" in stderr
    assert not out.exists()
    code, stdout, _ = _run("evidence", "report", str(bundle), "--json")
    failed = json.loads(stdout)
    assert code == 1 and failed["ok"] is False and failed["where"].startswith("transactions[")
    assert "verified offline" not in stdout


def test_report_needs_an_output(built: Built, tmp_path: Path) -> None:
    bundle = tmp_path / "case.bundle"
    bundle.write_bytes(built.data)
    _register()
    result = CliRunner().invoke(cli, ["evidence", "report", str(bundle)])
    assert result.exit_code == 2 and "--html OUT, --json" in result.output


# -- what a reader sees in a real browser ----------------------------------------------

def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    pytest.skip("Chromium not installed (Debian package chromium)")


def _browser(args: Sequence[str]) -> str:
    """Run headless Chromium in its own process group; stop the whole group, always."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # renderers and zygotes it left behind
        proc.wait()
    assert proc.returncode == 0, stderr[-2000:]
    return stdout


def test_headless_chromium_shows_the_verified_report(built: Built, tmp_path: Path) -> None:
    browser = _chromium()
    page = tmp_path / "report.html"
    page.write_text(render_html(build_report(built.data, VERIFIED_AT_MS, "case.bundle")),
                    encoding="utf-8")
    common = [browser, "--headless=new", "--no-sandbox", "--disable-gpu",
              "--no-first-run", "--disable-extensions", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}"]
    dom = _browser([*common, "--dump-dom", page.as_uri()])
    assert "<script" not in dom.lower()  # the injected purpose never became an element
    text = _text(dom)
    assert "Verified offline: 10 transactions, 2 reveals checked on 2026-09-21" in text
    assert f"purpose: export rebate check {INJECTED}" in text
    tx = built.tx
    assert _in_order(text, ["Timeline (chain order)", "#1.0", "asked customs for declarations",
                            "#1.1", "asked police for records",
                            "#2.0", f"customs answered query {tx['q1'][:16]}: 2 rows",
                            "DECL-0001", "DECL-0002",
                            "#2.1", f"police refused query {tx['q2'][:16]}: "
                                    f"COSIGNATURE_REQUIRED {REFUSAL_REASON}",
                            "#2.2", f"tax registered rule {RULE_ID}",
                            "#3.0", "#3.1", f"INVALID (recorded): {CODE_ALREADY_ANSWERED}",
                            "#4.0", "#5.0", "found 1 finding", USCC, FINDING_AMOUNT,
                            "#6.0", "case CASE-F1 opened by tax"])
    shot = tmp_path / "report.png"
    _browser([*common, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()])
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
