"""The four agencies' own datasets (DATA_CONTRACT.md): schemas, the loader into each
agency's store, the catalog views each computes on its store, and the sample data
generator (agents.generate).

    store = open_store("pboc", Path("data/agency.db"))
    load_dataset_dir("pboc", Path("extract/pboc"), store)
    rows = views_of("pboc")["company_flows"].rows(store, "2026-09")
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from agents import customs, market, pboc, police, tax
from agents.common.bulk import BATCH_ROWS
from agents.common.loader import FileLoad, LoadProgress, LoadReport, Progress, load_datasets
from agents.common.schema import Dataset
from agents.common.store import AgencyStore, SqliteAgencyStore
from agents.common.view import View
from agents.customs import views as customs_views
from agents.market import views as market_views
from agents.pboc import views as pboc_views
from agents.police import views as police_views
from agents.tax import views as tax_views

# The founding agencies of the data contract, and the one that joins a running network.
AGENCIES = ("tax", "police", "customs", "pboc")
JOINING_AGENCIES = ("market",)

_MODULES: dict[str, tuple[ModuleType, ModuleType]] = {
    "tax": (tax, tax_views),
    "police": (police, police_views),
    "customs": (customs, customs_views),
    "pboc": (pboc, pboc_views),
    "market": (market, market_views),
}

__all__ = ["AGENCIES", "JOINING_AGENCIES", "AgencyStore", "Dataset", "FileLoad", "LoadProgress", "LoadReport",
           "View",
           "datasets_of", "load_dataset_dir", "open_agency_store", "open_store", "views_of"]


def _modules(agency: str) -> tuple[ModuleType, ModuleType]:
    try:
        return _MODULES[agency]
    except KeyError:
        raise ValueError(f"unknown agency {agency!r} (one of "
                         f"{', '.join(AGENCIES + JOINING_AGENCIES)})") from None


def datasets_of(agency: str) -> tuple[Dataset, ...]:
    """The agency's datasets, in load order (targets of references first)."""
    datasets: tuple[Dataset, ...] = _modules(agency)[0].DATASETS
    return datasets


def views_of(agency: str) -> dict[str, View[Any]]:
    """The catalog views the agency offers, by name."""
    views: dict[str, View[Any]] = _modules(agency)[1].VIEWS
    return dict(views)


def open_store(agency: str, path: Path) -> SqliteAgencyStore:
    """The agency's SQLite store at `path`, created with its tables if absent."""
    return SqliteAgencyStore(path, agency, datasets_of(agency))


def open_agency_store(agency: str, location: str | Path) -> AgencyStore:
    """The agency's store at `location`: a ``postgresql://`` (or ``postgres://``) URL
    opens it in PostgreSQL, anything else is the path of a SQLite file."""
    from agents.common.pgstore import PostgresAgencyStore, is_postgres_url

    if is_postgres_url(location):
        assert isinstance(location, str)
        return PostgresAgencyStore(location, agency, datasets_of(agency))
    return open_store(agency, Path(location))


def load_dataset_dir(agency: str, folder: Path, store: AgencyStore,
                     replace: bool = False, *, progress: Progress | None = None,
                     batch_rows: int = BATCH_ROWS, bulk: bool = True) -> LoadReport:
    """Load every dataset file in `folder` (one CSV per dataset, named after it) into
    the agency's store in one transaction: all of it, or nothing and a DataFileError
    naming file, line and column. With `replace` each dataset loaded becomes exactly
    its file. `progress` hears after each batch of `batch_rows` rows and at the end of
    each file (rows, bytes, seconds); `bulk=False` skips the bulk path (see
    agents.common.loader)."""
    return load_datasets(agency, datasets_of(agency), Path(folder), store, replace,
                         progress=progress, batch_rows=batch_rows, bulk=bulk)
