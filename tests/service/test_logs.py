"""JSON log lines (service/logs.py): one object per line with the context a worker
binds, the fields a call passes, and tracebacks; and the CLI's --log-format."""

from __future__ import annotations

import json
import logging

import pytest
from typer.testing import CliRunner

from service import logs
from service.cli import app


def test_json_lines_carry_the_bound_context(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("info", "json")
    log = logging.getLogger("memedit.test")
    try:
        with logs.bound(model="tiny", job_id="0b6f"):
            with logs.bound(edit_ids=[3, 4]):
                log.info("version %d committed", 7, extra={"version": 7})
            log.warning("outside the batch")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h.get_name() == "memedit"]:
            root.removeHandler(handler)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    first, second, third = lines
    assert first["message"] == "version 7 committed" and first["level"] == "info"
    assert (first["model"], first["job_id"], first["edit_ids"], first["version"]) == (
        "tiny", "0b6f", [3, 4], 7)  # fmt: skip
    assert second["job_id"] == "0b6f" and "edit_ids" not in second
    assert "model" not in third and "ValueError: boom" in third["exception"]
    assert first["logger"] == "memedit.test" and first["ts"].endswith("+00:00")


def test_the_cli_takes_only_text_or_json() -> None:
    result = CliRunner().invoke(app, ["migrate", "--log-format", "xml"])
    assert result.exit_code == 2 and "xml" in result.output
