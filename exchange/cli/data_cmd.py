"""`exchange data`: load an agency's dataset extracts into its store, and generate sample
data (DATA_CONTRACT.md, docs/data.md)."""

from __future__ import annotations

from pathlib import Path

import click

from exchange.cli.output import emit_json, table
from exchange.errors import MalformedInput

_AGENCIES = ("tax", "police", "customs", "pboc")


@click.group("data")
def data() -> None:
    """Agencies' own datasets: load extracts, generate sample data."""


def _store_path(agency: str | None, store: Path | None, config: Path | None
                ) -> tuple[str, Path]:
    if (store is None) == (config is None):
        raise click.UsageError("give exactly one of --store and --config")
    if config is not None:
        from agents.common.store import sqlite_store_path
        from exchange.identity.config import load_node_config

        node = load_node_config(config)
        if agency is not None and agency != node.agency:
            raise MalformedInput(f"{config} is the node config of {node.agency!r}, "
                                 f"not {agency!r}")
        return node.agency, sqlite_store_path(node.paths.data_dir)
    if agency is None:
        raise click.UsageError("--agency is required with --store")
    assert store is not None
    return agency, store


@data.command("load")
@click.option("--agency", type=click.Choice(_AGENCIES), default=None,
              help="Whose datasets these are (default with --config: the node's agency).")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--store", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The agency's SQLite store (created if absent).")
@click.option("--config", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="A node.toml: load into <data_dir>/agency.db of that node.")
@click.option("--replace", is_flag=True,
              help="Each dataset loaded becomes exactly its file (rows not in it are "
                   "deleted); without it, rows are added or replace the rows of their key.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def load(agency: str | None, folder: Path, store: Path | None, config: Path | None,
         replace: bool, as_json: bool) -> None:
    """Load FOLDER (one CSV per dataset, named after it) into the agency's store, in one
    transaction: every file, or nothing and an error naming file, line and column."""
    import agents

    agency, path = _store_path(agency, store, config)
    with agents.open_store(agency, path) as agency_store:
        report = agents.load_dataset_dir(agency, folder, agency_store, replace=replace)
    if as_json:
        emit_json({"agency": report.agency, "store": str(path), "replace": report.replace,
                   "files": [{"dataset": f.dataset, "file": f.file, "rows": f.rows,
                              "rows_before": f.rows_before, "rows_after": f.rows_after,
                              "sha256": f.sha256} for f in report.files]})
        return
    click.echo(f"{agency}: loaded {folder} into {path}" + (" (replace)" if replace else ""))
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
