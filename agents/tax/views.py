"""tax's catalog view active_legal_reps, as SQL over its own store."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from agents.common.store import AgencyStore
from agents.common.view import SubjectFilter, View, ViewColumn, fetch_filtered


@dataclass(frozen=True, order=True)
class ActiveLegalRep:
    uscc: str
    legal_rep_id: str


ACTIVE_LEGAL_REPS_SQL = """
SELECT uscc, legal_rep_id FROM taxpayers WHERE status = 'active'
"""
# For given subjects: the status is tested on their rows, which are read by the subject
# column's index. (COALESCE of a NOT NULL column changes no value; it keeps a planner
# without statistics, SQLite's, from reading every active taxpayer through the status
# index instead, which it does from five subjects on.)
ACTIVE_LEGAL_REPS_FOR_SUBJECTS_SQL = """
SELECT uscc, legal_rep_id FROM taxpayers WHERE COALESCE(status, '') = 'active'{subjects}
"""


def active_legal_reps(store: AgencyStore, subjects: SubjectFilter | None = None
                      ) -> list[ActiveLegalRep]:
    """uscc, legal_rep_id of every taxpayer whose status is active now (with `subjects`,
    whose uscc or legal_rep_id is one named), sorted."""
    if subjects is None:
        rows = store.fetch(ACTIVE_LEGAL_REPS_SQL, {})
    else:
        rows = fetch_filtered(store, ACTIVE_LEGAL_REPS_FOR_SUBJECTS_SQL, {},
                              {"uscc": "uscc", "legal_rep_id": "legal_rep_id"}, subjects)
    return sorted(ActiveLegalRep(str(uscc), str(rep)) for uscc, rep in rows)


def stream_active_legal_reps(store: AgencyStore, period: str | None
                             ) -> Iterator[ActiveLegalRep]:
    """active_legal_reps of every active taxpayer, streamed from the store in order."""
    assert period is None
    sql = ACTIVE_LEGAL_REPS_SQL + "ORDER BY uscc, legal_rep_id\n"
    for uscc, rep in store.stream(sql, {}):
        yield ActiveLegalRep(str(uscc), str(rep))


def _compute(store: AgencyStore, period: str | None, subjects: SubjectFilter | None
             ) -> list[ActiveLegalRep]:
    assert period is None
    return active_legal_reps(store, subjects)


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
    stream=stream_active_legal_reps,
)

VIEWS = {ACTIVE_LEGAL_REPS.name: ACTIVE_LEGAL_REPS}
