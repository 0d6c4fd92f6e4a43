"""Request and response bodies of the HTTP API (pydantic v2), one module per resource.

Requests (:class:`~service.schemas.common.Input`) forbid unknown fields, so a misspelt
field (``"paraphrases"``) is a 422 naming it rather than silently ignored. Responses
(:class:`~service.schemas.common.Public`) are filled from ORM rows with
``model_validate`` (``from_attributes``): the conversions a row needs (a version row
as its number, null JSON as empty, non-finite numbers as null) are declared on the
field types in :mod:`service.schemas.common`, once.
"""

from service.schemas.common import MAX_INT
from service.schemas.edits import (
    MAX_PROMPT_LIST,
    Batching,
    EditCreate,
    EditJobCreated,
    EditPublic,
    EditRequestIn,
    EditsPublic,
)
from service.schemas.errors import ErrorItem, ErrorPublic
from service.schemas.evaluations import (
    EvaluationCreate,
    EvaluationJobCreated,
    EvaluationPublic,
    EvaluationsPublic,
)
from service.schemas.exports import ExportCreate, ExportCreated, ExportPublic, export_public
from service.schemas.jobs import EventPublic, JobCreated, JobPage, JobPublic
from service.schemas.models import ModelPublic, PolicyUpdate
from service.schemas.reads import (
    DEFAULT_NEW_TOKENS,
    GenerateRequest,
    GenerateResponse,
    ScoreRequest,
    ScoreResponse,
)
from service.schemas.versions import (
    GuardDecisionPublic,
    GuardDecisionsPublic,
    RollbackCreate,
    SeriesPublic,
    VersionDetailPublic,
    VersionPublic,
    VersionsPublic,
)
from service.schemas.workers import WorkerPublic

__all__ = [
    "DEFAULT_NEW_TOKENS",
    "MAX_INT",
    "MAX_PROMPT_LIST",
    "Batching",
    "EditCreate",
    "EditJobCreated",
    "EditPublic",
    "EditRequestIn",
    "EditsPublic",
    "ErrorItem",
    "ErrorPublic",
    "EvaluationCreate",
    "EvaluationJobCreated",
    "EvaluationPublic",
    "EvaluationsPublic",
    "ExportCreate",
    "ExportCreated",
    "ExportPublic",
    "export_public",
    "GenerateRequest",
    "GenerateResponse",
    "GuardDecisionPublic",
    "GuardDecisionsPublic",
    "JobCreated",
    "EventPublic",
    "JobPage",
    "JobPublic",
    "ModelPublic",
    "PolicyUpdate",
    "RollbackCreate",
    "ScoreRequest",
    "ScoreResponse",
    "SeriesPublic",
    "VersionDetailPublic",
    "VersionPublic",
    "VersionsPublic",
    "WorkerPublic",
]
