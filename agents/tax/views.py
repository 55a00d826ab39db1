"""tax's catalog view active_legal_reps, as SQL over its own store."""

from __future__ import annotations

from dataclasses import dataclass

from agents.common.store import AgencyStore
from agents.common.view import View, ViewColumn


@dataclass(frozen=True, order=True)
class ActiveLegalRep:
    uscc: str
    legal_rep_id: str


ACTIVE_LEGAL_REPS_SQL = """
SELECT uscc, legal_rep_id FROM taxpayers WHERE status = 'active'
"""


def active_legal_reps(store: AgencyStore) -> list[ActiveLegalRep]:
    """uscc, legal_rep_id of every taxpayer whose status is active now, sorted."""
    rows = store.fetch(ACTIVE_LEGAL_REPS_SQL, {})
    return sorted(ActiveLegalRep(str(uscc), str(rep)) for uscc, rep in rows)


def _compute(store: AgencyStore, period: str | None) -> list[ActiveLegalRep]:
    assert period is None
    return active_legal_reps(store)


ACTIVE_LEGAL_REPS = View[ActiveLegalRep](
    name="active_legal_reps",
    agency="tax",
    description="The legal representative of every active taxpayer (not period-bound).",
    columns=(
        ViewColumn("uscc", "uscc", "the active taxpayer"),
        ViewColumn("legal_rep_id", "person_id", "its legal representative"),
    ),
    period_bound=False,
    compute=_compute,
)

VIEWS = {ACTIVE_LEGAL_REPS.name: ACTIVE_LEGAL_REPS}
