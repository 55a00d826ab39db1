"""The PostgreSQL adapter of an agency's store, against a real PostgreSQL server that this
module starts (initdb into a temporary folder, fsync on) and stops: the same tables,
views and lookups as the SQLite adapter on generated data, all-or-nothing loads,
idempotent reloads, --replace, the CLI with a URL that never prints its password, and
the translation of ``:name`` parameters."""

from __future__ import annotations

import contextlib
import csv
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

import agents
from agents.common.csvread import DataFileError
from agents.common.pgstore import PostgresAgencyStore, redact_url, to_pyformat
from agents.common.store import AgencyStore, SqliteAgencyStore
from agents.generate import GeneratorConfig, generate
from agents.lookup import LookupRefused, LookupRequest, lookup
from exchange.cli.main import _register, cli
from exchange.errors import MalformedInput, Unavailable

SKIP_REASON = "PostgreSQL server not installed (Debian package postgresql)"
PASSWORD = "s3cret-pw:@/%"  # characters a URL must escape, and a colon
USER = "exchange"
SERVER_START_TIMEOUT_S = 60
RUN_AS = "nobody"  # PostgreSQL refuses to run as root
RUN_AS_FALLBACK = "exchange-pg"


# -- :name parameters to psycopg's style (pure) ---------------------------------------------

@pytest.mark.parametrize("portable,expected", [
    ("SELECT a FROM t WHERE b >= :start AND b < :end_2",
     "SELECT a FROM t WHERE b >= %(start)s AND b < %(end_2)s"),
    ("SELECT x::text, :v::int, CAST(:w AS bigint)",
     "SELECT x::text, %(v)s::int, CAST(%(w)s AS bigint)"),
    ("SELECT ':not', 'it''s :not', \"col:not\" FROM t WHERE c = :yes",
     "SELECT ':not', 'it''s :not', \"col:not\" FROM t WHERE c = %(yes)s"),
    ("SELECT E'\\':not', :yes", "SELECT E'\\':not', %(yes)s"),
    ("SELECT 'a\\', :yes", "SELECT 'a\\', %(yes)s"),  # no backslash escapes outside E''
    ("-- a :comment\nSELECT :a /* :b /* nested :c */ :d */ + 1",
     "-- a :comment\nSELECT %(a)s /* :b /* nested :c */ :d */ + 1"),
    ("SELECT $$ :not $$, $tag$ ' :not $tag$, $1, :yes",
     "SELECT $$ :not $$, $tag$ ' :not $tag$, $1, %(yes)s"),
    ("SELECT '50%' || :p, 7 % 3", "SELECT '50%%' || %(p)s, 7 %% 3"),
    ("SELECT a[1:2], f(x => 1), g(y := 2), ':'", "SELECT a[1:2], f(x => 1), g(y := 2), ':'"),
    ("SELECT :a||:b", "SELECT %(a)s||%(b)s"),
])
def test_named_parameters_become_pyformat_outside_quotes_casts_and_comments(
        portable: str, expected: str) -> None:
    assert to_pyformat(portable) == expected


@pytest.mark.parametrize("url,shown", [
    ("postgresql://u:pw@db.example:5432/x", "postgresql://u:***@db.example:5432/x"),
    ("postgres://u@h/x?sslmode=require", "postgres://u@h/x?sslmode=require"),
    ("postgresql://u@h/x?password=pw&sslmode=require",
     "postgresql://u@h/x?password=***&sslmode=require"),
    ("postgresql://u:p%40ss@[::1]:5432/x", "postgresql://u:***@[::1]:5432/x"),
    ("postgresql:///x?host=/run/pg", "postgresql:///x?host=/run/pg"),
])
def test_urls_are_shown_without_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# -- a real server ----------------------------------------------------------------------------

