"""`exchange data`: load an agency's dataset extracts into its store, and generate sample
data (DATA_CONTRACT.md, docs/data.md)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from exchange.cli.output import emit_json, table
from exchange.errors import MalformedInput

_AGENCIES = ("tax", "police", "customs", "pboc")


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
        report = agents.load_dataset_dir(agency, folder, agency_store, replace=replace)
    if as_json:
        emit_json({"agency": report.agency, "store": shown, "replace": report.replace,
                   "files": [{"dataset": f.dataset, "file": f.file, "rows": f.rows,
                              "rows_before": f.rows_before, "rows_after": f.rows_after,
                              "sha256": f.sha256} for f in report.files]})
        return
    click.echo(f"{agency}: loaded {folder} into {shown}" + (" (replace)" if replace else ""))
    table("", ("dataset", "file rows", "stored before", "stored now", "sha256"),
          [(f.dataset, f.rows, f.rows_before, f.rows_after, f.sha256[:16])
           for f in report.files])


@data.command("generate")
@click.option("--seed", type=int, required=True, help="Same seed and size, same bytes.")
@click.option("--companies", type=click.IntRange(100, 2_000_000), required=True,
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
