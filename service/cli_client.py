"""The operator's commands on a running service, through :mod:`service.client`:
``memedit edit``, ``memedit jobs list|show|watch|cancel``, ``memedit versions``,
``memedit rollback`` and ``memedit eval``. Each takes ``--url`` (``MEMEDIT_URL``) and
``--key`` (``MEMEDIT_KEY``), prints a table for people and JSON with ``--json``."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from service.client import FINAL, ApiError, Client, Job, JobFailed
from service.records import read_requests
from service.settings import DEFAULT_MODEL

Url = Annotated[str, typer.Option(envvar="MEMEDIT_URL", help="The service's address.")]
Key = Annotated[
    str | None, typer.Option(envvar="MEMEDIT_KEY", help="An API key (memedit keys create).")
]
AsJson = Annotated[bool, typer.Option("--json", help="JSON for scripts instead of a table.")]
Model = Annotated[str, typer.Option(help="The model.")]
Wait = Annotated[bool, typer.Option(help="Wait for the job to end.")]
DEFAULT_URL = "http://127.0.0.1:8000"

jobs_app = typer.Typer(help="List, show, follow and cancel jobs.", no_args_is_help=True)


@contextmanager
def _client(url: str, key: str | None) -> Iterator[Client]:
    """The client; an API error, a failed job or an unreachable service ends the
    command with its message and exit code 1."""
    try:
        with Client(url, key) as client:
            yield client
    except (ApiError, JobFailed, httpx.HTTPError) as exc:
        raise _fail(exc) from None


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


def _dump(value: Any) -> str:
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if hasattr(v, "model_dump") else v for v in value]
    return json.dumps(value, indent=2, sort_keys=True)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Rows as aligned columns."""
    cells = [[str(h) for h in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]  # fmt: skip
    return "\n".join(lines)


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else ""


# -- edit --------------------------------------------------------------------------------------


def edit(
    model: Model = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="Editing method (docs/editing.md).")] = "rome",
    prompt: Annotated[str | None, typer.Option(help='Template, "{} is located in".')] = None,
    subject: Annotated[str | None, typer.Option(help="The subject for {}.")] = None,
    target_new: Annotated[str | None, typer.Option(help="The new object.")] = None,
    target_true: Annotated[str | None, typer.Option(help="The true object.")] = None,
    paraphrase: Annotated[list[str] | None, typer.Option(help="A paraphrase (repeat).")] = None,
    neighborhood: Annotated[
        list[str] | None, typer.Option(help="A neighbourhood prompt (repeat).")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="A JSONL file of CounterFact or zsRE records, or of edit requests.",
        ),  # fmt: skip
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N records.")] = None,
    chunk: Annotated[int, typer.Option(min=1, help="Requests per POST (the API's cap).")] = 64,
    hparams: Annotated[str | None, typer.Option(help="Overrides as JSON.")] = None,
    wait: Wait = True,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Edit one fact from the flags, or every record of --file: chunked under the
    per-request cap, batched by the service, with a progress bar."""
    if file is not None:
        requests = list(read_requests(file, limit))
    elif prompt and subject and target_new:
        one = {"prompt": prompt, "subject": subject, "target_new": target_new,
               "target_true": target_true, "paraphrase_prompts": paraphrase or [],
               "neighborhood_prompts": neighborhood or []}  # fmt: skip
        requests = [{k: v for k, v in one.items() if v is not None}]
    else:
        raise typer.BadParameter("give --prompt, --subject and --target-new, or --file")
    overrides = json.loads(hparams) if hparams else None
    started = time.monotonic()
    with _client(url, key) as client:
        jobs = [client.edit(model, requests[i : i + chunk], method, overrides)
                for i in range(0, len(requests), chunk)]  # fmt: skip
        if not wait:
            out = [{"job_id": j.id, "edit_ids": j.created.edit_ids} for j in jobs]  # type: ignore[union-attr]
            typer.echo(json.dumps(out, indent=2) if as_json else "\n".join(j.id for j in jobs))
            return
        finished = _follow(jobs, len(requests), show=not as_json)
    summary = _summary(finished, time.monotonic() - started)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        typer.echo(_summary_text(summary))
    if summary["jobs_failed"]:
        raise typer.Exit(1)


def _follow(jobs: list[Job], total: int, *, show: bool) -> list[Any]:
    """Poll the jobs until all end, with a progress bar over their requests."""
    sizes = {j.id: len(j.created.edit_ids) for j in jobs}  # type: ignore[union-attr]
    done: dict[str, Any] = {}
    shown = 0
    with typer.progressbar(length=total, label="editing", file=sys.stderr if show else None,
                           hidden=not show) as bar:  # fmt: skip
        while len(done) < len(jobs):
            progress = 0.0
            for j in jobs:
                if j.id in done:
                    progress += sizes[j.id]
                    continue
                now = j.get()
                if now.status.value in FINAL:
                    done[j.id] = now
                    progress += sizes[j.id]
                else:
                    progress += sizes[j.id] * now.progress
            step = int(progress) - shown
            if step > 0:
                bar.update(step)
                shown += step
            if len(done) < len(jobs):
                time.sleep(0.5)
    return [done[j.id] for j in jobs]


def _summary(jobs: list[Any], seconds: float) -> dict[str, Any]:
    applied: list[dict[str, Any]] = []
    rejected = 0
    for job in jobs:
        result = job.result or {}
        applied += list((result.get("metrics") or {}).values())
        rejected += sum(len(r.get("edit_ids", [])) for r in result.get("rejected") or [])
    means: dict[str, float | None] = {}
    for k in ("efficacy", "paraphrase", "neighborhood"):
        values = [m[k] for m in applied if isinstance(m.get(k), int | float)]
        means[k] = sum(values) / len(values) if values else None  # none: no such prompts
    versions = sorted({v for job in jobs for v in (job.result or {}).get("versions", [])})
    return {
        "jobs": len(jobs),
        "jobs_failed": sum(j.status.value != "succeeded" for j in jobs),
        "errors": [j.error for j in jobs if j.error],
        "applied": len(applied),
        "rejected": rejected,
        "versions": versions,
        "mean": means if applied else {},
        "seconds": round(seconds, 1),
    }


def _summary_text(s: dict[str, Any]) -> str:
    lines = [
        f"{s['applied']} edit(s) applied, {s['rejected']} rejected, in {len(s['versions'])} "
        f"version(s) ({s['jobs']} job(s), {s['jobs_failed']} failed) in {s['seconds']} s",
    ]
    if s["mean"]:
        lines.append("  ".join(f"{k} {'-' if v is None else f'{v:.3f}'}"
                               for k, v in s["mean"].items()))  # fmt: skip
    lines += [f"error: {e}" for e in s["errors"]]
    return "\n".join(lines)


# -- jobs -------------------------------------------------------------------------------------


@jobs_app.command("list")
def jobs_list(
    model: Annotated[str | None, typer.Option(help="Only this model's jobs.")] = None,
    status: Annotated[str | None, typer.Option(help="queued, running, succeeded, …")] = None,
    kind: Annotated[str | None, typer.Option(help="edit, rollback or evaluation.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """The newest jobs."""
    with _client(url, key) as client:
        page = client.jobs(model=model, status=status, kind=kind, limit=limit)
    if as_json:
        typer.echo(_dump(page.items))
        return
    rows = [(j.id, j.kind.value, j.model, j.status.value, f"{j.progress:.0%}",
             _when(j.created_at), (j.error or j.message or "")[:60]) for j in page.items]  # fmt: skip
    typer.echo(table(rows, ["job", "kind", "model", "status", "progress", "created", "note"]))


@jobs_app.command("show")
def jobs_show(job_id: str, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """One job, as JSON."""
    with _client(url, key) as client:
        typer.echo(_dump(client.job(job_id)))


def describe(kind: str, d: dict[str, Any]) -> str:
    """One event as a line for people."""
    if kind == "progress":
        return f"{d['progress']:.0%} {d['message']}"
    if kind == "status":
        note = d.get("error") or d.get("message")
        return d["status"] + (f": {note}" if note else "")
    if kind == "version":
        return f"version {d['number']} committed"
    return json.dumps(d, sort_keys=True)


@jobs_app.command("watch")
def jobs_watch(
    job_id: str, url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False
) -> None:
    """Follow a job's events until it ends (its status, progress and versions)."""
    with _client(url, key) as client:
        for event in client.job_events(job_id):
            if as_json:
                typer.echo(event.model_dump_json())
                continue
            text = describe(event.kind, event.data)
            typer.echo(f"{_when(event.created_at)}  {event.kind:<10} {text}")
        final = client.job(job_id)
    if final.status.value != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Cancel a queued job, or stop a running one at its next safe point."""
    with _client(url, key) as client:
        job = client.cancel(job_id)
    state = (
        "cancel requested"
        if job.cancel_requested and job.status.value == "running"
        else job.status.value
    )
    typer.echo(f"{job.id}: {state}")


# -- versions, rollback, eval --------------------------------------------------------------------


def versions(
    model: Model = DEFAULT_MODEL,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """The model's versions (the first LIMIT)."""
    with _client(url, key) as client:
        page = client.versions(model, limit=limit)
    if as_json:
        typer.echo(_dump(page.items))
        return
    rows = [(v.number, v.kind.value, v.method or "", v.parent_number,
             "" if v.update_norm is None else f"{v.update_norm:.3g}", len(v.drift),
             _when(v.created_at), v.requested_by or "") for v in page.items]  # fmt: skip
    header = ["version", "kind", "method", "parent", "norm", "layers", "created", "by"]
    typer.echo(table(rows, header))


