"""The sample data generator: the four agencies' import folders for a seed and a size,
and ground_truth.csv, the findings the reference rules must produce on that data.

The data is shaped like the real thing at a small scale: every company holds one to
three accounts at Shenzhen banks; money comes in from other companies' accounts (both
legs booked), from accounts at banks outside the data set, from persons and, for
exporters, from abroad; companies move money between their own accounts, pay suppliers
and staff, and (importers mostly) pay abroad. Taxpayers issue many VAT invoices a month
and declare their revenue; exporters and importers file customs declarations; exporters
claim rebates. The police know every person and hold records about a few.

On top of that, chosen companies and months are *planted*: cases each reference rule
must find, and decoys that it must not, on both sides of every threshold (exactly at a
threshold is no finding, one fen beyond it is). The generator keeps its own books of
what it wrote (per company and month: inflows as the contract defines them, outbound
cross-border payments, declared values, claims, declared revenue) and derives
ground_truth.csv from them; it asserts that every planted case came out as planned.

Everything is drawn from one `random.Random(seed)` in a fixed order, so a seed and a
size always give the same bytes.

Over 600 lines on purpose: the generator is one seeded stream; every dataset's rows and
every planted case draw from the same random state in a fixed order, so that the same
seed and size give the same bytes. The planted cases would be the first part to move
out.
"""

from __future__ import annotations

import functools
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TextIO

from agents.common.checks import (
    USCC_ALPHABET,
    USCC_LENGTH,
    check_period,
    org_code_check_char,
    pair_subject,
    period_bounds,
    person_id_check_char,
    shift_period,
    uscc_check_char,
)
from agents.common.checks import format_fen as fmt_fen  # the one amount formatter
from exchange.errors import AlreadyExists, MalformedInput

RULE_EXPORT_REBATE = "export-rebate-without-exports"
RULE_REVENUE = "revenue-below-bank-inflows"
RULE_IMPORT_UNDERVALUATION = "import-undervaluation"
RULE_PAYMENTS_WITHOUT_IMPORTS = "payments-without-imports"
RULE_OFFICER_RECORD = "officer-with-police-record"
RULE_BEYOND_INFLOWS = "invoices-beyond-inflows"
RULE_RING = "invoice-ring"
RULE_ABNORMAL_ISSUERS = "invoices-from-abnormal-issuers"
RULE_IDS = (RULE_EXPORT_REBATE, RULE_REVENUE, RULE_IMPORT_UNDERVALUATION,
            RULE_PAYMENTS_WITHOUT_IMPORTS, RULE_OFFICER_RECORD, RULE_BEYOND_INFLOWS,
            RULE_RING, RULE_ABNORMAL_ISSUERS)

COMPANIES_MIN = 100
COMPANIES_MAX = 3_000_000
MONTHS_MAX = 24
DEFAULT_END_PERIOD = "2026-09"
DEFAULT_MONTHS = 3
FLUSH_LINES = 20_000
# Every buffer is written out after this many companies (a few dozen lines each).
FLUSH_COMPANIES = 1_000

CNY = 100  # fen
# The reference rules' thresholds, in fen.
R2_EXCESS_MIN = 1_000_000 * CNY
R3_EXCESS_MIN = 500_000 * CNY
R4_PAYMENTS_MIN = 200_000 * CNY
R6_INVOICED_MIN = 1_000_000 * CNY  # invoices-beyond-inflows: more than this, and > 3x
RING_PAIR_MIN = 100_000 * CNY  # invoice-ring: a pair at least this
RING_LENGTH_MAX = 6
R8_RECEIVED_MIN = 100_000 * CNY  # invoices-from-abnormal-issuers: more than this
INACTIVE = ("deregistered", "abnormal")
FLAGGING_KINDS = ("wanted", "fraud_conviction", "lost_id_report")
RECORD_KINDS = FLAGGING_KINDS + ("under_investigation",)

FILES = {
    "tax": {
        "taxpayers": "uscc,name,legal_rep_id,status,registered_on",
        "vat_invoices": "invoice_no,issuer_uscc,buyer_uscc,amount_cny,tax_cny,issued_on,kind",
        "revenue_declarations": "uscc,period,declared_revenue_cny",
        "export_rebates": "claim_no,uscc,period,claimed_export_value_cny,rebate_cny",
    },
    "customs": {
        "declarations": "decl_no,uscc,direction,hs_code,declared_value_cny,declared_on,port",
    },
    "pboc": {
        "accounts": "account_no,holder_kind,holder_id,bank,opened_on",
        "transactions":
            "txn_id,account_no,counterparty_account,amount_cny,direction,cross_border,booked_on",
    },
    "police": {
        "persons": "person_id,name",
        "records": "record_id,person_id,kind,case_no,recorded_on",
    },
}

SHENZHEN_DISTRICTS = ("440303", "440304", "440305", "440306", "440307", "440308",
                      "440309", "440310", "440311", "440300")
OTHER_REGIONS = ("440100", "441900", "440600", "310115", "110105", "330106", "320505",
                 "510107", "420106", "350203")
BANKS = (("中国工商银行深圳市分行", "622202"), ("中国建设银行深圳市分行", "621700"),
         ("中国银行深圳市分行", "621661"), ("中国农业银行深圳市分行", "622848"),
         ("交通银行深圳分行", "622262"), ("招商银行深圳分行", "621483"),
         ("平安银行深圳分行", "623058"), ("中信银行深圳分行", "622690"),
         ("浦发银行深圳分行", "622521"), ("兴业银行深圳分行", "622909"))
# Banks outside the data set: their accounts appear only as counterparties.
OUTSIDE_BANK_PREFIXES = ("955880", "622700", "621226", "603367", "622155")
# Second accounts opened for planted companies (a prefix no other account uses).
EXTRA_ACCOUNT_PREFIX = "622203"
FOREIGN_PREFIXES = ("HK", "SG", "US", "AE", "DE", "VN", "MY")
HS_CODES = ("8471300000", "8517130000", "8542310000", "6204430000", "9503008900",
            "8504401400", "3926909090", "8528721000", "6110200090", "9405420000",
            "8443321000", "8507600090")
PORTS = ("盐田港", "蛇口港", "皇岗口岸", "文锦渡口岸", "深圳湾口岸", "宝安国际机场", "大铲湾港",
         "前海湾保税港")
SURNAMES = ("王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高郑梁谢宋唐许韩冯邓曹彭曾肖田董潘袁蔡蒋余于杜叶"
            "程魏苏吕丁任卢姚沈钟姜崔谭陆范汪廖石金韦贾夏付方邹熊白孟秦邱侯江尹薛段雷龙黎史陶贺")
GIVEN = ("伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉萍红建文辉力斌宇浩凯健俊帆鹏"
         "林立新海波晨欣怡佳琪子轩梓涵雨博嘉")
WORDS = ("华信", "鹏程", "创维", "前海", "海川", "星辰", "金桥", "宏达", "恒通", "中联", "智汇",
         "天宇", "百川", "瑞丰", "新锐", "博远", "嘉禾", "永盛", "东升", "南山")
TRADES = ("科技", "电子", "贸易", "进出口", "供应链", "实业", "物流", "信息技术", "精密制造",
          "医疗器械", "新能源", "服装")
LATIN_WORDS = ("Bright", "Pearl", "Harbour", "Orient", "Delta", "Summit", "Crown", "Vista")


@dataclass(frozen=True)
class GeneratorConfig:
    seed: int
    companies: int
    end_period: str = DEFAULT_END_PERIOD
    months: int = DEFAULT_MONTHS

    def __post_init__(self) -> None:
        if not COMPANIES_MIN <= self.companies <= COMPANIES_MAX:
            raise MalformedInput(f"companies must be between {COMPANIES_MIN} and "
                                 f"{COMPANIES_MAX}, got {self.companies}")
        if not 1 <= self.months <= MONTHS_MAX:
            raise MalformedInput(f"months must be between 1 and {MONTHS_MAX}, "
                                 f"got {self.months}")
        try:
            check_period(self.end_period)
        except ValueError as exc:
            raise MalformedInput(f"end period: {exc}") from None

    @property
    def periods(self) -> tuple[str, ...]:
        return tuple(shift_period(self.end_period, -k) for k in range(self.months - 1, -1, -1))


@dataclass(frozen=True)
class GenerationReport:
    out: str
    config: GeneratorConfig
    rows: dict[str, int]  # "agency/dataset" -> data rows written
    findings: dict[str, int]  # rule id -> findings in ground_truth.csv
    planted: int  # planted cases and decoys
    seconds: float


# -- small helpers --------------------------------------------------------------------

