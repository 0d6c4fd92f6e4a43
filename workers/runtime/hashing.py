"""Tensor hashes, and the error a rebuilt state that does not match them raises."""

from __future__ import annotations

import hashlib

import torch


class IntegrityError(RuntimeError):
    """A rebuilt state does not hash to what the ledger recorded (or a snapshot is
    not the version it claims to be). The runtime refuses to serve it."""


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 over ``"<dtype>:<shape>:"`` and the tensor's raw bytes (computed on CPU).

    Works for every dtype (bf16/fp16 included) because the bytes are read through a
    ``uint8`` view of the contiguous tensor, not through NumPy's dtypes.
    """
    flat = t.detach().contiguous().cpu().reshape(-1)
    h = hashlib.sha256()
    dtype = str(flat.dtype).removeprefix("torch.")
    h.update(f"{dtype}:{','.join(str(s) for s in t.shape)}:".encode())
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()
