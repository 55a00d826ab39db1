"""Loading an agency's import folder into its store, all or nothing.

One load is one transaction over every dataset file in the folder:

1. each file is read and staged row by row; its first problem (malformed CSV, a
   missing column, a bad value or check digit, a key repeated in the file) rejects it;
   the other files are still read, so that one run reports every rejected file;
2. references are resolved against the rows of this load and the rows already stored
   (with `replace`, the target's stored rows do not count: they are being replaced);
3. staged rows are merged: a row replaces the stored row with its key; with `replace`
   the dataset becomes exactly the file;
4. with `replace`, stored rows of other datasets must not be left referring to a
   removed row.

Any problem rolls the whole load back and raises DataFileError; nothing is written.
Dataset files absent from the folder leave their datasets as they are.

A store that offers a bulk session (SQLite) is loaded by the bulk path first: whole
columns checked at once (agents.common.bulk), rows written straight into the tables with
their indexes built after, references checked on the tables, all in one transaction. It
takes only a load without any problem; at the first sign of one it rolls back and the
load runs again by the steps above, which name the problem as they always have. So both
paths accept the same loads, store the same rows and refuse the rest with the same
errors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agents.common.bulk import (
    BATCH_ROWS,
    Batch,
    BatchReader,
    BulkFileReader,
    NotBulk,
    code_memory,
    read_ahead,
)
from agents.common.csvread import DataFileError, DatasetFileReader, FileProblem, ProblemFound
from agents.common.duckread import DuckFileReader, prepared
from agents.common.schema import Dataset
from agents.common.store import AgencyStore, LoadSession, RowsRefused, SqliteAgencyStore
from exchange.errors import MalformedInput


@dataclass(frozen=True)
class FileLoad:
    """What one file did to its dataset."""

    dataset: str
    file: str
    rows: int  # data rows in the file
    rows_before: int  # rows the dataset held before
    rows_after: int  # rows it holds now
    sha256: str  # of the file's bytes
    # how it was loaded, which is no part of what it did (so not compared):
    method: str = field(default="rows", compare=False)  # "bulk" or "rows": which path
    size_bytes: int = field(default=0, compare=False)
    # reading, checking and writing it (and building its indexes)
    seconds: float = field(default=0.0, compare=False)
    # the bulk path's reader: "duckdb" (agents.common.duckread) or "python"
    # (agents.common.bulk); "" on the row path
    reader: str = field(default="", compare=False)


@dataclass(frozen=True)
class LoadProgress:
    """How far the load of one file is: sent to a load's progress callback after each
    batch of rows and when the file is done."""

    dataset: str
    file: str
    method: str  # "bulk" or "rows"
    rows: int  # rows read so far
    bytes_read: int
    size_bytes: int
    seconds: float  # since the file's reading began
    done: bool  # the file is read, checked and written (its indexes built)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else 0.0


Progress = Callable[[LoadProgress], None]


@dataclass(frozen=True)
class LoadReport:
    agency: str
    folder: str
    replace: bool
    files: tuple[FileLoad, ...]


def _display(folder: Path, name: str) -> str:
    return str(folder / name)


def dataset_files(datasets: Sequence[Dataset], folder: Path) -> dict[str, Path]:
    """The dataset files present in `folder`, by dataset name. A CSV file that is no
    dataset of the agency is an error (a misnamed extract must not go unnoticed)."""
    if not folder.is_dir():
        raise MalformedInput(f"{folder}: not a folder")
    by_file = {d.file_name: d for d in datasets}
    found: dict[str, Path] = {}
    unknown: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() != ".csv":
            continue
        dataset = by_file.get(path.name)
        if dataset is None:
            unknown.append(path.name)
        else:
            found[dataset.name] = path
    expected = ", ".join(d.file_name for d in datasets)
    if unknown:
        raise MalformedInput(f"{folder}: {', '.join(unknown)} "
                             f"{'is no dataset' if len(unknown) == 1 else 'are no datasets'}"
                             f" of this agency (expected {expected})")
    if not found:
        raise MalformedInput(f"{folder}: no dataset file (expected one or more of {expected})")
    return found


def load_datasets(agency: str, datasets: Sequence[Dataset], folder: Path,
                  store: AgencyStore, replace: bool = False, *,
                  progress: Progress | None = None, batch_rows: int = BATCH_ROWS,
                  bulk: bool = True, use_duckdb: bool = True) -> LoadReport:
    """Load the dataset files of `folder` into `store`, atomically (see the module).

    `progress` is called after each batch of `batch_rows` rows and at the end of each
    file; `bulk=False` takes the row path straight away; `use_duckdb=False` reads every
    file of the bulk path with agents.common.bulk's reader."""
    assert batch_rows > 0
    if store.agency != agency:
        raise MalformedInput(f"the store holds {store.agency!r} data, not {agency!r}")
    files = dataset_files(datasets, folder)
    if bulk and isinstance(store, SqliteAgencyStore):
        try:
            return _load_bulk(agency, datasets, folder, files, store, replace, progress,
                              batch_rows, use_duckdb)
        except (NotBulk, RowsRefused):
            pass  # rolled back: the row path finds and names the problem
    return _load_rows(agency, datasets, folder, files, store, replace, progress, batch_rows)


