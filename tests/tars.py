"""Tar archives built in memory, for the tests of patch uploads."""

from __future__ import annotations

import io
import tarfile


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar holding ``files`` (name → content)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
