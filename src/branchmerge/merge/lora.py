"""Exact LoRA branches: a group whose branches are PEFT LoRA adapters of one base (and that base itself, if
it is a branch) keeps each adapter's own factors over the base instead of compressing merged models.

For a tensor the adapters change by factors alone: ``W̄`` is the base's weight, every ``s_i`` is 1 and
``U_i = scaling·B_i``, ``V_i = A_i`` (``B_i``, ``A_i`` zero-padded to the tensor's largest adapter rank; a
branch that leaves the tensor alone gets zeros). Then ``s_i·(x W̄ᵀ + (x V_iᵀ) U_iᵀ)`` is the adapter's output
exactly, and the bundle is the size of the base plus the adapters, as multi-LoRA serving holds them. A
branch that changes such a tensor otherwise (DoRA's rescaling) stores its difference from the base at the
tensor's compress rate; the other branches stay exact.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from branchmerge.compress import compress_difference, rank_for, relative_error, tensor_seed
from branchmerge.config import MergeConfig
from branchmerge.io.adapters import LoraSource
from branchmerge.io.bundle import key_mean, key_part, key_scales
from branchmerge.io.models import ModelSource
from branchmerge.io.writer import ShardWriter
from branchmerge.merge.parts import store_factors

logger = logging.getLogger(__name__)


def lora_base(sources: list[ModelSource]) -> ModelSource | None:
    """The base of a group whose sources are LoRA adapters of one base folder (or that folder itself), else
    None (the group holds a full fine-tune, or adapters of different bases)."""
    bases = {s.base.path.resolve(): s.base for s in sources if isinstance(s, LoraSource)}
    if len(bases) != 1 or len(sources) < 2:  # (one adapter alone: its merged weights, stored once, are smaller)
        return None
    (path, base), = bases.items()
    if any(not isinstance(s, LoraSource) and s.path.resolve() != path for s in sources):
        return None
    return base


def lora_ranks(sources: list[ModelSource], tensor: str) -> list[int | None] | None:
    """Each branch's adapter rank for ``tensor`` (0: unchanged; None: changed otherwise, as DoRA does), or
    None when no adapter changes it (then the usual path stores it once)."""
    ranks = [s.change_rank(tensor) if isinstance(s, LoraSource) else 0 for s in sources]
    return None if all(r == 0 for r in ranks) else ranks


def lora_tensor(g: Any, base: ModelSource, tensor: str, shape: tuple[int, ...], config: MergeConfig,
                writer: ShardWriter, dtype: torch.dtype, device: torch.device) -> dict[str, Any] | None:
    """Write ``tensor`` of group ``g`` over ``base`` and return its record, or None when no adapter changes it
    (the caller then stores it once). Adapters' factors are kept exactly; a branch that
    changes the tensor otherwise (DoRA) stores its difference from the base at the tensor's compress rate
    (the rank is then the larger of that and the adapters')."""
    ranks = lora_ranks(g.sources, tensor)
    if ranks is None:
        return None
    rate_rank = rank_for(shape, config.rate_for(tensor)) if None in ranks else 0
    rank, n = max([r or 0 for r in ranks] + [rate_rank]), len(g.sources)
    w = base.get(tensor).to(device)
    mean_q = w.to(dtype)
    writer.add(key_mean(g.name, tensor), mean_q)
    writer.add(key_scales(g.name, tensor), torch.ones(n, dtype=torch.float32))
    esize = mean_q.element_size()
    nbytes, bits = mean_q.numel() * esize + 4 * n, int(config.factor_bits)
    errors: dict[str, float] = {}
    dense = False
    for s, r in zip(g.sources, ranks):
        exact = w if r == 0 else s.get(tensor).to(device)
        if r is None:  # changed otherwise: its difference from the base, compressed as the method does
            gen = torch.Generator(device=device).manual_seed(tensor_seed(config.rsvd.seed, s.name, tensor))
            diff = compress_difference(exact, w, rank, oversample=config.rsvd.oversample, n_iter=config.rsvd.n_iter,
                                       generator=gen)
            u, v = diff.u, diff.v
            if diff.dense is not None:
                dense = True
                writer.add(key_part(s.name, tensor, "delta"), diff.dense.to(dtype))
                nbytes += diff.dense.numel() * esize
                errors[s.name] = relative_error(mean_q.float() + diff.dense.to(dtype).float(), exact)
                continue
        elif r:
            u, v = s.factors(tensor, rank)
        else:  # (zeros, not nothing: every branch with factors of one rank keeps the fused layouts)
            u, v = torch.zeros(shape[0], rank), torch.zeros(rank, shape[1])
        if u is None:
            u, v = torch.zeros(shape[0], 0), torch.zeros(0, shape[1])
        b, stored = store_factors(writer, s.name, tensor, u.to(device), v.to(device), [(bits, rank)],
                                  config.group_size, dtype)
        nbytes += b
        errors[s.name] = relative_error(stored.apply(mean_q), exact)
    rec: dict[str, Any] = {"role": "compressed", "shape": list(shape), "compress_rate": 1 - rank / min(shape),
                           "rank": rank, "dense": dense, "rel_error": errors, "bytes": nbytes}
    if bits != 16 and not dense and rank > 0:
        rec.update(bits=[[bits, rank]], group_size=config.group_size)
    return rec