def _load_bulk(agency: str, datasets: Sequence[Dataset], folder: Path,
               files: dict[str, Path], store: SqliteAgencyStore, replace: bool,
               progress: Progress | None, batch_rows: int, use_duckdb: bool
               ) -> LoadReport:
    present = [d for d in datasets if d.name in files]
    by_name = {d.name: d for d in datasets}
    loads: list[FileLoad] = []
    codes = code_memory()
    kind = DuckFileReader if use_duckdb else BulkFileReader
    readers: list[BatchReader] = [
        kind(files[d.name], d, _display(folder, d.file_name), batch_rows, codes)
        for d in present]
    try:
        with prepared([r for r in readers if isinstance(r, DuckFileReader)]), \
                store.bulk_session() as session:
            current: BatchReader | None = None
            started = before = 0.0
            written = 0
            for reader, batch in _in_turn(readers):
                dataset = reader.dataset
                if reader is not current:
                    current, started, written = reader, time.perf_counter(), 0
                    before = session.rows_stored(dataset)
                    session.begin(dataset, replace)
                if batch is not None:
                    session.write(dataset, batch)
                    written += len(batch)
                    if progress is not None:  # the reader may be a few batches ahead
                        progress(LoadProgress(dataset.name, reader.display_name, "bulk",
                                              written, reader.bytes_read,
                                              reader.size_bytes,
                                              time.perf_counter() - started, False))
                    continue
                after = session.finish(dataset)
                seconds = time.perf_counter() - started
                loads.append(FileLoad(dataset.name, reader.display_name, reader.rows,
                                      int(before), after,
                                      reader.sha256, "bulk", reader.size_bytes,
                                      round(seconds, 3), _reader_name(reader)))
                if progress is not None:
                    progress(LoadProgress(dataset.name, reader.display_name, "bulk",
                                          reader.rows, reader.size_bytes, reader.size_bytes,
                                          seconds, True))
            assert len(loads) == len(present)
            for dataset in present:
                for ref in dataset.references:
                    session.check_references(dataset, ref, by_name[ref.target])
            if replace and _check_orphans(session, datasets, files, folder):
                raise RowsRefused("replace would orphan stored rows")
            for dataset, load in zip(present, loads, strict=True):
                session.log_file(dataset, dataset.file_name, load.sha256, load.rows, replace)
    except OSError as exc:
        raise MalformedInput(f"{exc.filename}: {exc.strerror} (nothing was loaded)") from exc
    return LoadReport(agency=agency, folder=str(folder), replace=replace, files=tuple(loads))


def _reader_name(reader: BatchReader) -> str:
    if isinstance(reader, DuckFileReader) and reader.method == "duckdb":
        return "duckdb"
    return "python"


def _in_turn(readers: Sequence[BatchReader]
             ) -> Iterator[tuple[BatchReader, Batch | None]]:
    """Every batch of every reader as (reader, batch), and (reader, None) when a
    reader is done: a DuckDB reader's on this thread (its parsing runs in DuckDB's),
    others' read ahead on a thread of their own."""
    for reader in readers:
        if isinstance(reader, DuckFileReader):
            for batch in reader.batches():
                yield reader, batch
            yield reader, None
        else:
            yield from read_ahead([reader])


