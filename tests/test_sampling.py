"""Per-row sampling: each row's draws follow its own temperature and top-p, and a seeded row's tokens
depend on its seed alone, not on the rows beside it."""

import pytest
import torch
from transformers import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from branchmerge.runtime.sampling import RowSampler, RowSettings, penalize, sample_rows

N = 20_000  # stratified uniforms (i + 0.5) / N: the empirical distribution is exact up to ~1/N


def _frequencies(scores: torch.Tensor, temperature: float, top_p: float, top_k: int, min_p: float) -> torch.Tensor:
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    rows = scores.expand(N, -1)
    tok = sample_rows(rows, torch.full((N,), temperature), torch.full((N,), top_p), u.float(),
                      torch.full((N,), top_k), torch.full((N,), min_p))
    return torch.bincount(tok, minlength=scores.shape[-1]).double() / N


def _hf(scores: torch.Tensor, temperature: float, top_p: float, top_k: int, min_p: float) -> torch.Tensor:
    """The distribution transformers' own warpers (in generate's order) sample from."""
    warp = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k > 0 else [])
                               + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
                               + ([MinPLogitsWarper(min_p)] if min_p > 0 else []))
    return warp(torch.zeros(1, 1, dtype=torch.long), scores.clone()).softmax(-1)[0].double()


@pytest.mark.parametrize(("temperature", "top_p", "top_k", "min_p"), [
    (1.0, 1.0, 0, 0.0), (0.5, 1.0, 0, 0.0), (2.0, 1.0, 0, 0.0), (1.0, 0.6, 0, 0.0), (0.7, 0.9, 0, 0.0),
    (1.0, 1.0, 3, 0.0), (1.5, 0.8, 4, 0.0), (1.0, 1.0, 0, 0.2), (2.0, 0.95, 5, 0.1), (1.0, 1.0, 1, 0.0)])
def test_draws_follow_the_warped_distribution(temperature, top_p, top_k, min_p):
    scores = torch.tensor([[2.0, -1.0, 0.5, 1.7, -3.0, 0.0, 1.0]])
    want = _hf(scores, temperature, top_p, top_k, min_p)
    got = _frequencies(scores, temperature, top_p, top_k, min_p)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    assert set(got.nonzero().flatten().tolist()) == set(want.nonzero().flatten().tolist())


def test_rows_of_one_batch_use_their_own_settings():
    torch.manual_seed(0)
    scores = torch.randn(4, 50)
    u = torch.tensor([0.999, 0.3, 0.999, 0.5])
    tok = sample_rows(scores, torch.tensor([0.0, 1.0, 1.0, 1e-6]), torch.tensor([1.0, 1.0, 0.05, 0.5]), u)
    assert tok[0] == scores[0].argmax() and tok[3] == scores[3].argmax()  # greedy rows, whatever u says
    assert scores[2].softmax(-1).max() >= 0.05  # so a top-p of 0.05 keeps only the likeliest token
    assert tok[2] == scores[2].argmax()
    half_bf16 = sample_rows(scores.bfloat16(), torch.ones(4), torch.ones(4), u)
    assert half_bf16.dtype == torch.long and half_bf16.shape == (4,)


def test_a_row_draws_the_same_token_whatever_its_neighbours_settings():
    torch.manual_seed(2)
    scores, u = torch.randn(3, 64), torch.rand(3)
    alone = [int(sample_rows(scores[r:r + 1], torch.tensor([1.2]), torch.ones(1), u[r:r + 1])) for r in range(3)]
    for temps, tops, ks, mins in [([1.2, 0.0, 1.2], [1.0, 1.0, 1.0], [0, 0, 0], [0, 0, 0]),
                                  ([1.2, 1.2, 1.2], [1.0, 0.3, 1.0], [0, 0, 0], [0, 0, 0]),
                                  ([1.2, 2.0, 1.2], [1.0, 0.9, 1.0], [0, 5, 0], [0, 0, 0]),
                                  ([1.2, 1.0, 1.2], [1.0, 1.0, 1.0], [0, 0, 0], [0, 0.3, 0])]:
        got = sample_rows(scores, torch.tensor(temps), torch.tensor(tops), u, torch.tensor(ks), torch.tensor(mins))
        assert [int(got[0]), int(got[2])] == [alone[0], alone[2]]


