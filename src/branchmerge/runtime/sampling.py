"""Per-row sampling: each row of one batch under its own temperature, top-k, top-p, min-p and random
generator.

``transformers``' ``generate`` samples a whole batch with one temperature, one top-p and the process's
random state, so requests with different settings, or with a ``seed``, could not share a batch. Here
each row draws its token by inverse-CDF sampling from one uniform number of its own generator (vLLM
keeps one generator per seeded request the same way): a seeded row's tokens depend on its seed and its
own logits, not on what else runs in the batch. :class:`RowSampler` plugs this into ``generate`` as the
last logits processor, with greedy decoding picking the sampled token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from branchmerge.runtime.text import MIN_TEMPERATURE


def sample_rows(scores: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor,
                top_k: torch.Tensor | None = None, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row: greedy where ``temperature <= MIN_TEMPERATURE``, else sampled.

    Sampling follows ``transformers``' warpers in their order: logits divided by the temperature; top-k
    (the ``top_k`` likeliest tokens, when above 0); nucleus (the likeliest tokens until their mass reaches
    ``top_p``); min-p (tokens at least ``min_p`` times as likely as the likeliest); each filter on the
    distribution the previous one left, at least one token kept. Then the token at ``uniform`` in the kept
    tokens' cumulative distribution. A row's token depends on its own scores and settings only, never
    on the rows beside it.

    Args:
        scores: ``[B, V]`` next-token logits (any float dtype; computed in float32).
        temperature: ``[B]`` per-row temperatures.
        top_p: ``[B]`` per-row nucleus mass in (0, 1].
        uniform: ``[B]`` per-row draws in [0, 1).
        top_k: ``[B]`` per-row token counts (0 or less, or the vocabulary or more: no top-k), or None.
        min_p: ``[B]`` per-row fractions in [0, 1] (0: no min-p), or None.

    Returns:
        ``[B]`` token ids (long).
    """
    picked = scores.argmax(-1)
    sampled = temperature > MIN_TEMPERATURE
    if not bool(sampled.any()):
        return picked
    n = scores.shape[0]
    top_k = torch.zeros(n, dtype=torch.long, device=scores.device) if top_k is None else top_k
    min_p = torch.zeros(n, device=scores.device) if min_p is None else min_p
    top_k = torch.where(top_k < scores.shape[1], top_k, 0)  # k at or past the vocabulary: no top-k
    filtered = (top_p < 1.0) | (top_k > 0) | (min_p > 0)  # these rows search the sorted distribution
    for rows in ((sampled & filtered).nonzero().squeeze(1), (sampled & ~filtered).nonzero().squeeze(1)):
        if len(rows):
            logits = scores[rows].float() / temperature[rows, None].float()
            picked[rows] = _draw(logits, top_p[rows].float(), top_k[rows], min_p[rows].float(), uniform[rows].float())
    return picked


def _draw(logits: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, min_p: torch.Tensor,
          uniform: torch.Tensor) -> torch.Tensor:
    """``[R]`` tokens drawn from ``[R, V]`` tempered logits: through the sorted distribution, filtered,
    when the rows have a filter (all of them, or none), else straight from the unsorted one."""
    if not bool(((top_p < 1.0) | (top_k > 0) | (min_p > 0)).any()):
        cdf = logits.softmax(-1).cumsum(-1)
        return torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[1] - 1)[:, 0]
    logits, order = logits.sort(-1, descending=True)
    probs = logits.softmax(-1)
    rank = torch.arange(probs.shape[1], device=probs.device)
    keep = (rank[None, :] < top_k[:, None]) | (top_k[:, None] <= 0)
    kept = probs * keep
    kept = kept / kept.sum(-1, keepdim=True)
    before = kept.cumsum(-1) - kept  # mass of the more likely kept tokens
    keep &= (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    kept = probs * keep
    kept = kept / kept.sum(-1, keepdim=True)
    keep &= kept >= min_p[:, None] * kept[:, :1]
    keep[:, 0] = True  # the likeliest always stays
    cdf = (probs * keep).cumsum(-1)
    idx = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[1] - 1)
    return order.gather(1, idx)[:, 0]


class RowSampler(LogitsProcessor):
    """The last logits processor of a batch whose rows sample differently: returns scores that are 0 at
    each row's drawn token and -inf elsewhere, so ``generate(do_sample=False)`` emits the draw.

    Rows with a seed draw from their own ``torch.Generator`` seeded with it; the others from the
    process's random state. A row with temperature at or below :data:`MIN_TEMPERATURE` is greedy.
    """

    def __init__(self, temperatures: Sequence[float], top_ps: Sequence[float], seeds: Sequence[int | None],
                 device: torch.device | str = "cpu", *, top_ks: Sequence[int | None] | None = None,
                 min_ps: Sequence[float | None] | None = None) -> None:
        n = len(temperatures)
        top_ks, min_ps = [None] * n if top_ks is None else top_ks, [None] * n if min_ps is None else min_ps
        if not n == len(top_ps) == len(seeds) == len(top_ks) == len(min_ps):
            raise ValueError(f"one temperature, top_p and seed per row: got {n}, {len(top_ps)} and {len(seeds)} "
                             f"(top_k {len(top_ks)}, min_p {len(min_ps)})")
        self.device = torch.device(device)
        self.temperature = torch.tensor([float(t or 0.0) for t in temperatures], device=self.device)
        self.top_p = torch.tensor([1.0 if p is None else float(p) for p in top_ps], device=self.device)
        self.top_k = torch.tensor([min(int(k or 0), 1 << 62) for k in top_ks], dtype=torch.long, device=self.device)
        self.min_p = torch.tensor([float(m or 0.0) for m in min_ps], device=self.device)
        self.generators = [None if s is None else torch.Generator(self.device).manual_seed(s % (1 << 63))
                           for s in seeds]

    def rows(self, idx: Sequence[int]) -> RowSampler:
        """The sampler of rows ``idx`` (in that order), for a ``generate`` call over only those rows: it
        shares their generators, so each seeded row's draws go on where they were."""
        sub = RowSampler.__new__(RowSampler)
        pick = torch.tensor(list(idx), dtype=torch.long, device=self.device)
        sub.device, sub.temperature, sub.top_p = self.device, self.temperature[pick], self.top_p[pick]
        sub.top_k, sub.min_p = self.top_k[pick], self.min_p[pick]
        sub.generators = [self.generators[i] for i in idx]
        return sub

    def __len__(self) -> int:
        return len(self.generators)

    @property
    def samples(self) -> bool:
        """Whether any row samples (otherwise the batch is plain greedy decoding)."""
        return bool((self.temperature > MIN_TEMPERATURE).any())

    def uniforms(self) -> torch.Tensor:
        """``[B]`` draws in [0, 1): each seeded row's from its generator, the rest from the process."""
        u = torch.rand(len(self.generators), device=self.device)
        for r, g in enumerate(self.generators):
            if g is not None:
                u[r] = torch.rand((), generator=g, device=self.device)
        return u

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self):
            raise ValueError(f"this sampler has {len(self)} rows, the batch {scores.shape[0]}: pass it to "
                             "Bundle.generate_ids as row_sampler (which splits it with the batch)")
        tok = sample_rows(scores, self.temperature, self.top_p, self.uniforms(), self.top_k, self.min_p)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, tok[:, None], 0.0)
        return out
