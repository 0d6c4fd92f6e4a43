"""A typed Python client of the memedit API (httpx), sync (:class:`Client`) and async
(:class:`AsyncClient`), covering every route, with what an application needs around
jobs: ``client.edit(...).wait()`` and ``.events()``.

    from service.client import Client

    with Client("http://127.0.0.1:8000", key="mk_…") as memedit:
        job = memedit.edit("smollm2-135m", [{"prompt": "{} is located in",
                                             "subject": "The Eiffel Tower",
                                             "target_new": "Rome"}], method="rome")
        done = job.wait()            # JobPublic, status succeeded (JobFailed otherwise)
        print(memedit.score("smollm2-135m", ["The Eiffel Tower is located in"], ["Rome"]))

- Answers are the API's own pydantic models (:mod:`service.schemas`).
- An error answer raises :class:`ApiError` (``status``, ``detail``, ``field``,
  ``retry_after``). A ``503`` or ``429`` with ``Retry-After`` is retried up to
  ``retries`` times; every POST that creates work carries an ``Idempotency-Key`` made
  here, so a retry never creates a second job.
- ``AsyncClient`` has the same methods; each returns an awaitable, ``events`` an async
  iterator.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
from pydantic import BaseModel

from service.client_http import (
    FINAL,
    ApiError,
    JobFailed,
    _Call,
    _clean,
    _error,
    _events,
    _headers,
    _outcome,
)
from service.schemas import (
    EditJobCreated,
    EditPublic,
    EditsPublic,
    EvaluationJobCreated,
    EvaluationPublic,
    EvaluationsPublic,
    EventPublic,
    ExportCreated,
    ExportPublic,
    GenerateResponse,
    GuardDecisionsPublic,
    JobCreated,
    JobPage,
    JobPublic,
    ModelPublic,
    ScoreResponse,
    SeriesPublic,
    VersionDetailPublic,
    VersionsPublic,
)

__all__ = ["FINAL", "ApiError", "AsyncClient", "Client", "Job", "JobFailed"]


class _Routes:
    """Every route once, as a :class:`_Call`; the subclasses run them."""

    def _do(self, call: _Call) -> Any:
        raise NotImplementedError

    # -- health, models ------------------------------------------------------------------
    def health(self) -> Any:
        return self._do(_Call("GET", "/healthz"))

    def workers(self) -> Any:
        return self._do(_Call("GET", "/healthz/workers"))

    def metrics(self) -> Any:
        return self._do(_Call("GET", "/metrics", parse=str))

    def models(self) -> Any:
        return self._do(_Call("GET", "/v1/models", parse=[ModelPublic]))

    def set_policy(self, model: str, evaluations: Sequence[Mapping[str, Any]]) -> Any:
        return self._do(_Call("PUT", f"/v1/models/{model}/policy", ModelPublic,
                              body={"evaluations": list(evaluations)}))  # fmt: skip

    # -- edits -------------------------------------------------------------------------------
    def _edit(
        self,
        model: str,
        requests: Sequence[Mapping[str, Any]],
        method: str = "rome",
        hparams: Mapping[str, Any] | None = None,
        batching: str = "auto",
    ) -> Any:
        body = _clean({"method": method, "requests": list(requests), "hparams": hparams,
                       "batching": batching})  # fmt: skip
        return self._do(_Call("POST", f"/v1/models/{model}/edits", EditJobCreated, body=body,
                              work=True))  # fmt: skip

    def edits(self, model: str, **filters: Any) -> Any:
        """A page of edits; ``status``, ``subject``, ``method``, ``since``, ``until``,
        ``min_version``, ``max_version``, ``limit``, ``cursor``."""
        return self._do(_Call("GET", f"/v1/models/{model}/edits", EditsPublic, _clean(filters)))

    def edit_of(self, model: str, edit_id: int) -> Any:
        return self._do(_Call("GET", f"/v1/models/{model}/edits/{edit_id}", EditPublic))

    # -- jobs --------------------------------------------------------------------------------
    def job(self, job_id: str) -> Any:
        return self._do(_Call("GET", f"/v1/jobs/{job_id}", JobPublic))

    def jobs(self, **filters: Any) -> Any:
        """A page of jobs, newest first; ``model``, ``status``, ``kind``, ``limit``, ``cursor``."""
        return self._do(_Call("GET", "/v1/jobs", JobPage, _clean(filters)))

    def cancel(self, job_id: str) -> Any:
        return self._do(_Call("POST", f"/v1/jobs/{job_id}/cancel", JobPublic))

    # -- versions ----------------------------------------------------------------------------
    def versions(self, model: str, **filters: Any) -> Any:
        return self._do(_Call("GET", f"/v1/models/{model}/versions", VersionsPublic,
                              _clean(filters)))  # fmt: skip

    def version(self, model: str, number: int) -> Any:
        return self._do(_Call("GET", f"/v1/models/{model}/versions/{number}", VersionDetailPublic))

    def series(self, model: str, name: str, suite: str | None = None) -> Any:
        return self._do(_Call("GET", f"/v1/models/{model}/series/{name}", SeriesPublic,
                              _clean({"suite": suite})))  # fmt: skip

    def _rollback(self, model: str, to_version: int) -> Any:
        return self._do(_Call("POST", f"/v1/models/{model}/rollback", JobCreated,
                              body={"to_version": to_version}, work=True))  # fmt: skip

    def _export(self, model: str, version: int | None, format: str) -> Any:
        return self._do(_Call("POST", f"/v1/models/{model}/exports", ExportCreated,
                              body=_clean({"version": version, "format": format}), work=True))  # fmt: skip

    def export_of(self, model: str, export_id: str) -> Any:
        return self._do(_Call("GET", f"/v1/models/{model}/exports/{export_id}", ExportPublic))

    def guard_decisions(self, model: str, **filters: Any) -> Any:
        return self._do(_Call("GET", f"/v1/models/{model}/guard-decisions", GuardDecisionsPublic,
                              _clean(filters)))  # fmt: skip

    # -- evaluations ---------------------------------------------------------------------------
    def _evaluate(
        self,
        model: str,
        suite: str,
        version: int | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        body = _clean({"suite": suite, "version": version, "params": params})
        return self._do(_Call("POST", f"/v1/models/{model}/evaluations", EvaluationJobCreated,
                              body=body, work=True))  # fmt: skip

    def evaluations(self, model: str, **filters: Any) -> Any:
        return self._do(_Call("GET", f"/v1/models/{model}/evaluations", EvaluationsPublic,
                              _clean(filters)))  # fmt: skip

    def evaluation(self, model: str, evaluation_id: int) -> Any:
        return self._do(_Call("GET", f"/v1/models/{model}/evaluations/{evaluation_id}",
                              EvaluationPublic))  # fmt: skip

    def alerts(self, model: str, **filters: Any) -> Any:
        return self._do(_Call("GET", f"/v1/models/{model}/alerts", EvaluationsPublic,
                              _clean(filters)))  # fmt: skip

    # -- reads ---------------------------------------------------------------------------------
    def score(
        self, model: str, prompts: Sequence[str], targets: Sequence[str], version: int | None = None
    ) -> Any:
        body = _clean({"prompts": list(prompts), "targets": list(targets), "version": version})
        return self._do(_Call("POST", f"/v1/models/{model}/score", ScoreResponse, body=body))

    def generate(
        self,
        model: str,
        prompt: str,
        max_new_tokens: int | None = None,
        version: int | None = None,
    ) -> Any:
        body = _clean({"prompt": prompt, "max_new_tokens": max_new_tokens, "version": version})
        return self._do(_Call("POST", f"/v1/models/{model}/generate", GenerateResponse, body=body))


class Job:
    """A job the sync client created or named: ``wait`` for it, follow its ``events``."""

    def __init__(self, client: Client, job_id: str, created: BaseModel | None = None) -> None:
        self.client, self.id, self.created = client, job_id, created

    def get(self) -> JobPublic:
        return self.client.job(self.id)

    def wait(self, timeout: float | None = None, poll_s: float = 0.5) -> JobPublic:
        """The finished job; :class:`JobFailed` if it failed or was cancelled,
        ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get()
            if job.status.value in FINAL:
                if job.status.value != "succeeded":
                    raise JobFailed(job)
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.id} is still {job.status.value}")
            time.sleep(poll_s)

    def events(self, after: int | None = None) -> Iterator[EventPublic]:
        """The job's events until its final status (docs/api.md#event-streams)."""
        return self.client.job_events(self.id, after=after)

    def cancel(self) -> JobPublic:
        return self.client.cancel(self.id)


