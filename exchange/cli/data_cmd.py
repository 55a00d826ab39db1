"""`exchange data`: load an agency's dataset extracts into its store, and generate sample
data (DATA_CONTRACT.md, docs/data.md)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from exchange.cli.output import emit_json, table
from exchange.errors import MalformedInput

if TYPE_CHECKING:
    from agents.common.loader import LoadProgress

_AGENCIES = ("tax", "police", "customs", "pboc")
# A load shows its progress on stderr once it has run this long, then this often.
PROGRESS_AFTER_S = 2.0
PROGRESS_EVERY_S = 2.0


class _ProgressLines:
    """Progress of a long load on stderr: rows, megabytes and MB/s of the file being
    loaded every few seconds, and a line when each file is done."""

    def __init__(self, agency: str) -> None:
        self.agency = agency
        self.started = self.shown = time.monotonic()

    def __call__(self, p: LoadProgress) -> None:
        now = time.monotonic()
        if now - self.started < PROGRESS_AFTER_S:
            return
        if not p.done and now - self.shown < PROGRESS_EVERY_S:
            return
        self.shown = now
        state = (f"done in {p.seconds:.1f} s ({p.method})" if p.done
                 else f"{p.bytes_read / 1e6:.0f} of {p.size_bytes / 1e6:.0f} MB")
        click.echo(f"{self.agency}: {p.file}: {p.rows:,} rows, {state}, "
                   f"{p.mb_per_s:.1f} MB/s", err=True)


@click.group("data")
def data() -> None:
    """Agencies' own datasets: load extracts, generate sample data."""


def _store_location(agency: str | None, store: str | None, config: Path | None
                    ) -> tuple[str, str | Path]:
    """The agency and its store: a PostgreSQL URL or a SQLite file path."""
    if (store is None) == (config is None):
        raise click.UsageError("give exactly one of --store and --config")
    from agents.common.pgstore import is_postgres_url

    if config is not None:
        from agents.common.store import sqlite_store_path
        from exchange.identity.config import load_node_config

        node = load_node_config(config)
        if agency is not None and agency != node.agency:
            raise MalformedInput(f"{config} is the node config of {node.agency!r}, "
                                 f"not {agency!r}")
        # [data] agency_store (a PostgreSQL URL), as the node itself opens it
        configured = getattr(node, "agency_store", "")
        if isinstance(configured, str) and configured:
            return node.agency, configured if is_postgres_url(configured) else Path(configured)
        return node.agency, sqlite_store_path(node.paths.data_dir)
    if agency is None:
        raise click.UsageError("--agency is required with --store")
    assert store is not None
    if is_postgres_url(store):
        return agency, store
    if Path(store).is_dir():
        raise click.BadParameter(f"{store} is a folder, not a store file", param_hint="--store")
    return agency, Path(store)


def _display(location: str | Path) -> str:
    """The store as it may be printed: a URL without its password."""
    from agents.common.pgstore import redact_url

    return redact_url(location) if isinstance(location, str) else str(location)


@data.command("load")
@click.option("--agency", type=click.Choice(_AGENCIES), default=None,
              help="Whose datasets these are (default with --config: the node's agency).")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--store", default=None, metavar="PATH|URL",
              help="The agency's store: a SQLite file (created if absent) or a "
                   "postgresql://user@host/db URL.")
@click.option("--config", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="A node.toml: load into that node's store (its "
                                 "[data] agency_store, else <data_dir>/agency.db).")
@click.option("--replace", is_flag=True,
              help="Each dataset loaded becomes exactly its file (rows not in it are "
                   "deleted); without it, rows are added or replace the rows of their key.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def load(agency: str | None, folder: Path, store: str | None, config: Path | None,
         replace: bool, as_json: bool) -> None:
    """Load FOLDER (one CSV per dataset, named after it) into the agency's store, in one
    transaction: every file, or nothing and an error naming file, line and column."""
    import agents

    agency, location = _store_location(agency, store, config)
    shown = _display(location)
    with contextlib.closing(agents.open_agency_store(agency, location)) as agency_store:
        report = agents.load_dataset_dir(agency, folder, agency_store, replace=replace,
                                         progress=_ProgressLines(agency))
    if as_json:
        emit_json({"agency": report.agency, "store": shown, "replace": report.replace,
                   "files": [{"dataset": f.dataset, "file": f.file, "rows": f.rows,
                              "rows_before": f.rows_before, "rows_after": f.rows_after,
                              "sha256": f.sha256, "method": f.method, "reader": f.reader,
                              "size_bytes": f.size_bytes, "seconds": f.seconds}
                             for f in report.files]})
        return
    click.echo(f"{agency}: loaded {folder} into {shown}" + (" (replace)" if replace else ""))
    table("", ("dataset", "file rows", "stored before", "stored now", "MB", "MB/s",
               "sha256"),
          [(f.dataset, f.rows, f.rows_before, f.rows_after, f"{f.size_bytes / 1e6:.1f}",
            f"{f.size_bytes / 1e6 / f.seconds:.1f}" if f.seconds > 0 else "-",
            f.sha256[:16]) for f in report.files])


@data.command("generate")
@click.option("--seed", type=int, required=True, help="Same seed and size, same bytes.")
@click.option("--companies", type=click.IntRange(100, 3_000_000), required=True,
              help="Number of companies.")
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder to write tax/, police/, customs/, pboc/ and ground_truth.csv into.")
@click.option("--end-period", default="2026-09", show_default=True,
              help="The last month of data, YYYY-MM.")
@click.option("--months", type=click.IntRange(1, 24), default=3, show_default=True,
              help="How many months, ending with --end-period.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def generate(seed: int, companies: int, out: Path, end_period: str, months: int,
             overwrite: bool, as_json: bool) -> None:
    """Write sample data for every agency with planted cases and near-threshold decoys,
    and ground_truth.csv: the findings the reference rules must produce on it."""
    from agents.generate import GeneratorConfig
    from agents.generate import generate as run

    report = run(GeneratorConfig(seed=seed, companies=companies, end_period=end_period,
                                 months=months), out, overwrite=overwrite)
    if as_json:
        emit_json({"out": report.out, "seed": seed, "companies": companies,
                   "periods": list(report.config.periods), "rows": report.rows,
                   "findings": report.findings, "planted": report.planted,
                   "seconds": report.seconds})
        return
    click.echo(f"{report.out}: seed {seed}, {companies} companies, "
               f"{', '.join(report.config.periods)}, {report.seconds:.1f} s")
    table("", ("file", "rows"), sorted(report.rows.items()))
    click.echo(f"ground_truth.csv: {sum(report.findings.values())} findings "
               f"({report.planted} planted cases and decoys checked)")
    table("", ("rule", "findings"), list(report.findings.items()))
