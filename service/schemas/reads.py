"""Score and generate: answered by the model's worker while the client waits."""

from __future__ import annotations

from pydantic import BaseModel, Field

from service.schemas.common import BodyInt, Input
from service.validation import Text

DEFAULT_NEW_TOKENS = 20  # generate's max_new_tokens when the client gives none


class ScoreRequest(Input):
    prompts: list[Text] = Field(min_length=1, examples=[["The Eiffel Tower is located in"]])
    targets: list[Text] = Field(min_length=1, examples=[["Rome"]])
    version: BodyInt | None = Field(None, description="the version to score (default: the head)")


class ScoreResponse(BaseModel):
    logprobs: list[float] = Field(
        description='mean per-token log-probability of " " + target after each prompt'
    )
    version: int


class GenerateRequest(Input):
    prompt: Text = Field(examples=["The Eiffel Tower is located in"])
    max_new_tokens: BodyInt | None = Field(
        None, ge=1, description=f"default {DEFAULT_NEW_TOKENS} (or the server's maximum, if lower)"
    )
    version: BodyInt | None = Field(
        None, description="the version that continues the prompt (default: the head)"
    )


class GenerateResponse(BaseModel):
    text: str
    version: int
