"""Running a bundle: every branch equals its original at r=0, mixed batches equal per-branch runs."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import branchmerge
from branchmerge.config import load_config
from branchmerge.errors import BranchmergeError, BranchNotFoundError, BundleError
from branchmerge.export import export_branch
from branchmerge.merge import run_merge
from branchmerge.runtime.modules import BranchedLinear
from tests.cli_util import run_cli
from tests.conftest import make_tiny_llama, save_char_tokenizer, write_config


def test_r0_logits_equal_originals(family, loaded):
    x = torch.randint(0, 64, (2, 16))
    b = loaded[0.0]
    for n in "abc":
        with b.use(n) as m, torch.no_grad():
            torch.testing.assert_close(m(x).logits, family[n][1](x).logits, atol=1e-4, rtol=0)


def test_r0_greedy_generation_identical(family, loaded):
    b = loaded[0.0]
    x = torch.randint(3, 64, (1, 6))
    for n in "abc":
        ref = family[n][1].generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
        with b.use(n) as m:
            got = m.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(ref, got), n


@pytest.mark.parametrize("side", ["left", "right"])
def test_mixed_batch_equals_per_branch(loaded, side):
    b = loaded[0.9]
    torch.manual_seed(1)
    lengths = [9, 5, 7, 3]
    names = ["a", "c", "b", "a"]
    width = max(lengths)
    ids = torch.zeros(4, width, dtype=torch.long)
    mask = torch.zeros(4, width, dtype=torch.long)
    seqs = [torch.randint(3, 64, (n,)) for n in lengths]
    for r, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[r, sl], mask[r, sl] = s, 1
    mixed = b.logits(ids, names, attention_mask=mask)
    for r, (s, n) in enumerate(zip(seqs, names)):
        with b.use(n) as m, torch.no_grad():
            alone = m(s[None]).logits[0]
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        torch.testing.assert_close(mixed[r, sl], alone, atol=1e-4, rtol=1e-4)


def test_mixed_generate_equals_separate(loaded):
    b = loaded[0.9]
    prompts = ["abc", "hello there", "1+1=", "zz"]
    names = ["b", "a", "c", "b"]
    together = b.generate(prompts, names, max_new_tokens=6)
    alone = [b.generate(p, n, max_new_tokens=6)[0] for p, n in zip(prompts, names)]
    assert together == alone


def test_export_and_runtime_agree_at_r09(bundles, loaded, tmp_path):
    out = export_branch(bundles[0.9], "b", tmp_path / "exp", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 64, (2, 10))
    with loaded[0.9].use("b") as m, torch.no_grad():
        torch.testing.assert_close(m(x).logits, ref(x).logits, atol=1e-4, rtol=1e-4)


def test_hot_branch_matches_and_costs_memory(loaded):
    b = loaded[0.9]
    x = torch.randint(0, 64, (1, 8))
    with b.use("c") as m, torch.no_grad():
        before = m(x).logits
    mem0 = b.memory_bytes()
    extra = b.materialize("c")
    assert extra > 0 and b.memory_bytes() == mem0 + extra
    with b.use("c") as m, torch.no_grad():
        torch.testing.assert_close(m(x).logits, before, atol=1e-5, rtol=1e-5)
    b.dematerialize("c")
    assert b.memory_bytes() == mem0


def test_memory_is_about_bundle_bytes(bundles, loaded, family):
    m = json.loads((bundles[0.9] / "manifest.json").read_text())
    held = loaded[0.9].memory_bytes()
    three = sum(p.numel() * 4 for n in "abc" for p in family[n][1].parameters())
    assert held < 0.75 * three
    assert abs(held - m["total_bytes"]) / m["total_bytes"] < 0.1


def test_standalone_and_tied_embeddings(family, tmp_path):
    other = tmp_path / "other"
    ref = make_tiny_llama(other, seed=9, hidden=48, tie_word_embeddings=True)
    tok = save_char_tokenizer(other, chat=True)
    cfg = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(family["a"][0])},
                                             {"name": "solo", "model": str(other), "standalone": True}], compress_rate=0.5)
    run_merge(load_config(cfg), tmp_path / "bundle", progress=False)
    b = branchmerge.load(tmp_path / "bundle", dtype="float32")
    x = torch.randint(0, 64, (1, 7))
    with b.use("solo") as m, torch.no_grad():
        torch.testing.assert_close(m(x).logits, ref(x).logits, atol=1e-5, rtol=0)
    text = b.generate("hi", "solo", max_new_tokens=5)
    ids = b.encode("hi", "solo")  # through the chat template
    assert ids == tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                          tokenize=True)["input_ids"]
    want = ref.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert text == [tok.decode(want[0, len(ids):], skip_special_tokens=True)]
    # rows of both groups in one call are split per group and keep their order
    both = b.generate(["hi", "yo"], ["solo", "a"], max_new_tokens=4)
    assert both == [b.generate("hi", "solo", max_new_tokens=4)[0], b.generate("yo", "a", max_new_tokens=4)[0]]
    # sampled rows of both groups (as the server batches them): each group's call gets its own rows' settings
    from branchmerge.runtime.sampling import RowSampler, RowSettings

    rows = [(b.encode("hi", "solo"), "solo", 1.5, 3), (b.encode("yo", "a"), "a", 0.0, None),
            (b.encode("ab", "solo"), "solo", 0.7, 5), (b.encode("yo", "a"), "a", 1.2, 6)]
    mixed = b.generate_ids([r[0] for r in rows], [r[1] for r in rows], max_new_tokens=6,
                           row_sampler=RowSampler([RowSettings(r[2], seed=r[3]) for r in rows]))
    alone = [b.generate_ids([i], [n], max_new_tokens=6, row_sampler=RowSampler([RowSettings(t, seed=s)]))[0]
             for i, n, t, s in rows]
    assert [m.new_ids for m in mixed] == [a.new_ids for a in alone]
    assert alone[1].text == b.generate("yo", "a", max_new_tokens=6)[0]  # the greedy row
    with pytest.raises(ValueError, match="row_sampler has 1 rows for 2 prompts"):
        b.generate_ids([rows[0][0], rows[1][0]], ["solo", "a"], row_sampler=RowSampler([RowSettings(1.0, seed=1)]))
    # scoring with shared prefixes on both groups (a context with two answers each) equals plain scoring
    ctx = torch.randint(3, 64, (20,)).tolist()
    seqs, names = [ctx + [5], ctx + [6, 7]] * 2, ["solo", "solo", "a", "a"]
    shared = b.token_logprobs_many(seqs, names, greedy_next=True)
    plain = b.token_logprobs_many(seqs, names, greedy_next=True, share_prefix=False)
    for x, y in zip(shared, plain):
        assert x.token_ids == y.token_ids and x.logprobs[1:] == pytest.approx(y.logprobs[1:], abs=1e-4)


def test_rows_end_their_own_way(loaded):
    """vLLM's stopping settings, per row of one batch, beside a row that ends at its end of text as usual:
    ignore_eos runs past the end of text, min_tokens suppresses it until then, stop_token_ids adds one."""
    from branchmerge.runtime.sampling import RowSampler, RowSettings

    b = loaded[0.9]
    ids = b.encode("add 5+5=", "a", chat=False)
    plain = b.generate_ids([ids], ["a"], max_new_tokens=20)[0]
    n = len(plain.new_ids)
    assert plain.finish_reason == "stop" and plain.stop_id in b.stop_ids("a") and 1 < n < 16  # the setting
    k = next(i for i, t in enumerate(plain.new_ids) if i and t not in plain.new_ids[:i])
    longer = b.generate_ids([ids], ["a"], max_new_tokens=20, row_sampler=RowSampler([RowSettings(ignore_eos=True)]))
    never = next(t for t in range(3, 64) if t not in longer[0].new_ids)
    kinds = [RowSettings(), RowSettings(ignore_eos=True), RowSettings(min_tokens=n + 2),
             RowSettings(stop_token_ids=(plain.new_ids[k],)), RowSettings(ignore_eos=True, stop_token_ids=(never,))]
    got = b.generate_ids([ids] * 5, ["a"] * 5, max_new_tokens=20, row_sampler=RowSampler(kinds))
    assert (got[0].new_ids, got[0].stop_id, got[0].finish_reason) == (plain.new_ids, plain.stop_id, "stop")
    assert len(got[1].new_ids) == 20 and got[1].finish_reason == "length" and got[1].stop_id is None
    assert got[1].new_ids[:n + 1] == plain.new_ids + [plain.stop_id]  # its end of text is just a token
    assert len(got[2].new_ids) >= n + 2 and got[2].new_ids[:n] == plain.new_ids
    assert (got[3].new_ids, got[3].stop_id, got[3].finish_reason) == (plain.new_ids[:k], plain.new_ids[k], "stop")
    assert got[4].new_ids == got[1].new_ids == longer[0].new_ids  # a stop id that never comes
    with pytest.raises(BranchmergeError, match="stop_token_ids of row 0: token id 999 is outside the vocabulary"):
        b.generate_ids([ids], ["a"], row_sampler=RowSampler([RowSettings(stop_token_ids=(999,), min_tokens=2)]))


def test_unknown_branch_lists_valid(loaded):
    with pytest.raises(BranchNotFoundError, match="unknown branch 'zzz'.*a, b, c"):
        loaded[0.9].generate("x", "zzz")


def test_prompt_longer_than_context(loaded):
    with pytest.raises(BranchmergeError, match="128-token context of branch 'a'"):
        loaded[0.9].generate("a" * 200, "a", max_new_tokens=4)


def test_auto_without_router_is_clear(loaded):
    with pytest.raises(BranchmergeError, match="needs a router"):
        loaded[0.9].generate("x", "auto")


def test_corrupt_bundle_refused(bundles, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(bundles[0.9], d)
    shard = next(d.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x55
    shard.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        branchmerge.load(d)


def test_cli_generate_streams(capsys, bundles):
    code, out, err = run_cli(capsys, "generate", bundles[0.9], "abc", "--branch", "a", "-n", "5")
    assert code == 0, err
    assert "[branch: a]" in err
    code, _, err = run_cli(capsys, "generate", bundles[0.9], "abc", "--branch", "nope")
    assert code != 0 and "unknown branch 'nope'" in err


def test_cli_generate_stops_at_its_stop_strings(capsys, bundles):
    """`generate --stop` shows the text up to the first stop string: text that may begin one waits until it
    cannot (a stop string that never completes shows everything)."""
    full = branchmerge.load(bundles[0.9]).generate("rev hello=", "a", max_new_tokens=16)[0]
    stop = full[4:7]
    code, out, err = run_cli(capsys, "generate", bundles[0.9], "rev hello=", "-b", "a", "-n", "16", "--stop", stop)
    assert code == 0, err
    assert out == full[:full.index(stop)] + "\n"
    code, out, err = run_cli(capsys, "generate", bundles[0.9], "rev hello=", "-b", "a", "-n", "16",
                             "-s", full[1] + "§", "-s", full[-1] + "§")  # begun, never completed
    assert code == 0, err
    assert out == full + "\n"


def test_cli_chat(capsys, bundles, monkeypatch):
    """Two turns; the second goes on from the first reply's KV cache (prefilling only what it adds) and
    answers as it does without it."""
    import io

    from branchmerge.runtime.generation import BatchGeneration

    carry, used = BatchGeneration._carry, []

    def spy(self, *a, **kw):
        got = carry(self, *a, **kw)
        used.append(got is not None and list(got[3]) == [0])
        return got

    monkeypatch.setattr(BatchGeneration, "_carry", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n\n"))
    code, out, err = run_cli(capsys, "chat", bundles[0.9], "--branch", "c", "-n", "3")
    assert code == 0, err
    assert out.count("c> ") == 2 and used == [True]  # (the first turn had no cache)
    monkeypatch.setattr(BatchGeneration, "_carry", lambda self, *a, **kw: None)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n\n"))
    assert run_cli(capsys, "chat", bundles[0.9], "--branch", "c", "-n", "3")[1] == out


def test_cli_chat_ctrl_c_stops_the_reply_not_the_chat(capsys, bundles, monkeypatch):
    """Ctrl-C while a reply streams stops its generation (the stopping criterion fires) and the chat goes on
    to the next turn, as in llama.cpp's or ollama's chat."""
    import io
    import os
    import signal
    import time

    from branchmerge.cli import run_cmds

    real_stop = run_cmds._Stop.__call__
    stopped = []

    def stop(self, input_ids, scores, **kw):
        if not stopped:  # the first step of the first reply: the user presses Ctrl-C, the step waits for it
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)
            self.event.wait(10)
        out = real_stop(self, input_ids, scores, **kw)
        stopped.append(bool(out.all()))
        return out

    monkeypatch.setattr(run_cmds._Stop, "__call__", stop)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n\n"))
    code, out, err = run_cli(capsys, "chat", bundles[0.9], "--branch", "c", "-n", "20")
    assert code == 0, err
    assert "[stopped]" in err
    assert out.count("c> ") == 2  # the second turn ran
    assert stopped[0], "the interrupted generation was not stopped"


def test_token_ids_outside_the_vocabulary_are_named(loaded):
    """On a GPU such an id is a device-side assert that ends the process's use of the device; here and
    there it is an error naming the row, the id and the branch, before any forward."""
    b = loaded[0.9]
    for ids, needle in (([[5, 64]], "row 0: token id 64 is outside the vocabulary of branch 'a' (size 64)"),
                        ([[5], [-1]], "row 1: token id -1"), ([[5], []], "row 1 has no tokens")):
        with pytest.raises(BranchmergeError, match=re.escape(needle)):
            b.generate_ids(ids, ["a"] * len(ids), max_new_tokens=2)
        with pytest.raises(BranchmergeError, match=re.escape(needle)):
            b.token_logprobs_many(ids, ["a"] * len(ids))


def test_mixed_batch_dense_deltas_path(loaded):
    """r=0 stores dense differences: the per-branch loop path must agree with per-branch runs too."""
    b = loaded[0.0]
    x = torch.randint(3, 64, (3, 6))
    mixed = b.logits(x, ["c", "a", "b"])
    for r, n in enumerate(["c", "a", "b"]):
        with b.use(n) as m, torch.no_grad():
            torch.testing.assert_close(mixed[r], m(x[r:r + 1]).logits[0], atol=1e-4, rtol=1e-4)


def test_model_moves_dtype_and_keeps_branches(bundles):
    b = branchmerge.load(bundles[0.9], dtype="float32")
    x = torch.randint(0, 64, (2, 5))
    with b.use("b") as m, torch.no_grad():
        ref = m(x).logits
        m.to(torch.float64)
        got = m(x).logits
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), ref, atol=1e-4, rtol=1e-4)
    mixed = b.logits(x, ["a", "b"])
    assert mixed.dtype == torch.float64



@pytest.mark.parametrize("path", ["masked", "gathered"])
def test_mixed_batch_uneven_groups_and_repeated_rows(bundles, monkeypatch, path):
    """Both mixed paths — every branch's factors with a row mask, and rows gathered into a padded
    per-branch layout — with uneven groups, an absent branch and beam-style repeated rows (batch a
    multiple of the ids set) must equal per-branch runs."""
    monkeypatch.setattr(BranchedLinear, "masked_max_share", 1e9 if path == "masked" else 0.0)
    b = branchmerge.load(bundles[0.9], dtype="float32")
    g = b.groups["main"]
    layers = [m for m in g.model.modules() if isinstance(m, BranchedLinear)]
    assert layers and all(m.masked == (path == "masked") for m in layers)
    x = torch.randint(3, 64, (6, 5))
    names = ["a", "a", "a", "b", "a", "b"]  # c absent, a has 4 rows and b 2
    mixed = b.logits(x, names)
    for r, n in enumerate(names):
        torch.testing.assert_close(mixed[r], b.logits(x[r:r + 1], [n])[0], atol=1e-4, rtol=1e-4)
    g.state.set_rows([g.state.index("c"), g.state.index("b")])
    try:
        with torch.no_grad():
            rep = g.model(x[:4]).logits  # 4 rows over 2 ids: rows 0-1 are c, rows 2-3 are b
    finally:
        g.state.set_rows(None)
    for r, n in enumerate("ccbb"):
        torch.testing.assert_close(rep[r], b.logits(x[r:r + 1], [n])[0], atol=1e-4, rtol=1e-4)


def test_fused_layout_equals_split(bundles, loaded):
    """The GPU's layout (W̄ and every V_i stored as one weight, ranks padded to a multiple of 8, two GEMMs
    per layer) computes the same function as the CPU's: one branch, mixed rows, hot branch, generation."""
    split = loaded[0.9]
    fused = branchmerge.load(bundles[0.9], dtype="float32", fused=True)
    layers = [m for m in fused.groups["main"].model.modules() if isinstance(m, BranchedLinear)]
    assert layers and all(m.fused and m.stride % 8 == 0 and m.stride >= m.rank for m in layers)
    assert not any(m.fused for m in split.groups["main"].model.modules() if isinstance(m, BranchedLinear))
    x = torch.randint(3, 64, (3, 7))
    for n in "abc":
        with split.use(n) as ms, fused.use(n) as mf, torch.no_grad():
            torch.testing.assert_close(mf(x).logits, ms(x).logits, atol=1e-4, rtol=1e-4)
    names = ["c", "a", "c"]
    torch.testing.assert_close(fused.logits(x, names), split.logits(x, names), atol=1e-4, rtol=1e-4)
    fused.materialize("a")
    with split.use("a") as ms, fused.use("a") as mf, torch.no_grad():
        torch.testing.assert_close(mf(x).logits, ms(x).logits, atol=1e-4, rtol=1e-4)
    fused.dematerialize("a")
    prompts, who = ["abc", "hello there", "1+1="], ["b", "a", "c"]
    assert fused.generate(prompts, who, max_new_tokens=5) == split.generate(prompts, who, max_new_tokens=5)