def test_a_seeded_row_does_not_depend_on_its_neighbours():
    torch.manual_seed(1)
    scores = [torch.randn(3, 40) for _ in range(6)]

    def run(temps, seeds, col):
        s = RowSampler([RowSettings(t, p, seed=sd) for t, p, sd in zip(temps, [1.0, 0.9, 1.0], seeds)])
        out = []
        for sc in scores:
            got = s(torch.zeros(3, 1, dtype=torch.long), sc.clone())
            assert torch.isfinite(got).sum(-1).eq(1).all()  # exactly one token left per row
            out.append(int(got[col].argmax()))
        return out

    a = run([1.5, 0.8, 2.0], [11, None, 5], col=0)
    b = run([1.5, 3.0, 0.0], [11, 4, None], col=0)  # different neighbours, same seed and settings
    assert a == b
    assert run([1.5, 0.8, 2.0], [12, None, 5], col=0) != a  # and the seed is what fixes it
    assert not RowSampler([RowSettings(seed=1), RowSettings()]).needed
    huge = RowSampler([RowSettings(1.0, seed=3, top_k=10**30)])  # no top-k at all, not an overflow
    assert int(huge(torch.zeros(1, 1, dtype=torch.long), scores[0][:1].clone()).argmax()) == \
        int(RowSampler([RowSettings(1.0, seed=3)])(torch.zeros(1, 1, dtype=torch.long), scores[0][:1].clone()).argmax())


def test_penalties_and_logit_bias_follow_openai():
    """OpenAI's formula: logit - frequency * count - presence * (count > 0), over the generated tokens
    only (not the prompt); logit_bias adds to its tokens first. Greedy rows change too."""
    scores = torch.zeros(2, 6)
    generated = torch.tensor([[1, 1, 4], [5, 5, 5]])
    got = penalize(scores.clone(), generated, torch.tensor([0.5, 0.0]), torch.tensor([0.25, 1.0]))
    want = torch.zeros(2, 6)
    want[0, 1], want[0, 4], want[1, 5] = -0.5 - 0.5, -0.5 - 0.25, -3.0
    torch.testing.assert_close(got, want)
    prompt = torch.tensor([[3, 3], [3, 3]])  # a prompt of the token the scores like best: no penalty for it
    s = RowSampler([RowSettings(presence_penalty=2.0), RowSettings(logit_bias={2: 100.0})])
    assert s.needed
    logits = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]] * 2)
    first = s(prompt, logits.clone()).argmax(-1).tolist()
    assert first == [3, 2]  # row 0: nothing generated yet; row 1: the bias wins
    second = s(torch.cat([prompt, torch.tensor([[3], [2]])], 1), logits.clone()).argmax(-1).tolist()
    assert second[0] != 3 and second[1] == 2  # row 0 generated 3 once: 1.0 - 2.0 < 0
    assert RowSampler([RowSettings(logit_bias={3: -100.0})])(prompt[:1], logits[:1].clone()).argmax() != 3


def test_stop_strings_end_each_row_at_its_own_stop_or_length():
    """The stopping rule step by step: a row is done once its new text (not its prompt) holds one of its
    own stop strings, or it has its own number of tokens; the others go on. Tokens here are UTF-8 bytes: a
    two-character stop string of six bytes is still found (a window of characters would miss it)."""
    from branchmerge.runtime.sampling import StopStrings

    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    prompt = list("ab=".encode())
    new = list("xy=日本uv".encode())
    stop = StopStrings([decode] * 4, [["="], ["日本"], ["q"], []], [None, None, 3, None])
    flags = []
    for k in range(1, len(new) + 1):
        ids = torch.tensor([prompt + new[:k]] * 4)
        flags.append(stop(ids, None).tolist())
    steps = range(1, len(new) + 1)
    assert [f[0] for f in flags] == [k >= 3 for k in steps]  # "=" in the prompt does not count
    assert [f[1] for f in flags] == [k >= 9 for k in steps]  # "xy=" + 6 bytes
    assert [f[2] for f in flags] == [k >= 3 for k in steps]  # never "q": its length
    assert not any(f[3] for f in flags)  # neither: the call's max_new_tokens ends it
    assert stop.ended == [3, 9, 3, None]
    # a batch that generate expanded (beam search, n > 1) is left to max_new_tokens
    assert not StopStrings([decode], [["x"]])(torch.tensor([prompt + new] * 2), None).any()


