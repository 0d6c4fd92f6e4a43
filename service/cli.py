"""The ``memedit`` command: ``up`` (everything, embedded), ``api``, ``worker``, ``migrate``.

The CLI lives with the service but never imports torch itself: ``memedit worker``
imports the worker package by name inside its own process, and ``memedit up``
starts the API and the worker as child processes.
"""

from __future__ import annotations

import copy
import enum
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from service import cli_client, cli_exports, cli_keys, logs
from service.logs import LogFormat
from service.settings import DEFAULT_MODEL, get_settings

app = typer.Typer(
    help="memedit: correct facts inside language models over HTTP.", no_args_is_help=True
)
app.add_typer(cli_keys.app, name="keys")
cli_client.register(app)
cli_exports.register(app)
log = logging.getLogger("memedit")


def _setup_logging(level: str, fmt: LogFormatChoice | LogFormat = "text") -> None:
    value: LogFormat = "json" if fmt in ("json", LogFormatChoice.json) else "text"
    os.environ["MEMEDIT_LOG_FORMAT"] = value  # the processes `up` starts write the same
    logs.setup(level, value)


LogLevel = Annotated[str, typer.Option(help="Logging level.")]


class LogFormatChoice(str, enum.Enum):
    text = "text"
    json = "json"


LogFormatOpt = Annotated[
    LogFormatChoice,
    typer.Option(
        "--log-format",
        envvar="MEMEDIT_LOG_FORMAT",
        help="text (default) or json: one JSON object per line with model, job_id, "
        "edit_ids and version where known.",
    ),
]
InsecureNoAuth = Annotated[
    bool,
    typer.Option(
        "--insecure-no-auth",
        help="Serve a non-loopback --host although no API key is defined (anyone who "
        "reaches the port may edit the model).",
    ),
]


def _check_exposure(host: str, database_url: str, insecure_no_auth: bool) -> None:
    """Refuse to listen off loopback while no API key exists, unless told to."""
    from service.api.auth import is_loopback  # noqa: PLC0415
    from service.ledger import keys as ledger_keys  # noqa: PLC0415
    from service.ledger.sessions import create_ledger_engine, session_scope  # noqa: PLC0415

    if is_loopback(host):
        return
    if insecure_no_auth:
        log.warning("serving %s with no API key required (--insecure-no-auth)", host)
        return
    engine = create_ledger_engine(database_url)
    try:
        with session_scope(engine) as s:
            if ledger_keys.any_active(s):
                return
    finally:
        engine.dispose()
    raise typer.BadParameter(
        f"refusing to serve {host!r} with no API key defined: anyone who reaches the port "
        "could edit the model. Create a key first (memedit keys create --name NAME "
        "--scope admin), or pass --insecure-no-auth.",
        param_hint="--host",
    )


# ``memedit up`` polls ``GET /healthz/workers`` with this query while the worker starts;
# the API's access log leaves those polls out (a line a second otherwise)
UP_POLL_QUERY = "poll=memedit-up"


