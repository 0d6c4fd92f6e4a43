"""Export and import jobs (docs/exports.md).

An export rebuilds the version asked for (hash-checked, like any sync), writes it
out as a Hugging Face folder (:mod:`workers.exporting.hf`) or a patch against the
base (:mod:`workers.exporting.patch`, which replays itself onto the base and must
give the version's hashes before it is kept), packs it as a tar archive in the
artifact store and records it; the model then goes back to the ledger's head.

An import applies an uploaded patch onto this deployment's base: a new version of
kind ``import`` whose parent is version 0 and whose delta *sets* the patched tensors
(:class:`~workers.editing.types.ValuesUpdate`) to the fp32 sums the exporting
worker held, so the new version's tensors hash exactly as the patch says. The
patch's edits are recorded as applied edits of the new version; the edits of
versions left off its chain are reverted, as by a rollback to 0.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from service.ledger import edits as ledger_edits
from service.ledger import exports as ledger_exports
from service.ledger import jobs as ledger_jobs
from service.ledger import versions as ledger_versions
from service.ledger.records import VersionRecord, chain
from service.ledger.tables import Edit, VersionKind
from service.ledger.versions import NewVersion
from workers.editing.types import ValuesUpdate, WeightDelta
from workers.exporting import archive, hf
from workers.exporting import patch as patches
from workers.jobs import evaluation
from workers.jobs.common import progress
from workers.startup import CODE_VERSION
from workers.state import WorkerState


def _deltas(
    state: WorkerState, records: dict[int, VersionRecord], number: int
) -> list[WeightDelta]:
    """The deltas of version ``number``'s chain, in ledger order (from the base)."""
    numbers = sorted(chain(records, number))
    return [
        WeightDelta.from_bytes(state.store.get(records[n].delta_path, records[n].delta_sha256))
        for n in numbers
        if records[n].delta_path is not None
    ]


def _edit_dict(edit: Edit, version: int) -> dict[str, Any]:
    return {
        "id": edit.id, "version": version, "method": edit.method, "prompt": edit.prompt,
        "subject": edit.subject, "target_new": edit.target_new, "target_true": edit.target_true,
        "paraphrase_prompts": list(edit.paraphrase_prompts or []),
        "neighborhood_prompts": list(edit.neighborhood_prompts or []),
    }  # fmt: skip


def base_info(state: WorkerState) -> dict[str, Any]:
    """The base as an export names it."""
    return {
        "source": state.spec.source,
        "revision": state.spec.revision,
        "fingerprint": state.base_fingerprint,
        "dtype": state.spec.dtype,
        "architecture": type(state.runtime.model).__name__,
    }