def test_min_tokens_holds_back_stop_strings_as_in_vllm():
    """vLLM's min_tokens covers stop strings: no row ends with one before it has min_tokens tokens, and a
    string its first min_tokens - 1 tokens completed does not end it later either (it is still in the
    decoded window then); one the min_tokens-th or a later token completes does. Earlier tokens (a row
    going on after a break) count."""
    from branchmerge.runtime.sampling import StopStrings
    from branchmerge.runtime.text import cut_at_stop, min_tokens_start

    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    prompt = list(b"p:")
    new = list(b"axbcxdxe")  # "x" completes at tokens 2, 5 and 7
    stop = StopStrings([decode] * 5, [["x"], ["x"], ["x"], ["x"], ["xd"]], [None] * 5, [0, 0, 0, 2, 0],
                       [0, 2, 3, 4, 3])
    ended = []
    for k in range(1, len(new) + 1):
        ended = stop(torch.tensor([prompt + new[:k]] * 5), None).tolist()
    assert stop.ended == [2, 2, 5, 2, 6]  # row 3 had 2 tokens before: its 4th token is its 2nd new one
    assert all(ended)
    text = decode(new)
    assert cut_at_stop(text, ["x"], start=min_tokens_start(decode, new, 3)) == ("axbc", True)
    assert cut_at_stop(text, ["x"], start=min_tokens_start(decode, new, 2)) == ("a", True)  # token 2 may end it
    assert cut_at_stop(text, ["x"], start=min_tokens_start(decode, new, 8)) == (text, False)
    assert cut_at_stop(text, ["xd"], start=5) == ("axbc", True)  # "xd" begins before start, ends after


def test_a_batch_adjusts_each_row_as_it_would_alone():
    """Logit bias, repetition penalty (its own prompt, not its padding), penalties and min_tokens applied to
    a batch at once give each row the scores it gets alone; the repetition penalty is transformers'."""
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    rows = [RowSettings(logit_bias={3: 5.0, 7: -2.0}, repetition_penalty=1.4),
            RowSettings(repetition_penalty=0.8, presence_penalty=0.5, min_tokens=3),
            RowSettings(repetition_penalty=1.5),
            RowSettings(min_tokens=2, frequency_penalty=0.3, logit_bias={1: 0.5}),
            RowSettings(),
            RowSettings(allowed_token_ids=(2, 9), logit_bias={9: 1.0, 4: 3.0})]
    prompts = [[4, 5, 5], [6], [], [9, 8, 1, 0], [2, 2], [1]]  # an empty prompt: nothing seen before it generates
    stops = [{0}, {0, 11}, {0}, {11}, {0}, {0}]

    def sampler(idx):
        s = RowSampler([rows[i] for i in idx])
        s.stops, s.prompts = [stops[i] for i in idx], [prompts[i] for i in idx]
        return s

    batch, alone = sampler(range(6)), [sampler([i]) for i in range(6)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(q)) + q for q in prompts])  # left-padded with 0
    for step in range(4):
        scores = torch.randn(6, 12, generator=g)
        got = batch.adjust(ids, scores.clone())
        assert torch.isfinite(got[5]).tolist() == [t in (2, 9) for t in range(12)]  # only its allowed tokens
        for i in range(6):
            row = torch.tensor([prompts[i] + ids[i, width:].tolist()], dtype=torch.long)
            one = alone[i].adjust(row, scores[i:i + 1].clone())
            torch.testing.assert_close(got[i:i + 1], one)
        if step == 0:
            seen = torch.tensor([prompts[0]])
            torch.testing.assert_close(got[0:1] - torch.tensor([[0, 0, 0, 5.0, 0, 0, 0, -2.0, 0, 0, 0, 0]]),
                                       RepetitionPenaltyLogitsProcessor(1.4)(seen, scores[0:1].clone()))
        assert got[1, 11] == -float("inf") if step < 3 else got[1, 11] > -float("inf")
        if step == 0:
            torch.testing.assert_close(got[2], scores[2])  # its -1 padding touched nothing
        else:
            assert got[2, 7] == scores[2, 7] / 1.5 or got[2, 7] == scores[2, 7] * 1.5  # it generated 7
        ids = torch.cat([ids, torch.tensor([[3], [5], [7], [11], [2], [9]])], 1)


