"""LoRA math (PEFT's conventions): a module's weight change from its factors, DoRA's merged weight, and the
factors as branch factors ``U [m, k]``, ``V [k, n]`` (zero-padded to a group's rank), so an adapter can be
a branch exactly: ``W_i = W̄ + U_i V_i`` with ``W̄`` the base and ``s_i = 1``."""

from __future__ import annotations

import torch
from torch import Tensor


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