class QuietPolls(logging.Filter):
    """Drop uvicorn's access-log records of ``memedit up``'s own polls."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and len(args) > 2 and UP_POLL_QUERY in str(args[2]))


def _uvicorn_log_config(fmt: LogFormat = "text") -> dict:
    from uvicorn.config import LOGGING_CONFIG  # noqa: PLC0415

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["quiet_polls"] = {"()": QuietPolls}
    config["loggers"]["uvicorn.access"]["filters"] = ["quiet_polls"]
    return logs.uvicorn_formatters(config, fmt)


@app.command()
def migrate(log_level: LogLevel = "info", log_format: LogFormatOpt = LogFormatChoice.text) -> None:
    """Migrate the ledger database (DATABASE_URL) to the newest schema."""
    _setup_logging(log_level, log_format)
    from service.migrate import upgrade_to_head  # noqa: PLC0415

    upgrade_to_head(get_settings().database_url)
    typer.echo("ledger schema is at head")


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    log_level: LogLevel = "info",
    log_format: LogFormatOpt = LogFormatChoice.text,
    insecure_no_auth: InsecureNoAuth = False,
) -> None:
    """Run the HTTP API (uvicorn). Off loopback it needs an API key to exist."""
    import uvicorn  # noqa: PLC0415

    _setup_logging(log_level, log_format)
    if insecure_no_auth:
        os.environ["MEMEDIT_INSECURE_NO_AUTH"] = "true"  # read by the app's settings
        get_settings.cache_clear()
    _check_exposure(host, get_settings().database_url, insecure_no_auth)
    uvicorn.run(
        "service.api:create_app",
        factory=True,
        host=host,
        port=port,
        log_level=log_level,
        log_config=_uvicorn_log_config(log_format.value),  # type: ignore[arg-type]
    )


@app.command()
def worker(
    model: Annotated[
        str, typer.Option(help="Name of the configured model to serve.")
    ] = DEFAULT_MODEL,
    burst: Annotated[bool, typer.Option(help="Exit when the queues are empty.")] = False,
    log_level: LogLevel = "info",
    log_format: LogFormatOpt = LogFormatChoice.text,
) -> None:
    """Run a worker that holds MODEL and applies its edits (one per device)."""
    _setup_logging(log_level, log_format)
    from service.presence import Phase, Presence  # noqa: PLC0415
    from service.redis_clients import command_client  # noqa: PLC0415

    settings = get_settings()
    if model not in settings.models:
        raise typer.BadParameter(f"unknown model {model!r}; configured: {sorted(settings.models)}")
    # announce the worker before the imports and the model load, which take a while:
    # reads wait for it instead of being refused as having no worker
    name = f"memedit-{model}-{socket.gethostname()}-{os.getpid()}"
    presence = Presence(command_client(settings.redis_url), settings.queue_prefix, model, name)
    presence.set(Phase.loading, message="starting")
    presence.start()
    try:
        # imported by name: the worker needs torch, the rest of the CLI does not
        worker_main = importlib.import_module("workers.worker").main
        worker_main(model, burst=burst, presence=presence)
    finally:
        presence.stop()


class _Children:
    """Child processes of ``memedit up``, stopped together."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        # a session of their own: a terminal's Ctrl-C reaches only `up`, which then
        # sends each child one SIGTERM (rq's warm shutdown: the running job may finish)
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args], env=env, start_new_session=True
        )

    def dead(self) -> list[tuple[str, int]]:
        return [(n, p.returncode) for n, p in self.procs.items() if p.poll() is not None]

    def stop(self, grace_s: float = 20.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name, p in self.procs.items():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", name, grace_s)
                p.kill()
                p.wait()


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


@app.command()
def up(
    host: Annotated[str, typer.Option(help="Interface for the API.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port for the API.")] = 8000,
    data_dir: Annotated[
        Path, typer.Option(help="Where the embedded database, queue and artifacts live.")
    ] = Path(".memedit"),
    model: Annotated[str, typer.Option(help="Model for the worker.")] = DEFAULT_MODEL,
    log_level: LogLevel = "info",
    log_format: LogFormatOpt = LogFormatChoice.text,
    insecure_no_auth: InsecureNoAuth = False,
) -> None:
    """Run everything: Postgres and Redis (embedded unless DATABASE_URL/REDIS_URL are
    set), the migrations, the API and one worker. Ctrl-C stops it all. Off loopback
    the API needs an API key to exist (memedit keys create)."""
    _setup_logging(log_level, log_format)
    from service import embedded  # noqa: PLC0415
    from service.migrate import upgrade_to_head  # noqa: PLC0415

    signal.signal(signal.SIGTERM, _raise_stop)
    settings = get_settings()
    if model not in settings.models:
        raise typer.BadParameter(f"unknown model {model!r}; configured: {sorted(settings.models)}")
    data_dir = data_dir.expanduser().resolve()
    env_db = os.environ.get("MEMEDIT_DATABASE_URL") or os.environ.get("DATABASE_URL")
    env_redis = os.environ.get("MEMEDIT_REDIS_URL") or os.environ.get("REDIS_URL")
    services = embedded.start(data_dir, database_url=env_db, redis_url=env_redis)
    children = _Children()
    code = 0
    try:
        upgrade_to_head(services.database_url)
        env = dict(os.environ)
        env["MEMEDIT_DATABASE_URL"] = services.database_url
        env["MEMEDIT_REDIS_URL"] = services.redis_url
        env.setdefault("MEMEDIT_ARTIFACT_DIR", str(data_dir / "artifacts"))
        _check_exposure(host, services.database_url, insecure_no_auth)
        api_args = ["api", "--host", host, "--port", str(port), "--log-level", log_level]
        children.start("api", api_args + ["--insecure-no-auth"] * insecure_no_auth, env)
        children.start("worker", ["worker", "--model", model, "--log-level", log_level], env)
        url = f"http://{host}:{port}"
        _wait_healthy(url, model, children)
        typer.echo(f"memedit is up at {url} (API docs at {url}/docs); Ctrl-C stops it")
        _wait_worker_ready(url, model, children)
        while not children.dead():
            time.sleep(0.5)
        for name, rc in children.dead():
            log.error("%s exited with code %s; stopping", name, rc)
        code = 1
    except (KeyboardInterrupt, _Stop):
        typer.echo("stopping memedit ...")
    finally:
        # the stop below is bounded (children get 20 s, then SIGKILL); a second
        # Ctrl-C or SIGTERM must not cut it short and leave servers behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        children.stop()
        services.stop()
    raise typer.Exit(code)


def _wait_healthy(url: str, model: str, children: _Children, timeout_s: float = 120.0) -> None:
    """Until the API answers and the worker has announced itself (so that a read
    sent from now on waits for it rather than finding no worker)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if children.dead():
            name, rc = children.dead()[0]
            raise RuntimeError(f"{name} exited with code {rc} during start-up")
        if _worker_state(url, model) not in (None, "no worker", "unknown"):
            return
        time.sleep(0.3)
    raise RuntimeError(f"the API did not answer at {url} within {timeout_s:.0f} s")


def _worker_state(url: str, model: str) -> str | None:
    """The model's worker state from ``GET /healthz/workers``, or ``None`` if the API
    does not answer."""
    return (_model_worker(url, model) or {}).get("state")


def _model_worker(url: str, model: str) -> dict | None:
    """The model's worker from the open ``GET /healthz/workers`` (no API key needed)."""
    try:
        response = httpx.get(f"{url}/healthz/workers?{UP_POLL_QUERY}", timeout=5.0)
        if response.status_code != 200:
            return None
        return response.json().get(model) or {}
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def _wait_worker_ready(
    url: str, model: str, children: _Children, timeout_s: float = 3600.0
) -> None:
    """Tell the user how the worker's start-up goes, and when it is ready (edits,
    rollbacks and evaluations sent earlier wait in the queue; reads are answered
    between the statistics' steps on a fresh ledger)."""
    deadline = time.monotonic() + timeout_s
    shown = ""
    while time.monotonic() < deadline and not children.dead():
        worker = _model_worker(url, model) or {}
        state = worker.get("state")
        if state == "ready":
            typer.echo(f"worker for {model} is ready")
            return
        if state == "statistics" and worker.get("progress") is not None:
            line = f"computing statistics, {10 * int(10 * worker['progress'])}%"  # per 10 %
        else:
            line = f"{state or 'waiting for the API'} ({worker.get('message') or '…'})"
        if line != shown:
            typer.echo(f"worker for {model}: {line}")
            shown = line
        time.sleep(1.0)


if __name__ == "__main__":
    app()
