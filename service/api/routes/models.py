"""Models: the configured models with their head version and worker, and their
evaluation policy."""

from __future__ import annotations

from fastapi import APIRouter

from service import ledger
from service.api.auth import Admin, Reads
from service.api.deps import ERRORS, Backends, BackendsDep
from service.ledger.tables import Model
from service.schemas import ModelPublic, PolicyUpdate

router = APIRouter(tags=["models"])


@router.get("/v1/models", responses=ERRORS)
def list_models(backends: BackendsDep, _: Reads) -> list[ModelPublic]:
    """The configured models, their head version and what their worker is doing
    (``worker.state``: ``loading``, ``statistics`` with ``progress``, ``ready`` or
    ``no worker``)."""
    return [_public(m, head, backends) for m, head in ledger.list_models(backends.session)]


@router.put("/v1/models/{model}/policy", responses=ERRORS)
def set_policy(model: str, body: PolicyUpdate, backends: BackendsDep, _: Admin) -> ModelPublic:
    """Replace the model's evaluation policy: suites run after every version whose
    number is a multiple of ``every_versions``, compared with ``thresholds``; a
    breach raises an alert and, with ``action: rollback``, queues a rollback to the
    last healthy version. Applies to versions committed from now on."""
    session = backends.session
    row = ledger.set_evaluation_policy(session, model, body.evaluations)
    public = _public(row, ledger.head_version_number(session, row.id), backends)
    session.commit()
    return public


def _public(row: Model, head: int | None, backends: Backends) -> ModelPublic:
    return ModelPublic.model_validate(
        {
            "name": row.name,
            "source": row.source,
            "architecture": row.architecture,
            "head_version": head,
            "policy": row.policy,
            "worker": backends.worker(row.name),
        }
    )
