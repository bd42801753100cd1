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

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import LogitsProcessor, StoppingCriteria

from branchmerge.runtime.structured import Constraint, Structure, Structurer, apply_bitmask, new_bitmask
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


class TokenLogprob(NamedTuple):
    """A drawn token's log-probability, and the ``(token id, log-probability)`` of the likeliest tokens at that
    step, likeliest first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RowSettings:
    """How one row samples: OpenAI's and vLLM's sampling parameters (defaults: greedy, nothing changed)."""

    temperature: float = 0.0  # at or below MIN_TEMPERATURE: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or less: no top-k
    min_p: float = 0.0
    seed: int | None = None  # its own generator, seeded with it (None: the process's random state)
    presence_penalty: float = 0.0  # OpenAI's: minus this from each token already generated (once)
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often a token was generated
    logit_bias: Mapping[int, float] | None = None  # OpenAI's: token id -> added to its logit
    stop_token_ids: tuple[int, ...] = ()  # vLLM's: more tokens that end the row, besides end of text
    ignore_eos: bool = False  # vLLM's: end of text does not end the row
    min_tokens: int = 0  # vLLM's: the row's stop tokens are suppressed until it has this many
    # vLLM's and transformers': logits of prompt and output tokens / it (< 0: *); None: the branch's own (its
    # generation config's, if any), which a number replaces, as a request's replaces vLLM's default
    repetition_penalty: float | None = None
    allowed_token_ids: tuple[int, ...] = ()  # vLLM's: the row draws only these (empty: any)
    structure: Structure | None = None  # the answer follows this schema, pattern, grammar or choice
    # vLLM's bad_words, as token sequences: the last token of each is never drawn where it would complete it
    bad_words: tuple[tuple[int, ...], ...] = ()
    # OpenAI's logprobs: record each drawn token's log-probability under the model's own logits (before any
    # adjustment, as vLLM's default) and this many likeliest tokens' (None: nothing recorded)
    logprobs: int | None = None

    @property
    def adjusts(self) -> bool:
        """Whether the row changes logits before choosing (so even a greedy row needs the sampler)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.min_tokens
                    or self.repetition_penalty not in (None, 1.0) or self.allowed_token_ids or self.structure or self.bad_words)

    @property
    def stops_own_way(self) -> bool:
        """Whether the row ends on other tokens than its branch's end of text."""
        return bool(self.stop_token_ids or self.ignore_eos)

    def token_ids(self) -> Iterator[tuple[str, list[int]]]:
        """``(field, ids)`` for each field that names token ids (``logit_bias``, ``stop_token_ids``,
        ``allowed_token_ids``), to be checked against the vocabulary: an index past the logits fails a batch
        (a device assert on GPUs)."""
        for what, ids in (("logit_bias", list(self.logit_bias or ())), ("stop_token_ids", list(self.stop_token_ids)),
                          ("allowed_token_ids", list(self.allowed_token_ids)),
                          ("bad_words", [t for w in self.bad_words for t in w])):
            if ids:
                yield what, ids

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A random generator seeded with ``seed`` (None without one: the process's random state)."""
        return None if self.seed is None else torch.Generator(device).manual_seed(self.seed % (1 << 63))

    def stop_set(self, eos: set[int]) -> set[int]:
        """The tokens that end this row, given its branch's end-of-text ids."""
        return (set() if self.ignore_eos else set(eos)) | set(self.stop_token_ids)


class StopTokens(StoppingCriteria):
    """Per row of a ``generate`` batch: done once its last token is one of its own stop tokens (the batch
    goes on until every row is done or ``max_new_tokens``; the caller cuts each row at its stop)."""

    def __init__(self, stops: Sequence[set[int]]) -> None:
        self.stops = [set(s) for s in stops]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        return torch.tensor([t in s for t, s in zip(last, self.stops)], dtype=torch.bool, device=input_ids.device)


class StopStrings(StoppingCriteria):
    """Per row of a ``generate`` batch: done once its new text holds one of its own stop strings, or it has
    its own number of new tokens (the batch runs to the largest); ``generate`` ends when every row is done.

    Each step decodes only a row's last few tokens: a stop string spans at most as many tokens as it has
    UTF-8 bytes (every token decodes to a byte or more), and two more give the decoder the context before
    it. ``ended[r]``: how many new tokens row ``r`` had when it was done (None: not done); ``hit[r]``:
    whether a stop string ended it.

    Args:
        decode: per row, token ids → text (its branch's tokenizer, as its text is decoded).
        stops: per row, its stop strings (empty: none).
        max_tokens: per row, its new tokens at most (None: the call's ``max_new_tokens``).
        generated: per row, how many of its prompt's last tokens it generated before (a row continuing):
            its text is those and the new ones.
        min_tokens: per row, vLLM's ``min_tokens``: no stop string ends it before it has this many tokens
            (earlier ones counted), nor one that its first ``min_tokens - 1`` tokens completed.
    """

    def __init__(self, decode: Sequence[Callable[[list[int]], str]], stops: Sequence[Sequence[str]],
                 max_tokens: Sequence[int | None] | None = None, generated: Sequence[int] | None = None,
                 min_tokens: Sequence[int] | None = None) -> None:
        self.decode, self.stops = list(decode), [[s for s in row if s] for row in stops]
        self.max_tokens = list(max_tokens) if max_tokens is not None else [None] * len(self.stops)
        self.generated = list(generated) if generated is not None else [0] * len(self.stops)
        self.min_tokens = list(min_tokens) if min_tokens is not None else [0] * len(self.stops)
        self.hit = [False] * len(self.stops)
        self.window = [max((len(s.encode("utf-8", "surrogatepass")) for s in row), default=0) + 2
                       for row in self.stops]
        self.ended: list[int | None] = [None] * len(self.stops)
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw) -> torch.BoolTensor:
        if input_ids.shape[0] != len(self.stops):  # the batch expanded (beam search, n): leave it to max_new_tokens
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.start is None:  # the first call comes after the first new token
            self.start = input_ids.shape[1] - 1
        n = input_ids.shape[1] - self.start
        tails = None
        for r, stops in enumerate(self.stops):
            if self.ended[r] is not None:
                continue
            if self.max_tokens[r] is not None and n >= self.max_tokens[r]:
                self.ended[r] = n
            elif stops and self.generated[r] + n >= self.min_tokens[r]:
                if tails is None:  # only the last tokens leave the device
                    tails = input_ids[:, -min(n + max(self.generated), max(self.window)):].tolist()
                tail = tails[r][-min(n + self.generated[r], self.window[r]):]
                text = self.decode[r](tail)
                after = self.generated[r] + n - max(self.min_tokens[r] - 1, 0)  # tokens that may complete one
                if after < len(tail):  # a string its first min_tokens - 1 tokens completed does not count
                    start = len(self.decode[r](tail[:-after]))
                    found = any(text.find(s, max(0, start - len(s) + 1)) >= 0 for s in stops)
                else:
                    found = any(s in text for s in stops)
                if found:
                    self.ended[r], self.hit[r] = n, True
        return torch.tensor([e is not None for e in self.ended], dtype=torch.bool, device=input_ids.device)


