"""The batched editors' linear algebra against the direct d × d solves (fp64), and the
per-layer cache of factorisations."""

from __future__ import annotations

import pytest
import torch

from workers.editing.common import solves
from workers.editing.common.base import EditError
from workers.editing.types import EditContext

D, N = 96, 7


def spd(seed: int, d: int = D, low: float = 1e-4, high: float = 1e2) -> torch.Tensor:
    """A symmetric positive definite matrix with eigenvalues spread from ``low`` to
    ``high`` (layer statistics are that ill-conditioned)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    values = torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), d)
    return (q * values.to(torch.float64)) @ q.T


def keys(seed: int, d: int = D, n: int = N) -> torch.Tensor:
    return torch.randn(d, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ctx_with(stats: dict[str, torch.Tensor]) -> EditContext:
    return EditContext(stats_provider=lambda param: stats[param])


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9) -> None:
    assert a.dtype == b.dtype == torch.float64
    err = float((a - b).norm() / b.norm())
    assert err < rtol, err


@pytest.mark.parametrize("lam", [1.0, 2093.0, 15000.0])
def test_memit_push_through_equals_the_direct_solve(lam: float) -> None:
    c, k = spd(0), keys(1)
    ctx = ctx_with({"w": c.float()})
    factor = solves.stats_factor(ctx, "w", D, use_stats=True)
    c32 = c.float().double()  # the provider's fp32 statistics, as the editor sees them
    direct = torch.linalg.solve(lam * c32 + k @ k.T, k)
    close(solves.memit_right(factor, k, lam), direct)
    no_stats = solves.stats_factor(ctx, "w", D, use_stats=False)
    close(solves.memit_right(no_stats, k, lam), torch.linalg.solve(lam * torch.eye(D) + k @ k.T, k))


@pytest.mark.parametrize(("lam", "ridge", "delta"), [(13953.5, 0.0, 0.1), (1.0, 0.5, 0.0)])
def test_emmet_equals_the_formula_with_explicit_inverses(lam, ridge, delta) -> None:
    c, k = spd(2).float().double(), keys(3)
    ctx = ctx_with({"w": c.float()})
    factor = solves.stats_factor(ctx, "w", D, use_stats=True, ridge=ridge / lam)
    c_inv = torch.linalg.inv(lam * c + ridge * torch.eye(D, dtype=torch.float64))
    d_inv = torch.linalg.inv(k.T @ c_inv @ k + delta * torch.eye(N, dtype=torch.float64))
    upd_keys = (d_inv @ k.T @ c_inv).T  # ΔW = R · rightᵀ = R D⁻¹ KᵀC'⁻¹
    right = solves.emmet_right(factor, k, lam, delta)
    close(right, upd_keys, rtol=1e-8)
    if delta == 0:  # the equality constraint: ΔW K = R, i.e. rightᵀ K = I
        close(right.T @ k, torch.eye(N, dtype=torch.float64), rtol=1e-8)


def test_emmet_with_unit_delta_is_memit() -> None:
    """Gupta et al.'s unification: (KᵀC'⁻¹K + I)⁻¹ is MEMIT's push-through form."""
    ctx = ctx_with({"w": spd(4).float()})
    factor = solves.stats_factor(ctx, "w", D, use_stats=True)
    k = keys(5)
    close(solves.emmet_right(factor, k, 500.0, 1.0), solves.memit_right(factor, k, 500.0))


@pytest.mark.parametrize("with_prior", [False, True])
def test_alphaedit_reduced_solve_equals_the_direct_solve(with_prior: bool) -> None:
    c = spd(6, low=1e-4, high=10.0).float()
    ctx = ctx_with({"w": c})
    threshold, alpha = 1e-2, 10.0
    basis = solves.nullspace_basis(ctx, "w", D, threshold)
    values, vectors = torch.linalg.eigh(c.double())
    assert basis.shape[1] == int((values < threshold).sum()) > 0
    p = vectors[:, values < threshold] @ vectors[:, values < threshold].T
    k, kp = keys(7), keys(8, n=40)
    prior = (kp @ kp.T).float() if with_prior else None
    a = k @ k.T + (prior.double() if prior is not None else 0)
    direct = torch.linalg.solve(p @ a + alpha * torch.eye(D, dtype=torch.float64), p @ k)
    right = solves.alphaedit_right(basis, k, prior, alpha)
    close(right, direct, rtol=1e-8)
    # the update ΔW = R rightᵀ vanishes on the preserved subspace (eigenvalues ≥ threshold)
    kept = vectors[:, values >= threshold]
    assert float((right.T @ kept).norm()) < 1e-10 * float(right.norm())


def test_factorisations_are_cached_per_layer_statistics_and_knob() -> None:
    c1, c2 = spd(9).float(), spd(10).float()
    stats = {"a": c1, "b": c1.clone()}
    calls: list[str] = []

    def provide(param: str) -> torch.Tensor:
        calls.append(param)
        return stats[param]

    ctx = EditContext(stats_provider=provide)
    first = solves.stats_factor(ctx, "a", D, True)
    assert solves.stats_factor(ctx, "a", D, True) is first  # reused, not recomputed
    assert solves.stats_factor(ctx, "b", D, True) is not first  # another layer
    assert solves.stats_factor(ctx, "a", D, True, ridge=0.1) is not first  # another knob
    stats["a"] = c2  # statistics recomputed (e.g. more samples): a new entry
    second = solves.stats_factor(ctx, "a", D, True)
    assert second is not first
    k = keys(11)
    close(second.solve(k), torch.linalg.solve(c2.double(), k), rtol=1e-6)
    basis = solves.nullspace_basis(ctx, "a", D, 1e-2)
    assert solves.nullspace_basis(ctx, "a", D, 1e-2) is basis
    assert solves.nullspace_basis(ctx, "a", D, 2e-2) is not basis
    assert len(ctx.cache[solves.CACHE_KEY]) == 6
    for i in range(solves.MAX_CACHED + 3):  # bounded: the oldest entries go first
        solves.nullspace_basis(ctx, "a", D, 1e-3 * (i + 1))
    assert len(ctx.cache[solves.CACHE_KEY]) == solves.MAX_CACHED


def test_indefinite_statistics_fall_back_to_lu_and_singular_ones_fail() -> None:
    m = spd(12).float().double()
    m[0, 0] = -1.0  # symmetric, not positive definite, not singular
    factor = solves.factorise(m)
    assert factor.kind == "lu"
    k = keys(13)
    close(factor.solve(k), torch.linalg.solve(m, k), rtol=1e-8)
    with pytest.raises(EditError, match="singular"):
        solves.factorise(torch.zeros(D, D, dtype=torch.float64))


def test_empty_null_space_and_wrong_shapes_are_edit_errors() -> None:
    ctx = ctx_with({"w": spd(14, low=1.0, high=2.0).float()})
    with pytest.raises(EditError, match="nullspace_threshold"):
        solves.nullspace_basis(ctx, "w", D, 0.5)
    with pytest.raises(EditError, match="shape"):
        solves.stats_factor(ctx, "w", D + 1, True)
