"""One router per resource; :mod:`service.api.main` includes them all."""

from service.api.routes import (
    dashboard,
    edits,
    evaluations,
    events,
    exports,
    health,
    jobs,
    models,
    reads,
    versions,
)

ROUTERS = [
    health.router,
    models.router,
    edits.router,
    jobs.router,
    versions.router,
    exports.router,
    evaluations.router,
    reads.router,
    events.router,
    dashboard.router,
]
