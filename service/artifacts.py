"""Content-addressed artifact store: deltas, snapshots, statistics and archives as files.

Every artifact is one file stored at ``<kind>/<sha256[:2]>/<sha256><suffix>`` under the
store's root (``.safetensors`` unless said otherwise; exports are ``.tar``). The ledger keeps the relative path and the sha256; reading
an artifact back with its recorded hash verifies it, so a truncated or altered file
is refused (:class:`ArtifactCorrupt`) instead of silently replayed.

The interface is deliberately small (``put``, ``get``, ``exists``) and speaks only
relative paths and bytes, so that a later implementation can keep it unchanged on
top of ``fsspec`` (``s3://``, ``gs://`` …); this one is a local directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

_KIND = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_SUFFIX = re.compile(r"^\.[a-z0-9]+(\.[a-z0-9]+)*$")
_CHUNK = 1 << 20
SUFFIX = ".safetensors"


class ArtifactError(Exception):
    """Base class of the artifact store's errors."""


class ArtifactMissing(ArtifactError, FileNotFoundError):
    """No artifact at that path."""


class ArtifactCorrupt(ArtifactError):
    """The artifact's bytes do not hash to the recorded sha256."""


@dataclass(frozen=True)
class StoredArtifact:
    """Where an artifact went: ``path`` is relative to the store's root (POSIX form)."""

    path: str
    sha256: str
    size_bytes: int


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """A local directory of content-addressed artifacts.

    Writes are atomic (a temporary file in the target directory, flushed to disk,
    then renamed over the final name), so a reader never sees a partial file and
    two writers of the same content both succeed.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # -- paths ----------------------------------------------------------------------
    @staticmethod
    def relative_path(kind: str, sha256: str, suffix: str = SUFFIX) -> str:
        """The path an artifact of ``kind`` with this hash is stored under."""
        if not _KIND.match(kind):
            raise ValueError(f"invalid artifact kind {kind!r} (lowercase letters, digits, - and _)")
        if not _SUFFIX.match(suffix):
            raise ValueError(f"invalid artifact suffix {suffix!r}")
        return f"{kind}/{sha256[:2]}/{sha256}{suffix}"

    def _resolve(self, path: str) -> Path:
        rel = PurePosixPath(path)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"artifact path must be relative to the store root: {path!r}")
        return self.root.joinpath(*rel.parts)

    # -- interface --------------------------------------------------------------------
    def put(self, kind: str, data: bytes) -> StoredArtifact:
        """Store ``data`` under its sha256; idempotent for identical content."""
        digest = sha256_hex(data)
        rel = self.relative_path(kind, digest)
        final = self._resolve(rel)
        if final.is_file() and final.stat().st_size == len(data):
            return StoredArtifact(path=rel, sha256=digest, size_bytes=len(data))
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{digest[:16]}.", suffix=".tmp", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.debug("stored %s (%d bytes)", rel, len(data))
        return StoredArtifact(path=rel, sha256=digest, size_bytes=len(data))

    def get(self, path: str, sha256: str | None = None) -> bytes:
        """The artifact's bytes; with ``sha256``, verified against it."""
        file = self._resolve(path)
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise ArtifactMissing(f"artifact not found: {path} (store {self.root})") from None
        if sha256 is not None:
            actual = sha256_hex(data)
            if actual != sha256:
                raise ArtifactCorrupt(
                    f"artifact {path} is corrupt: its sha256 is {actual}, the ledger "
                    f"records {sha256}"
                )
        return data

    def exists(self, path: str) -> bool:
        return self._resolve(path).is_file()

    def local_path(self, path: str) -> Path:
        """Where the artifact ``path`` lies on this machine (to stream it); raises
        :class:`ArtifactMissing` when it is not there."""
        file = self._resolve(path)
        if not file.is_file():
            raise ArtifactMissing(f"artifact not found: {path} (store {self.root})")
        return file

    def scratch(self, prefix: str) -> Path:
        """A new empty directory inside the store, for building a large artifact on
        the same file system it is renamed into (the caller removes it)."""
        base = self.root / ".scratch"
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=base))

    def put_file(self, kind: str, source: Path, suffix: str) -> StoredArtifact:
        """Store the file ``source`` under its sha256 (read in chunks, never whole in
        memory) by renaming it into place; ``source`` is gone afterwards. For large
        artifacts (export archives): build them in :meth:`scratch`."""
        h = hashlib.sha256()
        size = 0
        with source.open("rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
                size += len(chunk)
            os.fsync(f.fileno())
        digest = h.hexdigest()
        rel = self.relative_path(kind, digest, suffix)
        final = self._resolve(rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.is_file() and final.stat().st_size == size:
            source.unlink()
        else:
            os.replace(source, final)
        log.debug("stored %s (%d bytes)", rel, size)
        return StoredArtifact(path=rel, sha256=digest, size_bytes=size)
