"""Ledger operations used by the API (and the CLI): models, jobs, edits, versions,
evaluations and the models' evaluation policies.

Every function takes a :class:`~sqlalchemy.orm.Session` and leaves committing to
the caller (the API commits a new job before it enqueues it). Failures are domain
errors from :mod:`service.errors`, each naming the input field; nothing is added
to the session before all input checks passed, so a failed call stores nothing.

Listings use keyset pagination: items come in ascending key order (edit id,
version number) and ``next_cursor`` is an opaque string that resumes after the
last item returned, stable while new rows are appended.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import typing
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import ValidationError
from sqlalchemy import func, select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, joinedload, selectinload

from service.errors import InvalidInput, NotFound
from service.evaluations import EvaluationPolicy, check_suite_params
from service.models import (
    Edit,
    EditStatus,
    Evaluation,
    GuardDecision,
    Job,
    JobKind,
    JobStatus,
    Model,
    Version,
    VersionKind,
)
from service.schemas import Batching, EditRequestIn
from service.settings import Settings
from service.validation import check_hparams, check_method

log = logging.getLogger(__name__)

MAX_PAGE = 500
BATCHING_MODES: tuple[str, ...] = typing.get_args(Batching)

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


# -- models ---------------------------------------------------------------------------


def sync_models(session: Session, settings: Settings) -> list[str]:
    """Insert a ``models`` row for every configured model name that has none, and
    its base version 0.

    The source comes from the settings; the architecture stays unknown until a
    worker loads the model and reports it. Version 0 is the base weights: its
    tensor hashes stay empty until the first worker loads them and records them
    (so an evaluation or a rollback to the base can be accepted, and wait in the
    queue, before any worker has started). Existing rows are left as they are.
    Safe to run from several processes at once. Returns the names inserted.
    """
    added: list[str] = []
    for name, spec in settings.models.items():
        stmt = (
            pg_insert(Model)
            .values(
                name=name,
                source=spec.source,
                policy={**spec.policy(), "evaluations": spec.initial_evaluations()},
            )
            .on_conflict_do_nothing(index_elements=[Model.name])
            .returning(Model.id)
        )
        if session.execute(stmt).first() is not None:
            added.append(name)
        model_id = session.scalar(select(Model.id).where(Model.name == name))
        session.execute(
            pg_insert(Version)
            .values(
                model_id=model_id,
                number=0,
                kind=VersionKind.base,
                tensor_sha256={},
                drift={},
                timing={},
                info={"source": spec.source},
            )
            .on_conflict_do_nothing(constraint="uq_versions_model_number")
        )
    if added:
        log.info("registered models %s", added)
    return added


def get_model(session: Session, name: str) -> Model:
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        raise NotFound("model", f"unknown model {name!r}")
    return model


def list_models(session: Session) -> list[tuple[Model, int | None]]:
    """Every model with its head version number (None before a worker registered it)."""
    head = (
        select(Version.model_id, func.max(Version.number).label("head"))
        .group_by(Version.model_id)
        .subquery()
    )
    rows = session.execute(
        select(Model, head.c.head).outerjoin(head, head.c.model_id == Model.id).order_by(Model.name)
    ).all()
    return [(model, number) for model, number in rows]


def head_version_number(session: Session, model_id: int) -> int | None:
    return session.scalar(select(func.max(Version.number)).where(Version.model_id == model_id))


# -- jobs -----------------------------------------------------------------------------


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


# -- listings -------------------------------------------------------------------------


def list_edits(
    session: Session,
    model_name: str,
    status: EditStatus | str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[Edit]:
    """A page of the model's edits by ascending id, optionally of one status.

    Each edit's ``version`` relationship is loaded (its number is the version
    that applied it).
    """
    model = get_model(session, model_name)
    _check_limit(limit)
    after = _decode_cursor(cursor, "edits")
    query = select(Edit).where(Edit.model_id == model.id)
    if status is not None:
        query = query.where(Edit.status == _edit_status(status))
    if after is not None:
        query = query.where(Edit.id > after)
    rows = list(
        session.scalars(
            query.options(selectinload(Edit.version)).order_by(Edit.id).limit(limit + 1)
        )
    )
    return _page(rows, limit, "edits", lambda e: e.id)


def list_versions(
    session: Session, model_name: str, limit: int = 50, cursor: str | None = None
) -> Page[Version]:
    """A page of the model's versions by ascending number."""
    model = get_model(session, model_name)
    _check_limit(limit)
    after = _decode_cursor(cursor, "versions")
    query = select(Version).where(Version.model_id == model.id)
    if after is not None:
        query = query.where(Version.number > after)
    rows = list(session.scalars(query.order_by(Version.number).limit(limit + 1)))
    return _page(rows, limit, "versions", lambda v: v.number)


