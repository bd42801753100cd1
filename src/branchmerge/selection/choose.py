"""Choosing what to merge, as pure arithmetic: the predicted bytes of a bundle from shapes and ranks, and
the set of branches and the compress rate that maximize the summed per-domain best accuracy within a
memory budget. No models, no files."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from branchmerge.compress import rank_for, stored_bytes


@dataclass(frozen=True)
class Profile:
    """What the chooser knows of a candidate.

    Attributes:
        name: candidate name.
        group: compression group: fine-tunes of one base share one (their base's name); others their own.
        accuracy: per domain, the candidate's accuracy (mean over that domain's tasks).
        compress_shapes: ``[m, n]`` of each weight the merge compresses.
        other_numel: parameters kept per branch (embeddings, norms, head, biases).
        lora_ranks: a LoRA adapter's rank on each compressed weight (0: unchanged, -1: changed otherwise, as
            DoRA does); zeros for a base model; None for any other model. A group whose members all have them
            keeps the adapters exactly (the merge's ``lora: exact``).
    """

    name: str
    group: str
    accuracy: Mapping[str, float]
    compress_shapes: tuple[tuple[int, int], ...] = ()
    other_numel: int = 0
    lora_ranks: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        return sum(m * n for m, n in self.compress_shapes) + self.other_numel


def bundle_bytes(members: Sequence[Profile], rate: float, esize: int) -> int:
    """Bytes of a bundle holding ``members`` at ``rate``, stored with ``esize``-byte elements: per group of
    two or more, one ``W̄`` and N scales per compressed weight plus each branch's factors (or dense
    difference where factors would not be smaller) and kept tensors; a group of one is its dense model. A
    group of LoRA adapters (and their base) as the merge keeps them exactly: a weight none changes once, any
    other with every branch's factors at the largest adapter rank (or the rate's, where one changes it
    otherwise). An upper bound: tensors identical across branches are stored once by the real merge."""
    groups: dict[str, list[Profile]] = {}
    for p in members:
        groups.setdefault(p.group, []).append(p)
    total = 0
    for ps in groups.values():
        n = len(ps)
        if n == 1:
            total += ps[0].numel * esize
            continue
        exact = all(p.lora_ranks is not None for p in ps)
        for i, shape in enumerate(ps[0].compress_shapes):
            if not exact:
                total += sum(stored_bytes(shape, rank_for(shape, rate), n, esize))
                continue
            ranks = [p.lora_ranks[i] for p in ps]
            if not any(ranks):
                total += shape[0] * shape[1] * esize
                continue
            rank = max(ranks + [rank_for(shape, rate) if -1 in ranks else 0])
            total += sum(stored_bytes(shape, rank, n, esize))
        total += sum(p.other_numel for p in ps) * esize
    return total


def score(members: Sequence[Profile], domains: Sequence[str]) -> float:
    """Summed over domains, the best accuracy any member has there (0 where none was measured)."""
    return sum(max((p.accuracy.get(d, 0.0) for p in members), default=0.0) for d in domains)


@dataclass
class Choice:
    members: list[str]
    rate: float
    bytes: int
    score: float
    dropped: dict[str, str] = field(default_factory=dict)  # candidate -> why it is not in


class NothingFits(ValueError):
    """No non-empty set fits the budget."""


def choose(profiles: Sequence[Profile], domains: Sequence[str], rates: Sequence[float], budget_bytes: int,
           esize: int, *, max_exhaustive: int = 16) -> Choice:
    """The best set and rate: highest :func:`score`; then the least compression that fits (predicted
    accuracy is the candidates' own, and a lower rate keeps more of it); then fewest bytes, fewest
    branches, the earliest candidates (input order). Exhaustive over subsets up to ``max_exhaustive`` candidates; beyond,
    candidates that add nothing to any domain's best are left out first.

    Raises:
        NothingFits: naming what the smallest set needs.
    """
    if not profiles:
        raise NothingFits("no candidates to choose from")
    pool = list(profiles)
    if len(pool) > max_exhaustive:  # keep each domain's strongest, then the strongest overall
        keep = {max(pool, key=lambda p: p.accuracy.get(d, 0.0)).name for d in domains}
        rest = sorted((p for p in pool if p.name not in keep), key=lambda p: -sum(p.accuracy.values()))
        pool = [p for p in pool if p.name in keep] + rest[:max(0, max_exhaustive - len(keep))]
    order = {p.name: i for i, p in enumerate(profiles)}
    best: tuple | None = None
    smallest: tuple[int, list[str], float] | None = None
    for r in range(1, len(pool) + 1):
        for subset in itertools.combinations(pool, r):
            for rate in rates:
                b = bundle_bytes(subset, rate, esize)
                names = [p.name for p in subset]
                if smallest is None or b < smallest[0]:
                    smallest = (b, names, rate)
                if b > budget_bytes:
                    continue
                key = (-round(score(subset, domains), 9), rate, b, len(subset), sorted(order[n] for n in names))
                if best is None or key < best[0]:
                    best = (key, names, rate, b)
    if best is None:
        b, names, rate = smallest
        raise NothingFits(f"nothing fits {budget_bytes / 1e9:.3f} GB: the smallest set ({', '.join(names)} at "
                          f"r={rate}) needs {b / 1e9:.3f} GB")
    _, names, rate, b = best
    chosen = [p for p in profiles if p.name in names]
    dropped = {}
    for p in profiles:
        if p.name in names:
            continue
        gain = score([*chosen, p], domains) - score(chosen, domains)
        with_p = min(bundle_bytes([*chosen, p], r, esize) for r in rates)  # at the most compression offered
        dropped[p.name] = (f"adds {gain:.3f} to the score but the bundle would need at least {with_p / 1e9:.4f} GB "
                           f"(budget {budget_bytes / 1e9:.4f} GB)"
                           if gain > 0 else "adds nothing: a chosen branch is at least as good in every domain")
    return Choice([p.name for p in chosen], rate, b, score(chosen, domains), dropped)
