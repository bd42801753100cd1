"""Scoring token sequences: per-token log-probabilities, with shared prompt prefixes computed once.

Loglikelihood evaluation (lm-evaluation-harness's multiple-choice tasks) scores the same context with
every answer appended: four sequences that differ only in their last tokens. :func:`prefix_clusters`
groups such sequences; the shared prefix then runs once, its KV cache is repeated for each member and
only the differing suffixes run as a batch — vLLM's prefix caching, within one batch of requests.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenLogprobs:
    """Per-token scores of a sequence: ``logprobs[t]`` = log p(token t | tokens < t); entry 0 is None.

    ``top[t]`` lists ``(token id, logprob)`` of the most likely tokens at position t (None at 0);
    ``ranks[t]`` is token t's rank among all tokens at t (1: the likeliest; None at 0).
    """

    token_ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]
    ranks: list[int | None] | None = None


@dataclass(frozen=True)
class PrefixCluster:
    """Sequences (by index) sharing their first ``shared`` tokens; every member is longer than that."""

    members: list[int]
    shared: int


def shared_lengths(clusters: Sequence[PrefixCluster], n: int) -> list[int]:
    """Per sequence of ``n``, the length of the prefix its cluster shares (0 outside clusters)."""
    out = [0] * n
    for c in clusters:
        for i in c.members:
            out[i] = c.shared
    return out


def common_prefix(a: Sequence[int] | str, b: Sequence[int] | str) -> int:
    """Length of the longest common prefix of two token-id sequences or two strings (0 for a string and ids);
    a binary search over slices, so that 100,000-token prompts cost C-speed comparisons, not a Python loop."""
    if isinstance(a, str) != isinstance(b, str):
        return 0
    if not isinstance(a, str):
        a, b = list(a), list(b)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def prefix_clusters(seqs: Sequence[Sequence[int]], keys: Sequence[Hashable], *,
                    min_shared: int = 8) -> tuple[list[PrefixCluster], list[int]]:
    """Group sequences with the same key (branch) that share a prefix worth computing once.

    Sequences are sorted so that those with long common prefixes are adjacent, then joined greedily
    while joining costs fewer token positions than not: a cluster costs ``shared + Σ (len_i − shared)``
    positions, a sequence alone its length. The shared prefix stops at least one token short of every
    member, so each member has a suffix (and its own next-token distribution).

    Returns:
        (clusters of two or more members with ``shared ≥ min_shared``, indices of the other sequences).
    """
    min_shared = max(min_shared, 1)
    order = sorted(range(len(seqs)), key=lambda i: (str(keys[i]), list(seqs[i])))
    clusters: list[PrefixCluster] = []
    singles: list[int] = []

    def flush(members: list[int], shared: int) -> None:
        if len(members) > 1 and shared >= min_shared:
            clusters.append(PrefixCluster(members, shared))
        else:
            singles.extend(members)

    cur: list[int] = []
    shared = 0
    for i in order:
        if cur and keys[i] == keys[cur[0]]:
            q = min(shared, common_prefix(seqs[cur[0]], seqs[i]), len(seqs[i]) - 1)
            lens = [len(seqs[j]) for j in cur]
            cost_now = (shared + sum(n - shared for n in lens)) if len(cur) > 1 else lens[0]
            cost_joined = q + sum(n - q for n in lens) + len(seqs[i]) - q
            if q >= min_shared and cost_joined < cost_now + len(seqs[i]):
                cur.append(i)
                shared = q
                continue
        if cur:
            flush(cur, shared)
        cur, shared = [i], len(seqs[i]) - 1
    if cur:
        flush(cur, shared)
    return clusters, sorted(singles)


def _score(logits: Tensor, targets: Sequence[int], top: int
           ) -> tuple[list[float], list[list[tuple[int, float]]], list[int]]:
    """Log-probabilities of ``targets`` under ``logits`` ``[R, vocab]`` (one target per row), each row's
    ``top`` most likely ``(token, logprob)``, and each target's rank (1: the likeliest)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(1, torch.tensor(list(targets), device=lp.device, dtype=torch.long)[:, None])
    ranks = ((lp > picked).sum(-1) + 1).tolist()
    chosen = picked[:, 0].tolist()
    if top <= 0:
        return chosen, [[] for _ in chosen], ranks
    vals, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)
    return chosen, [list(zip(a, v)) for a, v in zip(ids.tolist(), vals.tolist())], ranks


def score_row(logits: Tensor, seq: Sequence[int], *, top: int = 0, greedy_next: bool = False) -> TokenLogprobs:
    """Scores of ``seq`` from its logits ``[len(seq), vocab]`` (row t predicts token t+1).

    ``greedy_next`` appends the most likely token after the sequence, scored from the last row.
    """
    n = len(seq)
    rows = logits[: n if greedy_next else n - 1]  # [T or T-1, vocab]
    tokens = list(seq) + ([int(rows[-1].argmax())] if greedy_next else [])
    chosen, best, ranks = _score(rows, tokens[1:], top)
    return TokenLogprobs(tokens, [None, *chosen], [None, *best], [None, *ranks])


def score_cluster(prefix_logits: Tensor, suffix_logits: Sequence[Tensor], seqs: Sequence[Sequence[int]], shared: int,
                  *, top: int = 0, greedy_next: bool = False) -> list[TokenLogprobs]:
    """:func:`score_row` for sequences sharing their first ``shared`` tokens, with the shared rows scored once.

    Args:
        prefix_logits: ``[shared, vocab]``, logits of the shared prefix.
        suffix_logits: per sequence ``[len_i − shared, vocab]``, logits of its own tokens.
    """
    # rows 0..shared-2 predict tokens 1..shared-1, the same for every member; row shared-1 predicts each
    # member's first own token
    head, head_best, head_ranks = _score(prefix_logits[: shared - 1], seqs[0][1:shared], top)
    out = []
    for seq, suf in zip(seqs, suffix_logits):
        t = score_row(torch.cat([prefix_logits[shared - 1:], suf]), seq[shared - 1:], top=top, greedy_next=greedy_next)
        out.append(TokenLogprobs(list(seq[:shared - 1]) + t.token_ids, [None, *head, *t.logprobs[1:]],
                                 [None, *head_best, *t.top[1:]], [None, *head_ranks, *t.ranks[1:]]))
    return out
