"""The ``models`` aggregate: the configured models' rows, their base version and
head, and their policies."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from service.errors import Conflict, InvalidInput, NotFound
from service.ledger.tables import (
    Model,
    Version,
    VersionKind,
)
from service.settings import ModelSpec, Settings
from service.suites import EvaluationPolicy

log = logging.getLogger(__name__)


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


def require_version(session: Session, model: Model, number: int, field: str) -> None:
    """:class:`InvalidInput` naming ``field`` unless ``model`` has version ``number``."""
    exists = session.scalar(
        select(Version.id).where(Version.model_id == model.id, Version.number == number)
    )
    if exists is None:
        head = head_version_number(session, model.id)
        have = "it has no versions yet" if head is None else f"its versions are 0..{head}"
        raise InvalidInput(
            field, f"version {number} does not exist for model {model.name!r} ({have})"
        )


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


# -- the worker's side -------------------------------------------------------------------


class BaseMismatch(Conflict):
    """The weights a worker loaded differ from the base version the ledger recorded."""


def register_base(
    session: Session,
    name: str,
    spec: ModelSpec,
    *,
    model_type: str,
    base_hashes: Mapping[str, str],
    code_version: str,
) -> int:
    """Make sure the model's row and its base version 0 exist and that ``base_hashes``
    (the sha256 of every tensor of the loaded pristine weights) are version 0's.

    Records the hashes in a version 0 that :func:`sync_models` wrote without them;
    raises :class:`BaseMismatch` when they differ from recorded ones (another
    checkpoint under the same name: a worker refuses to serve it rather than replay
    deltas onto the wrong base). The caller retries on an ``IntegrityError`` (another
    worker registered the model at the same time). Returns the model's id.
    """
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        model = Model(
            name=name, source=spec.source, policy={"evaluations": spec.initial_evaluations()}
        )
        session.add(model)
        session.flush()
    model.architecture = model_type
    model.policy = {**(model.policy or {}), **spec.policy()}
    v0 = session.scalar(
        select(Version).where(Version.model_id == model.id, Version.number == 0).with_for_update()
    )
    info = {"source": spec.source, "code_version": code_version}
    if v0 is None:
        session.add(
            Version(
                model_id=model.id,
                number=0,
                kind=VersionKind.base,
                tensor_sha256=dict(base_hashes),
                info=info,
            )
        )
    elif not v0.tensor_sha256:
        # written by sync_models before any worker loaded the model: record the hashes
        v0.tensor_sha256 = dict(base_hashes)
        v0.info = {**(v0.info or {}), **info}
    elif v0.tensor_sha256 != dict(base_hashes):
        differing = sorted(k for k in base_hashes if v0.tensor_sha256.get(k) != base_hashes[k])
        raise BaseMismatch(
            "model",
            f"the weights loaded for {name!r} differ from the ledger's base version in "
            f"{len(differing)} tensors (first: {differing[:3]}); refusing to serve",
        )
    session.flush()
    return model.id