def rollback(
    model: Model = DEFAULT_MODEL,
    to: Annotated[int, typer.Option("--to", min=0, help="The version to restore.")] = 0,
    wait: Wait = True,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Roll MODEL back to version --to (a new version with its weights, bit for bit)."""
    with _client(url, key) as client:
        job = client.rollback(model, to)
        if not wait:
            typer.echo(job.id)
            return
        done = job.wait()
    typer.echo(f"rolled back to version {to}: version {(done.result or {}).get('versions')}")


def evaluate(
    model: Model = DEFAULT_MODEL,
    suite: Annotated[
        str, typer.Option(help="retention, counterfact, zsre, downstream, fluency.")
    ] = "retention",
    version: Annotated[int | None, typer.Option(min=0, help="Default: the head.")] = None,
    params: Annotated[str | None, typer.Option(help="The suite's params as JSON.")] = None,
    wait: Wait = True,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Run an evaluation suite on a version; print its metrics."""
    with _client(url, key) as client:
        job = client.evaluate(model, suite, version, json.loads(params) if params else None)
        if not wait:
            typer.echo(job.id)
            return
        done = job.wait()
    result = done.result or {}
    if as_json:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    metrics = result.get("metrics") or {}
    typer.echo(f"{suite} on version {result.get('version')}:")
    typer.echo(table([(k, v) for k, v in sorted(metrics.items())], ["metric", "value"]))


def register(app: typer.Typer) -> None:
    """Add the commands to the ``memedit`` app."""
    app.command()(edit)
    app.command()(versions)
    app.command()(rollback)
    app.command("eval")(evaluate)
    app.add_typer(jobs_app, name="jobs")
