"""GET /v1/jobs/{job_id} (service/api/routes/jobs.py) against the real ledger."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.ledger.tables import Job, JobStatus
from tests.service.conftest import (
    OTHER,
    assert_names_field,
    edit_body,
)


def test_get_job(client: TestClient, clean_db: Engine) -> None:
    job_id = client.post(f"/v1/models/{OTHER}/edits", json=edit_body()).json()["job_id"]
    resp = client.get(f"/v1/jobs/{job_id}")
    assert resp.status_code == 200
    job = resp.json()
    assert {
        k: job[k] for k in ("id", "kind", "model", "status", "progress", "error", "result")
    } == {
        "id": job_id,
        "kind": "edit",
        "model": OTHER,
        "status": "queued",
        "progress": 0.0,
        "error": None,
        "result": None,
    }
    assert job["created_at"] and job["started_at"] is None and job["finished_at"] is None
    assert "message" in job

    with Session(clean_db) as s:  # what a worker writes when it finishes
        row = s.get(Job, job_id)
        assert row is not None
        row.status, row.progress = JobStatus.succeeded, 1.0
        row.result = {"versions": [1], "metrics": {"1": {"efficacy": 1.0}}}
        s.commit()
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["progress"]) == ("succeeded", 1.0)
    assert job["result"]["versions"] == [1]


@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "not-a-job", "123"])
def test_unknown_job_is_404(client: TestClient, job_id: str) -> None:
    assert_names_field(client.get(f"/v1/jobs/{job_id}"), 404, "job_id")
