"""Versions leaving the worker (docs/exports.md): a Hugging Face folder of the
weights (:mod:`~workers.exporting.hf`), a patch against the base that needs no
service to apply (:mod:`~workers.exporting.patch`), and the tar archives they travel
in (:mod:`~workers.exporting.archive`).

A library like :mod:`workers.editing`: torch, transformers and safetensors, nothing
of the ledger or the queue, so that ``memedit apply-patch`` runs without a service.
"""
