"""A catalog view: an aggregate an agency computes on its own store and offers to the
others (DATA_CONTRACT.md, "Aggregates the agencies offer")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from agents.common.store import AgencyStore

RowT = TypeVar("RowT")


@dataclass(frozen=True)
class ViewColumn:
    name: str
    type: str  # uscc, person_id, period, decimal, integer
    description: str


@dataclass(frozen=True)
class View(Generic[RowT]):
    """A named view: its columns and the function computing its rows, sorted by subject.

    A period-bound view takes the month `YYYY-MM`; the others take None.
    """

    name: str
    agency: str
    description: str
    columns: tuple[ViewColumn, ...]
    period_bound: bool
    compute: Callable[[AgencyStore, str | None], Sequence[RowT]]

    def rows(self, store: AgencyStore, period: str | None = None) -> Sequence[RowT]:
        if store.agency != self.agency:
            raise ValueError(f"view {self.name} is {self.agency}'s, the store is "
                             f"{store.agency}'s")
        if self.period_bound != (period is not None):
            raise ValueError(f"view {self.name} "
                             + ("needs a period" if self.period_bound else "takes no period"))
        return self.compute(store, period)
