"""The app as a whole (service/api/main.py): its OpenAPI contract."""

from __future__ import annotations

from fastapi.testclient import TestClient


def test_openapi_lists_the_contract(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {
        "/healthz",
        "/healthz/workers",
        "/metrics",
        "/v1/jobs",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/events",
        "/v1/models/{model}/events",
        "/v1/models/{model}/edits/{edit_id}",
        "/v1/models/{model}/versions/{number}",
        "/v1/models/{model}/series/{name}",
        "/v1/models",
        "/v1/models/{model}/edits",
        "/v1/jobs/{job_id}",
        "/v1/models/{model}/versions",
        "/v1/models/{model}/rollback",
        "/v1/models/{model}/score",
        "/v1/models/{model}/generate",
        "/v1/models/{model}/evaluations",
        "/v1/models/{model}/evaluations/{evaluation_id}",
        "/v1/models/{model}/alerts",
        "/v1/models/{model}/policy",
        "/v1/models/{model}/guard-decisions",
        "/v1/models/{model}/exports",
        "/v1/models/{model}/exports/{export_id}",
        "/v1/models/{model}/exports/{export_id}/download",
        "/v1/models/{model}/imports",
    }
    assert client.get("/docs").status_code == 200


def test_the_dashboard_and_its_charting_library_are_served_offline(client: TestClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/dashboard/static/plotly.min.js" in page.text and "http" not in page.text.split(
        "<body>")[0].replace("http-equiv", "")  # fmt: skip
    js = client.get("/dashboard/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000  # plotly.js itself
    assert client.get("/dashboard/static/dashboard.js").status_code == 200
    assert client.get("/dashboard/static/../cli.py").status_code == 404
    assert client.get("/dashboard/static/secret.txt").status_code == 404
    assert client.get("/", follow_redirects=False).headers["location"] == "/dashboard"
