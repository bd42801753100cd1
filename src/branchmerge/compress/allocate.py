"""Ranks (and bit widths) per tensor under one byte budget, from the spectra of the differences. Pure math.

Every singular triplet ``j`` of a tensor's difference costs its bytes (for all the group's branches: one
rank per tensor is shared by the group, so the runtime's single-kernel mixed-batch path holds) and buys
``Σ_i σ_ij²`` — the drop in the summed squared relative error, since each ``‖Ŵ_i‖ = 1`` — less the
squared error quantizing it would add. Greedy water-filling takes the best gain per byte next, one
triplet at a time, across all tensors; spectra are non-increasing, so this is the optimum of the
fractional problem and within one triplet of the integer one.

With two bit widths (``mixed``) a tensor's triplets are a prefix at the high width followed by a prefix
at the low one; the moves are "add a triplet at the low width" and "raise the next low triplet to the
high width", both priced by their gain per byte.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Spectrum:
    """One compressed tensor as the allocator sees it.

    Attributes:
        key: its name in the allocation.
        gains: per bit width, ``[cap]``: what triplet ``j`` removes from the summed squared error at that
            width (``Σ_i σ_ij² −`` its quantization error), non-increasing in ``j`` up to noise.
        cost: per bit width, bytes of one triplet for all the group's branches.
        total: summed squared error at rank 0 (``Σ_i ‖Ŵ_i − W̄‖²``).
    """

    key: str
    gains: dict[int, Tensor]
    cost: dict[int, int]
    total: float

    @property
    def cap(self) -> int:
        return int(next(iter(self.gains.values())).numel())


@dataclass
class Allocation:
    """Result: per tensor, ``[(bits, triplets), …]`` high width first; bytes spent; remaining error."""

    ranks: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    spent: int = 0
    error: float = 0.0

    def rank(self, key: str) -> int:
        return sum(c for _, c in self.ranks[key])


def allocate(spectra: list[Spectrum], budget: int, widths: tuple[int, ...]) -> Allocation:
    """Greedy allocation of ``budget`` bytes over ``spectra``.

    Args:
        spectra: the tensors; each must have gains and costs for every width in ``widths``.
        budget: bytes available for factors.
        widths: one bit width (e.g. ``(16,)``, ``(8,)``) or two, high then low (``(8, 4)``).

    Returns:
        An :class:`Allocation` whose ``spent ≤ budget``.
    """
    if len(widths) not in (1, 2):
        raise ValueError(f"widths must list one or two bit widths, got {widths}")
    hi, lo = widths[0], widths[-1]
    n_hi = [0] * len(spectra)  # triplets at the high width (a prefix)
    n_all = [0] * len(spectra)  # triplets in all
    heap: list[tuple[float, int, int, str, int]] = []
    seq = 0

    def push(t: int) -> None:
        nonlocal seq
        s = spectra[t]
        k, h = n_all[t], n_hi[t]
        if k < s.cap:  # add triplet k at the low width
            g = float(s.gains[lo][k])
            if g > 0:
                heapq.heappush(heap, (-g / s.cost[lo], seq, t, "add", k))
                seq += 1
        if hi != lo and h < k:  # raise triplet h to the high width
            g = float(s.gains[hi][h] - s.gains[lo][h])
            dc = s.cost[hi] - s.cost[lo]
            if g > 0 and dc > 0:
                heapq.heappush(heap, (-g / dc, seq, t, "up", h))
                seq += 1

    for t in range(len(spectra)):
        push(t)
    spent = 0
    dead: set[tuple[int, str]] = set()
    while heap:
        _, _, t, kind, pos = heapq.heappop(heap)
        s = spectra[t]
        if (t, kind) in dead or pos != (n_all[t] if kind == "add" else n_hi[t]):
            continue  # stale: the tensor moved on since this was pushed
        cost = s.cost[lo] if kind == "add" else s.cost[hi] - s.cost[lo]
        if spent + cost > budget:
            dead.add((t, kind))  # later moves of this kind for this tensor are worth less per byte
            continue
        spent += cost
        if kind == "add":
            n_all[t] += 1
        else:
            n_hi[t] += 1
        push(t)
    out = Allocation(spent=spent)
    for t, s in enumerate(spectra):
        parts = [(hi, n_hi[t]), (lo, n_all[t] - n_hi[t])] if hi != lo else [(lo, n_all[t])]
        out.ranks[s.key] = parts
        out.error += remaining_error(s, parts)
    return out


def remaining_error(s: Spectrum, parts: list[tuple[int, int]]) -> float:
    """Summed squared error left in tensor ``s`` with ``parts`` = ``[(bits, triplets), …]``."""
    done, lo = 0.0, 0
    for bits, c in parts:
        done += float(s.gains[bits][lo:lo + c].sum())
        lo += c
    return max(s.total - done, 0.0)


def crossover_rank(m: int, n: int) -> int:
    """The largest rank whose factors are smaller than the dense ``[m, n]`` difference (``k(m+n) < mn``)."""
    return max(0, min(min(m, n), (m * n - 1) // (m + n)))


def uniform_share(shapes: list[tuple[int, int, int]], budget: int, triplet_cost) -> float:
    """The ``1 − r`` a uniform rate would need to spend ``budget``: ``shapes`` lists ``(m, n, branches)``,
    ``triplet_cost(m, n)`` is one branch's bytes per triplet."""
    full = sum(nb * min(m, n) * triplet_cost(m, n) for m, n, nb in shapes)
    return budget / full if full else 0.0


def cap_rank(m: int, n: int, share: float, factor: float) -> int:
    """Rank the rSVD computes for allocation: ``factor`` times the uniform rank at ``share``, at least 1,
    at most the crossover rank."""
    return max(1, min(crossover_rank(m, n), math.ceil(factor * share * min(m, n))))


def spectrum(key: str, sigma2: Tensor, total: float, cost: dict[int, int],
             quant_err: dict[int, Tensor] | None = None) -> Spectrum:
    """A :class:`Spectrum` from the summed squared singular values ``sigma2`` ``[cap]`` and, per quantized
    width, the summed squared quantization error of each triplet ``[cap]``."""
    gains = {}
    for bits in cost:
        err = (quant_err or {}).get(bits)
        gains[bits] = sigma2.float() - (err.float() if err is not None else torch.zeros_like(sigma2.float()))
    return Spectrum(key, gains, cost, float(total))