def _edit_status(status: EditStatus | str) -> EditStatus:
    try:
        return EditStatus(status)
    except ValueError:
        known = ", ".join(s.value for s in EditStatus)
        raise InvalidInput("status", f"unknown status {status!r}; known: {known}") from None


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput("limit", f"must be between 1 and {MAX_PAGE}")


def _page(rows: list[T], limit: int, kind: str, key: Any) -> Page[T]:
    if len(rows) <= limit:
        return Page(items=rows, next_cursor=None)
    items = rows[:limit]
    return Page(items=items, next_cursor=_encode_cursor(kind, key(items[-1])))


def _encode_cursor(kind: str, after: int | list[int]) -> str:
    raw = json.dumps({"k": kind, "a": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _decode_cursor(cursor: str | None, kind: str) -> Any:
    """The position a cursor of listing ``kind`` resumes after: an int, or for the
    evaluation listings a ``[version, id]`` pair."""
    if cursor is None or cursor == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        after = data["a"]
        shape_ok = (
            _is_int(after)
            if kind in ("edits", "versions", "guard_decisions")
            else isinstance(after, list) and len(after) == 2 and all(map(_is_int, after))
        )
        ok = data["k"] == kind and shape_ok
    except (binascii.Error, ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise InvalidInput("cursor", f"is not a cursor returned by this {kind} listing")
    return after


# -- evaluations ------------------------------------------------------------------------


def create_evaluation_job(
    session: Session,
    model_name: str,
    suite: str,
    version: int | None,
    params: Mapping[str, Any] | None,
) -> tuple[Job, Evaluation]:
    """Add an evaluation job and its queued evaluation row.

    ``version`` None means the head version now (the number is fixed here, so the
    evaluation measures that version even if edits land before it runs). Raises
    :class:`InvalidInput` naming the field for an unknown suite or bad params, and
    :class:`NotFound` (``version``) for a version the model does not have.
    """
    model = get_model(session, model_name)
    checked = check_suite_params(suite, params)
    row = _version_row(session, model, version)
    job, evaluation = _add_evaluation(session, model.id, row, suite, checked)
    log.info(
        "job %s: %s evaluation %d of %s version %d",
        job.id, suite, evaluation.id, model_name, row.number,
    )  # fmt: skip
    return job, evaluation


def _version_row(session: Session, model: Model, version: int | None) -> Version:
    number = head_version_number(session, model.id) if version is None else version
    row = (
        None
        if number is None
        else session.scalar(
            select(Version).where(Version.model_id == model.id, Version.number == number)
        )
    )
    if row is None:
        head = head_version_number(session, model.id)
        have = (
            "it has no versions yet (no worker has registered it)"
            if head is None
            else f"its versions are 0..{head}"
        )
        raise NotFound(
            "version", f"version {number} does not exist for model {model.name!r} ({have})"
        )
    return row


def _add_evaluation(
    session: Session,
    model_id: int,
    version: Version,
    suite: str,
    params: dict[str, Any],
    policy: EvaluationPolicy | None = None,
) -> tuple[Job, Evaluation]:
    job = Job(
        model_id=model_id,
        kind=JobKind.evaluation,
        status=JobStatus.queued,
        progress=0.0,
        payload={"suite": suite, "version": version.number},
    )
    session.add(job)
    session.flush()
    evaluation = Evaluation(
        model_id=model_id,
        job_id=job.id,
        version=version.number,
        version_id=version.id,
        suite=suite,
        params=params,
        status=JobStatus.queued,
        policy=policy.key if policy is not None else None,
        policy_spec=policy.model_dump(mode="json") if policy is not None else None,
        timing={},
    )
    session.add(evaluation)
    session.flush()
    job.payload = {**job.payload, "evaluation_id": evaluation.id}
    session.flush()
    return job, evaluation


def model_policies(model: Model) -> list[EvaluationPolicy]:
    """The model's evaluation policies (entries that no longer validate are skipped
    with a warning: a policy stored by an older version of the code)."""
    out = []
    for i, raw in enumerate((model.policy or {}).get("evaluations") or []):
        try:
            out.append(EvaluationPolicy.model_validate(raw))
        except ValidationError as exc:
            log.warning(
                "model %s: evaluation policy %d is invalid, skipped: %s", model.name, i, exc
            )
    return out


def schedule_policy_evaluations(session: Session, model_id: int, number: int) -> list[str]:
    """Add the evaluation jobs the model's policies ask for after version ``number``.

    A policy with ``every_versions`` N is due when ``number`` is a positive
    multiple of N. Idempotent: a policy that already has an evaluation of this
    version gets no second one (and the table's unique constraint on model,
    version and policy backs that up). Call it in the transaction that commits the
    version, so that the evaluation exists exactly when the version does; enqueue
    the returned job ids after the commit.
    """
    model = session.get(Model, model_id)
    if model is None or number <= 0:
        return []
    due = [p for p in model_policies(model) if number % p.every_versions == 0]
    if not due:
        return []
    version = session.scalar(
        select(Version).where(Version.model_id == model_id, Version.number == number)
    )
    if version is None:
        raise LookupError(f"version {number} of model {model.name!r} is not in the ledger")
    taken = set(
        session.scalars(
            select(Evaluation.policy).where(
                Evaluation.model_id == model_id,
                Evaluation.version == number,
                Evaluation.policy.in_([p.key for p in due]),
            )
        )
    )
    jobs = []
    for p in due:
        if p.key in taken:
            continue
        job, evaluation = _add_evaluation(session, model_id, version, p.suite, p.params, p)
        jobs.append(job.id)
        log.info(
            "policy %s: %s evaluation %d of %s version %d (job %s)",
            p.key, p.suite, evaluation.id, model.name, number, job.id,
        )  # fmt: skip
    return jobs


def set_evaluation_policy(
    session: Session, model_name: str, policies: Sequence[EvaluationPolicy]
) -> Model:
    """Replace the model's evaluation policies (the rest of its policy stays)."""
    model = get_model(session, model_name)
    model.policy = {
        **(model.policy or {}),
        "evaluations": [p.model_dump(mode="json") for p in policies],
    }
    session.flush()
    log.info("model %s: evaluation policy %s", model_name, [p.key for p in policies])
    return model


def get_evaluation(session: Session, model_name: str, evaluation_id: int) -> Evaluation:
    model = get_model(session, model_name)
    row = session.scalar(
        select(Evaluation).where(Evaluation.model_id == model.id, Evaluation.id == evaluation_id)
    )
    if row is None:
        raise NotFound("evaluation_id", f"unknown evaluation {evaluation_id} of {model_name!r}")
    return row


def list_evaluations(
    session: Session,
    model_name: str,
    suite: str | None = None,
    *,
    version: int | None = None,
    alerts_only: bool = False,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[Evaluation]:
    """A page of the model's evaluations as a time series: by ascending version
    number, then in the order they were asked for (id). ``alerts_only``: only
    evaluations that raised an alert (the ``alerts`` listing, its own cursors)."""
    model = get_model(session, model_name)
    _check_limit(limit)
    kind = "alerts" if alerts_only else "evaluations"
    after = _decode_cursor(cursor, kind)
    query = select(Evaluation).where(Evaluation.model_id == model.id)
    if suite is not None:
        query = query.where(Evaluation.suite == suite)
    if version is not None:
        query = query.where(Evaluation.version == version)
    if alerts_only:
        query = query.where(Evaluation.alert.is_not(None))
    if after is not None:
        query = query.where(tuple_(Evaluation.version, Evaluation.id) > tuple_(*after))
    rows = list(session.scalars(query.order_by(Evaluation.version, Evaluation.id).limit(limit + 1)))
    return _page(rows, limit, kind, lambda e: [e.version, e.id])


def list_guard_decisions(
    session: Session,
    model_name: str,
    *,
    accepted: bool | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[GuardDecision]:
    """A page of the guard's decisions on the model's updates, oldest first, each with
    the version that committed it loaded (None when rejected)."""
    model = get_model(session, model_name)
    _check_limit(limit)
    after = _decode_cursor(cursor, "guard_decisions")
    query = (
        select(GuardDecision)
        .options(selectinload(GuardDecision.version))
        .where(GuardDecision.model_id == model.id)
    )
    if accepted is not None:
        query = query.where(GuardDecision.accepted.is_(accepted))
    if after is not None:
        query = query.where(GuardDecision.id > after)
    rows = list(session.scalars(query.order_by(GuardDecision.id).limit(limit + 1)))
    return _page(rows, limit, "guard_decisions", lambda r: r.id)
