"""The history routes for dashboards (service/api/routes/edits.py, versions.py): the
filters as query parameters, single items, the series and ``?format=csv``, against
the real ledger (versions written as a worker writes them; no worker runs)."""

from __future__ import annotations

import csv
import io

from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.service.conftest import MODEL, add_versions, assert_names_field, edit_body


def test_filters_single_items_series_and_csv(client: TestClient, clean_db: Engine) -> None:
    with Session(clean_db) as s:
        add_versions(s, MODEL, 3)
    for subject in ("The Eiffel Tower", "The Louvre"):
        body = edit_body(
            requests=[{"prompt": "{} is in", "subject": subject, "target_new": "Rome"}]
        )
        assert client.post(f"/v1/models/{MODEL}/edits", json=body).status_code == 202
    found = client.get(f"/v1/models/{MODEL}/edits", params={"subject": "LOUVRE"}).json()
    assert [e["subject"] for e in found["items"]] == ["The Louvre"]
    edit_id = found["items"][0]["id"]
    assert client.get(f"/v1/models/{MODEL}/edits/{edit_id}").json()["subject"] == "The Louvre"
    assert_names_field(client.get(f"/v1/models/{MODEL}/edits/999999"), 404, "edit_id")
    assert_names_field(
        client.get(f"/v1/models/{MODEL}/edits", params={"min_version": 2, "max_version": 1}),
        422, "min_version")  # fmt: skip
    assert client.get(f"/v1/models/{MODEL}/edits", params={"min_version": 1}).json()["items"] == []

    v2 = client.get(f"/v1/models/{MODEL}/versions/2").json()
    assert v2["number"] == 2 and v2["edits"] == [] and v2["guard_decision"] is None
    assert_names_field(client.get(f"/v1/models/{MODEL}/versions/7"), 404, "number")
    kinds = client.get(f"/v1/models/{MODEL}/versions", params={"kind": "edit"}).json()
    assert [v["number"] for v in kinds["items"]] == [1, 2]

    drift = client.get(f"/v1/models/{MODEL}/series/drift").json()
    assert drift["x"] == [0, 1, 2] and len(drift["series"]) == 1
    norms = client.get(f"/v1/models/{MODEL}/series/update_norm").json()
    assert norms["series"]["update_norm"] == [None, 1.0, 2.0]
    assert client.get(f"/v1/models/{MODEL}/series/bogus").status_code == 422
    assert_names_field(client.get(f"/v1/models/{MODEL}/series/evaluations"), 422, "suite")

    sheet = client.get(f"/v1/models/{MODEL}/versions", params={"format": "csv", "limit": 2})
    assert sheet.status_code == 200 and sheet.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(sheet.text)))
    assert [r["number"] for r in rows] == ["0", "1"] and "drift" in rows[0]
    assert sheet.headers["x-next-cursor"]
    edits = client.get(f"/v1/models/{MODEL}/edits", params={"format": "csv"})
    assert [r["subject"] for r in csv.DictReader(io.StringIO(edits.text))] == [
        "The Eiffel Tower", "The Louvre"]  # fmt: skip
    jobs = client.get("/v1/jobs", params={"format": "csv"})
    assert len(list(csv.DictReader(io.StringIO(jobs.text)))) == 2
    assert client.get("/v1/jobs", params={"format": "xml"}).status_code == 422
