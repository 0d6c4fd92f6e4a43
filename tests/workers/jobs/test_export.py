"""Exports and imports through the service on the tiny LLaMA (docs/exports.md):
HTTP API → ledger → Redis → worker → artifact store → download. A patch export
applied onto a fresh copy of the base, and a Hugging Face export loaded with
``from_pretrained``, give the version's tensors exactly; a patch imported into a
second model of the same base becomes a version with the same hashes and edits;
what cannot work (adaptor state, another base, a non-archive, an oversized body)
is refused before anything is stored."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from redis import Redis
from safetensors.torch import load_file
from sqlalchemy import Engine
from transformers import AutoModelForCausalLM

from service.settings import GuardPolicy, ModelSpec, Settings
from tests import worker_harness as harness
from tests.conftest import LEDGER_TABLES
from tests.tars import tar_bytes
from tests.workers.jobs.test_edit import edit_body, grace_body
from workers.exporting import archive
from workers.exporting import patch as patches
from workers.runtime.hashing import tensor_sha256

pytestmark = pytest.mark.e2e

MODEL, TWIN = "tiny", "twin"


@pytest.fixture
def two_settings(model_settings: Callable[..., Settings], tiny_dir: Path) -> Settings:
    """Two models of the same base: ``tiny`` exports, ``twin`` imports."""
    spec = ModelSpec(source=str(tiny_dir), snapshot_every=3, guard=GuardPolicy(enabled=False))
    one = model_settings(MODEL, spec, sync_timeout_s=60.0)
    return one.model_copy(update={"models": {MODEL: spec, TWIN: spec}})


@pytest.fixture
def client(two_settings: Settings, app_client: Callable[[Settings], TestClient]) -> TestClient:
    return app_client(two_settings)


def _run(client: TestClient, settings: Settings, redis: Redis, model: str, job_id: str) -> Any:
    harness.drain(model, settings, redis)
    done = harness.job(client, job_id)
    assert done["status"] == "succeeded", done
    return done


def _export(client: TestClient, settings: Settings, redis: Redis, body: dict[str, Any]) -> tuple[dict[str, Any], bytes]:  # fmt: skip
    r = client.post(f"/v1/models/{MODEL}/exports", json=body)
    assert r.status_code == 202, r.text
    created = r.json()
    assert r.headers["location"] == f"/v1/models/{MODEL}/exports/{created['export_id']}"
    pending = client.get(r.headers["location"]).json()
    assert pending["status"] == "queued" and pending["download"] is None
    early = client.get(f"{r.headers['location']}/download")
    assert early.status_code == 409 and "has no archive" in early.json()["detail"]
    _run(client, settings, redis, MODEL, created["job_id"])
    row = client.get(r.headers["location"]).json()
    assert row["status"] == "succeeded" and row["download"] == f"{r.headers['location']}/download"
    got = client.get(row["download"])
    assert got.status_code == 200 and got.headers["content-type"] == "application/x-tar"
    assert hashlib.sha256(got.content).hexdigest() == row["sha256"] == got.headers["etag"].strip('"')  # fmt: skip
    assert len(got.content) == row["size_bytes"]
    return row, got.content


def _untar(data: bytes, dest: Path) -> Path:
    (dest.parent / f"{dest.name}.tar").write_bytes(data)
    archive.extract_tar(dest.parent / f"{dest.name}.tar", dest)
    return dest


def test_patch_and_hf_exports_and_an_import_reproduce_the_version(
    client: TestClient, two_settings: Settings, redis_conn: Redis, tiny_dir: Path, tmp_path: Path
) -> None:
    state = harness.start_worker(MODEL, two_settings)
    r = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(3, mom2_adjustment=False))
    _run(client, two_settings, redis_conn, MODEL, r.json()["job_id"])
    vs = harness.all_versions(client, MODEL)
    head = vs[-1]
    assert head["number"] == 3

    # a patch of the head: onto a fresh copy of the base, the head's tensors exactly
    row, data = _export(client, two_settings, redis_conn, {"format": "patch"})
    assert row["version"] == 3 and row["format"] == "patch"
    assert row["manifest"]["edits"] == 3 and row["manifest"]["tensors"] >= 1
    patch = patches.read_patch(_untar(data, tmp_path / "patch"))
    assert [e["subject"] for e in patch.manifest["edits"]] == ["Mozart", "Picasso", "Einstein"]
    assert patch.manifest["versions"] == [1, 2, 3]
    assert patch.manifest["base"]["source"] == str(tiny_dir)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_dir)
    hashes = patches.apply_to_model(patch, fresh)
    assert hashes == {n: head["tensor_sha256"][n] for n in patch.entries}
    assert set(patch.entries) == {n for n in head["tensor_sha256"]
                                  if head["tensor_sha256"][n] != vs[0]["tensor_sha256"][n]}  # fmt: skip
    assert state.runtime.current_version == 3  # the worker is back at the head

    # an hf export of version 1: from_pretrained gives version 1's tensors
    row, data = _export(client, two_settings, redis_conn, {"format": "hf", "version": 1})
    folder = _untar(data, tmp_path / "hf")
    assert json.loads((folder / "memedit.json").read_text())["version"] == 1
    assert "| Mozart |" in (folder / "README.md").read_text()
    weights = load_file(folder / "model.safetensors")
    for name, want in vs[1]["tensor_sha256"].items():
        assert tensor_sha256(weights[name]) == want, name
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.dtype == torch.float32
    assert state.runtime.current_version == 3

    # the patch imported into the twin (same base): a version with the head's tensors
    harness.start_worker(TWIN, two_settings)
    up = client.post(f"/v1/models/{TWIN}/imports", content=(tmp_path / "patch.tar").read_bytes(),
                     headers={"Content-Type": "application/x-tar"})  # fmt: skip
    assert up.status_code == 202, up.text
    done = _run(client, two_settings, redis_conn, TWIN, up.json()["job_id"])
    assert done["result"]["versions"] == [1] and done["result"]["tensor_sha256_equal"]
    twin = harness.all_versions(client, TWIN)
    assert (twin[1]["kind"], twin[1]["parent_number"], twin[1]["method"]) == ("import", 0, "import")
    assert {n: twin[1]["tensor_sha256"][n] for n in patch.entries} == hashes
    edits = client.get(f"/v1/models/{TWIN}/edits").json()["items"]
    assert [(e["subject"], e["status"], e["version"]) for e in edits] == [
        ("Mozart", "applied", 1), ("Picasso", "applied", 1), ("Einstein", "applied", 1)]  # fmt: skip
    # a worker started now replays the import from its artifact
    again = harness.start_worker(TWIN, two_settings)
    assert again.runtime.current_version == 1
    assert again.runtime.tensor_hashes(sorted(hashes)) == hashes


def _rows(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar_one()
                for t in LEDGER_TABLES}  # fmt: skip


def test_what_cannot_be_exported_or_imported_is_refused_and_stores_nothing(
    client: TestClient,
    two_settings: Settings,
    redis_conn: Redis,
    db_engine: Engine,
    app_client: Callable[[Settings], TestClient],
) -> None:
    harness.start_worker(MODEL, two_settings)
    r = client.post(f"/v1/models/{MODEL}/edits", json=grace_body(0))
    _run(client, two_settings, redis_conn, MODEL, r.json()["job_id"])
    uploads = Path(two_settings.artifact_dir) / "upload"
    before = _rows(db_engine)
    refused = client.post(f"/v1/models/{MODEL}/exports", json={"format": "hf"})
    assert refused.status_code == 409, refused.text
    assert "grace adaptor state" in refused.json()["detail"]
    unknown = client.post(f"/v1/models/{MODEL}/exports", json={"version": 9})
    assert unknown.status_code == 422 and "version" in unknown.text
    assert client.post(f"/v1/models/{MODEL}/exports", json={"format": "gguf"}).status_code == 422
    assert client.get(f"/v1/models/{MODEL}/exports/not-an-id").status_code == 404

    manifest = {"format": "memedit-patch", "format_version": 1, "edits": [],
                "tensors": {"model.layers.0.mlp.down_proj.weight": {"base_sha256": "0" * 64}}}  # fmt: skip
    bodies = {
        b"": 422,  # empty
        b"plain text": 422,  # not a tar
        tar_bytes({"x.txt": b"1"}): 422,  # no manifest
        tar_bytes({"manifest.json": json.dumps({**manifest, "format_version": 9}).encode()}): 422,
        tar_bytes({"manifest.json": json.dumps(manifest).encode()}): 409,  # another base
    }
    for body, status in bodies.items():
        got = client.post(f"/v1/models/{TWIN}/imports", content=body,
                          headers={"Content-Type": "application/x-tar"})  # fmt: skip
        assert got.status_code == status, (body[:40], got.text)
    capped = app_client(two_settings.model_copy(update={"max_upload_bytes": 100}))
    big = capped.post(f"/v1/models/{TWIN}/imports", content=tar_bytes({"manifest.json": b"{}" * 100}),
                      headers={"Content-Type": "application/x-tar"})  # fmt: skip
    assert big.status_code == 413 and "max_upload_bytes" in big.json()["detail"]
    assert _rows(db_engine) == before
    assert not uploads.exists() or not list(uploads.rglob("*.tar"))
