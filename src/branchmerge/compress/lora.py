"""LoRA math (PEFT's conventions): a module's weight change from its factors, DoRA's merged weight, and the
factors as branch factors ``U [m, k]``, ``V [k, n]`` (zero-padded to a group's rank), so an adapter can be
a branch exactly: ``W_i = W̄ + U_i V_i`` with ``W̄`` the base and ``s_i = 1``; and the reverse, a LoRA pair
extracted from a fine-tune's difference."""

from __future__ import annotations

import torch
from torch import Tensor

from branchmerge.compress.lowrank import low_rank_factors, truncated_svd_factors


def lora_delta(a: Tensor, b: Tensor, scaling: float, *, embedding: bool = False,
               fan_in_fan_out: bool = False) -> Tensor:
    """The weight change of one LoRA module, in float32.

    Args:
        a: ``[r, in]`` (``lora_A``; ``[r, num_embeddings]`` for an embedding's ``lora_embedding_A``).
        b: ``[out, r]`` (``lora_B``; ``[embedding_dim, r]`` for an embedding).
        embedding: the factors of an embedding: the change is ``(B·A)ᵀ``, ``[num_embeddings, embedding_dim]``.
        fan_in_fan_out: the base weight is stored ``[in, out]`` (GPT-2's Conv1D): the change is transposed.

    Returns:
        ``scaling·B·A`` as the base weight is stored: ``[out, in]`` for a linear layer.
    """
    d = (b.float() @ a.float()) * scaling
    return d.T if embedding or fan_in_fan_out else d


def lora_factors(a: Tensor, b: Tensor, scaling: float, rank: int, *, fan_in_fan_out: bool = False
                 ) -> tuple[Tensor, Tensor]:
    """``U [m, rank]``, ``V [rank, n]`` in float32 with ``U V`` = :func:`lora_delta` (as the weight is stored),
    zero-padded from the adapter's rank ``r`` up to ``rank`` (a group's branches share one rank).

    Args:
        a: ``[r, in]``; b: ``[out, r]``; rank: at least ``r``.
    """
    r = a.shape[0]
    if rank < r:
        raise ValueError(f"rank {rank} is below the factors' rank {r}")
    u, v = (a.float().T, b.float().T * scaling) if fan_in_fan_out else (b.float() * scaling, a.float())
    pu = torch.zeros(u.shape[0], rank, dtype=torch.float32, device=u.device)
    pv = torch.zeros(rank, v.shape[1], dtype=torch.float32, device=v.device)
    pu[:, :r], pv[:r] = u, v
    return pu, pv


def dora_weight(weight: Tensor, delta: Tensor, magnitude: Tensor, *, fan_in_fan_out: bool = False) -> Tensor:
    """DoRA's merged weight ``m · (W + ΔW) / ‖W + ΔW‖`` (norms of each output row), in float32.

    Args:
        weight, delta: ``[out, in]`` (``[in, out]`` with ``fan_in_fan_out``).
        magnitude: ``[out]``, the adapter's ``lora_magnitude_vector``.
    """
    w = weight.float() + delta
    rows = w.T if fan_in_fan_out else w
    factor = magnitude.float() / torch.linalg.vector_norm(rows, dim=1)
    return w * (factor.view(1, -1) if fan_in_fan_out else factor.view(-1, 1))


def extract_lora_factors(delta: Tensor, max_rank: int, *, sv_epsilon: float = 0.0, target_error: float | None = None,
                         exact: bool = False, n_iter: int = 4, generator: torch.Generator | None = None,
                         ) -> tuple[Tensor, Tensor, float]:
    """A LoRA pair for a fine-tune's difference ``delta`` ``[out, in]``: ``lora_B`` ``[out, k]`` and
    ``lora_A`` ``[k, in]`` with ``B @ A ≈ delta``, each holding the square root of the singular values
    (mergekit's ``distribute_scale``).

    ``k`` is at most ``max_rank``; singular values at or below ``sv_epsilon`` are dropped; with
    ``target_error``, ``k`` is the smallest rank whose relative Frobenius error ``‖delta − B A‖ / ‖delta‖``
    is at most it (measured from the singular values and ``‖delta‖``). ``exact`` uses the full SVD, else the
    randomized one (Halko et al.). Returns ``(B, A, relative error)``; ``k`` may be 0 (a zero difference).
    """
    d = delta.float()
    total = float(torch.linalg.vector_norm(d))
    k = min(max_rank, *d.shape)
    if total == 0.0 or k == 0:
        return d.new_zeros(d.shape[0], 0), d.new_zeros(0, d.shape[1]), 0.0
    u, v = truncated_svd_factors(d, k) if exact else low_rank_factors(d, k, n_iter=n_iter, generator=generator)
    s = torch.linalg.vector_norm(u, dim=0)  # [k] singular values (u holds them)
    keep = int((s > sv_epsilon).sum()) if sv_epsilon > 0 else k
    if target_error is not None and keep > 0:
        # the error at rank j from the singular values: √(‖Δ‖² − Σ_{i≤j} s_i²) / ‖Δ‖; float32 leaves it about
        # 3e-4 uncertain, so a target below 1e-2 is searched with the measured error instead (monotone in j)
        left = (total ** 2 - torch.cumsum(s[:keep].double() ** 2, 0)).clamp(min=0).sqrt() / total
        hit = torch.nonzero(left <= target_error)
        if target_error >= 1e-2:
            keep = int(hit[0]) + 1 if len(hit) else keep
        else:
            lo, hi = 1, keep
            while lo < hi:
                mid = (lo + hi) // 2
                if float(torch.linalg.vector_norm(d - u[:, :mid] @ v[:mid])) / total <= target_error:
                    hi = mid
                else:
                    lo = mid + 1
            keep = lo
    u, v, s = u[:, :keep], v[:keep], s[:keep]
    root = s.clamp(min=1e-30).sqrt()
    b, a = u / root, v * root[:, None]
    err = float(torch.linalg.vector_norm(d - b @ a)) / total
    return b.contiguous(), a.contiguous(), err
