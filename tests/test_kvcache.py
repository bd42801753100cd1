"""KV caches carried from one generate call to the next (the engine's continuous batching): rows that go on
are not prefilled again, and their answers are those of one uninterrupted call."""

from __future__ import annotations

import torch
from transformers import DynamicCache, StaticCache

from branchmerge.runtime import kvcache
from branchmerge.runtime.sampling import RowSampler, RowSettings
from tests.serving import forwards


def test_rows_go_on_from_their_cache_and_new_rows_join(loaded):
    """Rows of a first call (two sharing a long prefix: the cache has a gap between it and the rest) go on
    from their caches while a new row joins: only the new row is prefilled, and every row's tokens equal
    one call's, greedy and seeded with penalties; the merged call's own caches go on again."""
    b = loaded[0.9]
    tok = b.tokenizer("a")
    head = "rev the quick brown fox="
    prompts, names = [head + "ab", head + "xyz", "key zz=", "add 12+30="], ["a", "a", "b", "c"]
    ids = [tok.encode(p) for p in prompts]
    settings = [RowSettings(), RowSettings(min_tokens=13, presence_penalty=0.5),
                RowSettings(temperature=0.9, seed=5, frequency_penalty=0.4, repetition_penalty=1.3),
                RowSettings(temperature=1.2, top_p=0.9, seed=7)]
    whole = b.generate_ids(ids, names, max_new_tokens=16, row_sampler=RowSampler(settings))
    s1 = RowSampler(settings[:3])
    first = b.generate_ids(ids[:3], names[:3], max_new_tokens=6, row_sampler=s1, keep_cache=True)
    assert all(f.cache is not None and f.cache.tokens() == (i + f.new_ids)[:-1] for i, f in zip(ids, first))
    assert (first[0].cache.source.mask[0] == 0).any()  # the shared prefix's row has a masked gap
    gens = [*s1.generators, RowSampler(settings).generators[3]]
    model = b.model("a")
    with forwards(model) as seen:
        rest = b.generate_ids([i + f.new_ids for i, f in zip(ids, first)] + [ids[3]], names,
                              max_new_tokens=[10, 10, 10, 16], generated=[6, 6, 6, 0],
                              row_sampler=RowSampler(settings, generators=gens),
                              past=[f.cache for f in first] + [None], keep_cache=True)
    assert seen[0] == (1, len(ids[3]) - 1)  # only the joining row is prefilled (its text but the last token)
    assert all(w == 1 for _, w in seen[1:])  # then one token a row a step
    for w, f, r in zip(whole, first, rest):
        assert (f.new_ids + r.new_ids, r.finish_reason, r.stop_id) == (w.new_ids, w.finish_reason, w.stop_id)
    assert rest[3].new_ids == whole[3].new_ids
    going = [r for r in rest if r.finish_reason == "length" and len(r.new_ids) == 10]
    assert going and all(r.cache.tokens() == (r.prompt_ids + r.new_ids)[:-1] for r in going)


def test_the_merged_batch_scores_each_row_as_its_text_alone(loaded):
    """The next step over a merged batch — rows carried from a cache, a row whose cache holds the start of
    its ids (a conversation's next turn), one whose cache holds more than its ids share (cut there), joining
    rows of different lengths and branches prefilled together (left-padded), a row of one token — gives each
    row the logits of its whole text run alone (positions count from each row's own first token)."""
    from branchmerge.runtime.generation import cache_arg
    from branchmerge.runtime.text import pad_rows

    b = loaded[0.9]
    tok = b.tokenizer("a")
    head = "rev the quick brown fox="
    first_ids = [tok.encode(head + "ab"), tok.encode(head + "xyz"), tok.encode("add 12+30="),
                 tok.encode("key zz=abcdefgh")]
    first = b.generate_ids(first_ids, ["a", "a", "b", "c"], max_new_tokens=5, keep_cache=True)
    texts = [i + f.new_ids for i, f in zip(first_ids, first)]
    texts[2] = texts[2] + tok.encode(" next: add 1+1=")  # the next turn: its cache holds the start
    texts[3] = first_ids[3][:-3] + tok.encode("XY")  # its cache holds 3 more prompt tokens and the answer
    texts += [tok.encode("add 5+5="), tok.encode("key longer than the other one="), tok.encode("k")]
    names = ["a", "a", "b", "c", "b", "c", "a"]
    g, rows = b._rows_for(names)
    past = [f.cache for f in first] + [None] * 3
    assert [p.shared(t) if p else 0 for p, t in zip(past, texts)][:4] == [len(t) - 1 for t in texts[:2]] + [
        len(texts[2]) - len(tok.encode(" next: add 1+1=")) - 1, len(first_ids[3]) - 3]  # (not the last answer token)
    with forwards(g.model) as seen:
        cache, input_ids, attention, going = b._carry(g, rows, texts, past, 0, None)
    assert set(going) == {0, 1, 2, 3} and len(seen) == 1 and seen[0][0] == 4  # one prefill: rows 2 to 5 (6 has one token)
    assert seen[0][1] == max(len(t) - 1 - (p.shared(t) if p else 0) for p, t in zip(past[2:], texts[2:]))
    assert attention[6, :-1].sum() == 0 and attention[4, 0] == 0  # a row of one token; a left-padded one
    pos = (attention.cumsum(1) - 1)[:, -1:]
    with g.state.select(rows), torch.no_grad():
        step = g.model(input_ids=input_ids[:, -1:], attention_mask=attention, position_ids=pos,
                       **{cache_arg(g.model): cache}).logits[:, -1]
    for r, (text, name) in enumerate(zip(texts, names)):
        x, _ = pad_rows([text])
        alone = b.logits(x, [name])[0, -1]
        assert torch.allclose(step[r], alone, atol=1e-4), (r, (step[r] - alone).abs().max())