def _server_bin() -> Path | None:
    """The folder of initdb, pg_ctl and postgres: on PATH, or Debian's newest version."""
    found = [shutil.which(n) for n in ("initdb", "pg_ctl", "postgres")]
    if all(found):
        return Path(os.path.realpath(str(found[0]))).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.parent.name)])
    for initdb in reversed(versions):
        if all((initdb.parent / n).exists() for n in ("pg_ctl", "postgres")):
            return initdb.parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    port: int
    socket_dir: Path
    database: str = "exchange"
    n_stores: int = 0

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """A superuser connection over the unix socket (trusted)."""
        return psycopg.connect(host=str(self.socket_dir), port=self.port, user=USER,
                               dbname=self.database, autocommit=True)

    def new_store_url(self) -> str:
        """The URL of an empty store: a schema of its own, over TCP with the password
        (a schema per store is much faster to make than a database)."""
        self.n_stores += 1
        schema = f"agency_{self.n_stores}"
        with self.admin() as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        return (f"postgresql://{USER}:{_quote(PASSWORD)}@127.0.0.1:{self.port}/"
                f"{self.database}?options=-csearch_path%3D{schema}")


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _server_user() -> pwd.struct_passwd | None:
    """Whom to run the server as: ourselves, or when we are root (PostgreSQL refuses to
    run as root) nobody, or a system user made for it."""
    if os.geteuid() != 0:
        return None
    for name in (RUN_AS, RUN_AS_FALLBACK):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    RUN_AS_FALLBACK], check=True, capture_output=True)
    return pwd.getpwnam(RUN_AS_FALLBACK)


