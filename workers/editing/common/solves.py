"""The linear algebra of the batched editors, with the expensive parts cached per layer.

MEMIT, EMMET and AlphaEdit all write a batch as ΔW = R · rightᵀ (R the residuals
``[d_out, n]``, ``right`` ``[d_in, n]``; :mod:`workers.editing.common.window`). Each
needs a d_in × d_in matrix built from the layer statistics C = E[k kᵀ] — a
factorisation of C (MEMIT, EMMET) or the eigenvectors of C below a threshold
(AlphaEdit) — which depends only on the statistics, never on the edit. Those are
computed once per layer and kept in ``ctx.cache`` (which lives as long as the worker's
model), keyed by the parameter, the statistics' content hash and the knob that shapes
them (ridge, threshold); a small LRU bounds the memory when requests override knobs.
What is left per edit costs O(d²n), plus, for AlphaEdit with accumulated state, one
m × m Cholesky (m the null-space dimension).

All solves run in float64, as MEMIT's reference code does.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.editing.common.base import EditError
from workers.editing.types import EditContext

CACHE_KEY = "linalg"
MAX_CACHED = 16  # factorisations kept per worker (one per layer × statistics × knob)


def content_hash(t: torch.Tensor) -> str:
    """sha256 of dtype, shape and bytes: the statistics' identity for the cache key
    (~20 ms for a 1,536² fp32 matrix, against ~1 s for the factorisation it saves)."""
    flat = t.detach().contiguous().cpu().reshape(-1)
    h = hashlib.sha256(f"{flat.dtype}:{tuple(t.shape)}:".encode())
    h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()[:24]


def cached(ctx: EditContext, key: str, build: Callable[[], object]) -> object:
    """``build()`` once per ``key`` in the context's LRU of linear-algebra results."""
    lru = ctx.cache.setdefault(CACHE_KEY, OrderedDict())
    if key in lru:
        lru.move_to_end(key)
        return lru[key]
    value = build()
    lru[key] = value
    while len(lru) > MAX_CACHED:
        lru.popitem(last=False)
    return value


def statistics(ctx: EditContext, param: str, d_in: int) -> torch.Tensor:
    """C = E[k kᵀ] of ``param``'s input keys, shape-checked (as the provider gives it)."""
    c = ctx.second_moment(param)
    if tuple(c.shape) != (d_in, d_in):
        raise EditError(f"statistics of {param} have shape {tuple(c.shape)}, expected {d_in}²")
    return c


# -- C + ρI, factorised once (MEMIT, EMMET) --------------------------------------------------


@dataclass(frozen=True)
class Factor:
    """A factorisation of the d × d matrix M = C + ρI (C = I without statistics):
    :meth:`solve` gives M⁻¹B. Cholesky when M is positive definite, else LU."""

    kind: str  # "scalar" (M = sI) | "cholesky" | "lu"
    data: tuple[torch.Tensor, ...] = ()
    scale: float = 1.0

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        if self.kind == "scalar":
            return b / self.scale
        if self.kind == "cholesky":
            return torch.cholesky_solve(b, self.data[0])
        return torch.linalg.lu_solve(self.data[0], self.data[1], b)


def factorise(m: torch.Tensor) -> Factor:
    """Cholesky of a symmetric matrix (fp64), LU if it is not positive definite;
    :class:`EditError` if it is singular."""
    m = m.to(torch.float64)
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0:
        return Factor("cholesky", (chol,))
    lu, pivots, info = torch.linalg.lu_factor_ex(m)
    if int(info) != 0:
        raise EditError("the layer statistics are singular; recompute them with more samples")
    return Factor("lu", (lu, pivots))


def stats_factor(
    ctx: EditContext, param: str, d_in: int, use_stats: bool, ridge: float = 0.0
) -> Factor:
    """The cached factorisation of C + ridge·I for ``param`` (I when ``use_stats`` is
    false). λ is applied by the caller ((λC)⁻¹ = C⁻¹/λ), so every λ shares it."""
    if not use_stats:
        return Factor("scalar", scale=1.0 + ridge)
    c = statistics(ctx, param, d_in)
    key = f"factor:{param}:{content_hash(c)}:ridge={ridge!r}"

    def build() -> Factor:
        m = c.to(torch.float64)
        if ridge:
            m = m + ridge * torch.eye(d_in, dtype=torch.float64, device=m.device)
        return factorise(m)

    factor = cached(ctx, key, build)
    assert isinstance(factor, Factor)
    return factor