def test_a_cache_that_does_not_hold_the_rows_text_is_not_used(loaded):
    """A row whose cache holds other tokens (a stale one, or another row's), or was made by another branch,
    is prefilled instead; its answer is its own."""
    b = loaded[0.9]
    tok = b.tokenizer("a")
    ids = [tok.encode("rev hello="), tok.encode("add 5+5=")]
    first = b.generate_ids(ids, ["a", "a"], max_new_tokens=4, keep_cache=True)
    texts = [i + f.new_ids for i, f in zip(ids, first)]
    ref = b.generate_ids(texts, ["a", "a"], max_new_tokens=6, generated=[4, 4])
    swapped = [first[1].cache, first[0].cache]  # each row given the other's cache
    assert swapped[0].tokens() != texts[0][:-1]
    with forwards(b.model("a")) as seen:
        out = b.generate_ids(texts, ["a", "a"], max_new_tokens=6, generated=[4, 4], past=swapped)
    assert seen[0][1] > 1  # prefilled, as without a cache
    assert [o.new_ids for o in out] == [r.new_ids for r in ref]
    other = b.generate_ids(texts[:1], ["b"], max_new_tokens=6, generated=[4])[0]
    with forwards(b.model("a")) as seen:  # branch a's cache, for a row of branch b: not used
        out = b.generate_ids(texts[:1], ["b"], max_new_tokens=6, generated=[4], past=[first[0].cache])
    assert seen[0][1] > 1 and out[0].new_ids == other.new_ids and first[0].cache.branch == "a"
    edited = list(texts[0])
    edited[2] = (edited[2] + 1) % 60  # one token changed before the end
    assert first[0].cache.tokens() != edited[:-1] and first[0].cache.tokens() != texts[0][:-2]


def test_merge_left_pads_parts_and_drops_unused_columns():
    """merge: rows of two caches of different widths, in the batch order asked, left-padded; leading
    columns no row uses are dropped; a batch row no part fills has no cached token."""
    def seg(width, mask_rows, fill):
        k = torch.arange(len(mask_rows) * 2 * width * 3, dtype=torch.float32).reshape(len(mask_rows), 2, width, 3)
        ids = torch.arange(len(mask_rows) * width).reshape(len(mask_rows), width) + fill
        return kvcache.SegmentCache([(k + fill, -k - fill)], ids, torch.tensor(mask_rows))

    a = seg(5, [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]], 1000)  # 2 unused leading columns
    c = seg(2, [[1, 1]], 5000)
    cache, ids, mask = kvcache.merge([(a, [1, 0], [2, 0]), (c, [0], [1])], 4)
    keys, values = cache.layers[0].keys, cache.layers[0].values
    assert ids.shape == (4, 3) and keys.shape == (4, 2, 3, 3)
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1], [0, 1, 1], [0, 0, 0]]
    assert torch.equal(keys[0], a.layers[0][0][0, :, 2:]) and torch.equal(values[2], a.layers[0][1][1, :, 2:])
    assert torch.equal(keys[1, :, 1:], c.layers[0][0][0]) and ids[1, 1:].tolist() == c.ids[0].tolist()
    assert not keys[3].any() and ids[0].tolist() == a.ids[0, 2:].tolist()
    input_ids, attention = kvcache.layout([[7, 8, 9, 10], [1, 2, 3], [4, 5], [6]], ids, mask, pad=0)
    assert input_ids[:, -1].tolist() == [10, 3, 5, 6] and attention[:, -1].tolist() == [1] * 4
    assert input_ids[3].tolist() == [0, 0, 0, 6] and input_ids[1, 0] == 0  # masked columns get the padding