class Client(_Routes):
    """The sync client (module doc)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        key: str | None = None,
        *,
        timeout: float = 150.0,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout,
                                 transport=transport)  # fmt: skip
        self.retries = retries

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _do(self, call: _Call) -> Any:
        headers = _headers(call)
        for attempt in range(self.retries + 1):
            r = self.http.request(call.method, call.path, params=call.params, json=call.body,
                                  headers=headers)  # fmt: skip
            pause = _outcome(call, r, attempt, self.retries)
            if not isinstance(pause, float):
                return pause.value
            time.sleep(pause)
        raise AssertionError("unreachable")

    # the POSTs that create work answer a handle
    def edit(self, model: str, requests: Sequence[Mapping[str, Any]], method: str = "rome",
             hparams: Mapping[str, Any] | None = None, batching: str = "auto") -> Job:  # fmt: skip
        created = self._edit(model, requests, method, hparams, batching)
        return Job(self, created.job_id, created)

    def rollback(self, model: str, to_version: int) -> Job:
        created = self._rollback(model, to_version)
        return Job(self, created.job_id, created)

    def evaluate(self, model: str, suite: str, version: int | None = None,
                 params: Mapping[str, Any] | None = None) -> Job:  # fmt: skip
        created = self._evaluate(model, suite, version, params)
        return Job(self, created.job_id, created)

    def export(self, model: str, version: int | None = None, format: str = "hf") -> Job:
        """An export job (``job.created.export_id`` names the export)."""
        created = self._export(model, version, format)
        return Job(self, created.job_id, created)

    def download_export(self, model: str, export_id: str, dest: Path) -> int:
        """Stream the export's tar archive to ``dest``; its size in bytes."""
        url = f"/v1/models/{model}/exports/{export_id}/download"
        with self.http.stream("GET", url) as r:
            if r.status_code != 200:
                r.read()
                _outcome(_Call("GET", url), r, self.retries, self.retries)
            size = 0
            with dest.open("wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
                    size += len(chunk)
        return size

    def import_patch(self, model: str, archive: Path) -> Job:
        """Upload a patch archive (``memedit export --format patch``) to apply it onto
        this deployment's base: an import job."""
        call = _Call("POST", f"/v1/models/{model}/imports", JobCreated, work=True)
        headers = {**_headers(call), "Content-Type": "application/x-tar"}
        with archive.open("rb") as f:
            r = self.http.post(call.path, content=f, headers=headers)
        created = _outcome(call, r, self.retries, self.retries).value
        return Job(self, created.job_id, created)

    def job_handle(self, job_id: str) -> Job:
        return Job(self, job_id)

    def job_events(self, job_id: str, after: int | None = None) -> Iterator[EventPublic]:
        yield from self._stream(f"/v1/jobs/{job_id}/events", after, follow=True)

    def model_events(self, model: str, after: int | None = None,
                     follow: bool = True) -> Iterator[EventPublic]:  # fmt: skip
        yield from self._stream(f"/v1/models/{model}/events", after, follow)

    def _stream(self, path: str, after: int | None, follow: bool) -> Iterator[EventPublic]:
        """The stream's events, reconnecting after the server closes a long one."""
        last = after
        while True:
            params = _clean({"after": last, "follow": "false" if not follow else None})
            ended = False
            with self.http.stream("GET", path, params=params, timeout=None) as r:
                if not r.is_success:
                    r.read()
                    raise _error(r)
                for event in _events(r.iter_lines()):
                    last = event.id or last
                    yield event
                    if event.kind == "status" and event.data.get("status") in FINAL:
                        ended = "/v1/jobs/" in path
                ended = ended or not follow
            if ended:
                return


class AsyncClient(_Routes):
    """The async client: the same methods, each an awaitable (module doc)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        key: str | None = None,
        *,
        timeout: float = 150.0,
        retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout,
                                      transport=transport)  # fmt: skip
        self.retries = retries

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def _run(self, call: _Call) -> Any:
        headers = _headers(call)
        for attempt in range(self.retries + 1):
            r = await self.http.request(call.method, call.path, params=call.params,
                                        json=call.body, headers=headers)  # fmt: skip
            pause = _outcome(call, r, attempt, self.retries)
            if not isinstance(pause, float):
                return pause.value
            await anyio.sleep(pause)
        raise AssertionError("unreachable")

    def _do(self, call: _Call) -> Any:
        return self._run(call)

    async def edit(self, model: str, requests: Sequence[Mapping[str, Any]], method: str = "rome",
                   hparams: Mapping[str, Any] | None = None, batching: str = "auto") -> Any:  # fmt: skip
        return await self._edit(model, requests, method, hparams, batching)

    async def rollback(self, model: str, to_version: int) -> Any:
        return await self._rollback(model, to_version)

    async def export(self, model: str, version: int | None = None, format: str = "hf") -> Any:
        return await self._export(model, version, format)

    async def evaluate(self, model: str, suite: str, version: int | None = None,
                       params: Mapping[str, Any] | None = None) -> Any:  # fmt: skip
        return await self._evaluate(model, suite, version, params)

    async def wait(self, job_id: str, timeout: float | None = None,
                   poll_s: float = 0.5) -> JobPublic:  # fmt: skip
        """The finished job (:meth:`Job.wait`)."""
        with anyio.fail_after(timeout):
            while True:
                job = await self.job(job_id)
                if job.status.value in FINAL:
                    if job.status.value != "succeeded":
                        raise JobFailed(job)
                    return job
                await anyio.sleep(poll_s)

    async def job_events(self, job_id: str, after: int | None = None) -> AsyncIterator[EventPublic]:
        """The job's events until its final status."""
        async for event in self._stream(f"/v1/jobs/{job_id}/events", after, follow=True):
            yield event

    async def model_events(self, model: str, after: int | None = None,
                           follow: bool = True) -> AsyncIterator[EventPublic]:  # fmt: skip
        """What happens to the model (until the client stops iterating)."""
        async for event in self._stream(f"/v1/models/{model}/events", after, follow):
            yield event

    async def _stream(self, path: str, after: int | None,
                      follow: bool) -> AsyncIterator[EventPublic]:  # fmt: skip
        last = after
        while True:
            params = _clean({"after": last, "follow": "false" if not follow else None})
            ended = not follow
            async with self.http.stream("GET", path, params=params, timeout=None) as r:
                if not r.is_success:
                    await r.aread()
                    raise _error(r)
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    event = EventPublic.model_validate(json.loads(line[6:]))
                    last = event.id or last
                    yield event
                    final = event.kind == "status" and event.data.get("status") in FINAL
                    ended = ended or (final and "/v1/jobs/" in path)
            if ended:
                return
