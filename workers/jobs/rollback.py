"""Rollback jobs: a new version whose weights equal an earlier version's, bit for bit.

The runtime rebuilds the target from the ledger (hash-checked), every tensor the
model's ledger ever edited is compared with the target's recorded hashes, and the
rollback version is committed with the edits' statuses aligned to the target's chain
(later edits reverted; edits an earlier rollback reverted and the target holds,
applied again). On any failure the runtime goes back to the ledger's head.
"""

from __future__ import annotations

import time
from typing import Any

from service.ledger import edits as ledger_edits
from service.ledger import jobs as ledger_jobs
from service.ledger import versions as ledger_versions
from service.ledger.records import chain
from service.ledger.tables import VersionKind
from service.ledger.versions import NewVersion
from workers.jobs import evaluation
from workers.jobs.common import progress
from workers.runtime import IntegrityError
from workers.startup import CODE_VERSION
from workers.state import WorkerState


def run_rollback(state: WorkerState, job_id: str) -> dict[str, Any]:
    rt = state.runtime
    with state.ledger() as s:
        target = int(ledger_jobs.edit_payload(s, job_id)["to_version"])
        records = ledger_versions.version_records(s, state.model_id)
        head = max(records)
    if target not in records:
        raise ValueError(f"version {target} does not exist")
    progress(state, job_id, 0.1, f"rebuilding version {target}")
    t0 = time.perf_counter()
    try:
        rt.sync(records, target, state.store)
        # every tensor this model's ledger ever edited, now equal to version `target`'s
        touched = set().union(*(r.tensor_sha256 for n, r in records.items() if n > 0))
        hashes = rt.tensor_hashes(sorted(touched))
        expected = records[target].tensor_sha256
        bad = [k for k, v in hashes.items() if k in expected and expected[k] != v]
        if bad:
            raise IntegrityError(f"rebuilt tensors differ from version {target}: {bad[:3]}")
        keep = chain(records, target)
        with state.ledger() as s:
            number = ledger_versions.next_number(s, state.model_id, head)
            snapshot = None
            if number % state.spec.snapshot_every == 0:
                snapshot = state.store.put("snapshot", rt.snapshot_bytes())
            drift, drift_rel = rt.drift()
            version = ledger_versions.add_version(
                s,
                state.model_id,
                NewVersion(
                    number=number,
                    kind=VersionKind.rollback,
                    parent_number=target,
                    job_id=job_id,
                    tensor_sha256=hashes,
                    drift=drift,
                    timing={"total_s": time.perf_counter() - t0},
                    info={"code_version": CODE_VERSION, "drift_relative": drift_rel},
                    snapshot=snapshot,
                ),
            )
            reverted, restored = ledger_edits.align_after_rollback(
                s, state.model_id, keep, [n for n in records if n not in keep], target
            )
            scheduled = evaluation.schedule(s, state, version.number)
    except BaseException:
        # the in-memory model may sit at `target` now: rebuild the ledger's head
        rt.sync(records, head, state.store)
        raise
    rt.current_version = number
    evaluation.enqueue(state, scheduled)
    return {
        "versions": [number],
        "to_version": target,
        "reverted_edit_ids": reverted,
        "restored_edit_ids": restored,
        "tensor_sha256_equal": True,
    }
