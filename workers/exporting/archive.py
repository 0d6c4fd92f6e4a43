"""Tar archives of a folder: written in a stable order, read back refusing anything
that would land outside the destination (absolute paths, ``..``, links, devices)."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ArchiveError(ValueError):
    """The archive is not one memedit wrote, or holds a member it refuses."""


def write_tar(folder: Path, dest: Path) -> None:
    """``folder``'s files (sorted, recursively) as an uncompressed tar at ``dest``
    (safetensors do not compress; an uncompressed tar streams as it is read)."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(folder).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o644
            with path.open("rb") as f:
                tar.addfile(info, f)


def extract_tar(source: Path, dest: Path) -> None:
    """Extract ``source`` into the directory ``dest`` (created): regular files and
    directories only, every one inside ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        tar = tarfile.open(source, "r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"{source} is not a tar archive: {exc}") from None
    with tar:
        for member in tar:
            target = (root / member.name).resolve()
            if member.name.startswith("/") or not target.is_relative_to(root):
                raise ArchiveError(f"the archive member {member.name!r} lies outside it")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                raise ArchiveError(f"the archive member {member.name!r} is not a regular file")
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                raise ArchiveError(f"the archive member {member.name!r} cannot be read")
            with src, target.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


@contextmanager
def opened(path: Path) -> Iterator[Path]:
    """A folder with the contents of ``path``: the folder itself, or a tar archive
    extracted into a temporary folder removed afterwards."""
    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix="memedit-archive-"))
    try:
        extract_tar(path, tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into(folder: Path, out: Path) -> None:
    """Put ``folder`` at ``out`` (which must not exist, or be an empty directory)."""
    if out.exists():
        if not out.is_dir() or any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not an empty directory")
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(folder, out)
    except OSError:  # another file system
        shutil.copytree(folder, out)
        shutil.rmtree(folder, ignore_errors=True)