def _csv_text(text: str) -> str:
    """A CSV field, quoted as RFC 4180 asks when it must be."""
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _uscc(region: str, org8: str) -> str:
    body = "91" + region + org8 + org_code_check_char(org8)
    return body + uscc_check_char(body)


def _base31(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 31)
        chars.append(USCC_ALPHABET[digit])
    return "".join(reversed(chars))


def _org8(index: int) -> str:
    """A distinct organization code body per index: new-style 'MA' codes and old
    all-digit ones, spread out by multiplying with numbers coprime to the modulus."""
    half, form = divmod(index, 2)
    if form == 0:
        return "MA" + _base31((half * 7_919 + 104_729) % 31**6, 6)
    return f"{(half * 7_919 + 3_141_592) % 10**8:08d}"


_BIRTH_START = date(1951, 1, 1).toordinal()
_BIRTH_DAYS = 20_000


def _person_id(index: int, region: str) -> str:
    """A distinct resident identity number per index (birth date and sequence)."""
    q, m = divmod(index, _BIRTH_DAYS)
    assert q < 1000, index
    birth = date.fromordinal(_BIRTH_START + (m * 7_919) % _BIRTH_DAYS)
    body = f"{region}{birth.year:04d}{birth.month:02d}{birth.day:02d}{(q * 37 + 11) % 1000:03d}"
    return body + person_id_check_char(body)


def _split(total: int, parts: int, r: Callable[[], float]) -> list[int]:
    """`total` fen in `parts` positive amounts summing to it exactly."""
    assert total > 0
    if parts <= 1 or total < 100 * parts:
        return [total]
    weights = [0.25 + r() for _ in range(parts)]
    scale = total / sum(weights)
    amounts = [int(w * scale) or 1 for w in weights[:-1]]  # max(1, .) of a natural
    last = total - sum(amounts)
    if last < 1:
        return [total]
    amounts.append(last)
    return amounts


class _Writer:
    """Buffered writers of the output files, counting rows."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.buffers: dict[str, list[str]] = {}
        self.rows: dict[str, int] = {}
        self._handles: dict[str, TextIO] = {}
        for agency, datasets in FILES.items():
            (out / agency).mkdir(parents=True)
            for name, header in datasets.items():
                key = f"{agency}/{name}"
                handle = open(out / agency / f"{name}.csv", "w", encoding="utf-8",  # noqa: SIM115
                              newline="")
                handle.write(header + "\n")
                self._handles[key] = handle
                self.buffers[key] = []
                self.rows[key] = 0

    def buffer(self, key: str) -> list[str]:
        return self.buffers[key]

    def flush(self, key: str) -> None:
        lines = self.buffers[key]
        if lines:
            self._handles[key].write("".join(lines))
            self.rows[key] += len(lines)
            lines.clear()

    def close(self) -> None:
        for key in self._handles:
            self.flush(key)
            self._handles[key].close()


# -- the plan of one company and month ------------------------------------------------

@dataclass(slots=True)
class MonthPlan:
    """What one company does in one month; amounts in fen."""

    declared: int | None = None  # revenue declared (None: no declaration)
    inflow: int = 0  # inflows as the contract counts them
    inflow_cross_border_share: float = 0.0  # of `inflow`, from abroad
    internal: int = 0  # moved between its own accounts (no inflow)
    out_domestic: int = 0
    outbound_cb: int = 0  # outbound cross-border payments
    outbound_cb_day: int | None = None  # 0-based day of the month, None: random
    imports: list[tuple[int, int | None]] = field(default_factory=list)  # (fen, day)
    exports: list[tuple[int, int | None]] = field(default_factory=list)
    claims: list[int] = field(default_factory=list)
    invoices: bool = True  # issues VAT invoices (taxpayers only)


@dataclass(frozen=True)
class Planted:
    """A planted case or decoy: what `rule` must find (or not) for subject in period."""

    scenario: str
    rule: str
    subject: str
    period: str
    finding: bool


# (name, rule, company pool, needs the month before, expected finding)
_SCENARIOS: tuple[tuple[str, str, str, bool, bool], ...] = (
    ("r1_no_exports", RULE_EXPORT_REBATE, "domestic", False, True),
    ("r1_low_exports", RULE_EXPORT_REBATE, "domestic", False, True),
    ("r1_below_80", RULE_EXPORT_REBATE, "domestic", False, True),
    ("r1_at_80", RULE_EXPORT_REBATE, "domestic", False, False),
    ("r1_above_80", RULE_EXPORT_REBATE, "domestic", False, False),
    ("r1_exports_month_before", RULE_EXPORT_REBATE, "domestic", True, True),
    ("r2_big", RULE_REVENUE, "domestic", False, True),
    ("r2_no_declaration", RULE_REVENUE, "domestic", False, True),
    ("r2_ratio_below", RULE_REVENUE, "domestic", False, False),
    ("r2_ratio_at", RULE_REVENUE, "domestic", False, False),
    ("r2_ratio_above", RULE_REVENUE, "domestic", False, True),
    ("r2_excess_below", RULE_REVENUE, "domestic", False, False),
    ("r2_excess_at", RULE_REVENUE, "domestic", False, False),
    ("r2_excess_above", RULE_REVENUE, "domestic", False, True),
    ("r2_no_declaration_at", RULE_REVENUE, "domestic", False, False),
    ("r2_no_declaration_above", RULE_REVENUE, "domestic", False, True),
    ("r2_internal_transfers", RULE_REVENUE, "domestic", False, False),
    ("r2_inbound_cross_border", RULE_REVENUE, "domestic", False, True),
    ("r3_big", RULE_IMPORT_UNDERVALUATION, "domestic", False, True),
    ("r3_ratio_below", RULE_IMPORT_UNDERVALUATION, "domestic", False, False),
    ("r3_ratio_at", RULE_IMPORT_UNDERVALUATION, "domestic", False, False),
    ("r3_ratio_above", RULE_IMPORT_UNDERVALUATION, "domestic", False, True),
    ("r3_excess_at", RULE_IMPORT_UNDERVALUATION, "domestic", False, False),
    ("r3_excess_above", RULE_IMPORT_UNDERVALUATION, "domestic", False, True),
    ("r3_exports_only", RULE_IMPORT_UNDERVALUATION, "domestic", False, False),
    ("r4_big", RULE_PAYMENTS_WITHOUT_IMPORTS, "domestic", False, True),
    ("r4_below", RULE_PAYMENTS_WITHOUT_IMPORTS, "domestic", False, False),
    ("r4_at", RULE_PAYMENTS_WITHOUT_IMPORTS, "domestic", False, False),
    ("r4_above", RULE_PAYMENTS_WITHOUT_IMPORTS, "domestic", False, True),
    ("r4_with_import", RULE_PAYMENTS_WITHOUT_IMPORTS, "domestic", False, False),
    ("r4_import_month_before", RULE_PAYMENTS_WITHOUT_IMPORTS, "domestic", True, True),
    ("r4_exports_only", RULE_PAYMENTS_WITHOUT_IMPORTS, "domestic", False, True),
    ("r4_not_a_taxpayer", RULE_PAYMENTS_WITHOUT_IMPORTS, "non_taxpayer", False, True),
    ("r4_inbound_only", RULE_PAYMENTS_WITHOUT_IMPORTS, "domestic", False, False),
    ("r4_domestic_out", RULE_PAYMENTS_WITHOUT_IMPORTS, "domestic", False, False),
)
# (name, expected finding); planted on legal representatives of chosen taxpayers
_PERSON_SCENARIOS: tuple[tuple[str, bool], ...] = (
    ("r5_wanted", True),
    ("r5_fraud_conviction", True),
    ("r5_lost_id_report", True),
    ("r5_two_companies", True),
    ("r5_also_under_investigation", True),
    ("r5_under_investigation", False),
    ("r5_deregistered", False),
    ("r5_abnormal", False),
)

# False invoicing (DATA_CONTRACT.md): ring scenarios, as (name, shape, every member found).
# A shape is the ring's members and its pairs; see _Generator.plant_ring.
_RING_SCENARIOS: tuple[tuple[str, bool], ...] = (
    ("ring_2", True), ("ring_3", True), ("ring_4", True), ("ring_5", True),
    ("ring_6", True),
    ("ring_7", False),  # longer than six: no finding
    ("ring_split", True),  # one pair reaches 100,000.00 exactly over three invoices
    ("ring_broken", False),  # one pair 99,999.99: the ring is broken
    ("ring_wrong_month", False),  # one pair reaches it only with an invoice of another month
    ("ring_wrong_kind", False),  # ... only with an export invoice
    ("ring_self", True),  # members also invoice themselves (ignored); a self-only decoy
    ("figure_eight", True),  # a 3-ring and a 4-ring sharing one company
    ("shared_edge", True),  # two 3-rings sharing an edge: its issuer counts it once
    ("ring_tail", True),  # a member also invoices a company off the ring (not found)
)
# invoices-beyond-inflows, planted on issuers: (name, finding)
_BEYOND_SCENARIOS: tuple[tuple[str, bool], ...] = (
    ("r6_big", True), ("r6_ratio_at", False), ("r6_ratio_above", True),
    ("r6_million_at", False), ("r6_million_above", True),
    ("r6_exports", False),  # exactly 3x inflows domestic, more only with export invoices
    ("r6_self", False),  # ... more only with self-invoices
    ("r6_dormant", True),  # a deregistered company with no bank flows at all
)
# invoices-from-abnormal-issuers, planted on buyers: (name, finding)
_ABNORMAL_SCENARIOS: tuple[tuple[str, bool], ...] = (
    ("r8_abnormal", True), ("r8_deregistered", True), ("r8_at", False),
    ("r8_two_issuers", True),  # 50,000.00 from each status, one fen beyond together
    ("r8_exports", False),  # more only with export invoices
    ("r8_active", False),  # more only with an active issuer's invoices
    ("r8_wrong_month", False),  # more only with an invoice of another month
    ("r8_self", False),  # an abnormal company invoicing itself
)
# invoice-ring members' pairs, CNY: between these (the threshold is 100,000)
RING_PAIR_CNY = (100_000, 400_000)


_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """SplitMix64's finalizer: 64 well-mixed bits of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass(slots=True)
class _Company:
    """What the generator knows of one company: drawn from its index and the seed alone
    (see _Generator), so that it is never kept for every company."""

    c: int
    taxpayer: bool
    region: str
    status: str
    exporter: bool
    importer: bool
    size: int  # typical monthly revenue, fen
    account_count: int