def test_head_gets_one_gemm_on_batched_prefill(loaded):
    """generate() hands the head a strided [B, 1, H] view; it must reach the head contiguous (one GEMM),
    not as a batched matmul over B copies of the vocabulary weight, and the logits must not change."""
    b = loaded[0.9]
    m = b.model("a")
    seen = []
    h = m.get_output_embeddings().register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    try:
        x = torch.randint(3, 64, (3, 7))
        with torch.no_grad():
            hidden = m.model(x).last_hidden_state[:, -1:, :]
            assert not hidden.is_contiguous()
            got = m.get_output_embeddings()(hidden)
            m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2, do_sample=False, pad_token_id=0)
    finally:
        h.remove()
    assert seen and all(seen)
    torch.testing.assert_close(got, torch.nn.functional.linear(hidden.contiguous(), m.get_output_embeddings().weight))


def test_rows_end_at_their_own_stop_strings_and_lengths(loaded):
    """generate_ids(stop=…, max_new_tokens=[…]): each row ends where its text first holds one of its stop
    strings (text cut before it, new_ids up to the token that completed it) or at its own length; the
    others are as without them, and the batch ends when its rows do, not at the largest length."""
    from transformers import StoppingCriteria

    class Steps(StoppingCriteria):
        n = 0

        def __call__(self, input_ids, scores, **kw):
            Steps.n += 1
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    b = loaded[0.9]
    tok = b.tokenizer("a")
    prompts = ["rev hello=", "add 12+30=", "key zz="]
    ids, names = [tok.encode(p) for p in prompts], ["a", "c", "b"]
    full = b.generate_ids(ids, names, max_new_tokens=16)
    assert all(len(r.new_ids) == 16 for r in full[:2])
    text0 = full[0].text
    stop0 = text0[4:7]  # a stop string that first ends in the middle of row 0's text
    k = next(k for k in range(1, 17) if stop0 in tok.decode(full[0].new_ids[:k], skip_special_tokens=True))
    out = b.generate_ids(ids[:2], names[:2], max_new_tokens=[16, 5], stop=[[stop0, "never§"], []],
                         stopping_criteria=[Steps()])
    assert out[0].new_ids == full[0].new_ids[:k] and k < 16
    assert (out[0].text, out[0].finish_reason, out[0].stop_id) == (text0[:text0.index(stop0)], "stop", None)
    assert (out[1].new_ids, out[1].finish_reason) == (full[1].new_ids[:5], "length")
    assert Steps.n == max(k, 5)  # not 16
    # a row without a stop or limit of its own is untouched by its neighbours'
    mixed = b.generate_ids(ids, names, max_new_tokens=[16, 5, 16], stop=[[stop0], [], []])
    assert (mixed[2].new_ids, mixed[2].text) == (full[2].new_ids, full[2].text)
    assert b.generate(prompts[0], "a", max_new_tokens=16, stop=stop0, chat=False) == [out[0].text]
    with pytest.raises(ValueError, match="max_new_tokens has 2 rows"):
        b.generate_ids(ids, names, max_new_tokens=[4, 4])
    with pytest.raises(ValueError, match="at least 1"):
        b.generate_ids(ids[:1], names[:1], max_new_tokens=[0])