def test_only_plain_full_attention_caches_are_kept():
    """keep/snapshot: a static cache, a sliding-window layer or a cache of another width is not kept (its
    rows are prefilled next time, as before)."""
    from transformers import LlamaConfig

    ids, mask = torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)
    plain = DynamicCache([(torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8))])
    assert kvcache.snapshot(plain, ids, mask) is not None
    assert kvcache.snapshot(plain, ids[:, :3], mask[:, :3]) is None  # width differs
    kept = kvcache.keep(plain, torch.ones(2, 5, dtype=torch.long), mask[:, :2], [3, 1])
    assert kept.mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]  # after each row's own new tokens: masked
    cfg = LlamaConfig(hidden_size=8, num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=1,
                      intermediate_size=8, vocab_size=16)
    assert kvcache.snapshot(StaticCache(config=cfg, max_cache_len=4), ids, mask) is None
    cfg.sliding_window, cfg.layer_types = 2, ["sliding_attention"]
    sliding = DynamicCache(config=cfg)
    sliding.update(torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8), 0)
    assert kvcache.snapshot(sliding, ids, mask) is None


def test_prefix_store_keeps_finished_rows_within_its_budget(loaded):
    """PrefixStore: a finished row's cache (its own columns, copied) serves a later row that begins the
    same way, cut to what they share (never the later row's last token); another branch's row, or one
    sharing fewer than min_tokens, gets nothing; a row extending a stored one replaces it; past the budget
    the least recently used go first."""
    b = loaded[0.9]
    tok = b.tokenizer("a")
    head = "rev the quick brown fox jumps="
    ids = [tok.encode(head + "ab"), tok.encode("add 12+30= and then some"), tok.encode("key zz=abc")]
    out = b.generate_ids(ids, ["a", "b", "a"], max_new_tokens=4, keep_cache=True)
    store = kvcache.PrefixStore(max_tokens=200, min_tokens=8)
    for o in out:
        store.add(o.cache)
    assert len(store) == 3 and store.tokens == sum(len(i) + 3 for i in ids)
    assert all(s.seg.layers[0][0].shape[0] == 1 for s in store._rows.values())  # a row, not its batch
    later = tok.encode(head + "zz")
    got = store.lookup("a", later)
    shared = kvcache.common_prefix(ids[0], later)
    assert got.branch == "a" and got.tokens() == later[:shared] and got.source.layers[0][0].shape[2] == shared
    assert store.lookup("b", later) is None  # branch a's cache
    assert store.lookup("a", tok.encode("rev t")) is None  # shares fewer than min_tokens
    whole = ids[0] + out[0].new_ids
    assert store.lookup("a", whole).tokens() == whole[:-1]  # all of it: the last token is fed again
    cached = b.generate_ids([later], ["a"], max_new_tokens=5, past=[got])[0]
    assert cached.reused == shared and cached.new_ids == b.generate_ids([later], ["a"], max_new_tokens=5)[0].new_ids
    longer = b.generate_ids([whole], ["a"], max_new_tokens=3, generated=[4], keep_cache=True)[0]
    store.add(longer.cache)  # extends row 0's entry: replaces it
    assert len(store) == 3 and store.lookup("a", whole + longer.new_ids).tokens() == whole + longer.new_ids[:-1]
    store.lookup("b", ids[1] + [5])  # row 1 used: row 2 is now the least recently used
    small = kvcache.PrefixStore(max_tokens=len(ids[1]) + 3 + len(ids[2]) + 3, min_tokens=8)
    for o in out[1:]:
        small.add(o.cache)
    small.lookup("b", ids[1] + [5])
    small.add(out[0].cache)  # over the budget: the least recently used (row 2) goes, then row 1
    assert small.tokens <= small.max_tokens and small.lookup("a", ids[2] + [5]) is None
    assert small.lookup("a", ids[0] + [5]) is not None
