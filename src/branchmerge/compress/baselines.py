"""Delta-compression baselines from the literature, as a registry. Pure math.

Each codec stores one branch's normalized difference ``Δ = Ŵ_i − W̄`` ``[m, n]`` beside the same shared
``W̄`` the branch method uses, in about ``nbytes`` bytes, and returns what a reader would reconstruct plus
the bytes it really stores — so every method is compared at equal bytes (``bench/compact.py``). These
are **baselines for the benches**; bundles store the branch method's low-rank factors.

* ``bitdelta`` — BitDelta without its distillation step (Liu et al. 2024, https://arxiv.org/abs/2402.10193):
  ``sign(Δ)·α`` with one scale ``α = mean|Δ|`` per matrix; one bit per entry whatever ``nbytes`` is.
* ``dare`` — DARE drop-and-rescale (Yu et al. 2024, https://arxiv.org/abs/2311.03099): keep entries with
  probability ``p``, scaled by ``1/p``; the kept positions come from a stored seed, so only the values
  cost bytes (``p·m·n·esize``).
* ``topk`` — the largest-magnitude entries, stored as values plus int32 positions (or a bitmap when
  that is smaller).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DeltaCodec:
    name: str
    fn: Callable[..., tuple[Tensor, int]]
    reference_url: str
    description: str


DELTA_CODECS: dict[str, DeltaCodec] = {}


def delta_codec(name: str, *, reference_url: str):
    """Register ``fn(delta [m, n], nbytes, *, esize, generator) -> (reconstruction [m, n], stored bytes)``."""

    def deco(fn):
        if name in DELTA_CODECS:
            raise ValueError(f"delta codec {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        DELTA_CODECS[name] = DeltaCodec(name, fn, reference_url, doc[0] if doc else "")
        return fn

    return deco


@delta_codec("bitdelta", reference_url="https://arxiv.org/abs/2402.10193")
def bitdelta(delta: Tensor, nbytes: int, *, esize: int = 2, generator: torch.Generator | None = None
             ) -> tuple[Tensor, int]:
    """Baseline: sign of the difference times one scale per matrix (BitDelta without distillation)."""
    d = delta.float()
    alpha = d.abs().mean()
    return torch.sign(d) * alpha, -(-d.numel() // 8) + 4


@delta_codec("dare", reference_url="https://arxiv.org/abs/2311.03099")
def dare(delta: Tensor, nbytes: int, *, esize: int = 2, generator: torch.Generator | None = None
         ) -> tuple[Tensor, int]:
    """Baseline: random drop of the difference's entries, survivors rescaled by 1/p (DARE)."""
    d = delta.float()
    kept = max(0, min(d.numel(), (nbytes - 8) // esize))  # 8 bytes: the seed
    p = kept / d.numel()
    if kept == 0:
        return torch.zeros_like(d), 8
    keep = torch.rand(d.shape, generator=generator, device=d.device) < p
    return d * keep / p, int(keep.sum()) * esize + 8


@delta_codec("topk", reference_url="https://arxiv.org/abs/2306.01708")
def topk(delta: Tensor, nbytes: int, *, esize: int = 2, generator: torch.Generator | None = None
         ) -> tuple[Tensor, int]:
    """Baseline: the largest-magnitude entries of the difference (values plus positions)."""
    d = delta.float()
    total = d.numel()
    bitmap = -(-total // 8)
    k = max((nbytes // (esize + 4)), (nbytes - bitmap) // esize if nbytes > bitmap else 0)
    k = max(0, min(total, k))
    if k == 0:
        return torch.zeros_like(d), 0
    flat = d.flatten()
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(d), min(k * (esize + 4), bitmap + k * esize)