def run_export(state: WorkerState, job_id: str) -> dict[str, Any]:
    rt = state.runtime
    with state.ledger() as s:
        payload = ledger_jobs.edit_payload(s, job_id)
        records = ledger_versions.version_records(s, state.model_id)
        number, fmt = int(payload["version"]), str(payload["format"])
        on_chain = chain(records, number)
        # every edit a version of the chain applied is in its weights, whatever its
        # status at the head (a later rollback marks it reverted), less those a later
        # edit of the chain superseded
        active = [_edit_dict(e, n) for e, n in ledger_edits.chain_active_edits(s, state.model_id, on_chain)]  # fmt: skip
    head = max(records)
    t0 = time.perf_counter()
    progress(state, job_id, 0.05, f"rebuilding version {number}", stoppable=False)
    scratch = state.store.scratch("export-")
    try:
        rt.sync(records, number, state.store)
        info = {
            "model": state.name,
            "version": number,
            "base": base_info(state),
            "edits": len(active),
            "memedit": CODE_VERSION,
        }
        folder = scratch / "out"
        progress(state, job_id, 0.2, f"writing version {number} as {fmt}", stoppable=False)
        if fmt == "hf":
            files = hf.write_hf_folder(rt.model, rt.tokenizer, folder,
                info={**info, "tensor_sha256": records[number].tensor_sha256}, edits=active)  # fmt: skip
            summary: dict[str, Any] = {**info, "files": files}
        else:
            patch = patches.build_patch(
                _deltas(state, records, number),
                pristine=rt.pristine,
                current=lambda name: rt.param(name).detach(),
                canonical=rt.canonical,
                expected_sha256=records[number].tensor_sha256,
                manifest={**info, "edits": active,
                          "versions": sorted(n for n in on_chain if records[n].delta_path)},
            )  # fmt: skip
            patch.write(folder)
            entries = patch.entries
            summary = {
                **info,
                "tensors": len(entries),
                "low_rank": sum(e["encoding"] == "low_rank" for e in entries.values()),
                "values": sum(e["encoding"] == "values" for e in entries.values()),
                "tensor_bytes": patch.nbytes(),
            }
        progress(state, job_id, 0.8, "packing the archive", stoppable=False)
        tar = scratch / "archive.tar"
        archive.write_tar(folder, tar)
        stored = state.store.put_file("export", tar, ".tar")
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        result = {"export_id": payload["export_id"], "version": number, "format": fmt,
                  "size_bytes": stored.size_bytes, "sha256": stored.sha256}  # fmt: skip
        with state.ledger() as s:
            ledger_exports.finish_export(s, payload["export_id"], stored, summary)
            ledger_jobs.finish(s, [job_id], result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if rt.current_version != head:
            rt.sync(records, head, state.store)
    return result


def run_import(state: WorkerState, job_id: str) -> dict[str, Any]:
    rt = state.runtime
    with state.ledger() as s:
        payload = ledger_jobs.edit_payload(s, job_id)
        records = ledger_versions.version_records(s, state.model_id)
    head = max(records)
    t0 = time.perf_counter()
    progress(state, job_id, 0.05, "reading the patch", stoppable=False)
    path = state.store.local_path(payload["path"])
    with archive.opened(Path(path)) as folder:
        patch = patches.read_patch(folder)
    rt.sync(records, 0, state.store)
    try:
        progress(state, job_id, 0.3, f"applying {len(patch.entries)} tensor(s) onto the base",
                 stoppable=False)  # fmt: skip
        base = {name: rt.pristine(rt.canonical(name)) for name in patch.entries}
        sums = patches.accumulators(patch, base)
        delta = WeightDelta(
            method="import",
            updates=[ValuesUpdate(name, value) for name, value in sums.items()],
            meta={"from_model": patch.manifest.get("model"),
                  "from_version": patch.manifest.get("version")},
        )  # fmt: skip
        staged = rt.stage(delta)
        try:
            wrong = [n for n, e in patch.entries.items()
                     if staged.tensor_sha256.get(rt.canonical(n)) != e["sha256"]]  # fmt: skip
            if wrong:
                raise patches.PatchError(f"the imported tensors do not hash as the patch records: {wrong[:3]}")  # fmt: skip
            blob = delta.to_bytes()
            with state.ledger() as s:
                number = ledger_versions.next_number(s, state.model_id, head)
                snapshot = None
                if number % state.spec.snapshot_every == 0:
                    snapshot = state.store.put("snapshot", staged.snapshot_bytes())
                stored = state.store.put("delta", blob)
                version = ledger_versions.add_version(
                    s,
                    state.model_id,
                    NewVersion(
                        number=number,
                        kind=VersionKind.import_,
                        parent_number=0,
                        job_id=job_id,
                        method="import",
                        tensor_sha256=staged.tensor_sha256,
                        drift=staged.drift,
                        update_norm=staged.update_norm,
                        timing={"total_s": time.perf_counter() - t0},
                        info={"code_version": CODE_VERSION, "drift_relative": staged.drift_relative,
                              "from_model": patch.manifest.get("model"),
                              "from_version": patch.manifest.get("version"),
                              "from_base": patch.manifest.get("base")},
                        delta=stored,
                        snapshot=snapshot,
                    ),
                )  # fmt: skip
                reverted, _ = ledger_edits.align_after_rollback(
                    s, state.model_id, {0}, [n for n in records if n != 0], 0
                )
                added = ledger_edits.add_imported(
                    s, state.model_id, job_id, version.id, patch.manifest.get("edits") or []
                )
                scheduled = evaluation.schedule(s, state, number)
                result = {"versions": [number], "imported_edit_ids": added,
                          "reverted_edit_ids": reverted, "tensor_sha256_equal": True}  # fmt: skip
                ledger_jobs.finish(s, [job_id], result)
        except BaseException:
            rt.discard(staged)
            raise
        rt.commit(staged, number)
    except BaseException:
        rt.sync(records, head, state.store)
        raise
    evaluation.enqueue(state, scheduled)
    return result
