"""Low-rank compression of each branch's difference (the method). Pure math: tensors in, tensors out.

For a group of same-shape weights ``W_i`` (i = 1..N), each ``[m, n]``:

    s_i = ‖W_i‖_F,   Ŵ_i = W_i / s_i,   W̄ = mean_i Ŵ_i,   U_i V_i ≈ Ŵ_i − W̄   (rank k)

with ``k = round((1 − r) · min(m, n))`` for compress rate ``r``. A branch's weight is recovered as
``W_i ≈ s_i · (W̄ + U_i V_i)``. The difference is kept densely wherever ``k·(m+n) ≥ m·n`` (the factors
would not be smaller), so ``r = 0`` reproduces every input up to float error; ``r = 1`` keeps no factors.

The randomized SVD follows Halko, Martinsson & Tropp, "Finding structure with randomness" (2011),
https://arxiv.org/abs/0909.4061, Algorithm 4.4 (randomized subspace iteration).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import Tensor


def rank_for(shape: tuple[int, ...] | torch.Size, compress_rate: float) -> int:
    """Rank ``k = round((1 − r) · min(m, n))`` kept for a 2-D weight of ``shape`` at rate ``r``."""
    if not 0.0 <= compress_rate <= 1.0:
        raise ValueError(f"compress_rate must be in [0, 1], got {compress_rate}")
    m, n = shape
    return int(round((1.0 - compress_rate) * min(m, n)))


def stores_dense(shape: tuple[int, ...] | torch.Size, rank: int) -> bool:
    """True when factors of this rank are not smaller than the dense ``[m, n]`` difference."""
    m, n = shape
    return rank > 0 and rank * (m + n) >= m * n


def stored_bytes(shape: tuple[int, int], rank: int, n: int, esize: int) -> tuple[int, int, int]:
    """Bytes the merge stores for one compressed ``[m, n]`` weight of ``n`` branches, as
    ``(W̄ plus the float32 scales, low-rank factors, dense differences)``: each branch keeps factors of
    ``rank``, or its dense difference where factors would not be smaller."""
    rows, cols = shape
    mean = rows * cols * esize + 4 * n
    if stores_dense(shape, rank):
        return mean, 0, n * rows * cols * esize
    return mean, n * rank * (rows + cols) * esize, 0


def frobenius_scale(weight: Tensor) -> float:
    """``s = ‖W‖_F`` computed in float32 (float64 accumulation for large matrices)."""
    return float(torch.linalg.vector_norm(weight.float(), dtype=torch.float64))


def normalize(weight: Tensor, scale: float) -> Tensor:
    """``Ŵ = W / s`` in float32; an all-zero weight (s = 0) stays zero."""
    w = weight.float()
    return w / scale if scale > 0 else torch.zeros_like(w)


def tensor_seed(seed: int, *names: str) -> int:
    """A per-tensor seed derived from the global seed and names, independent of processing order."""
    return (seed * 1_000_003 + zlib.crc32("/".join(names).encode())) % (2**63 - 1)


def low_rank_factors(
    delta: Tensor,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Randomized truncated SVD: ``delta ≈ U @ V``.

    Args:
        delta: ``[m, n]`` matrix (any float dtype; computed in float32 on its device).
        rank: ``k``, 1 ≤ k ≤ min(m, n).
        oversample: extra random directions ``p``; the sketch has ``k + p`` columns.
        n_iter: power (subspace) iterations, each re-orthonormalized by QR.
        generator: seeded generator on ``delta``'s device for the Gaussian test matrix.

    Returns:
        ``U`` of shape ``[m, k]`` (left singular vectors scaled by the singular values) and ``V`` of
        shape ``[k, n]`` (right singular vectors), both float32.

    Raises:
        ValueError: if ``delta`` is not 2-D or ``rank`` is out of range.
    """
    if delta.ndim != 2:
        raise ValueError(f"delta must be 2-D, got shape {list(delta.shape)}")
    m, n = delta.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for shape {[m, n]}, got {rank}")
    a = delta.float()
    sketch = min(rank + oversample, min(m, n))
    if sketch >= min(m, n):  # the sketch would span everything: exact SVD is as cheap
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank].contiguous()
    omega = torch.randn(n, sketch, generator=generator, device=a.device, dtype=a.dtype)  # [n, l]
    q, _ = torch.linalg.qr(a @ omega)  # [m, l]
    for _ in range(n_iter):
        z, _ = torch.linalg.qr(a.T @ q)  # [n, l]
        q, _ = torch.linalg.qr(a @ z)  # [m, l]
    b = q.T @ a  # [l, n]
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)  # ub [l, l], s [l], vh [l, n]
    u = q @ ub[:, :rank]  # [m, k]
    return u * s[:rank], vh[:rank].contiguous()


def truncated_svd_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Exact truncated SVD (the reference the randomized one is measured against)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank].contiguous()


@dataclass(frozen=True)
class Difference:
    """How one branch's normalized difference ``Ŵ_i − W̄`` is stored.

    Exactly one form: ``dense`` ``[m, n]``; or ``u`` ``[m, k]`` with ``v`` ``[k, n]``; or nothing
    (rank 0: the branch is the scaled mean).
    """

    dense: Tensor | None = None
    u: Tensor | None = None
    v: Tensor | None = None

    @property
    def rank(self) -> int:
        return 0 if self.u is None else self.u.shape[1]

    def to(self, dtype: torch.dtype) -> Difference:
        cast = (lambda t: None if t is None else t.to(dtype).contiguous())
        return Difference(cast(self.dense), cast(self.u), cast(self.v))

    def apply(self, mean: Tensor) -> Tensor:
        """``W̄ + Δ`` in float32, ``[m, n]``."""
        out = mean.float()
        if self.dense is not None:
            return out + self.dense.float()
        if self.u is not None:
            return out + self.u.float() @ self.v.float()
        return out.clone()


def compress_difference(
    normalized: Tensor,
    mean: Tensor,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
) -> Difference:
    """Store ``Ŵ_i − W̄`` at ``rank``: densely when factors would not be smaller, else by rSVD."""
    if rank <= 0:
        return Difference()
    delta = normalized.float() - mean.float()  # [m, n]
    if stores_dense(delta.shape, rank):
        return Difference(dense=delta)
    u, v = low_rank_factors(delta, rank, oversample=oversample, n_iter=n_iter, generator=generator)
    return Difference(u=u, v=v)


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """``‖approx − exact‖_F / ‖exact‖_F`` (0 when both are zero)."""
    denom = float(torch.linalg.vector_norm(exact.float()))
    num = float(torch.linalg.vector_norm(approx.float() - exact.float()))
    return num / denom if denom > 0 else num


def reconstruct(mean: Tensor, scale: float, diff: Difference) -> Tensor:
    """Dense branch weight ``s_i · (W̄ + Δ_i)``, float32 ``[m, n]``."""
    return diff.apply(mean) * scale
