"""Per-row sampling: each row of one batch under its own temperature, top-p and random generator.

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


def sample_rows(scores: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                uniform: torch.Tensor) -> torch.Tensor:
    """One token per row: greedy where ``temperature <= MIN_TEMPERATURE``, else sampled.

    Sampling follows ``transformers``' warpers in their order: logits divided by the temperature, then
    nucleus (top-p) filtering that keeps the most likely tokens until their probability reaches ``top_p``
    (at least one), then the token at ``uniform`` in the kept tokens' cumulative distribution. A row's
    token depends on its own scores and settings only, never on the rows beside it.

    Args:
        scores: ``[B, V]`` next-token logits (any float dtype; computed in float32).
        temperature: ``[B]`` per-row temperatures.
        top_p: ``[B]`` per-row nucleus mass in (0, 1].
        uniform: ``[B]`` per-row draws in [0, 1).

    Returns:
        ``[B]`` token ids (long).
    """
    picked = scores.argmax(-1)
    sampled = temperature > MIN_TEMPERATURE
    if not bool(sampled.any()):
        return picked
    nucleus = top_p < 1.0  # these rows search the sorted distribution, the others the unsorted one
    for rows in ((sampled & nucleus).nonzero().squeeze(1), (sampled & ~nucleus).nonzero().squeeze(1)):
        if len(rows):
            picked[rows] = _draw(scores[rows].float() / temperature[rows, None].float(), top_p[rows].float(),
                                 uniform[rows].float())
    return picked


def _draw(logits: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """``[R]`` tokens drawn from ``[R, V]`` tempered logits, through the sorted distribution cut at
    ``top_p`` when the rows have one below 1 (all of them, or none)."""
    order = None
    if bool((top_p < 1.0).any()):
        logits, order = logits.sort(-1, descending=True)
        probs = logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        probs = probs * (before < top_p[:, None]).to(probs.dtype)
        probs[:, 0] = probs[:, 0].clamp_min(torch.finfo(probs.dtype).tiny)  # the likeliest always stays
    else:
        probs = logits.softmax(-1)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[1] - 1)
    return idx.squeeze(1) if order is None else order.gather(1, idx).squeeze(1)


class RowSampler(LogitsProcessor):
    """The last logits processor of a batch whose rows sample differently: returns scores that are 0 at
    each row's drawn token and -inf elsewhere, so ``generate(do_sample=False)`` emits the draw.

    Rows with a seed draw from their own ``torch.Generator`` seeded with it; the others from the
    process's random state. A row with temperature at or below :data:`MIN_TEMPERATURE` is greedy.
    """

    def __init__(self, temperatures: Sequence[float], top_ps: Sequence[float], seeds: Sequence[int | None],
                 device: torch.device | str = "cpu") -> None:
        if not len(temperatures) == len(top_ps) == len(seeds):
            raise ValueError(f"one temperature, top_p and seed per row: got {len(temperatures)}, "
                             f"{len(top_ps)} and {len(seeds)}")
        self.device = torch.device(device)
        self.temperature = torch.tensor([float(t or 0.0) for t in temperatures], device=self.device)
        self.top_p = torch.tensor([1.0 if p is None else float(p) for p in top_ps], device=self.device)
        self.generators = [None if s is None else torch.Generator(self.device).manual_seed(s % (1 << 63))
                           for s in seeds]

    def rows(self, idx: Sequence[int]) -> RowSampler:
        """The sampler of rows ``idx`` (in that order), for a ``generate`` call over only those rows: it
        shares their generators, so each seeded row's draws go on where they were."""
        sub = RowSampler.__new__(RowSampler)
        pick = torch.tensor(list(idx), dtype=torch.long, device=self.device)
        sub.device, sub.temperature, sub.top_p = self.device, self.temperature[pick], self.top_p[pick]
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
        tok = sample_rows(scores, self.temperature, self.top_p, self.uniforms())
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, tok[:, None], 0.0)
        return out
