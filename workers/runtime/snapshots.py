"""Snapshots: the fp32 accumulators and method state of one version in one
safetensors blob, so that a rebuild can start there instead of the base."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from service.ledger.records import VersionRecord
from workers.runtime.hashing import IntegrityError

SNAPSHOT_FORMAT = "1"
ACC = "acc:"  # snapshot key prefix of parameter accumulators
SNAPSHOT_KEY = "memedit_snapshot"


def encode(version: int, acc: Mapping[str, torch.Tensor], states: Iterable[Any]) -> bytes:
    """The accumulators ``acc`` and the method ``states`` as one safetensors blob
    whose bytes are a function of the state alone."""
    tensors = {ACC + n: t.detach().contiguous().cpu() for n, t in acc.items()}
    for s in states:
        for k, t in s.tensors().items():
            tensors[s.prefix + k] = t.detach().contiguous().cpu()
    # one metadata key: safetensors writes several keys in an arbitrary order
    header = {"format": SNAPSHOT_FORMAT, "version": version, "params": sorted(acc)}
    return st_save(tensors, metadata={SNAPSHOT_KEY: json.dumps(header, sort_keys=True)})


def decode(
    blob: bytes, rec: VersionRecord, same_state: Iterable[int]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header and tensors of ``rec``'s snapshot blob, which may have been taken at
    any version in ``same_state`` (``rec`` and, through rollbacks, the versions it
    equals); :class:`IntegrityError` for a blob that is not such a snapshot."""
    try:
        header = json.loads(_metadata(blob)[SNAPSHOT_KEY])
    except (KeyError, ValueError):
        raise IntegrityError(
            f"snapshot of version {rec.number} is not a memedit snapshot"
        ) from None
    if header.get("format") != SNAPSHOT_FORMAT:
        raise IntegrityError(
            f"snapshot of version {rec.number} has format {header.get('format')!r}"
        )
    if header.get("version") not in set(same_state):
        raise IntegrityError(
            f"snapshot stored for version {rec.number} is of version {header.get('version')}"
        )
    return header, st_load(blob)


def _metadata(blob: bytes) -> dict[str, Any]:
    """safetensors ``__metadata__`` (8-byte little-endian header length, then JSON)."""
    n = int.from_bytes(blob[:8], "little")
    return dict(json.loads(blob[8 : 8 + n]).get("__metadata__") or {})
