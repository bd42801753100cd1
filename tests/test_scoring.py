"""Scoring with shared prefixes: a context with each of its answers runs the context once."""

from __future__ import annotations

import pytest
import torch

import branchmerge
from branchmerge.runtime.scoring import prefix_clusters

g = torch.Generator().manual_seed(3)


def _ids(n: int) -> list[int]:
    return torch.randint(3, 64, (n,), generator=g).tolist()


CTX1, CTX2, OTHER = _ids(40), _ids(25), _ids(12)
SEQS = [CTX1 + [5], CTX1 + [6], CTX1 + [7, 8, 9], CTX2 + [5], CTX2 + [6, 7], OTHER, CTX1 + [5], CTX1[:10] + _ids(30)]
KEYS = ["a", "a", "a", "a", "a", "a", "b", "a"]


def test_prefix_clusters_group_each_context_with_its_answers():
    clusters, singles = prefix_clusters(SEQS, KEYS)
    got = sorted((sorted(c.members), c.shared) for c in clusters)
    assert got == [([0, 1, 2], 40), ([3, 4], 25)]
    # another branch never shares; a sequence sharing only 10 tokens with a 3-member cluster of 40 would
    # cost more positions joined (2 × 30 recomputed) than alone (10 saved)
    assert singles == [5, 6, 7]
    for c in clusters:
        assert all(len(SEQS[i]) > c.shared for i in c.members)
    # a sequence that is a prefix of another still keeps a suffix token of its own
    c2, _ = prefix_clusters([CTX1, CTX1 + [4, 4]], ["a", "a"])
    assert c2[0].shared == len(CTX1) - 1
    assert prefix_clusters([CTX1 + [5], CTX1 + [6]], ["a", "a"], min_shared=41) == ([], [0, 1])


@pytest.mark.parametrize("greedy", [False, True])
def test_shared_prefix_scores_equal_separate_forwards(bundles, greedy):  # noqa: F811
    b = branchmerge.load(bundles[0.9], dtype="float32")
    emb = b.groups["main"].model.get_input_embeddings()
    seen: list[int] = []
    hook = emb.register_forward_pre_hook(lambda m, a: seen.append(a[0].numel()))
    try:
        shared = b.token_logprobs_many(SEQS, KEYS, top=3, greedy_next=greedy)
        n_shared = sum(seen)
        seen.clear()
        plain = b.token_logprobs_many(SEQS, KEYS, top=3, greedy_next=greedy, share_prefix=False)
        n_plain = sum(seen)
    finally:
        hook.remove()
    for s, p, seq in zip(shared, plain, SEQS):
        assert s.token_ids == p.token_ids and s.token_ids[:len(seq)] == seq
        assert s.logprobs[0] is None and s.logprobs[1:] == pytest.approx(p.logprobs[1:], abs=1e-4)
        assert [[t for t, _ in row] for row in s.top[1:]] == [[t for t, _ in row] for row in p.top[1:]]
    # the two contexts ran once, as one padded batch (2×40), then the five answers over their cache rows
    # (5×3), then the rest as one padded batch (3×41); against one padded batch of all 8 (8×43)
    assert n_plain == 8 * 43
    assert n_shared == 2 * 40 + 5 * 3 + 3 * 41


def test_shared_prefix_on_a_hot_branch(bundles):  # noqa: F811
    """Materialized (hot) branches score the same through the shared-prefix path."""
    b = branchmerge.load(bundles[0.9], dtype="float32")
    before = b.token_logprobs_many(SEQS[:3], ["b"] * 3, top=1, share_prefix=False)
    b.materialize("b")
    after = b.token_logprobs_many(SEQS[:3], ["b"] * 3, top=1)
    for x, y in zip(before, after):
        assert x.logprobs[1:] == pytest.approx(y.logprobs[1:], abs=1e-4)


def test_clusters_of_different_branches_share_one_batch(bundles):  # noqa: F811
    """Prefixes of clusters on different branches run as one mixed-branch batch, of different lengths
    (right-padded, positions continue from each prefix), and still equal separate forwards."""
    b = branchmerge.load(bundles[0.9], dtype="float32")
    seqs = [CTX1 + [5], CTX1 + [6, 7], CTX2 + [5], CTX2 + [9], CTX2 + [9, 9, 9]]
    keys = ["a", "a", "b", "b", "b"]
    assert len(prefix_clusters(seqs, keys)[0]) == 2
    shared = b.token_logprobs_many(seqs, keys, top=2, greedy_next=True)
    plain = b.token_logprobs_many(seqs, keys, top=2, greedy_next=True, share_prefix=False)
    for s, p in zip(shared, plain):
        assert s.token_ids == p.token_ids
        assert s.logprobs[1:] == pytest.approx(p.logprobs[1:], abs=1e-4)


@pytest.mark.parametrize("sample", [False, True])
def test_generation_shares_prompt_prefixes(bundles, sample):  # noqa: F811
    """Prompts of one branch sharing a long prefix (a system prompt, n samples of one prompt) prefill it
    once; generations equal those without sharing, including rows outside any cluster and other branches."""
    b = branchmerge.load(bundles[0.9], dtype="float32")
    sys_prompt = _ids(24)
    prompts = [sys_prompt + [5, 6], sys_prompt + [7], sys_prompt + [8, 9, 10], OTHER[:3], sys_prompt + [5, 6],
               sys_prompt + [4], [11, 12]]
    names = ["a", "a", "a", "a", "b", "b", "b"]
    emb = b.groups["main"].model.get_input_embeddings()
    seen: list[int] = []
    hook = emb.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-1]))
    kw = {"do_sample": True, "top_k": 0, "temperature": 1.0} if sample else {}

    def run(ps, ns, share):
        seen.clear()
        torch.manual_seed(0)
        out = b.generate_ids(ps, ns, max_new_tokens=6, share_prefix=share, **kw)
        return [r.new_ids for r in out], list(seen)
    try:
        shared, seen_shared = run(prompts, names, True)
        plain, seen_plain = run(prompts, names, False)
        # sharing that would compute more positions than it saves is not used
        few = [sys_prompt + [5], sys_prompt + [6], _ids(40)]
        few_shared, few_seen = run(few, ["a"] * 3, True)
        few_plain, _ = run(few, ["a"] * 3, False)
    finally:
        hook.remove()
    assert shared == plain and few_shared == few_plain
    # the prefix batch covered the 24 shared tokens once (clusters on "a" and on "b"); generate's first
    # forward then ran only each row's own tokens, left-padded: 3 at most
    assert seen_plain[0] == 27 and seen_shared[:2] == [24, 3]
    assert few_seen[0] == 40


def test_beam_search_with_shared_prompts_still_works(bundles):  # noqa: F811
    """Beam search expands the batch inside ``generate``; prompts sharing a prefix then run unshared."""
    b = branchmerge.load(bundles[0.9], dtype="float32")
    sys_prompt = _ids(24)
    prompts = [sys_prompt + [5], sys_prompt + [6]]
    got = b.generate_ids(prompts, ["a", "a"], max_new_tokens=4, num_beams=2)
    want = b.generate_ids(prompts, ["a", "a"], max_new_tokens=4, num_beams=2, share_prefix=False)
    assert [r.new_ids for r in got] == [r.new_ids for r in want] and all(len(r.new_ids) <= 4 for r in got)
