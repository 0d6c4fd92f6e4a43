"""The ``jobs`` aggregate as the API writes it: edit and rollback jobs (with their
queued edits), and reading one job."""

from __future__ import annotations

import logging
import typing
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from service.errors import InvalidInput, NotFound
from service.ledger.models import get_model, head_version_number
from service.ledger.tables import (
    Edit,
    EditStatus,
    Job,
    JobKind,
    JobStatus,
    Version,
)
from service.schemas import Batching, EditRequestIn
from service.validation import check_hparams, check_method

log = logging.getLogger(__name__)

BATCHING_MODES: tuple[str, ...] = typing.get_args(Batching)


def create_edit_job(
    session: Session,
    model_name: str,
    method: str,
    hparams_overrides: Mapping[str, Any] | None,
    requests: Sequence[EditRequestIn | Mapping[str, Any]],
    *,
    max_requests: int | None = None,
    batching: str = "auto",
) -> Job:
    """Add an edit job and one queued edit row per request (positions 0..n-1).

    The job's payload is ``{"method", "hparams", "batching"}`` (the user's
    overrides only; the worker resolves the defaults for the model's
    architecture). ``batching`` is ``"auto"`` (the writer may apply the requests
    together with other queued jobs' requests) or ``"alone"``. Raises
    :class:`NotFound` for an unknown model and :class:`InvalidInput` naming the
    field for an unknown method, a bad override, a bad request, too many, or an
    unknown batching mode.
    """
    model = get_model(session, model_name)
    check_method(method)
    if batching not in BATCHING_MODES:
        raise InvalidInput(
            "batching", f"unknown mode {batching!r}; known: {', '.join(BATCHING_MODES)}"
        )
    overrides = check_hparams(method, hparams_overrides)
    parsed = _parse_requests(requests)
    if not parsed:
        raise InvalidInput("requests", "at least one request is needed")
    if max_requests is not None and len(parsed) > max_requests:
        raise InvalidInput(
            "requests", f"at most {max_requests} requests per edit job (got {len(parsed)})"
        )
    job = Job(
        model_id=model.id,
        kind=JobKind.edit,
        status=JobStatus.queued,
        progress=0.0,
        payload={"method": method, "hparams": overrides, "batching": batching},
    )
    session.add(job)
    session.flush()
    for position, req in enumerate(parsed):
        session.add(
            Edit(
                model_id=model.id,
                job_id=job.id,
                position=position,
                method=method,
                prompt=req.prompt,
                subject=req.subject,
                target_new=req.target_new,
                target_true=req.target_true,
                paraphrase_prompts=list(req.paraphrase_prompts),
                neighborhood_prompts=list(req.neighborhood_prompts),
                status=EditStatus.queued,
            )
        )
    session.flush()
    session.refresh(job, attribute_names=["edits"])
    log.info("job %s: %d %s edit(s) for %s", job.id, len(parsed), method, model_name)
    return job


def _parse_requests(requests: Sequence[EditRequestIn | Mapping[str, Any]]) -> list[EditRequestIn]:
    parsed = []
    for i, req in enumerate(requests):
        if isinstance(req, EditRequestIn):
            parsed.append(req)
            continue
        try:
            parsed.append(EditRequestIn.model_validate(req))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(["requests", str(i), *(str(p) for p in err["loc"])])
            raise InvalidInput(field, err["msg"]) from None
    return parsed


def create_rollback_job(session: Session, model_name: str, to_version: int) -> Job:
    """Add a rollback job to ``to_version``, which must exist for the model."""
    model = get_model(session, model_name)
    exists = session.scalar(
        select(Version.id).where(Version.model_id == model.id, Version.number == to_version)
    )
    if exists is None:
        head = head_version_number(session, model.id)
        have = "it has no versions yet" if head is None else f"its versions are 0..{head}"
        raise InvalidInput(
            "to_version", f"version {to_version} does not exist for model {model_name!r} ({have})"
        )
    job = Job(
        model_id=model.id,
        kind=JobKind.rollback,
        status=JobStatus.queued,
        progress=0.0,
        payload={"to_version": to_version},
    )
    session.add(job)
    session.flush()
    log.info("job %s: rollback of %s to version %d", job.id, model_name, to_version)
    return job


def get_job(session: Session, job_id: str) -> Job:
    """The job (its ``model`` loaded); :class:`NotFound` (``job_id``) if there is none.

    A string that is not a job id (a UUID) is simply not found.
    """
    try:
        key = str(uuid.UUID(job_id))
    except ValueError:
        raise NotFound("job_id", f"unknown job {job_id!r}") from None
    job = session.scalar(select(Job).options(joinedload(Job.model)).where(Job.id == key))
    if job is None:
        raise NotFound("job_id", f"unknown job {job_id!r}")
    return job
