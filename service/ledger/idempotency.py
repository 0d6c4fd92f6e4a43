"""Idempotency keys: a client that sends ``Idempotency-Key`` with a POST that creates
work gets the same job back when it sends the same request again (a retry after a
timeout, a lost answer), and a refusal when it reuses the key for another request.

A key is unique per model among the jobs (``uq_jobs_model_idempotency_key``); the
job keeps the sha256 of what was asked (:func:`fingerprint`: the route's kind and the
validated body), which a replay must match.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from service.errors import InvalidInput
from service.ledger.models import get_model
from service.ledger.tables import Job

HEADER = "Idempotency-Key"


def fingerprint(kind: str, body: Mapping[str, Any]) -> str:
    """The sha256 of a request: its kind (``edits``, ``rollback``, ``evaluations``)
    and its validated body as canonical JSON."""
    text = json.dumps({"kind": kind, "body": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def job_for_key(session: Session, model_name: str, key: str, sha256: str) -> Job | None:
    """The model's job created with ``key``, or None. :class:`InvalidInput`
    (``Idempotency-Key``) when that job was created by another request."""
    model = get_model(session, model_name)
    job = session.scalar(
        select(Job)
        .options(selectinload(Job.edits))
        .where(Job.model_id == model.id, Job.idempotency_key == key)
    )
    if job is not None and job.request_sha256 != sha256:
        raise InvalidInput(
            HEADER,
            f"was used for another request (job {job.id}); send a new key with a new request",
        )
    return job


def remember(job: Job, key: str, sha256: str) -> None:
    """Record ``key`` and the request's fingerprint on a job being created."""
    job.idempotency_key = key
    job.request_sha256 = sha256