def test_a_row_goes_on_where_it_stopped(loaded):
    """generate_ids(generated=…): a row given its text so far goes on as if it had not stopped: the same
    tokens for greedy and seeded rows (their generators carried over), with penalties, min_tokens and a
    stop string that begins before the break and ends after it. (The server's continuous batching runs
    rows this way.)"""
    from branchmerge.runtime.sampling import RowSampler, RowSettings

    b = loaded[0.9]
    tok = b.tokenizer("a")
    prompts, names = ["rev hello=", "add 5+5=", "key zz=", "add 12+30="], ["a", "a", "b", "c"]
    ids = [tok.encode(p) for p in prompts]
    settings = [RowSettings(), RowSettings(min_tokens=13, presence_penalty=0.5),
                RowSettings(temperature=0.9, seed=5, frequency_penalty=0.4, repetition_penalty=1.3),
                RowSettings(temperature=1.2, top_p=0.9, seed=7)]
    plain = b.generate_ids(ids[:1], names[:1], max_new_tokens=16)[0]
    stops = [[tok.decode(plain.new_ids[4:8])], [], [], []]  # completes at token 8 of row 0
    whole = b.generate_ids(ids, names, max_new_tokens=16, stop=stops, row_sampler=RowSampler(settings))
    assert len(whole[0].new_ids) == 8 and whole[0].finish_reason == "stop"
    assert len(whole[1].new_ids) >= 13  # it ends with its end of text only after min_tokens
    first_sampler = RowSampler(settings)
    first = b.generate_ids(ids, names, max_new_tokens=6, stop=stops, row_sampler=first_sampler)
    assert all(len(f.new_ids) == 6 and f.finish_reason == "length" for f in first)
    rest = b.generate_ids([i + f.new_ids for i, f in zip(ids, first)], names, max_new_tokens=10, stop=stops,
                          generated=[6] * 4, row_sampler=RowSampler(settings, generators=first_sampler.generators))
    for w, f, r in zip(whole, first, rest):
        assert (f.new_ids + r.new_ids, r.finish_reason, r.stop_id) == (w.new_ids, w.finish_reason, w.stop_id)