class _Generator:
    """Writes the data set in one pass over the companies, keeping no more than a fixed
    amount per company in memory (their codes and numbers of accounts, 19 bytes each) and
    the planted cases.

    A company's and a person's own traits (taxpayer or not, status, size, accounts,
    legal representative, police records) are drawn from bits of a hash of the seed
    and the index, so that any company's traits are known when another refers to it
    (an invoice's buyer, a payer's account) without being stored. What each does month
    by month is drawn from one `random.Random(seed)` in company order.
    """

    def __init__(self, config: GeneratorConfig, out: Path) -> None:
        self.config = config
        self.out = out
        self.rng = random.Random(config.seed)
        self.salt = _mix(config.seed & _MASK64) ^ (config.seed >> 64)
        self.n = config.companies
        self.n_persons = self.n + self.n // 2
        self.periods = config.periods
        self.month_days: list[list[str]] = []
        for period in self.periods:
            start, end = period_bounds(period)
            first = date.fromisoformat(start).toordinal()
            last = date.fromisoformat(end).toordinal()
            self.month_days.append([date.fromordinal(o).isoformat()
                                    for o in range(first, last)])
        self.planted: list[Planted] = []
        # the few companies the planted cases change
        self.taxpayer_override: dict[int, bool] = {}
        self.status_override: dict[int, str] = {}
        self.rep_override: dict[int, int] = {}
        self.found: list[tuple[str, str, str]] = []
        self.extra_accounts = 0
        # False invoicing: its own random stream, so that the other datasets' bytes do
        # not depend on it; planted invoices per (issuer, month index) as (buyer, fen,
        # kind, day index), the months whose ordinary invoices an issuer does not write,
        # the companies no ordinary invoice pair of 100,000 CNY may reach, and the
        # buyers each (issuer, month) already has a planted invoice to.
        self.side = random.Random(f"false-invoicing/{config.seed}")
        self.fi_invoices: dict[tuple[int, int], list[tuple[int, int, str, int]]] = {}
        self.fi_quiet: set[tuple[int, int]] = set()
        self.fi_protected: set[int] = set()
        self.fi_partners: dict[tuple[int, int], set[int]] = {}
        self.fi_beyond: dict[tuple[int, int], str] = {}  # (issuer, month) -> scenario
        self.fi_expect: list[tuple[str, str, int, int, bool]] = []  # name, rule, c, p, found
        self.fi_received: dict[tuple[int, int], int] = {}  # (buyer, month) -> fen from
        self.fi_edges: dict[tuple[int, int, int], int] = {}  # (p, u, v) -> planted fen
        self.sink = -1

    # -- traits drawn from the index ----------------------------------------------------

    def _bits(self, index: int, stream: int) -> int:
        return _mix(self.salt ^ (index * 8 + stream))

    def company(self, c: int) -> _Company:
        h0, h1 = self._bits(c, 0), self._bits(c, 1)
        taxpayer = (h0 & 0xFFFF) >= 3277  # 95 in 100
        regions = SHENZHEN_DISTRICTS if taxpayer else OTHER_REGIONS
        u = ((h0 >> 16) & 0xFFFF) / 65536
        status = "active" if u < 0.92 else "abnormal" if u < 0.97 else "deregistered"
        # lognormal monthly revenue: median 300,000 CNY (Box-Muller on two 26-bit draws)
        u1 = ((h1 & 0x3FFFFFF) + 1) / 67108864
        u2 = ((h1 >> 26) & 0x3FFFFFF) / 67108864
        gauss = math.sqrt(-2.0 * math.log(u1)) * math.cos(2 * math.pi * u2)
        size = min(200_000_000 * CNY, int(300_000 * CNY * math.exp(1.1 * gauss))) + CNY
        u = ((h0 >> 52) & 0xFF) / 256
        count = (1 if u < 0.5 else 2 if u < 0.85 else 3) + (size > 3_000_000 * CNY)
        h7 = self._bits(c, 7)
        return _Company(c, self.taxpayer_override.get(c, taxpayer),
                        regions[((h0 >> 32) & 0xFFFF) % 10],
                        self.status_override.get(c, status),
                        (h7 & 0x3FF) < 82, ((h7 >> 10) & 0x3FF) < 82,  # 8 in 100 each
                        size, count)

    def rep(self, c: int) -> int:
        """The person index of the company's legal representative: its own, or (3 in
        100) that of an earlier company."""
        while True:
            override = self.rep_override.get(c)
            if override is not None:
                return override
            h = self._bits(c, 2)
            if not c or (h & 0xFFFF) >= 1966:
                return c
            c = (h >> 16) % c

    def uscc_of(self, c: int) -> str:
        at = c * USCC_LENGTH
        return self.usccs[at:at + USCC_LENGTH].decode("ascii")

    def company_account(self, c: int, k: int) -> str:
        bank = (self._bits(c, 3) >> (6 * k)) % len(BANKS)
        return f"{BANKS[bank][1]}{((c * 8 + k + 1) * 7_919) % 10**13:013d}"

    def person_region(self, i: int) -> str:
        h = self._bits(i, 4)
        if (h & 0xFFFF) < 39322:  # 60 in 100
            return SHENZHEN_DISTRICTS[(h >> 16) % 10]
        return OTHER_REGIONS[(h >> 32) % 10]

    def person_id(self, i: int) -> str:
        return _person_id(i, self.person_region(i))

    def person_has_account(self, i: int) -> bool:
        return i >= self.n or (self._bits(i, 5) & 0xFFFF) < 19661  # 30 in 100

    def person_account(self, i: int) -> str:
        bank = (self._bits(i, 5) >> 16) % len(BANKS)
        return f"{BANKS[bank][1]}{((self.n * 8 + i + 1) * 7_919) % 10**13:013d}"

    def random_person_account(self) -> str:
        """An account of one of the persons who are no legal representative."""
        return self.person_account(self.n + int(self.rng.random() * (self.n_persons - self.n)))

    def natural_records(self, i: int) -> tuple[str, ...]:
        """The kinds of the police records of a person no planted case is about."""
        h = self._bits(i, 6)
        if (h & 0xFFFF) >= 655:  # 1 in 100
            return ()
        first = RECORD_KINDS[(h >> 16) & 3]
        if ((h >> 18) & 0xFF) < 51:  # 1 in 5 of them has two
            return (first, RECORD_KINDS[(h >> 26) & 3])
        return (first,)

    def record_kinds(self, person: int) -> tuple[str, ...]:
        planted = self.planted_records.get(person)
        return planted if planted is not None else self.natural_records(person)

    # -- the population ---------------------------------------------------------------

    def people_and_companies(self) -> None:
        """Every company's code and number of accounts (19 bytes each: invoices name
        any company as buyer, transfers any company's account as payer)."""
        n = self.n
        self.usccs = bytearray(n * USCC_LENGTH)
        self.account_counts = bytearray(n)  # a payer's accounts are any company's
        for c in range(n):
            co = self.company(c)
            code = _uscc(co.region, _org8(c)).encode("ascii")
            self.usccs[c * USCC_LENGTH:(c + 1) * USCC_LENGTH] = code
            self.account_counts[c] = co.account_count
        assert len(set(self.uscc_of(c) for c in range(min(n, 50_000)))) == min(n, 50_000)

    def _walk(self, pool: str, rng: random.Random | None = None) -> Iterator[int]:
        """The companies of a pool, in an order drawn from the seed, each once."""
        n = self.n
        rng = rng or self.rng
        step = 1 + int(rng.random() * (n - 1))
        while math.gcd(step, n) != 1:
            step += 1
        start = int(rng.random() * n)
        for k in range(n):
            c = (start + k * step) % n
            co = self.company(c)
            if pool == "issuer":  # any active taxpayer, exporters and importers too
                if co.taxpayer and co.status == "active":
                    yield c
                continue
            if pool == "inactive":
                if co.taxpayer and co.status in INACTIVE:
                    yield c
                continue
            if co.exporter or co.importer:
                continue
            if pool == "non_taxpayer":
                if not co.taxpayer:
                    yield c
            elif co.taxpayer and co.status == "active" and self.rep(c) == c:
                yield c

    def assign_scenarios(self) -> None:
        """Choose the planted companies, months and persons; set their traits."""
        r = self.rng.random
        per = max(1, self.n // 2_500)
        domestic = self._walk("domestic")
        non_taxpayers = self._walk("non_taxpayer")
        taken: set[int] = set()

        def take(pool: Iterator[int]) -> int | None:
            for c in pool:
                if c not in taken:
                    taken.add(c)
                    return c
            return None

        months = len(self.periods)
        self.scenario_of: dict[int, list[tuple[int, str]]] = {}
        for name, _rule, pool_name, needs_before, _finding in _SCENARIOS:
            if needs_before and months < 2:
                continue
            for _ in range(per):
                c = take(non_taxpayers if pool_name == "non_taxpayer" else domestic)
                if c is None and pool_name == "non_taxpayer":
                    # a small population may lack one: make a company unknown to tax
                    c = take(domestic)
                    if c is not None:
                        self.taxpayer_override[c] = False
                if c is None:
                    raise MalformedInput(f"too few companies to plant every case; "
                                         f"use at least {COMPANIES_MIN}")
                p = (1 if needs_before else 0) + int(r() * (months - (1 if needs_before else 0)))
                self.scenario_of.setdefault(c, []).append((p, name))
        self.person_scenarios: list[tuple[str, int, int | None]] = []  # (name, c, c2)
        for name, _finding in _PERSON_SCENARIOS:
            for _ in range(per):
                c = take(domestic)
                c2 = take(domestic) if name == "r5_two_companies" else None
                if c is None or (name == "r5_two_companies" and c2 is None):
                    raise MalformedInput(f"too few companies to plant every case; "
                                         f"use at least {COMPANIES_MIN}")
                if c2 is not None:
                    self.rep_override[c2] = self.rep(c)
                elif name == "r5_deregistered":
                    self.status_override[c] = "deregistered"
                elif name == "r5_abnormal":
                    self.status_override[c] = "abnormal"
                self.person_scenarios.append((name, c, c2))
        self.planted_records: dict[int, tuple[str, ...]] = {}
        for name, c, _c2 in self.person_scenarios:
            kinds = {"r5_fraud_conviction": ("fraud_conviction",),
                     "r5_two_companies": ("fraud_conviction",),
                     "r5_lost_id_report": ("lost_id_report",),
                     "r5_under_investigation": ("under_investigation",),
                     "r5_also_under_investigation": ("under_investigation", "wanted"),
                     }.get(name, ("wanted",))  # r5_wanted, the inactive taxpayers' reps
            self.planted_records[self.rep(c)] = kinds
        self.assign_false_invoicing(taken)

    # -- false invoicing ------------------------------------------------------------------

    def assign_false_invoicing(self, planted_before: set[int]) -> None:
        """Choose the companies and months of the false-invoicing cases and plan their
        invoices (those of invoices-beyond-inflows are drawn when the issuer's inflows in
        the month are known), all from the generator's second random stream.

        No ordinary invoice pair can close a ring: an ordinary pair of 100,000 CNY or
        more goes from a company to one of higher index (or to a company that issues no
        invoice), never to a protected company. A planted pair comes from a protected
        company (no pair of 100,000 CNY reaches it), or from a ring member in the ring's
        month, when it writes no ordinary invoice, to another member or to a company
        that writes none either. So every cycle of the threshold graph is made of planted
        pairs, and the ground truth of invoice-ring is computed from those alone."""
        side = self.side
        r = side.random
        per = max(1, self.n // 2_500)
        months = len(self.periods)
        issuers = self._walk("issuer", side)
        inactive = self._walk("inactive", side)
        month_walks = [self._walk("issuer", side) for _ in range(months)]
        reserved: set[int] = set()

        def too_few() -> MalformedInput:
            return MalformedInput(f"too few companies to plant every case; use at least "
                                  f"{COMPANIES_MIN}")

        def take_issuer(size_min: int = 0, size_max: int = 1 << 62) -> int:
            for c in issuers:
                if c in reserved or c in planted_before or c in self.status_override:
                    continue
                if size_min <= self.company(c).size < size_max:
                    reserved.add(c)
                    return c
            raise too_few()

        def take_inactive(status: str) -> int:
            for c in inactive:
                if c not in reserved and self.company(c).status == status:
                    reserved.add(c)
                    return c
            c = take_issuer()  # a small population may lack one: make one
            self.status_override[c] = status
            return c

        busy: list[set[int]] = [set() for _ in range(months)]

        def take_member(p: int) -> int:
            for c in month_walks[p]:
                if c not in reserved and c not in self.status_override and c not in busy[p]:
                    busy[p].add(c)
                    return c
            raise too_few()

        # invoices-beyond-inflows: issuers with inflows on the right side of 1,000,000 / 3
        for _ in range(per):
            for name, finding in _BEYOND_SCENARIOS:
                p = int(r() * months)
                if name == "r6_dormant":
                    c = take_inactive("deregistered")
                elif name in ("r6_million_at", "r6_million_above"):
                    c = take_issuer(size_max=200_000 * CNY)  # 3 x inflows < 1,000,000
                elif name == "r6_big":
                    c = take_issuer()
                else:
                    c = take_issuer(size_min=600_000 * CNY)  # 3 x inflows > 1,000,000
                self.fi_beyond[(c, p)] = name
                self.fi_quiet.add((c, p))
                self.fi_protected.add(c)
                self.fi_expect.append((name, RULE_BEYOND_INFLOWS, c, p, finding))
        # invoices-from-abnormal-issuers: per unit, one month, one issuer of each status
        r8_units = []
        for _ in range(per):
            p = int(r() * months)
            abnormal, deregistered, active = (take_inactive("abnormal"),
                                              take_inactive("deregistered"), take_issuer())
            self.fi_protected.update((abnormal, deregistered, active))
            r8_units.append((p, abnormal, deregistered, active))
        for p, abnormal, deregistered, active in r8_units:
            other = p - 1 if p else min(p + 1, months - 1)
            for name, finding in _ABNORMAL_SCENARIOS:
                if name == "r8_wrong_month" and other == p:
                    continue
                buyer = abnormal if name == "r8_self" else take_member(p)
                self.fi_expect.append((name, RULE_ABNORMAL_ISSUERS, buyer, p, finding))
                plant = self.plant
                if name == "r8_abnormal":
                    for fen in _split(R8_RECEIVED_MIN + 1, 2, r):
                        plant(p, abnormal, buyer, fen)
                elif name == "r8_deregistered":
                    plant(p, deregistered, buyer, int((150_000 + 750_000 * r()) * CNY))
                elif name == "r8_at":
                    plant(p, abnormal, buyer, R8_RECEIVED_MIN)
                elif name == "r8_two_issuers":
                    plant(p, abnormal, buyer, R8_RECEIVED_MIN // 2)
                    plant(p, deregistered, buyer, R8_RECEIVED_MIN // 2 + 1)
                elif name == "r8_exports":
                    plant(p, abnormal, buyer, R8_RECEIVED_MIN)
                    plant(p, abnormal, buyer, 300_000 * CNY, "export")
                elif name == "r8_active":
                    plant(p, abnormal, buyer, R8_RECEIVED_MIN)
                    plant(p, active, buyer, 400_000 * CNY)
                elif name == "r8_wrong_month":
                    plant(p, abnormal, buyer, 60_000 * CNY)
                    plant(other, abnormal, buyer, 40_000 * CNY + 1)
                else:  # r8_self
                    plant(p, abnormal, abnormal, 500_000 * CNY)
        # invoice-ring
        for _ in range(per):
            for name, finding in _RING_SCENARIOS:
                p = int(r() * months)
                other = p - 1 if p else min(p + 1, months - 1)
                if name == "ring_wrong_month" and other == p:
                    continue
                self.plant_ring(name, finding, p, other, functools.partial(take_member, p))
        self.fi_special = reserved.union(*busy)
        self.fi_writes = set(self.fi_invoices) | set(self.fi_beyond)
        self.sink = next((c for c in range(self.n) if not self.company(c).taxpayer
                          and c not in self.fi_special), -1)
        if self.sink < 0:
            raise too_few()

    def plant(self, p: int, issuer: int, buyer: int, fen: int, kind: str = "domestic") -> None:
        """One planted invoice in month `p` (its day drawn now)."""
        assert fen > 0
        day = int(self.side.random() * len(self.month_days[p]))
        self.fi_invoices.setdefault((issuer, p), []).append((buyer, fen, kind, day))
        if issuer != buyer:
            self.fi_partners.setdefault((issuer, p), set()).add(buyer)
            if kind == "domestic":
                key = (p, issuer, buyer)
                self.fi_edges[key] = self.fi_edges.get(key, 0) + fen

    def plant_ring(self, name: str, finding: bool, p: int, other: int,
                   member: Callable[[], int]) -> None:
        """A ring scenario in month `p`: its members write no ordinary invoice that month."""
        r = self.side.random

        def pair_fen() -> int:
            low, high = RING_PAIR_CNY
            return int((low + (high - low) * r()) * CNY)

        def cycle(members: list[int]) -> None:
            for i, c in enumerate(members):
                self.plant(p, c, members[(i + 1) % len(members)], pair_fen())

        expect: dict[int, bool] = {}
        if name.startswith("ring_") and name[5:].isdigit():
            members = [member() for _ in range(int(name[5:]))]
            self.plant(p, members[0], members[1], RING_PAIR_MIN)  # exactly the threshold
            for i in range(1, len(members)):
                self.plant(p, members[i], members[(i + 1) % len(members)], pair_fen())
            expect = dict.fromkeys(members, finding)
        elif name in ("ring_split", "ring_broken", "ring_wrong_month", "ring_wrong_kind"):
            members = [member() for _ in range(4 if name == "ring_broken" else 3)]
            a, b = members[0], members[1]
            for i in range(1, len(members)):
                self.plant(p, members[i], members[(i + 1) % len(members)], pair_fen())
            if name == "ring_split":
                for fen in _split(RING_PAIR_MIN, 3, r):
                    self.plant(p, a, b, fen)
            elif name == "ring_broken":
                for fen in _split(RING_PAIR_MIN - 1, 2, r):
                    self.plant(p, a, b, fen)
            elif name == "ring_wrong_month":
                self.plant(p, a, b, 60_000 * CNY)
                self.plant(other, a, b, 40_000 * CNY)
            else:
                self.plant(p, a, b, 60_000 * CNY)
                self.plant(p, a, b, 40_000 * CNY, "export")
            expect = dict.fromkeys(members, finding)
        elif name == "ring_self":
            members = [member() for _ in range(3)]
            cycle(members)
            for c in members:
                self.plant(p, c, c, pair_fen())
            alone = member()
            self.plant(p, alone, alone, 500_000 * CNY)
            expect = dict.fromkeys(members, True) | {alone: False}
        elif name == "figure_eight":
            hub = member()
            left, right = [member() for _ in range(2)], [member() for _ in range(3)]
            cycle([hub, *left])
            cycle([hub, *right])
            expect = dict.fromkeys([hub, *left, *right], True)
        elif name == "shared_edge":
            a, b, c, d = (member() for _ in range(4))
            for u, v in ((a, b), (b, c), (c, a), (b, d), (d, a)):
                self.plant(p, u, v, pair_fen())
            expect = dict.fromkeys((a, b, c, d), True)
        else:  # ring_tail
            members = [member() for _ in range(3)]
            cycle(members)
            tail = member()
            self.plant(p, members[0], tail, pair_fen())
            expect = dict.fromkeys(members, True) | {tail: False}
        for c, found in expect.items():
            self.fi_quiet.add((c, p))
            self.fi_expect.append((name, RULE_RING, c, p, found))

    def upward_buyer(self, c: int, u: float, avoid: set[int] | frozenset[int]) -> int:
        """A buyer for an invoice pair of 100,000 CNY or more: a company of higher index
        than `c` that is not in `avoid`, or (above the last) the sink, which issues no
        invoice. `u` in [0, 1) picks it."""
        n = self.n
        b = c + 1 + int(u * (n - 1 - c))
        while b < n and b in avoid:
            b += 1
        return b if b < n else self.sink

    def write_planted_invoices(self, c: int, p: int, uscc: str, period: str) -> None:
        """The planted invoices of company `c` in month `p` (invoices-beyond-inflows'
        drawn now, from its inflows), and their books."""
        if (c, p) not in self.fi_writes:
            return
        planned = list(self.fi_invoices.get((c, p), ()))
        name = self.fi_beyond.get((c, p))
        if name is not None:
            planned += self.beyond_invoices(c, p, name)
        if not planned:
            return
        days = self.month_days[p]
        out = self.w.buffer("tax/vat_invoices")
        for buyer, fen, kind, day in planned:
            self.fi_seq += 1
            out.append(f"{period[2:4]}443000{self.fi_seq:012d},{uscc},{self.uscc_of(buyer)},"
                       f"{fmt_fen(fen)},{fmt_fen(max(1, (fen * 13 + 50) // 100))},"
                       f"{days[day]},{kind}\n")
            if kind == "domestic" and buyer != c:
                self.book_invoiced[p] += fen
                if self.co.status in INACTIVE:
                    key = (buyer, p)
                    self.fi_received[key] = self.fi_received.get(key, 0) + fen

    def beyond_invoices(self, c: int, p: int, name: str) -> list[tuple[int, int, str, int]]:
        """The invoices of an invoices-beyond-inflows case, from the issuer's inflows."""
        r = self.side.random
        inflow = self.book_inflow[p]
        triple = 3 * inflow
        extra: list[tuple[int, str]] = []
        if name == "r6_big":
            total = max(triple, R6_INVOICED_MIN) + int((100_000 + 1_900_000 * r()) * CNY)
        elif name == "r6_dormant":
            assert inflow == 0, (name, c)
            total = int((1_200_000 + 1_800_000 * r()) * CNY)
        elif name.startswith("r6_million_"):
            assert triple < R6_INVOICED_MIN, (name, c, inflow)
            total = R6_INVOICED_MIN + (1 if name.endswith("above") else 0)
        else:
            assert triple > R6_INVOICED_MIN, (name, c, inflow)
            total = triple + (1 if name == "r6_ratio_above" else 0)
            if name == "r6_exports":
                extra.append((2_000_000 * CNY, "export"))
            elif name == "r6_self":
                extra.append((2_000_000 * CNY, "self"))
        days = len(self.month_days[p])
        out = []
        for fen in _split(total, 2 + int(r() * 3), r):
            buyer = self.upward_buyer(c, r(), self.fi_special)
            out.append((buyer, fen, "domestic", int(r() * days)))
        for fen, kind in extra:
            buyer = c if kind == "self" else self.upward_buyer(c, r(), self.fi_special)
            out.append((buyer, fen, "domestic" if kind == "self" else kind, int(r() * days)))
        return out

    def ring_findings(self) -> list[tuple[str, str, str]]:
        """invoice-ring's findings: only planted pairs can close a ring (see
        assign_false_invoicing), so the threshold graph of planted pairs decides. An edge
        u -> v is on a ring of 2..6 companies iff v reaches u in at most 5 edges."""
        found = []
        for p, period in enumerate(self.periods):
            succ: dict[int, list[int]] = {}
            for (q, u, v), fen in self.fi_edges.items():
                if q == p and fen >= RING_PAIR_MIN:
                    succ.setdefault(u, []).append(v)
            on_ring = set()
            for u, buyers in succ.items():
                for v in buyers:
                    seen, frontier = {v}, [v]
                    for _ in range(RING_LENGTH_MAX - 1):
                        reached = []
                        for x in frontier:
                            for w in succ.get(x, ()):
                                if w not in seen:
                                    seen.add(w)
                                    reached.append(w)
                        frontier = reached
                    if u in seen:
                        on_ring.add(u)
                        break
            found += [(RULE_RING, self.uscc_of(u), period) for u in on_ring]
        return found

    # -- writing ------------------------------------------------------------------------

    def write_all(self) -> None:
        self.w = _Writer(self.out)
        try:
            self.write_persons_and_records()
            self.write_companies()
            self.rich_persons()
        finally:
            self.w.close()
        self.write_ground_truth()

    def write_persons_and_records(self) -> None:
        r = self.rng.random
        w = self.w
        persons = w.buffer("police/persons")
        records = w.buffer("police/records")
        accounts = w.buffer("pboc/accounts")
        start = date(2003, 1, 1).toordinal()
        span = date.fromisoformat(period_bounds(self.periods[0])[0]).toordinal() - start - 1
        n_records = 0
        for i in range(self.n_persons):
            person_id = self.person_id(i)
            name = (SURNAMES[int(r() * len(SURNAMES))]
                    + "".join(GIVEN[int(r() * len(GIVEN))] for _ in range(1 + (r() < 0.7))))
            persons.append(f"{person_id},{name}\n")
            for kind in self.record_kinds(i):
                n_records += 1
                year = 2012 + int(r() * 14)
                recorded_on = f"{year}-{1 + int(r() * 12):02d}-{1 + int(r() * 28):02d}"
                case_no = ("" if kind == "lost_id_report" and r() < 0.7
                           else f"深公经〔{year}〕{1 + int(r() * 9999)}号")
                records.append(f"R{n_records:09d},{person_id},{kind},{case_no},"
                               f"{recorded_on}\n")
            if self.person_has_account(i):
                bank = BANKS[(self._bits(i, 5) >> 16) % len(BANKS)][0]
                opened_on = date.fromordinal(start + int(r() * span)).isoformat()
                accounts.append(f"{self.person_account(i)},person,{person_id},{bank},"
                                f"{opened_on}\n")
            if len(persons) >= FLUSH_LINES:
                w.flush("police/persons")
                w.flush("police/records")
                w.flush("pboc/accounts")
        w.flush("police/persons")
        w.flush("police/records")
        w.flush("pboc/accounts")

    def write_companies(self) -> None:
        """Each company in turn: its taxpayer row, its accounts, its months."""
        r = self.rng.random
        w = self.w
        taxpayers = w.buffer("tax/taxpayers")
        accounts = w.buffer("pboc/accounts")
        tax_start = date(1995, 1, 1).toordinal()
        first_day = date.fromisoformat(period_bounds(self.periods[0])[0]).toordinal()
        tax_span = first_day - tax_start - 30
        bank_start = date(2003, 1, 1).toordinal()
        bank_span = first_day - bank_start - 1
        months = len(self.periods)
        self.seq = {"invoice": 0, "decl": 0, "claim": 0}
        self.txn_seq = 0
        self.txn_amount, self.txn_amount_text = -1, ""
        self.txn_lines = w.buffers["pboc/transactions"]  # the same list across flushes
        self.fi_seq = 0
        for c in range(self.n):
            co = self.co = self.company(c)
            uscc = self.uscc_of(c)
            if co.taxpayer:
                if r() < 0.02:
                    name = (f'Shenzhen {LATIN_WORDS[int(r() * 8)]} "{LATIN_WORDS[int(r() * 8)]}" '
                            "Trading Co., Ltd.")
                else:
                    name = (f"深圳市{WORDS[int(r() * 20)]}{TRADES[int(r() * 12)]}"
                            f"{'股份' if r() < 0.1 else ''}有限公司")
                registered_on = date.fromordinal(tax_start + int(r() * tax_span)).isoformat()
                taxpayers.append(f"{uscc},{_csv_text(name)},{self.person_id(self.rep(c))},"
                                 f"{co.status},{registered_on}\n")
            self.accounts = [self.company_account(c, k) for k in range(co.account_count)]
            for k, account_no in enumerate(self.accounts):
                bank = BANKS[(self._bits(c, 3) >> (6 * k)) % len(BANKS)][0]
                opened_on = date.fromordinal(bank_start + int(r() * bank_span)).isoformat()
                accounts.append(f"{account_no},company,{uscc},{bank},{opened_on}\n")
            self.account_owner = dict.fromkeys(self.accounts, c)
            # The books of this company, per month, in fen.
            self.book_inflow = [0] * months
            self.book_outbound_cb = [0] * months
            self.book_imports = [0] * months
            self.book_import_count = [0] * months
            self.book_exports = [0] * months
            self.book_claimed = [0] * months
            self.book_claims = [0] * months
            self.book_declared: list[int | None] = [None] * months
            self.book_invoiced = [0] * months  # domestic, to other companies
            plans = [self.base_plan(c) for _ in range(months)]
            for p, name in sorted(self.scenario_of.get(c, ())):
                plans[p] = self.scenario_plan(name, c, p, plans)
            for p in range(months):
                self.emit_month(c, p, plans[p])
            self.company_findings(co, uscc)
            if c % FLUSH_COMPANIES == 0:  # every file's buffer, the small ones too
                for key in w.buffers:
                    w.flush(key)
        for key in w.buffers:
            w.flush(key)

    # -- the monthly activity -------------------------------------------------------------

    def base_plan(self, c: int) -> MonthPlan:
        r = self.rng.random
        co = self.co
        assert co.c == c
        revenue = max(10_000 * CNY, int(co.size * (0.8 + 0.4 * r())))
        plan = MonthPlan()
        if co.taxpayer and co.status == "deregistered":
            plan.invoices = False
            return plan  # a dormant company: its accounts stay quiet
        plan.inflow = int(revenue * (0.75 + 0.5 * r()))
        if not co.taxpayer:
            plan.inflow = min(plan.inflow, 900_000 * CNY)  # declares its revenue elsewhere
            plan.invoices = False
        elif co.status == "abnormal":
            plan.invoices = False  # an abnormal taxpayer has stopped declaring;
            if r() < 0.9:  # most have also stopped trading
                plan.inflow = min(plan.inflow, int(900_000 * CNY * r()) + CNY)
        elif r() < 0.02:
            plan.inflow = min(plan.inflow, 900_000 * CNY)  # a month not declared
        else:
            plan.declared = revenue
        if len(self.accounts) > 1 and r() < 0.3:
            plan.internal = int(revenue * (0.1 + 0.4 * r())) + CNY
        plan.out_domestic = int(revenue * (0.6 + 0.35 * r())) + CNY
        if co.exporter:
            exports = int(revenue * (0.3 + 0.6 * r())) + CNY
            plan.exports = [(v, None) for v in _split(exports, 1 + int(r() * 4), r)]
            plan.inflow_cross_border_share = 0.5 + 0.4 * r()
            if co.taxpayer and r() < 0.85:
                claimed = int(exports * (0.85 + 0.35 * r())) + CNY
                plan.claims = _split(claimed, 1 + int(r() * 2), r)
        if co.importer:
            imports = int(revenue * (0.2 + 0.5 * r())) + CNY
            plan.imports = [(v, None) for v in _split(imports, 1 + int(r() * 4), r)]
            plan.outbound_cb = int(imports * (0.85 + 0.3 * r())) + CNY
        elif r() < 0.15:
            plan.outbound_cb = int((5_000 + 145_000 * r()) * CNY)  # services from abroad
        return plan

    def scenario_plan(self, name: str, c: int, p: int, plans: list[MonthPlan]) -> MonthPlan:
        """The plan of a planted company-month (may also touch the month before)."""
        r = self.rng.random
        plan = self.base_plan(c)
        plan.outbound_cb = 0
        last_day = len(self.month_days[p - 1]) - 1 if p else 0

        def amount(low_cny: int, high_cny: int, multiple: int = 1) -> int:
            fen = int((low_cny + (high_cny - low_cny) * r()) * CNY)
            return max(multiple, fen - fen % multiple)

        if name.startswith("r1_"):
            claimed = amount(200_000, 5_000_000, multiple=5)
            plan.claims = _split(claimed, 1 + int(r() * 3), r)
            exports = {"r1_no_exports": 0, "r1_low_exports": claimed // 2,
                       "r1_below_80": claimed * 4 // 5 - 1, "r1_at_80": claimed * 4 // 5,
                       "r1_above_80": claimed * 4 // 5 + 1,
                       "r1_exports_month_before": 0}[name]
            if exports:
                plan.exports = [(v, None) for v in _split(exports, 1 + int(r() * 3), r)]
            if name == "r1_exports_month_before":
                plans[p - 1].exports.append((claimed, last_day))
        elif name.startswith("r2_"):
            declared = None
            if name == "r2_big":
                declared = amount(100_000, 3_000_000)
                inflow = declared * 3 + R2_EXCESS_MIN * 2
            elif name == "r2_no_declaration":
                inflow = amount(1_500_000, 6_000_000)
            elif name.startswith("r2_ratio_"):
                declared = amount(4_000_000, 20_000_000, multiple=2)  # excess > 1M anyway
                inflow = declared * 3 // 2 + {"r2_ratio_below": -1, "r2_ratio_at": 0,
                                              "r2_ratio_above": 1}[name]
            elif name.startswith("r2_excess_"):
                declared = amount(100_000, 1_500_000)  # 50% of it is below 1M
                inflow = declared + R2_EXCESS_MIN + {"r2_excess_below": -1, "r2_excess_at": 0,
                                                     "r2_excess_above": 1}[name]
            elif name.startswith("r2_no_declaration_"):
                inflow = R2_EXCESS_MIN + (1 if name.endswith("above") else 0)
            elif name == "r2_internal_transfers":
                declared = amount(500_000, 2_000_000)
                inflow = declared * 11 // 10
                plan.internal = declared * 5 + R2_EXCESS_MIN * 5
                if len(self.accounts) < 2:
                    self.accounts.append(self.extra_account(c))
            else:  # r2_inbound_cross_border: receipts from abroad count as inflows
                declared = amount(200_000, 1_000_000)
                inflow = declared * 2 + R2_EXCESS_MIN
                plan.inflow_cross_border_share = 1.0
            plan.declared = declared
            plan.inflow = inflow
            plan.out_domestic = min(plan.out_domestic, inflow)
        elif name.startswith("r3_"):
            if name == "r3_big":
                imports = amount(500_000, 3_000_000)
                plan.outbound_cb = imports * 2 + R3_EXCESS_MIN * 2
            elif name.startswith("r3_ratio_"):
                imports = amount(2_000_000, 10_000_000, multiple=10)  # 30% of it > 500k
                plan.outbound_cb = imports * 13 // 10 + {"r3_ratio_below": -1, "r3_ratio_at": 0,
                                                         "r3_ratio_above": 1}[name]
            elif name.startswith("r3_excess_"):
                imports = amount(300_000, 1_600_000)  # 30% of it is below 500k
                plan.outbound_cb = imports + R3_EXCESS_MIN + (1 if name.endswith("above")
                                                             else 0)
            else:  # r3_exports_only: no import declaration, so no undervaluation
                imports = 0
                plan.exports = [(amount(100_000, 1_000_000), None)]
                plan.outbound_cb = amount(1_000_000, 3_000_000)
            if imports:
                plan.imports = [(v, None) for v in _split(imports, 1 + int(r() * 3), r)]
        elif name.startswith("r4_"):
            if name in ("r4_big", "r4_not_a_taxpayer"):
                plan.outbound_cb = amount(300_000, 3_000_000)
            elif name in ("r4_below", "r4_at", "r4_above"):
                plan.outbound_cb = R4_PAYMENTS_MIN + {"r4_below": -1, "r4_at": 0,
                                                      "r4_above": 1}[name]
            elif name == "r4_with_import":
                imports = amount(200_000, 400_000)
                plan.imports = [(imports, None)]
                plan.outbound_cb = imports * 11 // 10
            elif name == "r4_import_month_before":
                imports = amount(300_000, 2_000_000)
                plans[p - 1].imports.append((imports, last_day))
                plans[p - 1].outbound_cb = 0
                plan.outbound_cb = imports
                plan.outbound_cb_day = 0
            elif name == "r4_exports_only":
                plan.exports = [(amount(100_000, 1_000_000), None)]
                plan.outbound_cb = amount(300_000, 2_000_000)
            elif name == "r4_inbound_only":
                plan.declared = amount(3_000_000, 8_000_000)
                plan.inflow = plan.declared
                plan.inflow_cross_border_share = 1.0
            else:  # r4_domestic_out: large payments, but not abroad
                plan.out_domestic = amount(1_000_000, 5_000_000)
        else:
            raise AssertionError(name)
        return plan

    def extra_account(self, c: int) -> str:
        """A second account for a planted company that moves money between its own."""
        self.extra_accounts += 1
        account_no = f"{EXTRA_ACCOUNT_PREFIX}{self.extra_accounts:013d}"
        self.account_owner[account_no] = c
        self.w.buffer("pboc/accounts").append(
            f"{account_no},company,{self.uscc_of(c)},{BANKS[0][0]},2020-01-02\n")
        return account_no

    def emit_month(self, c: int, p: int, plan: MonthPlan) -> None:
        r = self.rng.random
        w = self.w
        days = self.month_days[p]
        n_days = len(days)
        period = self.periods[p]
        uscc = self.uscc_of(c)
        at = p
        accounts = self.accounts
        txns = w.buffer("pboc/transactions")
        txn = self.txn

        if plan.declared is not None:
            w.buffer("tax/revenue_declarations").append(
                f"{uscc},{period},{fmt_fen(plan.declared)}\n")
            self.book_declared[at] = plan.declared

        # inflows, from other companies (their leg booked too), banks outside the data
        # set, persons, and abroad
        if plan.inflow:
            parts = _split(plan.inflow, 1 + min(6, int(r() * 3 + plan.inflow / 5e8)), r)
            for amount in parts:
                account = accounts[int(r() * len(accounts))]
                day = days[int(r() * n_days)]
                u = r()
                if u < plan.inflow_cross_border_share:
                    txn(account, self.foreign_account(), amount, "in", 1, day, p)
                    continue
                u = r()
                if u < 0.35:
                    payer = int(r() * (self.n - 1))
                    payer += payer >= c
                    other = self.company_account(
                        payer, int(r() * self.account_counts[payer]))
                    txn(other, account, amount, "out", 0, day, p)
                    txn(account, other, amount, "in", 0, day, p)
                elif u < 0.5:
                    person = self.random_person_account()
                    txn(person, account, amount, "out", 0, day, p)
                    txn(account, person, amount, "in", 0, day, p)
                else:
                    txn(account, self.outside_account(), amount, "in", 0, day, p)
        if plan.internal:
            for amount in _split(plan.internal, 1 + int(r() * 2), r):
                i = int(r() * len(accounts))
                j = (i + 1 + int(r() * (len(accounts) - 1))) % len(accounts)
                day = days[int(r() * n_days)]
                txn(accounts[i], accounts[j], amount, "out", 0, day, p)
                txn(accounts[j], accounts[i], amount, "in", 0, day, p)
        if plan.out_domestic:
            for amount in _split(plan.out_domestic, 1 + int(r() * 3), r):
                account = accounts[int(r() * len(accounts))]
                day = days[int(r() * n_days)]
                if r() < 0.3:  # wages
                    person = self.random_person_account()
                    txn(account, person, amount, "out", 0, day, p)
                    txn(person, account, amount, "in", 0, day, p)
                else:
                    txn(account, self.outside_account(), amount, "out", 0, day, p)
        if plan.outbound_cb:
            for amount in _split(plan.outbound_cb, 1 + int(r() * 3), r):
                day_index = (plan.outbound_cb_day if plan.outbound_cb_day is not None
                             else int(r() * n_days))
                txn(accounts[int(r() * len(accounts))], self.foreign_account(), amount, "out",
                    1, days[day_index], p)
        if len(txns) >= FLUSH_LINES:
            w.flush("pboc/transactions")

        # customs
        decls = w.buffer("customs/declarations")
        for direction, items in (("import", plan.imports), ("export", plan.exports)):
            for amount, decl_day in items:
                self.seq["decl"] += 1
                day = days[decl_day if decl_day is not None else int(r() * n_days)]
                decls.append(f"5316{period[:4]}{self.seq['decl']:010d},{uscc},{direction},"
                             f"{HS_CODES[int(r() * len(HS_CODES))]},{fmt_fen(amount)},{day},"
                             f"{PORTS[int(r() * len(PORTS))]}\n")
                if direction == "import":
                    self.book_imports[at] += amount
                    self.book_import_count[at] += 1
                else:
                    self.book_exports[at] += amount
        if len(decls) >= FLUSH_LINES:
            w.flush("customs/declarations")

        # rebate claims
        for claimed in plan.claims:
            self.seq["claim"] += 1
            rebate = (claimed * (13 if r() < 0.7 else 9) + 50) // 100
            w.buffer("tax/export_rebates").append(
                f"TS{period.replace('-', '')}{self.seq['claim']:08d},{uscc},{period},"
                f"{fmt_fen(claimed)},{fmt_fen(rebate)}\n")
            self.book_claimed[at] += claimed
            self.book_claims[at] += 1

        # VAT invoices: most of the revenue, in many invoices; exporters' part as export
        if plan.invoices and self.co.taxpayer:
            revenue = plan.declared or plan.inflow or self.co.size
            count = 1 + int(r() * r() * 12) + int(revenue > 2_000_000 * CNY) * 3
            export_value = sum(v for v, _ in plan.exports) if plan.exports else 0
            n_export = min(count - 1, len(plan.exports)) if export_value else 0
            domestic = max(revenue - export_value, count * CNY)
            amounts = (_split(domestic, count - n_export, r)
                       + (_split(export_value, n_export, r) if n_export else []))
            n = self.n
            # An ordinary domestic pair that would reach 100,000 CNY to a company of
            # lower index, and any invoice to a protected company or to a buyer of the
            # issuer's planted invoices this month, goes to a company of higher index
            # instead (assign_false_invoicing says why); the month of a ring member or
            # of an invoices-beyond-inflows issuer has its planted invoices only.
            quiet = (c, p) in self.fi_quiet
            avoid = self.fi_protected
            partners = self.fi_partners.get((c, p))
            if partners:
                avoid = avoid | partners
            low: dict[int, int] = {}
            invoices = w.buffers["tax/vat_invoices"]
            invoiced = 0
            seq = self.seq["invoice"]
            uscc_of = self.uscc_of
            for k, amount in enumerate(amounts):
                seq += 1
                kind = "export" if k >= count - n_export else "domestic"
                rate = 13 if r() < 0.7 else 9 if r() < 0.5 else 6
                amount = amount if amount > CNY else CNY
                u = r()
                buyer = int(u * (n - 1))
                buyer += buyer >= c
                day = days[int(r() * n_days)]
                if quiet:
                    continue  # drawn all the same: the other datasets keep their bytes
                if kind == "domestic":
                    invoiced += amount
                    if buyer in avoid:
                        buyer = self.upward_buyer(c, u, avoid)
                    elif buyer < c:
                        total = low.get(buyer, 0) + amount
                        if total >= RING_PAIR_MIN:
                            buyer = self.upward_buyer(c, u, avoid)
                        else:
                            low[buyer] = total
                invoices.append(
                    f"{period[2:4]}442000{seq:012d},{uscc},{uscc_of(buyer)},"
                    f"{fmt_fen(amount)},{fmt_fen((amount * rate + 50) // 100)},{day},{kind}\n")
            self.seq["invoice"] = seq
            self.book_invoiced[p] += invoiced
        self.write_planted_invoices(c, p, uscc, period)
        if len(w.buffers["tax/vat_invoices"]) >= FLUSH_LINES:
            w.flush("tax/vat_invoices")

    def txn(self, account: str, counterparty: str, amount: int, direction: str,
            cross_border: int, day: str, p: int) -> None:
        """Write one transaction and keep the books of the company being written (the
        other side of a transfer is the payer's out, which no book counts)."""
        self.txn_seq += 1
        if amount != self.txn_amount:  # both legs of a transfer: formatted once
            self.txn_amount, self.txn_amount_text = amount, fmt_fen(amount)
        self.txn_lines.append(
            f"T{day[:4]}{self.txn_seq:011d},{account},{counterparty},{self.txn_amount_text},"
            f"{direction},{cross_border},{day}\n")
        if account not in self.account_owner:
            return  # a person's account or another company's out: no book counts it
        if direction == "in":
            if counterparty not in self.account_owner:
                self.book_inflow[p] += amount
        elif cross_border:
            self.book_outbound_cb[p] += amount

    def outside_account(self) -> str:
        r = self.rng.random
        return (f"{OUTSIDE_BANK_PREFIXES[int(r() * len(OUTSIDE_BANK_PREFIXES))]}"
                f"{int(r() * 10**13):013d}")

    def foreign_account(self) -> str:
        r = self.rng.random
        return f"{FOREIGN_PREFIXES[int(r() * len(FOREIGN_PREFIXES))]}{int(r() * 10**16):016d}"

    def rich_persons(self) -> None:
        """Decoys: persons with large inflows and payments abroad make no subject."""
        r = self.rng.random
        self.account_owner = {}
        count = max(1, self.n // 2_500) * 3
        for _ in range(count):
            account = self.random_person_account()
            p = int(r() * len(self.periods))
            days = self.month_days[p]
            self.txn(account, self.outside_account(), int((2_000_000 + 8_000_000 * r()) * CNY),
                     "in", 0, days[int(r() * len(days))], p)
            self.txn(account, self.foreign_account(), int((300_000 + 2_000_000 * r()) * CNY),
                     "out", 1, days[int(r() * len(days))], p)

    # -- ground truth ---------------------------------------------------------------------

    def company_findings(self, co: _Company, uscc: str) -> None:
        """The findings about the company just written, from its books."""
        found = self.found
        for p, period in enumerate(self.periods):
            claimed, exports = self.book_claimed[p], self.book_exports[p]
            if self.book_claims[p] and 5 * exports < 4 * claimed:
                found.append((RULE_EXPORT_REBATE, uscc, period))
            inflow, declared = self.book_inflow[p], self.book_declared[p] or 0
            excess = inflow - declared
            if 2 * excess > declared and excess > R2_EXCESS_MIN:
                found.append((RULE_REVENUE, uscc, period))
            payments, imports = self.book_outbound_cb[p], self.book_imports[p]
            excess = payments - imports
            if (self.book_import_count[p] and 10 * excess > 3 * imports
                    and excess > R3_EXCESS_MIN):
                found.append((RULE_IMPORT_UNDERVALUATION, uscc, period))
            if payments > R4_PAYMENTS_MIN and not self.book_import_count[p]:
                found.append((RULE_PAYMENTS_WITHOUT_IMPORTS, uscc, period))
            invoiced = self.book_invoiced[p]
            if invoiced > R6_INVOICED_MIN and invoiced > 3 * inflow:
                found.append((RULE_BEYOND_INFLOWS, uscc, period))
        if co.taxpayer and co.status == "active":
            rep = self.rep(co.c)
            if any(k in FLAGGING_KINDS for k in self.record_kinds(rep)):
                found.append((RULE_OFFICER_RECORD, pair_subject(uscc, self.person_id(rep)), ""))

    def write_ground_truth(self) -> None:
        self.found += self.ring_findings()
        self.found += [(RULE_ABNORMAL_ISSUERS, self.uscc_of(buyer), self.periods[p])
                       for (buyer, p), fen in self.fi_received.items()
                       if fen > R8_RECEIVED_MIN]
        self.found.sort()
        self.check_planted(set(self.found))
        with open(self.out / "ground_truth.csv", "w", encoding="utf-8", newline="") as f:
            f.write("rule_id,subject,period\n")
            f.writelines(f"{rule},{subject},{period}\n" for rule, subject, period in self.found)

    def check_planted(self, found: set[tuple[str, str, str]]) -> None:
        """Every planted case must be found and every decoy must not: a generator bug
        otherwise."""
        rules = {name: (rule, finding) for name, rule, _, _, finding in _SCENARIOS}
        for c, cases in sorted(self.scenario_of.items()):
            for p, name in sorted(cases):
                rule, finding = rules[name]
                item = Planted(name, rule, self.uscc_of(c), self.periods[p], finding)
                self.planted.append(item)
                assert ((rule, item.subject, item.period) in found) == finding, item
        expected = dict(_PERSON_SCENARIOS)
        for name, c, c2 in self.person_scenarios:
            for company in (c,) if c2 is None else (c, c2):
                subject = pair_subject(self.uscc_of(company), self.person_id(self.rep(company)))
                item = Planted(name, RULE_OFFICER_RECORD, subject, "", expected[name])
                self.planted.append(item)
                assert ((RULE_OFFICER_RECORD, subject, "") in found) == expected[name], item
        for name, rule, c, p, finding in self.fi_expect:
            item = Planted(name, rule, self.uscc_of(c), self.periods[p], finding)
            self.planted.append(item)
            assert ((rule, item.subject, item.period) in found) == finding, item


def generate(config: GeneratorConfig, out: Path, overwrite: bool = False) -> GenerationReport:
    """Write tax/, police/, customs/, pboc/ and ground_truth.csv under `out`.

    The folder is written beside `out` and renamed into place when complete, so `out`
    never holds half a data set. An existing `out` is an error unless `overwrite`.
    """
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise AlreadyExists(f"{out} already exists (use overwrite to replace it)")
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        g = _Generator(config, partial)
        g.people_and_companies()
        g.assign_scenarios()
        g.write_all()
        rows = dict(g.w.rows)
        findings = {rule: 0 for rule in RULE_IDS}
        for rule, _subject, _period in g.found:
            findings[rule] += 1
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return GenerationReport(out=str(out), config=config, rows=rows, findings=findings,
                            planted=len(g.planted),
                            seconds=round(time.perf_counter() - started, 3))
