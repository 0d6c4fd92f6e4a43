"""The manifest of a patch archive, read without torch (the API checks an upload
before it creates an import job; docs/exports.md has the format)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

from service.errors import InvalidInput

FORMAT = "memedit-patch"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_MAX_MANIFEST = 64 * 1024**2


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the tar archive at ``path``; :class:`InvalidInput` (field
    ``body``) when it is not a memedit patch archive."""
    try:
        with tarfile.open(path, "r:*") as tar:
            member = next((m for m in tar if m.name in (MANIFEST, f"./{MANIFEST}")), None)
            if member is None or not member.isfile():
                raise InvalidInput("body", f"the archive holds no {MANIFEST}: not a memedit patch")
            if member.size > _MAX_MANIFEST:
                raise InvalidInput("body", f"the archive's {MANIFEST} is over {_MAX_MANIFEST} bytes")  # fmt: skip
            f = tar.extractfile(member)
            raw = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidInput("body", f"the body is not a tar archive: {exc}") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput("body", f"the archive's {MANIFEST} is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InvalidInput("body", f"the archive's {MANIFEST} is not a memedit patch manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InvalidInput("body", f"unsupported patch format version {manifest.get('format_version')!r} (this memedit reads {FORMAT_VERSION})")  # fmt: skip
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("base_sha256"), str)
        for k, v in tensors.items()
    ):
        raise InvalidInput("body", f"the {MANIFEST} has no valid tensors table")
    edits = manifest.get("edits") or []
    if not isinstance(edits, list) or not all(
        isinstance(e, dict)
        and all(isinstance(e.get(k), str) for k in ("prompt", "subject", "target_new"))
        for e in edits
    ):
        raise InvalidInput("body", f"the {MANIFEST}'s edits are not a list of edit requests")
    return manifest