def _run(args: list[str], user: pwd.struct_passwd | None, cwd: Path
         ) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(cwd)}
    if user is None:
        return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True,
                              check=False, timeout=SERVER_START_TIMEOUT_S)
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=SERVER_START_TIMEOUT_S, user=user.pw_uid,
                          group=user.pw_gid, extra_groups=[])


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A PostgreSQL server of our own in a temporary folder: TCP on a free localhost port
    (password required) and a unix socket (trusted, for setting up); stopped at the end."""
    bin_dir = _server_bin()
    if bin_dir is None:
        pytest.skip(SKIP_REASON)
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="exchange-pgtest-"))
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    sockets.mkdir()
    (root / "pwfile").write_text(PASSWORD + "\n")
    if user is not None:
        for path in (root, sockets, root / "pwfile"):
            os.chown(path, user.pw_uid, user.pw_gid)
    port = _free_port()
    started = False
    try:
        # --no-sync only skips flushing initdb's own files; the server runs with fsync on.
        done = _run([str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "-E", "UTF8",
                     "--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256",
                     f"--pwfile={root / 'pwfile'}", "--no-sync"], user, root)
        assert done.returncode == 0, done.stdout + done.stderr
        options = (f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=on "
                   "-c synchronous_commit=on -c max_connections=20")
        started = True
        done = _run([str(bin_dir / "pg_ctl"), "start", "-D", str(data), "-w",
                     "-t", str(SERVER_START_TIMEOUT_S), "-l", str(log), "-o", options],
                    user, root)
        assert done.returncode == 0, (done.stdout + done.stderr
                                      + (log.read_text() if log.exists() else ""))
        server = Server(port=port, socket_dir=sockets)
        with psycopg.connect(host=str(sockets), port=port, user=USER, dbname="postgres",
                             autocommit=True) as conn:
            assert conn.execute("SHOW fsync").fetchone() == ("on",)
            conn.execute(f'CREATE DATABASE "{server.database}"')
        yield server
    finally:
        if started:
            done = _run([str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"],
                        user, root)
            pid_file = data / "postmaster.pid"
            if done.returncode != 0 and pid_file.exists():  # still ours to stop
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _commands() -> None:
    _register()


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "n300"
    generate(GeneratorConfig(seed=11, companies=300), out)
    return out


PERIODS = ("2026-06", "2026-07", "2026-08", "2026-09", "2026-10")  # and months with no data


def dump(store: AgencyStore, agency: str) -> dict[str, list[tuple[object, ...]]]:
    """Every table's rows, in key order (the same bytes on both adapters' collations)."""
    result = {}
    for d in agents.datasets_of(agency):
        key = ", ".join(f'"{d.stored(k)}"' for k in d.key)
        result[d.name] = store.fetch(f'SELECT * FROM "{d.name}" ORDER BY {key}', {})
    return result


def load_log(store: AgencyStore) -> list[tuple[object, ...]]:
    assert isinstance(store, SqliteAgencyStore | PostgresAgencyStore)
    return [entry[1:] for entry in store.load_log()]  # without the time


@pytest.fixture
def pg_store(server: Server) -> Iterator[PostgresAgencyStore]:
    store = PostgresAgencyStore(server.new_store_url(), "pboc",
                                agents.datasets_of("pboc"))
    yield store
    store.close()


def _view_rows(store: AgencyStore, agency: str) -> dict[str, str]:
    rows = {}
    for name, view in agents.views_of(agency).items():
        for period in PERIODS if view.period_bound else (None,):
            rows[f"{name} {period}"] = repr(view.rows(store, period))
    return rows


def _lookups(store: AgencyStore, agency: str, subjects: dict[str, list[str]]) -> list[str]:
    answers = []
    names = [d.name for d in agents.datasets_of(agency)] + list(agents.views_of(agency))
    for name in names:
        for kind, values in subjects.items():
            for period in (None, "2026-09"):
                request = LookupRequest(name, tuple((kind, v) for v in values), period)
                try:
                    answers.append(repr(lookup(store, request, 100_000)))
                except LookupRefused as refused:
                    answers.append(f"{refused.code}: {refused}")
    return answers


def test_generated_data_gives_the_same_rows_views_and_lookups_on_both_adapters(
        server: Server, sample: Path, tmp_path: Path) -> None:
    with open(sample / "tax" / "taxpayers.csv", encoding="utf-8", newline="") as f:
        taxpayers = list(csv.DictReader(f))[:40]
    subjects = {"uscc": [r["uscc"] for r in taxpayers],
                "person_id": [r["legal_rep_id"] for r in taxpayers]}
    compared: dict[str, tuple[int, int]] = {}
    for agency in agents.AGENCIES:
        with contextlib.ExitStack() as stack:
            sqlite = stack.enter_context(agents.open_store(agency, tmp_path / f"{agency}.db"))
            pg = agents.open_agency_store(agency, server.new_store_url())
            stack.callback(pg.close)
            reports = [agents.load_dataset_dir(agency, sample / agency, s) for s in (sqlite, pg)]
            assert reports[0].files == reports[1].files
            assert all(f.rows == f.rows_after > 0 for f in reports[1].files)
            tables = dump(sqlite, agency)
            assert repr(dump(pg, agency)) == repr(tables)
            assert load_log(pg) == load_log(sqlite)
            views = _view_rows(sqlite, agency)
            assert _view_rows(pg, agency) == views
            answers = _lookups(sqlite, agency, subjects)
            assert _lookups(pg, agency, subjects) == answers
            for d in agents.datasets_of(agency):
                assert pg.row_count(d) == sqlite.row_count(d) == len(tables[d.name])
            compared[agency] = (sum(text.count("(") for text in views.values()),
                                sum(text.count("{") for text in answers))
    # not vacuous: every view has rows in the months of data, every agency answers lookups
    assert compared["pboc"][0] > 300 and compared["customs"][0] > 100
    assert compared["tax"][0] > 100 and all(n > 10 for _, n in compared.values())


def test_portable_sql_runs_with_casts_quoted_colons_and_percent(
        pg_store: PostgresAgencyStore) -> None:
    assert pg_store.fetch("SELECT :a::text || ':b' || '%', 7 % 3, $$:c$$, \"n:m\" "
                          "FROM (SELECT 1 AS \"n:m\") t -- :d\n", {"a": "x"}) == [
        ("x:b%", 1, ":c", 1)]


ACCOUNTS_HEADER = "account_no,holder_kind,holder_id,bank,opened_on"
TXN_HEADER = "txn_id,account_no,counterparty_account,amount_cny,direction,cross_border,booked_on"


def _uscc(n: int) -> str:
    from agents.common import checks

    body = f"91440300{n:09d}"
    return body + checks.uscc_check_char(body)


def write(folder: Path, name: str, *rows: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(r + "\n" for r in rows), encoding="utf-8")


def load_error(folder: Path, store: AgencyStore, replace: bool = False) -> str:
    with pytest.raises(DataFileError) as info:
        agents.load_dataset_dir("pboc", folder, store, replace=replace)
    return str(info.value)


def test_a_malformed_file_is_rejected_whole_and_nothing_changes(
        pg_store: PostgresAgencyStore, sample: Path, tmp_path: Path) -> None:
    agents.load_dataset_dir("pboc", sample / "pboc", pg_store)
    before, log = dump(pg_store, "pboc"), load_log(pg_store)
    bad = tmp_path / "bad"
    shutil.copytree(sample / "pboc", bad)
    with open(bad / "accounts.csv", "a", encoding="utf-8") as f:
        f.write(f"NEW-1,company,{_uscc(1)},New Bank,2020-01-01\n")
    lines = (bad / "transactions.csv").read_text(encoding="utf-8").splitlines()
    # new rows past the first staging batch, then a bad date
    lines += [f"NEW-T{i},NEW-1,X9,1.00,in,0,2026-09-01" for i in range(12_000)]
    lines.append("NEW-T-bad,NEW-1,X9,1.00,in,0,2026-09-31")
    (bad / "transactions.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    message = load_error(bad, pg_store)
    assert f"transactions.csv, line {len(lines)}, column 7 (booked_on)" in message
    assert "nothing was loaded" in message
    assert dump(pg_store, "pboc") == before and load_log(pg_store) == log


def test_repeated_keys_and_unresolved_references_name_their_lines(
        pg_store: PostgresAgencyStore, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write(folder, "accounts.csv", ACCOUNTS_HEADER, f"A1,company,{_uscc(1)},B,2020-01-01",
          f"A2,company,{_uscc(1)},B,2020-01-01", f"A1,company,{_uscc(2)},B,2020-01-01")
    rows = [f"T{i},A1,X9,1.00,in,0,2026-09-01" for i in range(25_000)]
    rows.insert(20_500, "T7,A1,X9,2.00,in,0,2026-09-02")  # across staging batches
    write(folder, "transactions.csv", TXN_HEADER, *rows)
    message = load_error(folder, pg_store)
    # both files are reported: the transaction goes on after a batch is undone
    assert "accounts.csv, line 4: key account_no='A1' repeats line 2" in message
    assert "transactions.csv, line 20502: key txn_id='T7' repeats line 9" in message
    write(folder, "accounts.csv", ACCOUNTS_HEADER, f"A1,company,{_uscc(1)},B,2020-01-01")
    write(folder, "transactions.csv", TXN_HEADER, "T1,A1,X9,1,in,0,2026-09-01",
          "T2,NOPE,X9,1,in,0,2026-09-01")
    message = load_error(folder, pg_store)
    assert ("transactions.csv, line 3, column 2 (account_no): account_no 'NOPE' is not in "
            "accounts.csv or the stored accounts") in message
    assert dump(pg_store, "pboc") == {"accounts": [], "transactions": []}
    assert load_log(pg_store) == []


def test_reloading_the_same_folder_changes_nothing(pg_store: PostgresAgencyStore,
                                                   sample: Path) -> None:
    agents.load_dataset_dir("pboc", sample / "pboc", pg_store)
    before = dump(pg_store, "pboc")
    versions = pg_store.fetch("SELECT txn_id, xmin::text FROM transactions ORDER BY txn_id",
                              {})
    report = agents.load_dataset_dir("pboc", sample / "pboc", pg_store)
    assert all(f.rows_before == f.rows_after == f.rows for f in report.files)
    assert dump(pg_store, "pboc") == before
    # not even rewritten: a row equal to the stored one is left as it is
    assert pg_store.fetch("SELECT txn_id, xmin::text FROM transactions ORDER BY txn_id",
                          {}) == versions
    log = load_log(pg_store)
    assert log[:2] == log[2:] and len(log) == 4


def test_replace_deletes_rows_missing_from_the_file(pg_store: PostgresAgencyStore,
                                                    tmp_path: Path) -> None:
    write(tmp_path / "a", "accounts.csv", ACCOUNTS_HEADER,
          f"A1,company,{_uscc(1)},B,2020-01-01", f"A2,company,{_uscc(1)},B,2020-01-02")
    write(tmp_path / "a", "transactions.csv", TXN_HEADER, "T1,A1,X9,100.00,in,0,2026-09-01",
          "T2,A2,A1,20.5,out,1,2026-09-02")
    agents.load_dataset_dir("pboc", tmp_path / "a", pg_store)
    write(tmp_path / "b", "transactions.csv", TXN_HEADER, "T3,A1,X8,1,out,0,2026-09-04")
    report = agents.load_dataset_dir("pboc", tmp_path / "b", pg_store, replace=True)
    assert [(f.rows_before, f.rows_after) for f in report.files] == [(2, 1)]
    rows = dump(pg_store, "pboc")
    assert rows["transactions"] == [("T3", "A1", "X8", 100, "out", 0, "2026-09-04")]
    assert len(rows["accounts"]) == 2
    # replacing accounts may not leave a stored transaction without its account
    write(tmp_path / "c", "accounts.csv", ACCOUNTS_HEADER, f"A2,company,{_uscc(1)},B,2020-01-01")
    message = load_error(tmp_path / "c", pg_store, replace=True)
    assert ("replacing accounts would remove account_no 'A1', which the stored transactions "
            "row txn_id='T3' refers to") in message
    assert dump(pg_store, "pboc") == rows


def test_a_store_keeps_one_agency_and_an_unreachable_server_is_unavailable(
        server: Server) -> None:
    url = server.new_store_url()
    PostgresAgencyStore(url, "pboc", agents.datasets_of("pboc")).close()
    with pytest.raises(MalformedInput, match="holds the datasets of 'pboc', not 'tax'"):
        agents.open_agency_store("tax", url)
    with pytest.raises(Unavailable) as info:
        agents.open_agency_store("pboc", url.replace(_quote(PASSWORD), "wrong"))
    assert "password authentication failed" in str(info.value)
    assert "wrong" not in str(info.value) and ":***@" in str(info.value)


def test_a_role_that_may_only_read_opens_the_store_and_runs_its_views(
        server: Server, sample: Path) -> None:
    url = server.new_store_url()
    with contextlib.closing(agents.open_agency_store("pboc", url)) as store:
        agents.load_dataset_dir("pboc", sample / "pboc", store)
        flows = agents.views_of("pboc")["company_flows"].rows(store, "2026-09")
    schema = url.rsplit("%3D", 1)[1]
    with server.admin() as conn:
        conn.execute("CREATE ROLE reader LOGIN PASSWORD 'reader-pw'")
        conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO reader')
        conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO reader')
    reader_url = url.replace(f"{USER}:{_quote(PASSWORD)}@", "reader:reader-pw@")
    with contextlib.closing(agents.open_agency_store("pboc", reader_url)) as store:
        assert agents.views_of("pboc")["company_flows"].rows(store, "2026-09") == flows
        assert len(flows) > 50


NODE_TOML = """agency = "pboc"
node_id = "pboc"
[listen]
grpc = "127.0.0.1:7130"
metrics = "127.0.0.1:7131"
[paths]
data_dir = "data"
genesis = "../genesis.pb"
node_key = "keys/node.key"
data_key = "keys/data.key"
tls_cert = "tls/node.pem"
tls_key = "tls/node.key"
[block]
tx_max = 100
bytes_max = 1048576
interval_ms = 20
"""


def test_cli_loads_into_a_postgresql_url_without_printing_its_password(
        server: Server, sample: Path, tmp_path: Path) -> None:
    url = server.new_store_url()
    outputs = []

    def invoke(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli, ["data", "load", *args])
        outputs.append(result.output)
        return result.exit_code, result.output

    code, output = invoke("--agency", "pboc", str(sample / "pboc"), "--store", url)
    assert code == 0, output
    assert f"loaded {sample / 'pboc'} into {redact_url(url)}" in output
    code, output = invoke("--agency", "pboc", str(sample / "pboc"), "--store", url, "--json")
    assert code == 0, output
    assert '"rows_before": ' in output and f'"store": "{redact_url(url)}"' in output
    write(tmp_path / "bad", "transactions.csv", TXN_HEADER, "T1,A1,X9,1,in,0,2026-09-31")
    code, output = invoke("--agency", "pboc", str(tmp_path / "bad"), "--store", url)
    assert code == 1 and "line 2, column 7 (booked_on)" in output
    code, output = invoke("--agency", "pboc", str(sample / "pboc"),
                          "--store", url.replace(_quote(PASSWORD), "wrong-pw"))
    assert code == 1 and "cannot connect" in output and output.count("\n") == 1
    assert "wrong-pw" not in output
    # a node whose [data] agency_store is a URL loads there, not into <data_dir>/agency.db
    config = tmp_path / "node" / "node.toml"
    config.parent.mkdir()
    other = server.new_store_url()
    config.write_text(NODE_TOML + f'[data]\nagency_store = "{other}"\n')
    code, output = invoke(str(sample / "pboc"), "--config", str(config))
    assert code == 0, output
    assert redact_url(other) in output
    assert not (tmp_path / "node" / "data" / "agency.db").exists()
    with contextlib.closing(agents.open_agency_store("pboc", other)) as store:
        assert len(dump(store, "pboc")["accounts"]) > 300
    for output in outputs:
        assert PASSWORD not in output and _quote(PASSWORD) not in output


@pytest.mark.cluster
def test_a_node_answers_queries_from_its_agency_records_in_postgresql(
        server: Server, sample: Path, tmp_path: Path) -> None:
    import csv
    import json

    from exchange.testing.localnet import Cluster

    url = server.new_store_url()
    cluster = Cluster(tmp_path / "pgnet")
    try:
        cluster.init()
        cluster.edit_node_config("customs", "[data]\n", f'[data]\nagency_store = "{url}"\n')
        config = cluster.node_config("customs")
        load = cluster.run_exchange("data", "load", "--config", str(config),
                                    str(sample / "customs"), "--json")
        assert load.returncode == 0, load.stderr
        assert PASSWORD not in load.stdout and json.loads(load.stdout)["store"].startswith(
            "postgresql://")
        cluster.start()
        with open(sample / "customs" / "declarations.csv", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        uscc = rows[0]["uscc"]
        asked = cluster.run_exchange(
            "query", "--to", "customs", "--dataset", "declarations", "--subject",
            f"uscc={uscc}", "--case", "PG-1", "--purpose", "records in PostgreSQL",
            "--wait", "--json", "--profile", str(cluster.profile("tax")))
        assert asked.returncode == 0, asked.stderr
        out = json.loads(asked.stdout)
        assert sorted(r["decl_no"] for r in out["data"]) == sorted(
            r["decl_no"] for r in rows if r["uscc"] == uscc)
    finally:
        cluster.stop()