def memit_right(factor: Factor, keys: torch.Tensor, lam: float) -> torch.Tensor:
    """(λC + KKᵀ)⁻¹K (MEMIT eq. 14) by the push-through identity

        (λC + KKᵀ)⁻¹K = X (I + KᵀX)⁻¹,   X = (λC)⁻¹K = C⁻¹K / λ,

    so only an n × n system is solved per edit. ``keys`` is K ``[d_in, n]`` fp64."""
    x = factor.solve(keys) / lam
    s = torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device) + keys.T @ x
    return torch.linalg.solve(s, x.T).T  # S symmetric: X S⁻¹ = (S⁻¹ Xᵀ)ᵀ


def emmet_right(factor: Factor, keys: torch.Tensor, lam: float, delta: float) -> torch.Tensor:
    """C'⁻¹K (KᵀC'⁻¹K + δI)⁻¹ with C' = λ(C + ρI) (EMMET; Gupta et al. 2024, the
    equality-constrained solution ΔW = R (KᵀC'⁻¹K)⁻¹ KᵀC'⁻¹ with the δ ridge of the
    reference code against an ill-conditioned KᵀC'⁻¹K). With δ = 0, ΔW K = R exactly;
    with δ = 1 it is MEMIT's solution (compare :func:`memit_right`)."""
    x = factor.solve(keys) / lam
    d = keys.T @ x + delta * torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device)
    try:
        return torch.linalg.solve(d, x.T).T
    except torch.linalg.LinAlgError:
        raise EditError(
            "KᵀC⁻¹K + δI is singular: the batch has linearly dependent keys "
            "(the same subject twice?); raise emmet_lambda or split the batch"
        ) from None


# -- AlphaEdit's null-space projector -------------------------------------------------------


def nullspace_basis(ctx: EditContext, param: str, d_in: int, threshold: float) -> torch.Tensor:
    """U ``[d_in, m]`` fp64: the eigenvectors of C whose eigenvalue is below
    ``threshold``, so that P = U Uᵀ projects onto the directions the preserved
    knowledge hardly uses (AlphaEdit, Fang et al. 2024, eq. 9–10). Cached per layer."""
    c = statistics(ctx, param, d_in)
    key = f"nullspace:{param}:{content_hash(c)}:threshold={threshold!r}"

    def build() -> torch.Tensor:
        values, vectors = torch.linalg.eigh(c.to(torch.float64))
        return vectors[:, values < threshold].contiguous()

    basis = cached(ctx, key, build)
    assert isinstance(basis, torch.Tensor)
    if basis.shape[1] == 0:
        raise EditError(
            f"no eigenvalue of the statistics of {param} is below nullspace_threshold "
            f"{threshold}: the projected update would be zero"
        )
    return basis


def alphaedit_right(
    basis: torch.Tensor, keys: torch.Tensor, prior: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """(P A + αI)⁻¹ P K with P = U Uᵀ and A = K_p K_pᵀ + K Kᵀ (``prior`` = K_p K_pᵀ, the
    keys of earlier edits; AlphaEdit eq. 14 in our layout: ΔW = R · rightᵀ).

    The solution lies in the range of P (X = P(K − AX)/α), so X = U Y with
    (UᵀAU + αI) Y = UᵀK: one symmetric positive definite m × m system instead of a
    general d × d one; without earlier edits UᵀAU = GGᵀ (G = UᵀK) and
    Y = G (GᵀG + αI)⁻¹ costs O(mn²)."""
    g = basis.T @ keys  # [m, n]
    n = keys.shape[1]
    if prior is None:
        s = g.T @ g + alpha * torch.eye(n, dtype=g.dtype, device=g.device)
        y = torch.linalg.solve(s, g.T).T
    else:
        p = prior.to(torch.float64)
        m = basis.T @ (p @ basis) + g @ g.T
        m.diagonal().add_(alpha)
        y = torch.cholesky_solve(g, torch.linalg.cholesky(m))
    return basis @ y
