"""Score and generate: answered by the model's worker while the client waits
(:func:`service.queue.call_read`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session

from service import ledger, queue
from service.api.auth import requires
from service.api.deps import SYNC_ERRORS, ReadsRedisDep, SessionDep, SettingsDep
from service.errors import InvalidInput
from service.schemas import (
    DEFAULT_NEW_TOKENS,
    GenerateRequest,
    GenerateResponse,
    ScoreRequest,
    ScoreResponse,
)

router = APIRouter(tags=["reads"], dependencies=[Depends(requires("reads"))])


@router.post("/v1/models/{model}/score", responses=SYNC_ERRORS)
def score(
    model: str,
    body: ScoreRequest,
    session: SessionDep,
    redis: ReadsRedisDep,
    settings: SettingsDep,
) -> ScoreResponse:
    """Mean per-token log-probability of ``" " + target`` after each prompt, at the
    head or the version asked for."""
    if len(body.targets) != len(body.prompts):
        raise InvalidInput(
            "targets",
            f"needs one target per prompt ({len(body.targets)} targets, "
            f"{len(body.prompts)} prompts)",
        )
    if len(body.prompts) > settings.max_prompts_per_score:
        raise InvalidInput(
            "prompts", f"at most {settings.max_prompts_per_score} prompts per request"
        )
    _release_after_lookup(session, model, body.version)
    kwargs = {"model": model, "prompts": body.prompts, "targets": body.targets}
    if body.version is not None:
        kwargs["version"] = body.version
    return ScoreResponse.model_validate(queue.call_read(redis, settings, model, "score", kwargs))


@router.post("/v1/models/{model}/generate", responses=SYNC_ERRORS)
def generate(
    model: str,
    body: GenerateRequest,
    session: SessionDep,
    redis: ReadsRedisDep,
    settings: SettingsDep,
) -> GenerateResponse:
    """Greedy continuation of ``prompt`` by the head or the version asked for."""
    max_new_tokens = body.max_new_tokens or min(DEFAULT_NEW_TOKENS, settings.max_new_tokens)
    if max_new_tokens > settings.max_new_tokens:
        raise InvalidInput("max_new_tokens", f"must be at most {settings.max_new_tokens}")
    _release_after_lookup(session, model, body.version)
    kwargs = {"model": model, "prompt": body.prompt, "max_new_tokens": max_new_tokens}
    if body.version is not None:
        kwargs["version"] = body.version
    answer = queue.call_read(redis, settings, model, "generate", kwargs)
    return GenerateResponse.model_validate(answer)


def _release_after_lookup(session: Session, model: str, version: int | None) -> None:
    """404 for an unknown model, 422 for a version it does not have; then give the
    connection back before waiting on a worker."""
    row = ledger.get_model(session, model)
    if version is not None:
        ledger.require_version(session, row, version, "version")
    session.close()