def _load_rows(agency: str, datasets: Sequence[Dataset], folder: Path,
               files: dict[str, Path], store: AgencyStore, replace: bool,
               progress: Progress | None, batch_rows: int) -> LoadReport:
    present = [d for d in datasets if d.name in files]
    by_name = {d.name: d for d in datasets}
    problems: list[FileProblem] = []
    readers: dict[str, DatasetFileReader] = {}
    loads: list[FileLoad] = []
    started: dict[str, float] = {}
    seconds: dict[str, float] = {}
    try:
        with store.load_session() as session:
            for dataset in present:
                started[dataset.name] = time.perf_counter()
                reader = DatasetFileReader(files[dataset.name], dataset,
                                           _display(folder, dataset.file_name), batch_rows)
                readers[dataset.name] = reader
                problem = _stage_file(session, reader)
                seconds[dataset.name] = time.perf_counter() - started[dataset.name]
                if problem is not None:
                    problems.append(problem)
            if problems:
                raise DataFileError(problems)

            for dataset in present:
                problem = _check_references(session, readers[dataset.name], by_name, files,
                                            replace)
                if problem is not None:
                    problems.append(problem)
            if problems:
                raise DataFileError(problems)

            for dataset in present:
                merged_at = time.perf_counter()
                counts = session.merge(dataset, replace)
                reader = readers[dataset.name]
                took = seconds[dataset.name] + time.perf_counter() - merged_at
                size = files[dataset.name].stat().st_size
                loads.append(FileLoad(dataset.name, reader.display_name, reader.rows,
                                      counts.rows_before, counts.rows_after, reader.sha256,
                                      "rows", size, round(took, 3)))
                if progress is not None:
                    progress(LoadProgress(dataset.name, reader.display_name, "rows",
                                          reader.rows, size, size, took, True))

            if replace:
                problems.extend(_check_orphans(session, datasets, files, folder))
                if problems:
                    raise DataFileError(problems)

            for dataset, load in zip(present, loads, strict=True):
                session.log_file(dataset, dataset.file_name, load.sha256, load.rows, replace)
    except OSError as exc:
        raise MalformedInput(f"{exc.filename}: {exc.strerror} (nothing was loaded)") from exc
    return LoadReport(agency=agency, folder=str(folder), replace=replace, files=tuple(loads))


def _stage_file(session: LoadSession, reader: DatasetFileReader) -> FileProblem | None:
    """Stage every row of one file; its first problem, or None."""
    dataset = reader.dataset
    try:
        for batch in reader.batches():
            duplicate = session.stage(dataset, batch)
            if duplicate is not None:
                key_text = ", ".join(f"{k}={v!r}" for k, v in
                                     zip(dataset.key, duplicate.key, strict=True))
                return FileProblem(
                    reader.display_name,
                    f"key {key_text} repeats line {duplicate.first_line}",
                    duplicate.line)
    except ProblemFound as found:
        return found.problem
    return None


def _check_references(session: LoadSession, reader: DatasetFileReader,
                      by_name: dict[str, Dataset], files: dict[str, Path], replace: bool
                      ) -> FileProblem | None:
    dataset = reader.dataset
    for ref in dataset.references:
        target = by_name[ref.target]
        target_staged = target.name in files
        target_stored = not (replace and target_staged)
        found = session.first_unresolved(dataset, ref, target, target_staged, target_stored)
        if found is None:
            continue
        where = []
        if target_staged:
            where.append(target.file_name)
        if target_stored:
            where.append(f"the stored {target.name}")
        message = f"{ref.column} {found.value!r} is not in {' or '.join(where)}"
        return reader.problem(message, found.line, ref.column).problem
    return None


def _check_orphans(session: LoadSession, datasets: Sequence[Dataset],
                   files: dict[str, Path], folder: Path) -> list[FileProblem]:
    """With replace: stored rows left referring to a row the load removed."""
    by_name = {d.name: d for d in datasets}
    problems = []
    for dataset in datasets:
        if dataset.name in files:
            continue  # replaced too, and checked against the new target rows
        for ref in dataset.references:
            if ref.target not in files:
                continue
            target = by_name[ref.target]
            orphan = session.first_orphan(dataset, ref, target)
            if orphan is None:
                continue
            key_text = ", ".join(f"{k}={v!r}" for k, v in
                                 zip(dataset.key, orphan.key, strict=True))
            problems.append(FileProblem(
                _display(folder, target.file_name),
                f"replacing {target.name} would remove {target.key[0]} {orphan.value!r}, "
                f"which the stored {dataset.name} row {key_text} refers to (load "
                f"{dataset.file_name} with --replace in the same folder, or keep the row)"))
    return problems