def penalize(scores: torch.Tensor, generated: torch.Tensor, presence: torch.Tensor,
             frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: ``scores[j] - frequency * count[j] - presence * (count[j] > 0)`` per row.

    Args:
        scores: ``[B, V]`` logits (float32, changed in place and returned).
        generated: ``[B, T]`` the tokens each row generated so far.
        presence, frequency: ``[B]`` per-row penalties.
    """
    if generated.shape[1] == 0:
        return scores
    counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
    return scores.sub_(_penalty(counts, frequency[:, None], presence[:, None]))


def _penalty(counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """What OpenAI's penalties take from a logit, for tokens generated ``counts`` times (``[B, 1]``
    penalties broadcast over ``counts``)."""
    return frequency * counts + presence * (counts > 0).to(counts.dtype)


class RowSampler(LogitsProcessor):
    """The last logits processor of a batch whose rows sample differently: returns scores that are 0 at
    each row's chosen token and -inf elsewhere, so ``generate(do_sample=False)`` emits it.

    Per row, in vLLM's order: its allowed tokens, the logit bias, the repetition penalty (on its prompt's
    and its generated tokens), the presence and frequency penalties (on the tokens it generated), its bad
    words, its structure's grammar (:mod:`.structured`: only tokens that keep its answer valid), then
    :func:`sample_rows`.
    Rows with a seed draw from their own ``torch.Generator`` seeded with it; the others from the process's
    random state. Rows end on their own stop tokens when ``generate_ids`` gives them (:class:`StopTokens`).
    A row's generator and grammar state (``constraints``) go on from one ``generate`` call to the next.
    """

    def __init__(self, rows: Sequence[RowSettings], device: torch.device | str = "cpu", *,
                 generators: Sequence[torch.Generator | None] | None = None,
                 constraints: Sequence[Constraint | None] | None = None,
                 records: Sequence[list[TokenLogprob] | None] | None = None) -> None:
        self.settings, self.device = list(rows), torch.device(device)
        f = lambda attr, dtype=torch.float32: torch.tensor(  # noqa: E731
            [getattr(r, attr) for r in self.settings], dtype=dtype, device=self.device)
        self.temperature, self.top_p, self.min_p = f("temperature"), f("top_p"), f("min_p")
        self.top_k = torch.tensor([min(int(r.top_k), 1 << 62) for r in self.settings], dtype=torch.long,
                                  device=self.device)
        self.presence, self.frequency = f("presence_penalty"), f("frequency_penalty")
        # each row's draws go on where ``generators`` left them (a row continuing), else from its seed
        self.generators = list(generators) if generators is not None else [r.generator(self.device)
                                                                            for r in self.settings]
        self.start: int | None = None  # the prompt width, at the first call
        self.stops: list[set[int]] = [set(r.stop_token_ids) for r in self.settings]  # set by generate_ids
        self.prompts: list[Sequence[int]] | None = None  # each row's prompt, unpadded (set by generate_ids)
        self.generated = [0] * len(self.settings)  # how many of each prompt's last tokens the row generated
        # each structured row's grammar state (made by rows(), from its branch's Structurer, at its first call)
        self.constraints = list(constraints) if constraints is not None else [None] * len(self.settings)
        # each recording row's drawn tokens' log-probabilities, one entry a step (``generate_ids`` keeps only
        # the row's own tokens' entries); shared with sub-samplers and kept from one call to the next
        self.records = list(records) if records is not None else [
            [] if r.logprobs is not None else None for r in self.settings]

    def rows(self, idx: Sequence[int], *, eos: Sequence[set[int]] | None = None,
             prompts: Sequence[Sequence[int]] | None = None, generated: Sequence[int] | None = None,
             structurers: Sequence[Structurer | None] | None = None) -> RowSampler:
        """The sampler of rows ``idx`` (in that order), for a ``generate`` call over only those rows: it
        shares their generators and grammar states, so each row's draws and structure go on where they were.
        ``eos``: each row's branch's end-of-text ids (its stop set is made of them); ``prompts``: each row's
        unpadded prompt; ``generated``: how many of each prompt's last tokens the row generated before (they
        count for its penalties and ``min_tokens``); ``structurers``: each row's branch's, to compile the
        structure of a row that has none yet."""
        sub_stops = [st.stop_set(e) for st, e in zip((self.settings[i] for i in idx), eos)] if eos is not None else None
        for k, i in enumerate(idx):
            st = self.settings[i].structure
            if st is not None and self.constraints[i] is None:
                if structurers is None or structurers[k] is None:
                    raise ValueError(f"row {i} has a structure but no Structurer was given to compile it")
                self.constraints[i] = structurers[k].constraint(st, None if sub_stops is None else sub_stops[k])
        sub = RowSampler([self.settings[i] for i in idx], self.device, generators=[self.generators[i] for i in idx],
                         constraints=[self.constraints[i] for i in idx], records=[self.records[i] for i in idx])
        if sub_stops is not None:
            sub.stops = sub_stops
        sub.prompts = prompts
        if generated is not None:
            sub.generated = list(generated)
        return sub

    def token_ids(self) -> Iterator[tuple[int, str, list[int]]]:
        """``(row, field, ids)``: :meth:`RowSettings.token_ids` of every row."""
        for i, st in enumerate(self.settings):
            for what, ids in st.token_ids():
                yield i, what, ids

    @property
    def ends_own_way(self) -> bool:
        """Whether some row ends on other tokens than its branch's end of text."""
        return any(st.stops_own_way for st in self.settings)

    def __len__(self) -> int:
        return len(self.settings)

    @property
    def needed(self) -> bool:
        """Whether any row samples, changes its logits or ends its own way (else: plain greedy decoding)."""
        return bool((self.temperature > MIN_TEMPERATURE).any()) or any(
            r.adjusts or r.stops_own_way or r.logprobs is not None for r in self.settings)

    def uniforms(self) -> torch.Tensor:
        """``[B]`` draws in [0, 1): each seeded row's from its generator, the rest from the process."""
        u = torch.rand(len(self.generators), device=self.device)
        for r, g in enumerate(self.generators):
            if g is not None:
                u[r] = torch.rand((), generator=g, device=self.device)
        return u

    def _index(self, input_ids: torch.Tensor, vocab: int) -> None:
        """At the first call (``stops`` and ``prompts`` are set after ``__init__``): the per-row adjustments
        as index tensors, so each step applies them to the whole batch at once.

        ``_allowed``: ``[B, V]`` the tokens each row may draw (all, unless it names some);
        ``_bias``: (rows, token ids, values) of the logit biases; ``_repetition``: ``[B, 1]`` penalties and
        ``_prompt_idx``: ``[B, P]`` each row's prompt tokens; ``_counts``: ``[B, V]`` how often each row
        generated each token, counted as they come (OpenAI's penalties read it only at the tokens generated);
        ``_early``: (rows, token ids, min_tokens) of the stop tokens that rows short of min_tokens may not draw.
        """
        dev, n = input_ids.device, len(self.settings)
        self._adjusts = any(r.adjusts for r in self.settings)
        prompts = self.prompts if self.prompts is not None else input_ids.tolist()

        def pairs(table: list[tuple[int, int, float]], dtype: torch.dtype):
            if not table:
                return None
            rows, cols, vals = zip(*table)
            return (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev),
                    torch.tensor(vals, dtype=dtype, device=dev))

        self._bias = pairs([(i, t, v) for i, r in enumerate(self.settings) for t, v in (r.logit_bias or {}).items()],
                           torch.float32)
        self._early = pairs([(i, t, r.min_tokens - self.generated[i]) for i, r in enumerate(self.settings)
                             if r.min_tokens > self.generated[i] for t in sorted(self.stops[i])], torch.long)
        self._allowed = None
        if any(r.allowed_token_ids for r in self.settings):  # [B, V]: True where a row may draw
            self._allowed = torch.ones(n, vocab, dtype=torch.bool, device=dev)
            for i, r in enumerate(self.settings):
                if r.allowed_token_ids:
                    self._allowed[i] = False
                    self._allowed[i, torch.tensor(r.allowed_token_ids, device=dev)] = True
        self._repetition = self._prompt_idx = None
        if any(r.repetition_penalty not in (None, 1.0) for r in self.settings):
            self._repetition = torch.tensor([[r.repetition_penalty or 1.0] for r in self.settings], device=dev)
            width = max(1, *map(len, prompts))
            # each row's prompt tokens, padded with its first (a duplicate changes nothing); -1 for an empty one
            self._prompt_idx = torch.tensor([list(q) + [q[0] if q else -1] * (width - len(q)) for q in prompts],
                                            dtype=torch.long, device=dev)
        # bad words: one-token words are never drawn (in _allowed); longer ones checked each step (_bad)
        self._bad = {i: longer for i, r in enumerate(self.settings)
                     if (longer := [w for w in r.bad_words if len(w) > 1])}
        singles = [(i, w[0]) for i, r in enumerate(self.settings) for w in r.bad_words if len(w) == 1]
        if singles:
            if self._allowed is None:
                self._allowed = torch.ones(n, vocab, dtype=torch.bool, device=dev)
            rows, cols = zip(*singles)
            self._allowed[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = False
        self._constrained = [i for i, c in enumerate(self.constraints) if c is not None]
        self._recording = [i for i, r in enumerate(self.records) if r is not None]
        self._bitmask = new_bitmask(n, vocab) if self._constrained else None
        self._counts, self._counted_to, self._earlier = None, self.start, None
        if bool((self.presence != 0).any() or (self.frequency != 0).any()):
            self._counts = torch.zeros(n, vocab, device=dev)  # how often each row generated each token
            self._penalties = self.frequency.to(dev)[:, None], self.presence.to(dev)[:, None]
            if any(self.generated):  # tokens generated before this call: counted now, read with the new ones
                earlier = [list(q[len(q) - g:]) if g else [] for q, g in zip(prompts, self.generated)]
                width = max(map(len, earlier))
                # padded with token 0: a token's penalty depends only on its own count (0: none)
                self._earlier = torch.tensor([e + [0] * (width - len(e)) for e in earlier], dtype=torch.long,
                                             device=dev)
                real = torch.tensor([[1.0] * len(e) + [0.0] * (width - len(e)) for e in earlier], device=dev)
                self._counts.scatter_add_(1, self._earlier, real)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raw = scores
        scores = self.adjust(input_ids, scores)
        tok = sample_rows(scores, self.temperature, self.top_p, self.uniforms(), self.top_k, self.min_p)
        if self._recording:
            self._record(raw, tok)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, tok[:, None], 0.0)
        return out

    def _record(self, raw: torch.Tensor, tok: torch.Tensor) -> None:
        """Append to each recording row's record its drawn token's log-probability under ``raw`` (``[B, V]``
        logits) and its ``logprobs`` likeliest tokens' (one device sync a step, recording rows only)."""
        rows = self._recording
        idx = torch.tensor(rows, device=raw.device)
        lp = torch.log_softmax(raw.index_select(0, idx).float(), dim=-1)
        chosen = lp.gather(1, tok.index_select(0, idx)[:, None])[:, 0].tolist()
        k = min(max(self.settings[r].logprobs for r in rows), lp.shape[-1])
        vals, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        for r, c, v, i in zip(rows, chosen, vals.tolist(), ids.tolist()):
            n = self.settings[r].logprobs
            self.records[r].append(TokenLogprob(c, tuple(zip(i[:n], v[:n]))))

    def adjust(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``[B, V]`` logits after each row's bias, penalties and min_tokens (a new tensor when any applies).

        Args:
            input_ids: ``[B, T]`` the batch so far; the first call's width is the prompts'.
            scores: ``[B, V]`` the next token's logits.
        """
        if scores.shape[0] != len(self):
            raise ValueError(f"this sampler has {len(self)} rows, the batch {scores.shape[0]}: pass it to "
                             "Bundle.generate_ids as row_sampler (which splits it with the batch)")
        if self.start is None:
            self.start = input_ids.shape[1]
            self._index(input_ids, scores.shape[1])
        if self._adjusts:
            raw, scores = scores, scores.float().clone()
            if self._allowed is not None:
                scores.masked_fill_(~self._allowed, -float("inf"))
            if self._bias is not None:
                rows, cols, values = self._bias
                scores.index_put_((rows, cols), values, accumulate=True)
            gen = input_ids[:, self.start:]  # [B, n] the tokens generated so far
            if self._repetition is not None:  # logits of tokens in a row's prompt or answer: / or × its penalty
                idx = torch.cat([self._prompt_idx, gen], 1)
                # an empty prompt's -1: a token it generated, or, before any, its own column 0 left as it is
                idx = torch.where(idx < 0, gen[:, :1], idx) if gen.shape[1] else idx.clamp(min=0)
                v = scores.gather(1, idx)
                p = self._repetition
                new = torch.where(v < 0, v * p, v / p)
                if not gen.shape[1]:
                    new = torch.where(self._prompt_idx >= 0, new, v)
                scores.scatter_(1, idx, new)  # duplicates write equal values
            if self._earlier is not None:
                gen = torch.cat([self._earlier, gen], 1)
            if self._counts is not None and gen.shape[1]:  # penalize(), on the generated tokens only
                for col in input_ids[:, self._counted_to:].split(1, dim=1):
                    self._counts.scatter_add_(1, col, torch.ones_like(col, dtype=self._counts.dtype))
                self._counted_to = input_ids.shape[1]
                c = self._counts.gather(1, gen)
                scores.scatter_(1, gen, scores.gather(1, gen) - _penalty(c, *self._penalties))
            if self._early is not None:  # rows short of their min_tokens cannot end yet
                rows, cols, least = self._early
                early = least > input_ids.shape[1] - self.start  # (no boolean indexing: no device sync)
                scores.index_put_((rows, cols), torch.where(early, -float("inf"), 0.0), accumulate=True)
            if self._bad:
                self._ban_bad_words(input_ids, scores)
            if self._bitmask is not None:
                self._constrain(input_ids, scores, raw)
        return scores

    def _ban_bad_words(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """vLLM's ``bad_words``: for each row's words of several tokens, -inf at the last token where the row's
        generated tokens end with the ones before it (``scores`` ``[B, V]``, in place)."""
        width = input_ids.shape[1]
        bans: list[tuple[int, int]] = []
        for r, words in self._bad.items():
            made = self.generated[r] + width - self.start  # tokens the row generated (the prompt's last ones)
            longest = min(made, max(len(w) for w in words) - 1)
            tail = input_ids[r, width - longest:].tolist() if longest else []
            bans += [(r, w[-1]) for w in words
                     if len(w) - 1 <= len(tail) and tail[len(tail) - len(w) + 1:] == list(w[:-1])]
        if bans:
            rows, cols = zip(*bans)
            scores[torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device)] = -float("inf")

    def _constrain(self, input_ids: torch.Tensor, scores: torch.Tensor, raw: torch.Tensor) -> None:
        """Feed each structured row's grammar the tokens it generated since the last step, then mask
        ``scores`` (``[B, V]``, in place) to the tokens its grammar allows next. The grammar wins: a row whose
        other adjustments (``min_tokens``, bad words, allowed tokens) leave none of those draws among them by
        the model's own logits ``raw`` (so its answer still follows its structure)."""
        width = input_ids.shape[1]
        rows = []
        for r in self._constrained:
            c = self.constraints[r]
            missing = self.generated[r] + width - self.start - c.accepted  # generated, not yet fed
            if missing > 0:
                c.feed(input_ids[r, width - missing:].tolist())
            if c.fill(self._bitmask, r):
                rows.append(r)
        if rows:
            apply_bitmask(scores, self._bitmask, rows)
            dead = torch.isneginf(scores[rows]).all(1)
            for k in dead.nonzero().flatten().tolist():  # (one device sync a step, structured rows only)
                row = raw[rows[k]:rows[k] + 1].float().clone()
                apply_bitmask(row, self._bitmask[rows[k]:rows[k] + 1], [0])
                scores[rows[k]] = row[0]
