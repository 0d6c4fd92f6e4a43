"""Evaluation suites as the service knows them: names, parameter schemas, policies.

The service never imports :mod:`workers` (the suites run torch), so it keeps its
own list of suite names and validates each suite's ``params`` with a pydantic
class here before anything is stored. The worker's registry
(``workers/evaluation/suites.py``) maps the same names to the suite functions; a
test checks that both name the same five suites.

Suites and their parameters (docs/api.md, "Evaluations"):

- ``counterfact`` / ``zsre``: records inline (``records``) or a JSONL file
  (``data_path``, read from ``offset``, at most ``limit`` records).
- ``retention``: no records; the worker fills ``edits`` from the ledger (every
  edit applied on the evaluated version's chain); ``limit`` scores an evenly
  spaced sample of them.
- ``downstream``: few-shot tasks from ``data_dir`` (``<task>.jsonl``).
- ``fluency``: greedy generations and a fixed text set shipped with the code.

Data paths are resolved by the worker against its data root (``Settings.data_root``);
the API refuses paths that climb out of it with ``..`` (:func:`check_relative_path`),
and the worker refuses any path that resolves outside it (:func:`resolve_data_path`).

A model's evaluation policy (:class:`EvaluationPolicy`) runs a suite every N
versions and compares its metrics with thresholds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from service.errors import InvalidInput
from service.validation import CompletePrompt, Template, Text

SuiteName = Literal["counterfact", "zsre", "retention", "downstream", "fluency"]
SUITE_NAMES: tuple[str, ...] = ("counterfact", "zsre", "retention", "downstream", "fluency")

MAX_INLINE_RECORDS = 1000  # records given in the request body
MAX_PROMPTS = 64
MAX_POLICIES = 16
DOWNSTREAM_TASKS = ("sst2", "mrpc", "rte", "cola", "nli", "mmlu")


def check_relative_path(path: str) -> str:
    """Refuse a path that leaves the data root by ``..``, or holds a NUL byte.

    Absolute paths pass here: only the worker knows its data root, and it checks
    them (:func:`resolve_data_path`).
    """
    if "\x00" in path:
        raise ValueError("must not contain a NUL byte")
    if not PurePosixPath(path).is_absolute():
        depth = 0
        for part in PurePosixPath(path).parts:
            depth += -1 if part == ".." else (0 if part == "." else 1)
            if depth < 0:
                raise ValueError("must stay inside the worker's data root (no leading '..')")
    return path


DataPath = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=1024),
    AfterValidator(check_relative_path),
]


def resolve_data_path(root: Path, path: str) -> Path:
    """``path`` (relative to ``root``, or absolute) as an absolute path inside ``root``.

    Symbolic links are resolved before the check, so a link pointing out of the
    root is refused too. Raises ``ValueError`` naming the path otherwise. The file
    need not exist (the suite reports a missing file).
    """
    check_relative_path(path)
    base = root.expanduser().resolve()
    candidate = Path(path).expanduser()
    resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
    if not resolved.is_relative_to(base):
        raise ValueError(f"data path {path!r} is outside the worker's data root {str(base)!r}")
    return resolved


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Record(BaseModel):
    # records as the data files hold them: fields the suite does not read are kept
    model_config = ConfigDict(extra="allow")


# -- counterfact ------------------------------------------------------------------------


class _Target(_Record):
    str: Text  # CounterFact's own key


class _Rewrite(_Record):
    prompt: Template
    subject: Text
    target_new: _Target
    target_true: _Target


class CounterFactRecord(_Record):
    """One CounterFact record (../shared/data/README.md, "CounterFact")."""

    case_id: int | None = None
    requested_rewrite: _Rewrite
    paraphrase_prompts: list[CompletePrompt] = Field(default_factory=list, max_length=MAX_PROMPTS)
    neighborhood_prompts: list[CompletePrompt] = Field(default_factory=list, max_length=MAX_PROMPTS)


class _RecordSource(_Params):
    data_path: DataPath | None = Field(
        None, description="JSONL file, relative to the worker's data root"
    )
    offset: int = Field(
        0, ge=0, strict=True, description="records to skip at the start of the file"
    )
    limit: int | None = Field(None, ge=1, strict=True, description="most records evaluated")

    @model_validator(mode="after")
    def _one_source(self) -> _RecordSource:
        records = getattr(self, "records", None)
        if (records is None) == (self.data_path is None):
            raise ValueError("give either records or data_path (exactly one)")
        return self


class CounterFactParams(_RecordSource):
    records: list[CounterFactRecord] | None = Field(
        None, min_length=1, max_length=MAX_INLINE_RECORDS
    )


# -- zsre -------------------------------------------------------------------------------


class ZsreRecord(_Record):
    """One zsRE record in MEND's format (../shared/data/README.md, "zsRE")."""

    subject: Text
    src: Text
    answers: list[Text] = Field(min_length=1)
    rephrase: Text
    loc: Text
    loc_ans: Text

    @model_validator(mode="after")
    def _subject_in_question(self) -> ZsreRecord:
        if self.subject not in self.src:
            raise ValueError("subject must occur in src (the prompt replaces it with {})")
        return self


class ZsreParams(_RecordSource):
    records: list[ZsreRecord] | None = Field(None, min_length=1, max_length=MAX_INLINE_RECORDS)


