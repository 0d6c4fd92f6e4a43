"""``memedit export``, ``memedit import-patch`` (on a running service, through
:mod:`service.client`) and ``memedit apply-patch`` (no service: a patch onto a base
checkpoint, written out as a Hugging Face folder). docs/exports.md has the formats."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli_client import DEFAULT_URL, AsJson, Key, Model, Url, Wait, _client, _fail
from service.client import FINAL, Job, JobFailed
from service.settings import DEFAULT_MODEL

Out = Annotated[
    Path,
    typer.Option(help="Where to write: a folder (extracted; new or empty), or a file ending .tar."),
]


def _wait(job: Job, label: str) -> Any:
    """Poll ``job`` to its end with a progress bar on stderr; :class:`JobFailed` unless
    it succeeded."""
    shown = 0
    with typer.progressbar(length=100, label=label, file=sys.stderr) as bar:
        while True:
            now = job.get()
            step = int(100 * (1.0 if now.status.value in FINAL else now.progress)) - shown
            if step > 0:
                bar.update(step)
                shown += step
            if now.status.value in FINAL:
                break
            time.sleep(0.5)
    if now.status.value != "succeeded":
        raise JobFailed(now)
    return now


def export(
    model: Model = DEFAULT_MODEL,
    version: Annotated[int | None, typer.Option(min=0, help="Default: the head.")] = None,
    format: Annotated[str, typer.Option(help="hf (a Hugging Face folder) or patch.")] = "hf",
    out: Out = Path("export"),
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Write a version of MODEL out (an export job), then download it to --out."""
    if format not in ("hf", "patch"):
        raise _fail(ValueError(f"--format must be hf or patch, not {format!r}"))
    if out.exists() and out.suffix != ".tar" and (not out.is_dir() or any(out.iterdir())):
        raise _fail(FileExistsError(f"{out} exists and is not an empty folder"))
    with _client(url, key) as client:
        job = client.export(model, version, format)
        export_id = job.created.export_id  # type: ignore[union-attr]
        _wait(job, f"export {format}")
        row = client.export_of(model, export_id)
        with tempfile.TemporaryDirectory(prefix="memedit-export-") as tmp:
            tar = Path(tmp) / "export.tar"
            size = client.download_export(model, export_id, tar)
            _place(tar, out)
    summary = {"export_id": export_id, "version": row.version, "format": format,
               "size_bytes": size, "sha256": row.sha256, "out": str(out)}  # fmt: skip
    if as_json:
        typer.echo(json.dumps({**summary, "manifest": row.manifest}, indent=2, sort_keys=True))
    else:
        typer.echo(f"version {row.version} of {model} as {format}: {size} bytes "
                   f"(sha256 {row.sha256}) in {out}")  # fmt: skip


def _place(tar: Path, out: Path) -> None:
    from workers.exporting import archive  # torch-free, but the package is the worker's

    if out.suffix == ".tar":
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(tar, out)
        return
    archive.extract_tar(tar, out)


def import_patch(
    patch: Annotated[Path, typer.Argument(help="A patch archive (.tar) or its folder.")],
    model: Model = DEFAULT_MODEL,
    wait: Wait = True,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Apply a patch from another deployment onto MODEL's base, as a new version."""
    from workers.exporting import archive

    with tempfile.TemporaryDirectory(prefix="memedit-import-") as tmp:
        tar = patch
        if patch.is_dir():
            tar = Path(tmp) / "patch.tar"
            archive.write_tar(patch, tar)
        elif not patch.is_file():
            raise _fail(FileNotFoundError(f"{patch} does not exist"))
        with _client(url, key) as client:
            job = client.import_patch(model, tar)
            if not wait:
                typer.echo(job.id)
                return
            done = _wait(job, "import")
    result = done.result or {}
    typer.echo(f"imported as version {result.get('versions')} of {model} with "
               f"{len(result.get('imported_edit_ids') or [])} edit(s)")  # fmt: skip


def apply_patch(
    patch: Annotated[Path, typer.Argument(help="A patch archive (.tar) or its folder.")],
    base: Annotated[
        str, typer.Option(help="The base: a hub id, a folder or gguf:… (as a model's source).")
    ],  # fmt: skip
    out: Annotated[Path, typer.Option(help="The Hugging Face folder to write (new or empty).")],
    revision: Annotated[str | None, typer.Option(help="The base's revision (hub ids).")] = None,
    device: Annotated[
        str, typer.Option(help="Where to load the base: cpu, cuda, …", envvar="MEMEDIT_DEVICE")
    ] = "cpu",
) -> None:
    """Apply a patch onto its base checkpoint and write the patched model (no service).

    Refuses a base whose touched tensors do not hash as the patch's manifest says;
    the written tensors hash exactly as the exporting worker's version."""
    from workers.exporting import archive, hf
    from workers.exporting import patch as patches
    from workers.models.loading import ModelSourceError, load_model

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise _fail(FileExistsError(f"{out} exists and is not an empty folder"))
    try:
        with archive.opened(patch) as folder:
            loaded_patch = patches.read_patch(folder)
        manifest = loaded_patch.manifest
        dtype = str((manifest.get("base") or {}).get("dtype") or "float32")
        loaded = load_model(base, dtype=dtype, device=device, revision=revision)
        hashes = patches.apply_to_model(loaded_patch, loaded.model)
        with tempfile.TemporaryDirectory(prefix="memedit-apply-", dir=out.parent if out.parent.exists() else None) as tmp:  # fmt: skip
            folder = Path(tmp) / "out"
            info = {k: manifest.get(k) for k in ("model", "version", "base", "memedit")}
            info["tensor_sha256"] = hashes
            info["applied_onto"] = base
            hf.write_hf_folder(loaded.model, loaded.tokenizer, folder, info=info,
                               edits=manifest.get("edits") or [])  # fmt: skip
            archive.move_into(folder, out)
    except (patches.PatchError, archive.ArchiveError, ModelSourceError, OSError) as exc:
        raise _fail(exc) from None
    typer.echo(f"{len(hashes)} tensor(s) patched onto {base}: version {manifest.get('version')} "
               f"of {manifest.get('model')}, hash-equal to the manifest; written to {out}")  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add the commands to the ``memedit`` app."""
    app.command()(export)
    app.command("import-patch")(import_patch)
    app.command("apply-patch")(apply_patch)
