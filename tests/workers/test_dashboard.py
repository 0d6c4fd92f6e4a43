"""The web dashboard (/dashboard) in the machine's Chromium, driven by Playwright: the
service with a tiny model and a real ``memedit worker``, edits, a guard rejection and
a rollback made through the client; then, in the rendered page, the edit history, the
drift chart with one point per version, the guard's rejection, and the live progress
of a job that runs while the page watches. A screenshot goes to the test's folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from service.client import Client, JobFailed
from service.settings import GuardPolicy, ModelSpec, Settings
from tests import worker_harness as harness
from tests.served import serve
from tests.tiny_models import TINY_OVERRIDES

pytestmark = pytest.mark.e2e

MODEL = "tiny"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# what the machine's closed network and a root user need (the env notes of this machine)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip
PEOPLE = [("Mozart", "Rome"), ("Picasso", "Berlin"), ("Einstein", "London"), ("Curie", "Tokyo")]


def facts(people: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"prompt": "{} was born in", "subject": s, "target_new": c, "target_true": "Paris"}
            for s, c in people]  # fmt: skip


@pytest.fixture
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def settings(model_settings: Callable[..., Settings], tiny_dir: Path) -> Settings:
    spec = ModelSpec(source=str(tiny_dir), max_batch=1, max_wait_ms=0,
                     guard=GuardPolicy(norm_min_history=3))  # fmt: skip
    return model_settings(MODEL, spec, sync_timeout_s=60.0)


def test_the_dashboard_shows_history_drift_rejections_and_live_progress(
    browser: Any,
    settings: Settings,
    clean_db: object,
    redis_conn: Redis,
    tmp_path: Path,
    measurements: list[str],
) -> None:
    log = tmp_path / "worker.log"
    with serve(settings) as url, Client(url) as memedit:
        worker = harness.spawn_worker(settings, MODEL, log)
        try:
            deadline = time.monotonic() + 120
            while memedit.workers()[MODEL]["state"] != "ready":
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            ft = TINY_OVERRIDES["ft_l"]
            memedit.edit(MODEL, facts(PEOPLE), method="ft_l", hparams=ft).wait(60)
            # a learning rate 1000x the usual: the guard's norm rule rejects the update
            memedit.edit(MODEL, facts([("Newton", "Moscow")]), method="ft_l",
                         hparams={**ft, "lr": 50.0}).wait(60)  # fmt: skip
            memedit.rollback(MODEL, 3).wait(60)
            versions = memedit.versions(MODEL).items
            assert [v.number for v in versions] == [0, 1, 2, 3, 4, 5]

            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{url}/dashboard?model={MODEL}")
            page.wait_for_selector("body[data-loaded]", timeout=30_000)
            # the history: five edits, one rejected by the guard, the last applied one reverted
            page.wait_for_function("document.querySelectorAll('#edits tr.edit').length === 5")
            statuses = page.eval_on_selector_all(
                "#edits tr.edit .status", "e => e.map(x => x.textContent)"
            )
            assert sorted(statuses) == ["applied", "applied", "applied", "rejected", "reverted"]
            # the drift chart: one point per version
            points = page.evaluate("document.getElementById('drift').data.map(t => t.x.length)")
            assert points and all(n == len(versions) for n in points), points
            assert page.evaluate("document.getElementById('drift').data[0].x") == [0, 1, 2, 3, 4, 5]
            # the guard's rejection with its rule
            rejected = page.inner_text("#guard tr.decision.rejected")
            assert "norm" in rejected and "v4" in rejected
            assert page.locator("#guard tr.decision.accepted").count() == 4

            # a job that runs while the page watches: its progress arrives live (SSE)
            slow = {**TINY_OVERRIDES["rome"], "v_num_grad_steps": 200, "v_lr": 1e-4}
            job = memedit.edit(MODEL, facts([("Darwin", "Vienna"), ("Tolstoy", "Lisbon"),
                                             ("Homer", "Athens")]), method="rome", hparams=slow)  # fmt: skip
            row = f"#jobs tr.job[data-job='{job.id}']"
            page.wait_for_function(
                f"""(() => {{ const r = document.querySelector("{row}");
                    if (!r || !r.classList.contains('running')) return false;
                    const p = parseInt(r.querySelector('.pct').textContent);
                    return p > 0 && p < 100; }})()""",
                timeout=60_000,
            )
            seen = page.inner_text(row)
            page.screenshot(path=str(tmp_path / "dashboard-running.png"), full_page=True)
            with contextlib.suppress(JobFailed):  # the page shows a failure as well
                job.wait(120)
            page.wait_for_selector(f"{row}:not(.running):not(.queued)", timeout=30_000)
            final = len(memedit.versions(MODEL).items)
            page.wait_for_function(  # the history catches up with the job's end
                f"document.getElementById('drift').data[0].x.length === {final} && "
                "!document.querySelector('#edits tr.edit.queued')",
                timeout=30_000,
            )
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert errors == [], errors
        finally:
            harness.stop(worker)
    measurements.append(f"dashboard: screenshot {shot}; a running job read {seen!r}")