# -- retention, downstream, fluency ---------------------------------------------------


class RetentionParams(_Params):
    """The worker adds ``edits`` (every edit on the version's chain, in order)."""

    limit: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="score an evenly spaced sample of at most this many edits",
    )


TaskName = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
]


class DownstreamParams(_Params):
    tasks: list[TaskName] = Field(
        default_factory=lambda: list(DOWNSTREAM_TASKS), min_length=1, max_length=32
    )
    shots: int | None = Field(
        None, ge=0, le=10, strict=True, description="few-shot examples per query"
    )
    limit: Annotated[int, Field(ge=1, strict=True)] | Literal["all"] | None = Field(
        None,
        description='test examples per task (default 10: a few minutes on a CPU); "all": '
        "every test example of each task (hours on a CPU)",
    )
    data_dir: DataPath | None = Field(
        None, description="folder of <task>.jsonl, relative to the worker's data root"
    )


class FluencyParams(_Params):
    max_new_tokens: int | None = Field(None, ge=1, le=512, strict=True)
    prompts: list[CompletePrompt] | None = Field(None, min_length=1, max_length=MAX_PROMPTS)


SUITE_PARAMS: dict[str, type[BaseModel]] = {
    "counterfact": CounterFactParams,
    "zsre": ZsreParams,
    "retention": RetentionParams,
    "downstream": DownstreamParams,
    "fluency": FluencyParams,
}


def check_suite_params(suite: str, params: Mapping[str, Any] | None, field: str = "params") -> dict:
    """Validate ``params`` for ``suite``; return them as JSON (defaults not filled in).

    Raises :class:`InvalidInput` naming the field (``params.records.0.subject``).
    """
    if suite not in SUITE_PARAMS:
        raise InvalidInput("suite", f"unknown suite {suite!r}; known: {', '.join(SUITE_NAMES)}")
    if suite == "retention" and params and "edits" in params:
        raise InvalidInput(
            f"{field}.edits", "is filled by the worker from the ledger; do not send it"
        )
    try:
        parsed = SUITE_PARAMS[suite].model_validate(dict(params or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [field, *(str(p) for p in err["loc"])]
        raise InvalidInput(".".join(loc), err["msg"].removeprefix("Value error, ")) from None
    return parsed.model_dump(mode="json", exclude_unset=True)


# -- policies ---------------------------------------------------------------------------


class Threshold(_Params):
    """A bound on one metric: the evaluation breaches it below ``min`` or above ``max``."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _some_bound(self) -> Threshold:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not exceed max")
        return self


PolicyName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]


class EvaluationPolicy(_Params):
    """Run ``suite`` after every version whose number is a multiple of ``every_versions``.

    A finished run whose metrics breach a threshold records an alert; with
    ``action: "rollback"`` the worker also queues a rollback to the last healthy
    version (docs/api.md, "Evaluation policies").
    """

    name: PolicyName | None = Field(None, description="unique per model; default: the suite's name")
    suite: SuiteName
    params: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    every_versions: int = Field(ge=1, le=100_000, strict=True)
    thresholds: dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], Threshold] = (
        Field(default_factory=dict)
    )
    action: Literal["alert", "rollback"] = "alert"

    @field_validator("params")
    @classmethod
    def _suite_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        suite = info.data.get("suite")
        if suite is None:
            return params  # the suite's own error is reported
        try:
            return check_suite_params(suite, params, field="params")
        except InvalidInput as exc:
            sub = exc.field.removeprefix("params").removeprefix(".")
            raise ValueError(f"{sub}: {exc.message}" if sub else exc.message) from None

    @model_validator(mode="after")
    def _check(self) -> EvaluationPolicy:
        if self.name is None:
            self.name = self.suite
        if self.action == "rollback" and not self.thresholds:
            raise ValueError("a rollback policy needs thresholds")
        return self

    @property
    def key(self) -> str:
        return self.name or self.suite


def check_policies(policies: list[EvaluationPolicy]) -> list[EvaluationPolicy]:
    names = [p.key for p in policies]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(
                f"policy name {name!r} is used twice (give each policy of one suite a name)"
            )
    return policies


EvaluationPolicies = Annotated[
    list[EvaluationPolicy], Field(max_length=MAX_POLICIES), AfterValidator(check_policies)
]


def breaches(
    metrics: Mapping[str, Any], thresholds: Mapping[str, Mapping[str, float | None]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The thresholds ``metrics`` breaches, and the thresholded metrics it lacks.

    A breach is ``{"metric", "value", "min"|"max"}``; a metric that is not a finite
    number breaches every bound on it. A missing metric is not a breach (a policy
    naming a metric its suite does not report raises an alert, never a rollback).
    """
    out: list[dict[str, Any]] = []
    missing: list[str] = []
    for name, bound in thresholds.items():
        if name not in metrics or metrics[name] is None:
            missing.append(name)
            continue
        value = metrics[name]
        ok_number = isinstance(value, int | float) and value == value and abs(value) != float("inf")
        for side in ("min", "max"):
            limit = bound.get(side)
            if limit is None:
                continue
            bad = (
                not ok_number
                or (side == "min" and value < limit)
                or (side == "max" and value > limit)
            )
            if bad:
                out.append({"metric": name, "value": value, side: limit})
    return out, missing
