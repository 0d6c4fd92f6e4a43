"""The ledger: the only code that reads and writes the ledger's tables, used by the
API and the workers alike.

- :mod:`~service.ledger.tables` — the tables (SQLAlchemy 2; Alembic owns the schema);
- :mod:`~service.ledger.sessions` — engines and sessions;
- one module per aggregate: :mod:`~service.ledger.models`, :mod:`~service.ledger.jobs`,
  :mod:`~service.ledger.edits`, :mod:`~service.ledger.versions`,
  :mod:`~service.ledger.evaluations`, :mod:`~service.ledger.guard_decisions`;
- :mod:`~service.ledger.paging` — keyset pagination of the listings.

Every function takes a :class:`~sqlalchemy.orm.Session` and leaves committing to the
caller (the API commits a new job before it enqueues it). Failures are domain errors
from :mod:`service.errors`, each naming the input field; nothing is added to the
session before all input checks passed, so a failed call stores nothing. The names
below are the ones the API uses.
"""

from service.ledger.edits import list_edits
from service.ledger.evaluations import (
    create_evaluation_job,
    evaluation_of_job,
    get_evaluation,
    list_evaluations,
    schedule_policy_evaluations,
)
from service.ledger.guard_decisions import list_guard_decisions
from service.ledger.jobs import BATCHING_MODES, create_edit_job, create_rollback_job, get_job
from service.ledger.models import (
    get_model,
    head_version_number,
    list_models,
    model_policies,
    require_version,
    set_evaluation_policy,
    sync_models,
)
from service.ledger.paging import MAX_PAGE, Page
from service.ledger.versions import list_versions

__all__ = [
    "BATCHING_MODES",
    "MAX_PAGE",
    "Page",
    "create_edit_job",
    "create_evaluation_job",
    "create_rollback_job",
    "evaluation_of_job",
    "get_evaluation",
    "get_job",
    "get_model",
    "head_version_number",
    "list_edits",
    "list_evaluations",
    "list_guard_decisions",
    "list_models",
    "list_versions",
    "model_policies",
    "require_version",
    "schedule_policy_evaluations",
    "set_evaluation_policy",
    "sync_models",
]
