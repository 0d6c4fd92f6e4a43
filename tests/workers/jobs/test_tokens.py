"""Prompt lengths in tokens (workers/tokens.py), end to end on a tiny model: an edit
job with a text longer than the worker takes fails by itself, naming the field, while
the job batched with it is applied; score and generate answer 422."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.settings import GuardPolicy, ModelSpec, Settings
from tests import worker_harness as harness
from tests.workers.jobs.test_edit import MODEL, edit_body
from workers import tokens

pytestmark = pytest.mark.e2e

LIMIT = 24  # tokens


@pytest.fixture
def settings(model_settings: Callable[..., Settings], tiny_dir: Path) -> Settings:
    spec = ModelSpec(source=str(tiny_dir), guard=GuardPolicy(enabled=False), max_wait_ms=2000)
    return model_settings(MODEL, spec, sync_timeout_s=60.0, max_prompt_tokens=LIMIT)


def test_texts_too_long_in_tokens_are_refused_naming_the_field(
    settings: Settings, app_client: Callable[[Settings], TestClient], redis_conn: Redis
) -> None:
    client = app_client(settings)
    state = harness.start_worker(MODEL, settings)
    long_prompt = "Mozart was born in the city that " + "lies far away " * 20
    assert tokens.count(state.runtime.tokenizer, long_prompt) > LIMIT

    too_long = edit_body(2, method="memit")
    too_long["requests"][1]["paraphrase_prompts"] = [long_prompt]
    fine = edit_body(1, method="memit")
    fine["requests"][0]["subject"] = "Bach"
    bad = client.post(f"/v1/models/{MODEL}/edits", json=too_long)
    good = client.post(f"/v1/models/{MODEL}/edits", json=fine)
    assert bad.status_code == 202 and good.status_code == 202
    harness.drain(MODEL, settings, redis_conn)

    failed = harness.job(client, bad.json()["job_id"])
    assert failed["status"] == "failed", failed
    assert "requests.1.paraphrase_prompts.0" in failed["error"], failed["error"]
    assert f"at most {LIMIT}" in failed["error"]
    done = harness.job(client, good.json()["job_id"])
    assert done["status"] == "succeeded", done
    assert done["result"]["versions"] == [1]  # the refused job's requests are in no version
    edits = client.get(f"/v1/models/{MODEL}/edits").json()["items"]
    assert sorted(e["status"] for e in edits) == ["applied", "failed", "failed"]

    answers: dict[str, Any] = {}

    def ask() -> None:
        answers["score"] = client.post(
            f"/v1/models/{MODEL}/score",
            json={"prompts": ["Bach was born in", long_prompt], "targets": ["Rome", "Rome"]},
        )
        answers["generate"] = client.post(
            f"/v1/models/{MODEL}/generate", json={"prompt": long_prompt, "max_new_tokens": 2}
        )
        answers["fine"] = client.post(
            f"/v1/models/{MODEL}/generate", json={"prompt": "Bach was born in", "max_new_tokens": 2}
        )

    harness.while_draining(MODEL, settings, redis_conn, ask)
    score, gen, ok = answers["score"], answers["generate"], answers["fine"]
    assert score.status_code == 422, score.text
    assert score.json()["errors"][0]["field"] == "prompts.1" and "tokens" in score.json()["detail"]
    assert gen.status_code == 422 and gen.json()["errors"][0]["field"] == "prompt", gen.text
    assert ok.status_code == 200 and ok.json()["version"] == 1, ok.text


def test_generate_must_fit_the_models_context(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    context = tokens.context_length(model)
    assert context is not None
    assert tokens.token_limit(model, 10**6) == context
    with pytest.raises(tokens.PromptTooLong) as refused:
        tokens.check_generate(tok, model, "Mozart was born in", context, 10**6)
    assert refused.value.field == "max_new_tokens"
    tokens.check_generate(tok, model, "Mozart was born in", 2, 10**6)


def test_an_edits_limit_leaves_room_for_the_context_templates(tiny_dir: Path) -> None:
    from types import SimpleNamespace

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dir)
    model = SimpleNamespace(config=config)
    context = tokens.context_length(model)
    assert context is not None
    templates = SimpleNamespace(context_template_length_params=((5, 2), (10, 3)))
    assert tokens.edit_limit(model, 10**6, templates) == context - 11
    assert tokens.edit_limit(model, 8, templates) == 8
    assert tokens.edit_limit(model, 10**6, SimpleNamespace()) == context