def test_held_text_holds_back_what_may_begin_a_stop_string():
    """HeldText, fed a growing text: what may begin a stop string (or a character still being decoded) waits
    until the next piece shows; the text stops at a completed stop string (through it with keep), nothing
    after; a text that ends gives out what it held; start keeps an early stop string from ending it."""
    from branchmerge.runtime.text import HeldText

    def run(pieces, stop, **kw):
        held, text, out = HeldText(stop, **kw), "", []
        for p in pieces:
            text += p
            out.append(held.feed(text))
        return out, held

    out, held = run(["He", "llo E", "N", "D!", " more"], ["END"])
    assert out == ["He", "llo ", "", "", ""] and held.hit and held.text == "Hello " and held.finish() == ""
    out, held = run(["ab", "E", "Nx", "y"], ["END"])  # "EN" was not the stop string after all
    assert "".join(out) == "abENxy" and out[1:3] == ["", "ENx"] and not held.hit
    out, held = run(["ab", "E"], ["END"])
    assert out == ["ab", ""] and held.finish() == "E"  # the text ended: what it held goes out
    out, held = run(["a", "EN", "D", "z"], ["END"], keep=True)
    assert "".join(out) == "aEND"
    held = HeldText([])  # a character still being decoded waits; the next decode of the ids completes it
    assert [held.feed("caf"), held.feed("caf\ufffd"), held.feed("café!")] == ["caf", "", "é!"]
    held = HeldText(["x"])
    assert held.feed("ax", start=2) == "ax" and not held.hit  # "x" ends inside text[:start]: no stop
    assert held.feed("axbx", start=2) == "b" and held.hit and held.finish() == ""
    assert HeldText(["xy"]).feed("ax", final=True) == "ax"  # nothing more comes: nothing held back


def test_bad_words_never_complete_and_change_nothing_before(loaded):
    """vLLM's ``bad_words``: a row never generates a banned token sequence (nor a banned single token); up to
    where the plain answer would first complete one, its answer is the plain one, and a row beside it
    without bad words is unchanged."""
    from branchmerge.runtime.text import bad_word_ids

    b = loaded[0.9]
    tok = b.tokenizer("a")
    ids = tok.encode("rev hello=")
    plain = b.generate_ids([ids], ["a"], max_new_tokens=30)[0].new_ids
    pair = plain[3:5]  # two tokens the plain answer generates
    word = tok.decode(pair)
    banned = bad_word_ids(tok, [word, tok.decode(plain[:1])])
    assert tuple(pair) in banned and (plain[0],) in banned
    rows = [RowSettings(bad_words=banned), RowSettings()]
    got = b.generate_ids([ids, tok.encode("add 1+2=")], ["a", "a"], max_new_tokens=30, row_sampler=RowSampler(rows))
    new = got[0].new_ids
    assert plain[0] not in new and all(new[i:i + 2] != pair for i in range(len(new) - 1))
    assert got[1].new_ids == b.generate_ids([tok.encode("add 1+2=")], ["a"], max_new_tokens=30)[0].new_ids
    # with only the pair banned: the same answer up to where it would complete it
    only = b.generate_ids([ids], ["a"], max_new_tokens=30,
                          row_sampler=RowSampler([RowSettings(bad_words=(tuple(pair),))]))[0].new_ids
    first = next(i for i in range(len(plain) - 1) if plain[i:i + 2] == pair)
    assert only[:first + 1] == plain[:first + 1] and only[first + 1] != pair[1]
