"""Fine-tunes that added tokens (chat or tool tokens: a vocabulary that grew) stay in their group: their
embeddings and head are kept per branch at their own size, the rest is merged as usual. Each branch answers
as its own model, alone and in mixed batches (where a row's tokens past its vocabulary are impossible), with
structured outputs, through the server, and a bundle that lies about the sizes is refused."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import branchmerge
from branchmerge.config import load_config
from branchmerge.errors import BranchmergeError, BundleError, ModelInputError
from branchmerge.export_vllm import export_vllm
from branchmerge.merge import run_merge
from branchmerge.runtime.sampling import RowSampler, RowSettings
from branchmerge.server import create_app
from tests.cli_util import run_cli
from tests.conftest import make_finetune, make_tiny_llama, save_char_tokenizer, write_config
from tests.serving import serving, wait_queued
from tests.test_structured import STRUCTURES, _check
from tests.test_tampered_bundle import _edit_manifest, _edit_shards, _set

ADDED = ["<|q|>", "<|r|>", "<|tool|>"]  # 64 → 67 tokens: the last word of the structure bitmask grows too
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _grow(model, folder: Path, seed: int) -> None:
    """Add ``ADDED`` to the tokenizer and model saved in ``folder``, with trained-looking rows for them."""
    tok = save_char_tokenizer(folder)
    tok.add_tokens(ADDED, special_tokens=True)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.get_input_embeddings().weight[64:] = torch.randn(len(ADDED), 32, generator=g)
        if not model.config.tie_word_embeddings:
            model.lm_head.weight[64:] = torch.randn(len(ADDED), 32, generator=g)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def _family(root: Path, tied: bool, frozen: bool = False) -> dict[str, Path]:
    """Base fine-tunes ``a`` and ``c`` (vocabulary 64; ``c`` with ``a``'s embeddings and head, stored once and
    run as one in mixed batches) and ``g``, whose vocabulary grew to 67 (``frozen``: over ``a``'s embeddings and
    head, as a fine-tune that froze them and trained only its new rows)."""
    base = make_tiny_llama(root / "base", seed=3, tie_word_embeddings=tied)
    out, first = {}, None
    for i, name in enumerate("acg"):
        m = make_finetune(base, root / name, seed=40 + i)
        if name == "a":
            first = m
        if name == "c" or (name == "g" and frozen):
            with torch.no_grad():
                m.get_input_embeddings().weight.copy_(first.get_input_embeddings().weight)
                m.lm_head.weight.copy_(first.lm_head.weight)
            if name == "c":
                m.save_pretrained(root / name)
        if name == "g":
            _grow(m, root / name, seed=7)
        else:
            save_char_tokenizer(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("grown")
    models = _family(root, tied=False)
    bundles = {}
    for r in (0.0, 0.5):
        cfg = write_config(root / f"c{r}.yaml", [{"name": n, "model": str(p)} for n, p in models.items()],
                           compress_rate=r)
        run_merge(load_config(cfg), root / f"b{r}", progress=False)
        bundles[r] = root / f"b{r}"
    return {"root": root, "models": models, "bundles": bundles,
            "loaded": {r: branchmerge.load(p, dtype="float32") for r, p in bundles.items()}}


def _hf(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_the_grown_fine_tune_joins_its_group_and_each_branch_is_its_own_model(grown):
    """One group; the embeddings and head records name g's own shape; at r=0 every branch's logits are its
    original model's, alone and in one mixed batch (a's and c's padded with -inf past their 64 tokens)."""
    b = grown["loaded"][0.0]
    m = b.reader.manifest
    assert len(m.groups) == 1 and m.groups[next(iter(m.groups))].branches == ["a", "c", "g"]
    recs = m.tensors[next(iter(m.groups))]
    assert recs[EMBED].shape == [64, 32] and recs[EMBED].shapes == {"g": [67, 32]}
    assert recs[HEAD].shapes == {"g": [67, 32]}
    assert all(not r.shapes for k, r in recs.items() if k not in (EMBED, HEAD))
    ids = {"a": [1, 5, 7, 9, 11], "c": [1, 8, 8, 3, 2], "g": [1, 64, 7, 66, 65]}  # g's prompt has new tokens
    x = torch.tensor(list(ids.values()))
    mixed = b.logits(x, list(ids))
    assert mixed.shape == (3, 5, 67)
    with torch.no_grad():
        for r, (name, row) in enumerate(ids.items()):
            want = _hf(grown["models"][name])(torch.tensor([row])).logits[0]
            alone = b.logits(torch.tensor([row]), [name])[0]
            assert alone.shape == want.shape
            torch.testing.assert_close(alone, want, atol=2e-5, rtol=0)
            torch.testing.assert_close(mixed[r, :, :want.shape[1]], want, atol=2e-5, rtol=0)
            assert bool(torch.isneginf(mixed[r, :, want.shape[1]:]).all())
    assert recs[EMBED].bytes == (64 + 67) * 32 * 4 and recs[EMBED].same_as == {"c": "a"}  # float32
    head = b.groups[m.branches["a"].group].model.lm_head
    assert head._holder == [0, 0, 2]  # a's and c's rows run through one head matmul


def test_a_row_may_not_use_tokens_of_another_branchs_vocabulary(grown):
    """Token 65 is g's; a's rows and a's request fields name it as outside a's vocabulary."""
    b = grown["loaded"][0.5]
    with pytest.raises(BranchmergeError, match=r"token id 65 is outside the vocabulary of branch 'a' \(size 64\)"):
        b.generate_ids([[1, 65]], ["a"], max_new_tokens=2)
    with pytest.raises(BranchmergeError, match="allowed_token_ids of row 0.*token id 66.*'c'"):
        b.generate_ids([[1, 5]], ["c"], max_new_tokens=2, row_sampler=RowSampler([RowSettings(allowed_token_ids=(66,))]))
    out = b.generate_ids([[1, 5], [1, 5]], ["a", "g"], max_new_tokens=2,
                         row_sampler=RowSampler([RowSettings(), RowSettings(allowed_token_ids=(66,))]))
    assert out[1].new_ids == [66, 66]


def test_mixed_batches_answer_as_each_row_alone_with_sampling_and_structures(grown):
    """Greedy, seeded and structured rows of both vocabularies in one batch: each row gets what it gets alone
    (a seeded draw over -inf padding is the draw without it), each structured answer follows its structure,
    and the grown branch draws its new tokens where its own model does."""
    b = grown["loaded"][0.5]
    names = ["a", "g", "c", "g", "a", "g"]
    prompts = ["add 1+2=", "rev abc<|q|>", "key zz=", "add 12+30<|r|>", "rev hello=", "key ab<|tool|>"]
    rows = [RowSettings(structure=STRUCTURES[0]), RowSettings(temperature=0.9, seed=7, top_k=5),
            RowSettings(temperature=0.9, seed=7, structure=STRUCTURES[1]), RowSettings(structure=STRUCTURES[2]),
            RowSettings(temperature=1.0, seed=3, top_p=0.9), RowSettings(temperature=0.7, seed=11, structure=STRUCTURES[3])]
    ids = [b.tokenizer(n).encode(p) for n, p in zip(names, prompts)]
    assert ids[1][-1] == 64 and ids[5][-1] == 66  # the added tokens are single tokens of g's tokenizer
    out = b.generate_ids(ids, names, max_new_tokens=60, row_sampler=RowSampler(rows))
    for i, (o, st) in enumerate(zip(out, rows)):
        if st.structure is not None:
            _check(st.structure, o.text)
        alone = b.generate_ids([ids[i]], [names[i]], max_new_tokens=60, row_sampler=RowSampler([st]))[0]
        assert (o.new_ids, o.finish_reason) == (alone.new_ids, alone.finish_reason), i
    greedy = b.generate_ids([ids[1], ids[0]], ["g", "a"], max_new_tokens=8)
    with torch.no_grad():  # at r=0.5 the grown branch still prefers its new tokens where its model does
        want = _hf(grown["models"]["g"]).generate(torch.tensor([ids[1]]), max_new_tokens=8, do_sample=False)
    assert any(t >= 64 for t in want[0, len(ids[1]):].tolist())
    assert greedy[0].new_ids[:2] == want[0, len(ids[1]):len(ids[1]) + 2].tolist()
    lp = b.token_logprobs_many([ids[1], ids[0]], ["g", "a"], top=3)
    assert all(t < 64 for top in lp[1].top[1:] for t, _ in top)
    assert lp[1].logprobs[1:] == pytest.approx(b.token_logprobs(ids[0], "a").logprobs[1:], abs=1e-5)


def test_tied_embeddings_and_the_cli(tmp_path, capsys):
    """A family with tied embeddings (the head is each branch's own embedding matrix, grown with it): at r=0 every
    branch is its model; `merge --dry-run` plans it, `inspect` shows g's shape; exports write g with 67
    tokens, while the LoRA export, which needs one vocabulary, says so."""
    models = _family(tmp_path, tied=True)
    cfg = write_config(tmp_path / "c.yaml", [{"name": n, "model": str(p)} for n, p in models.items()],
                       compress_rate=0.0)
    code, out, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "plan", "--dry-run")
    assert code == 0, err
    code, out, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "b", "--no-progress")
    assert code == 0, err
    b = branchmerge.load(tmp_path / "b", dtype="float32")
    assert HEAD not in b.reader.manifest.tensors[next(iter(b.reader.manifest.groups))]
    x = torch.tensor([[1, 5, 7, 9], [1, 66, 64, 3], [1, 2, 3, 4]])
    mixed = b.logits(x, ["a", "g", "c"])
    with torch.no_grad():
        for r, n in enumerate("agc"):
            want = _hf(models[n])(x[r:r + 1]).logits[0]
            torch.testing.assert_close(mixed[r, :, :want.shape[1]], want, atol=2e-5, rtol=0)
    code, out, err = run_cli(capsys, "inspect", tmp_path / "b", "--json")
    assert code == 0, err
    info = json.loads(out)["groups"]
    assert next(iter(info.values()))["tensor_records"][EMBED]["shapes"] == {"g": [67, 32]}
    code, out, err = run_cli(capsys, "inspect", tmp_path / "b")
    assert code == 0 and "each branch its own vocabulary (a 64, c 64, g 67 tokens)" in " ".join(out.split()), out
    code, out, err = run_cli(capsys, "export-branch", tmp_path / "b", "g", "-o", tmp_path / "g-alone")
    assert code == 0, err
    export = tmp_path / "dense"
    export_vllm(tmp_path / "b", export, mode="dense", progress=False)
    g = _hf(export / "g")
    assert _hf(tmp_path / "g-alone").config.vocab_size == 67
    assert g.config.vocab_size == 67
    with torch.no_grad():
        torch.testing.assert_close(g(x[1:2]).logits[0], _hf(models["g"])(x[1:2]).logits[0], atol=2e-5, rtol=0)
    with pytest.raises(BranchmergeError, match=r"vocabularies differ in size \('a' 64, 'c' 64, 'g' 67 tokens\).*--mode dense"):
        export_vllm(tmp_path / "b", tmp_path / "lora", progress=False)
    assert not (tmp_path / "lora").exists()


def test_only_the_vocabulary_may_differ(grown, tmp_path):
    """A norm of another width, or embeddings whose rows are not the branch's own vocab_size, still need a
    group of their own; the error names the tensor and the branch."""
    models = grown["models"]
    bad = tmp_path / "bad"
    shutil.copytree(models["g"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] = 70  # config says 70, the weights hold 67 rows
    (bad / "config.json").write_text(json.dumps(cfg))
    conf = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(models["a"])},
                                             {"name": "bad", "model": str(bad)}])
    with pytest.raises(ModelInputError, match=r"tensor lm_head\.weight has shape \[67, 32\] in branch 'bad' but "
                       r"\[64, 32\] in branch 'a' \('bad'\'s config\.json says vocab_size 70\).*but for their vocabulary"):
        run_merge(load_config(conf), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    wide = tmp_path / "wide"  # a fine-tune of another hidden size: refused as before, by its first tensor
    make_tiny_llama(wide, seed=1, hidden=48)
    conf = write_config(tmp_path / "w.yaml", [{"name": "a", "model": str(models["a"])},
                                             {"name": "wide", "model": str(wide)}])
    with pytest.raises(ModelInputError, match="'a' and 'wide' differ in hidden_size"):
        run_merge(load_config(conf), tmp_path / "out", progress=False)


def _group(m: dict) -> dict:
    return m["tensors"][next(iter(m["groups"]))]


@pytest.mark.parametrize("edit,message", [
    (lambda m: _group(m)["model.norm.weight"].update(shapes={"g": [40]}), r"`shapes\.g` \[40\]: only a per-branch"),
    (lambda m: _group(m)["model.layers.0.input_layernorm.weight"].update(shapes={"g": [67, 32]}, shape=[64, 32]),
     r"b\.a\|model\.layers\.0\.input_layernorm\.weight has shape \[32\]; its manifest record implies \[64, 32\]"),
    (lambda m: (_group(m)[EMBED].update(shapes={"g": [70, 32]}), _group(m)[HEAD].update(shapes={"g": [70, 32]})),
     r"branch 'g'\'s rows \(70\) are not its config's vocab_size \(67\)"),
    (lambda m: _group(m)[EMBED].update(shapes={"g": [67, 16]}), r"`shapes\.g` \[67, 16\]: only a per-branch"),
    (lambda m: _group(m)[EMBED].update(shapes={"a": [64, 32], "g": [67, 32]}), r"shapes names \['a'\]"),
    (lambda m: _group(m)[EMBED].update(shapes={"zz": [67, 32]}), r"shapes names \['zz'\]"),
    (lambda m: _group(m)[EMBED].update(same_as={"g": "a"}), r"`same_as\.g`: 'a' holds a tensor of another shape"),
    (lambda m: _group(m)[EMBED].pop("shapes"), r"b\.g\|model\.embed_tokens\.weight has shape \[67, 32\]; its "
                                                r"manifest record implies \[64, 32\]"),
])
def test_a_manifest_that_lies_about_the_vocabularies_is_refused(grown, tmp_path, edit, message):
    _refused(grown["bundles"][0.5], tmp_path, _edit_manifest, edit, message)


def _refused(bundle: Path, tmp_path: Path, editor, edit, message: str) -> None:
    """A copy of ``bundle`` edited (``editor(folder, edit)``) fails to load with ``message``."""
    d = tmp_path / "bundle"
    shutil.copytree(bundle, d)
    editor(d, edit)
    with pytest.raises(BundleError, match=message):
        branchmerge.load(d, dtype="float32")


def test_grown_embeddings_swapped_in_the_shards_are_refused(grown, tmp_path):
    """The config says 67 tokens, the shard holds (re-signed) 64 rows for g: refused at load, by name."""
    d = tmp_path / "bundle"
    shutil.copytree(grown["bundles"][0.5], d)
    _edit_shards(d, _set(f"b.g|{EMBED}", lambda t: t[:64].contiguous()))
    _edit_manifest(d, lambda m: _group(m)[EMBED].pop("shapes"))
    with pytest.raises(BundleError, match=r"branch 'g': its embeddings have 64 rows but its config's vocab_size is 67"):
        branchmerge.load(d, dtype="float32")


def test_the_server_batches_both_vocabularies_together(grown):
    """Concurrent requests for a and g run as one batch through the real ``openai`` SDK and answer as each
    does alone; g's chat can ask for its new tokens, a's cannot (400 naming the field)."""
    bundle = grown["loaded"][0.5]
    app = create_app(bundle, max_batch=8, wait_ms=20, max_tokens_limit=32)
    engine = app.state.engine
    with serving(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)

        def call(model: str, prompt: str, **kw) -> str:
            return c.completions.create(model=model, prompt=prompt, max_tokens=8, **kw).choices[0].text

        reqs = [("a", "rev abc="), ("g", "rev abc<|q|>"), ("c", "key zz="), ("g", "add 1+2<|tool|>")]
        alone = [call(*r) for r in reqs]
        before = engine.batches
        with ThreadPoolExecutor(len(reqs)) as ex, engine.paused():
            futs = [ex.submit(call, *r) for r in reqs]
            wait_queued(engine, len(reqs), futures=futs)
        assert [f.result() for f in futs] == alone
        assert engine.batches - before == 1
        assert call("g", "rev abc=", extra_body={"allowed_token_ids": [65], "skip_special_tokens": False}) == "<|r|>" * 8
        with pytest.raises(openai.BadRequestError, match="allowed_token_ids.*token id 65.*'a'"):
            call("a", "rev abc=", extra_body={"allowed_token_ids": [65]})


def _tokens_adapter(base_model, folder: Path, indices, *, save_embedding_layers: bool = False, seed: int = 0):
    """A real PEFT adapter with LoRA on q_proj and ``trainable_token_indices``, its trained rows random;
    returns PEFT's merged model."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                trainable_token_indices=indices))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "trainable_tokens_delta" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(folder, save_embedding_layers=save_embedding_layers)
    return model.merge_and_unload().eval()


def test_peft_trainable_tokens_read_as_peft_merges_them(tmp_path):
    """PEFT's ``trainable_token_indices`` (new values for some embedding rows: chat tokens a base never
    trained, or tokens just added) read as ``merge_and_unload`` makes them: a tied model (the head follows),
    an untied one with its own rows for the head (the dict form), and a resized vocabulary saved with
    ``save_embedding_layers``; such adapters join their base's group, kept exactly, and each branch answers
    as PEFT's merged model."""
    from branchmerge.io.adapters import LoraSource, open_model
    from branchmerge.merge import merge_adapters

    tied = make_tiny_llama(tmp_path / "tied", seed=5, tie_word_embeddings=True)
    untied = make_tiny_llama(tmp_path / "untied", seed=6)
    grown = make_tiny_llama(tmp_path / "unused", seed=6)
    grown.resize_token_embeddings(67, mean_resizing=False)
    cases = {  # name: (the model PEFT trained over, the base folder we read it over, PEFT's merged model)
        "chat": (tied, "tied", _tokens_adapter(tied, tmp_path / "chat", [3, 5, 60])),
        "both": (untied, "untied", _tokens_adapter(untied, tmp_path / "both", {"embed_tokens": [3, 4], "lm_head": [7]})),
        "grown": (grown, "untied", _tokens_adapter(grown, tmp_path / "grown", [64, 65, 66], save_embedding_layers=True)),
    }
    for name, (trained_over, folder, want) in cases.items():
        src = open_model(name, str(tmp_path / name), base=str(tmp_path / folder))
        assert isinstance(src, LoraSource) and src.tokens, name
        sd = want.state_dict()
        assert max(float((src.get(k).float() - sd[k].float()).abs().max()) for k in src.names()) < 1e-6, name
        before = trained_over.get_input_embeddings().weight
        assert not torch.equal(src.get("model.embed_tokens.weight"), before), name  # (the check above could fail)
    assert src.hf_config["vocab_size"] == 67
    merge_adapters(tmp_path / "untied", {"both": tmp_path / "both", "grown": tmp_path / "grown"}, tmp_path / "b",
                   dtype="float32", progress=False)
    b = branchmerge.load(tmp_path / "b", dtype="float32")
    assert len(b.reader.manifest.groups) == 1 and b.reader.manifest.groups["main"].lora_base is not None
    recs = b.reader.manifest.tensors["main"]  # the trained rows only, over the base's matrices
    assert recs["model.embed_tokens.weight"].patches == recs["lm_head.weight"].patches == {"both": "base",
                                                                                            "grown": "base"}
    assert recs["lm_head.weight"].bytes == (64 + 1 + 3) * 32 * 4 + (1 + 3) * 8
    x = torch.tensor([[1, 3, 7, 4, 9], [1, 66, 7, 64, 65]])
    mixed = b.logits(x, ["both", "grown"])
    with torch.no_grad():
        torch.testing.assert_close(mixed[0, :, :64], cases["both"][2](x[:1]).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed[1], cases["grown"][2](x[1:]).logits[0], atol=1e-5, rtol=0)
    # loaded into a running bundle (vLLM's runtime LoRA API, which has no trainable tokens): its rows over the
    # base's, in a bundle whose embeddings are per branch (this one) and in the base alone (shared, tied)
    got = b.load_lora("both2", tmp_path / "both", base="base")
    with torch.no_grad():
        torch.testing.assert_close(b.logits(x[:1], ["both2"])[0], cases["both"][2](x[:1]).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(b.logits(x[:1], ["both"]), mixed[:1, :, :64], atol=1e-5, rtol=0)
    assert got.slot == 3
    merge_adapters(tmp_path / "tied", {}, tmp_path / "t", dtype="float32", progress=False)
    t = branchmerge.load(tmp_path / "t", dtype="float32")
    t.load_lora("chat", tmp_path / "chat")
    y = torch.tensor([[1, 3, 60, 5, 9], [1, 3, 60, 5, 9]])
    with torch.no_grad():
        both_rows = t.logits(y, ["chat", "base"])
        torch.testing.assert_close(both_rows[0], cases["chat"][2](y[:1]).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(both_rows[1], tied(y[1:]).logits[0], atol=1e-5, rtol=0)
    t.unload_lora("chat")
    t.load_lora("chat3", tmp_path / "chat")  # its slot, reused
    torch.testing.assert_close(t.logits(y[:1], ["chat3"]), both_rows[:1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("edit,message", [
    (lambda cfg, t: cfg.update(trainable_token_indices=[3, 70]), r"trainable_token_indices reach row 70, past "
                                                                 r"model\.embed_tokens\.weight's 64 rows, but do not "
                                                                 r"give rows \[64, 65, 66, 67, 68\]"),
    (lambda cfg, t: cfg.update(trainable_token_indices=[-1, 3]), r"trainable_token_indices \[-1\] are outside"),
    (lambda cfg, t: cfg.update(trainable_token_indices=[3, 10**12]),  # (not a loop to 10**12)
     r"reach row 1000000000000, past model\.embed_tokens\.weight's 64 rows, but do not give rows \[64, 65"),
    (lambda cfg, t: cfg.update(trainable_token_indices=[3, 5, 9]), r"trainable_tokens_delta is \[2, 32\]; 3 "
                                                                   r"trainable_token_indices"),
    (lambda cfg, t: cfg.update(trainable_token_indices=[3, 3]), "repeat a token id"),
    (lambda cfg, t: cfg.update(trainable_token_indices={"lm_head": [3, 5]}), r"names \['lm_head'\]"),
    (lambda cfg, t: cfg.pop("trainable_token_indices"), "the config has no trainable_token_indices"),
])
def test_bad_trainable_tokens_are_named(tmp_path, edit, message):
    from branchmerge.io.adapters import open_model

    base = make_tiny_llama(tmp_path / "base", seed=5)
    _tokens_adapter(base, tmp_path / "ad", [3, 5])
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    edit(cfg, None)
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelInputError, match=message):
        open_model("ad", str(tmp_path / "ad"), base=str(tmp_path / "base"))


@pytest.mark.parametrize("tied", [False, True])
def test_rows_a_fine_tune_left_alone_are_stored_and_held_once(tmp_path, capsys, tied):
    """g froze a's embeddings (and head) and trained only its three new rows: the bundle stores those rows as a
    patch of a's, the runtime holds them alone (a ``RowPatched`` over a's module, the tied head too), and every
    branch still answers as its own model, alone and mixed; exports rebuild g's whole matrices."""
    from branchmerge.runtime.patched import RowPatched

    models = _family(tmp_path, tied=tied, frozen=True)
    cfg = write_config(tmp_path / "c.yaml", [{"name": n, "model": str(p)} for n, p in models.items()],
                       compress_rate=0.0)
    run_merge(load_config(cfg), tmp_path / "b", progress=False)
    b = branchmerge.load(tmp_path / "b", dtype="float32")
    recs = b.reader.manifest.tensors["main"]
    for key in (EMBED,) if tied else (EMBED, HEAD):
        assert recs[key].patches == {"g": "a"} and recs[key].same_as == {"c": "a"}
        assert recs[key].bytes == 64 * 32 * 4 + 3 * (32 * 4 + 8)  # a's matrix and g's three rows
    model = b.groups["main"].model
    for mod in (model.model.embed_tokens, model.lm_head):
        first, _, third = mod._copies
        assert mod._holder == [0, 0, 2] and isinstance(third, RowPatched) and third.of is first
        assert third.rows.tolist() == [64, 65, 66] and third.size == 67
    ids = {"a": [1, 5, 7, 9, 11], "c": [1, 8, 8, 3, 2], "g": [1, 64, 7, 66, 65]}
    mixed = b.logits(torch.tensor(list(ids.values())), list(ids))
    with torch.no_grad():
        for r, (name, row) in enumerate(ids.items()):
            want = _hf(models[name])(torch.tensor([row])).logits[0]
            torch.testing.assert_close(b.logits(torch.tensor([row]), [name])[0], want, atol=2e-5, rtol=0)
            torch.testing.assert_close(mixed[r, :, :want.shape[1]], want, atol=2e-5, rtol=0)
    prompts = [[1, 5, 7], [1, 64, 66], [1, 8, 3]]
    together = b.generate_ids(prompts, ["a", "g", "c"], max_new_tokens=6)
    assert [o.new_ids for o in together] == [b.generate_ids([p], [n], max_new_tokens=6)[0].new_ids
                                             for p, n in zip(prompts, "agc")]
    code, _, err = run_cli(capsys, "export-branch", tmp_path / "b", "g", "-o", tmp_path / "g-out")
    assert code == 0, err
    assert torch.equal(_hf(tmp_path / "g-out").get_input_embeddings().weight, _hf(models["g"]).get_input_embeddings().weight)


ROWS, VALUES = f"b.g|{EMBED}|rows", f"b.g|{EMBED}|values"


def _patched_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("patched")
    models = _family(root, tied=False, frozen=True)
    cfg = write_config(root / "c.yaml", [{"name": n, "model": str(p)} for n, p in models.items()], compress_rate=0.5)
    run_merge(load_config(cfg), root / "b", progress=False)
    return root / "b"


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> Path:
    return _patched_bundle(tmp_path_factory)


@pytest.mark.parametrize("edit,message", [
    (_set(ROWS, lambda r: r.flip(0).contiguous()), r"rows must be 3 sorted, unique row indices below 67, covering "
                                                       r"rows 64\.\.66"),
    (_set(ROWS, lambda r: torch.tensor([3, 64, 65])), r"rows must be 3 sorted.*covering rows 64\.\.66"),
    (_set(ROWS, lambda r: torch.tensor([64, 65, 67])), "rows must be 3 sorted"),
    (_set(ROWS, lambda r: r.to(torch.int32)), "stored as I32; int64 row indices are expected"),
    (_set(VALUES, lambda v: v[:, :16].contiguous()), r"values has shape \[3, 16\]; its manifest record implies "
                                                         r"\['k', 32\]"),
    (_set(VALUES, lambda v: v[:2].contiguous()), "rows must be 2 sorted"),
])
def test_a_patch_that_lies_is_refused(patched, tmp_path, edit, message):
    _refused(patched, tmp_path, _edit_shards, edit, message)


@pytest.mark.parametrize("edit,message", [
    (lambda m: _group(m)[EMBED].update(patches={"g": "c"}), r"`patches\.g`: only a per-branch matrix may patch "
                                                            r"another branch's, stored whole \(got 'c'\)"),
    (lambda m: _group(m)["model.norm.weight"].update(patches={"g": "a"}), r"`patches\.g`: only a per-branch matrix"),
    (lambda m: _group(m)[EMBED].update(patches={"g": "zz"}), "patches names branches outside the group"),
    (lambda m: _group(m)[EMBED].update(patches={"a": "g"}), r"'g''s \[67, 32\] cannot be patched into \[64, 32\]"),
    (lambda m: (_group(m)[EMBED].update(shapes={"g": [10**9, 32]}), _group(m)[HEAD].update(shapes={"g": [10**9, 32]}),
                m["branches"]["g"]["hf_config"].update(vocab_size=10**9)),  # (nothing that large is allocated)
     r"rows must be 3 sorted, unique row indices below 1000000000, covering rows 64\.\.999999999"),
])
def test_a_manifest_that_lies_about_patches_is_refused(patched, tmp_path, edit, message):
    _refused(patched, tmp_path, _edit_manifest, edit, message)


def test_each_row_ends_on_its_own_branchs_end_of_text(tmp_path):
    """g ends on its chat token <|r|> (65) alone (its own generation config, not its group's first branch's),
    a on </s> (2). Drawing </s>, only text to g, g's row goes on in a mixed batch as it does alone, and each
    row stops on its own end token."""
    models = _family(tmp_path, tied=False)
    g = AutoModelForCausalLM.from_pretrained(models["g"])
    g.generation_config.eos_token_id = 65
    g.generation_config.save_pretrained(models["g"])
    tok = AutoTokenizer.from_pretrained(models["g"])
    tok.eos_token = "<|r|>"
    tok.save_pretrained(models["g"])
    cfg = write_config(tmp_path / "c.yaml", [{"name": n, "model": str(p)} for n, p in models.items()],
                       compress_rate=0.0)
    run_merge(load_config(cfg), tmp_path / "b", progress=False)
    b = branchmerge.load(tmp_path / "b", dtype="float32")
    assert b.stop_ids("g") == {65} and 2 in b.stop_ids("a")
    prompts, names = [[1, 5, 7], [1, 64, 9], [1, 8, 3]], ["a", "g", "c"]
    rows = [RowSettings(), RowSettings(allowed_token_ids=(2,)), RowSettings(allowed_token_ids=(5, 2))]
    alone = [b.generate_ids([p], [n], max_new_tokens=6, row_sampler=RowSampler([r]))[0]
             for p, n, r in zip(prompts, names, rows)]
    assert alone[1].new_ids == [2] * 6 and alone[1].finish_reason == "length"  # </s> is text to g
    together = b.generate_ids(prompts, names, max_new_tokens=6, row_sampler=RowSampler(rows))
    assert [(o.new_ids, o.finish_reason) for o in together] == [(o.new_ids, o.finish_reason) for o in alone]
    assert together[2].finish_reason == "stop" or together[2].new_ids == [5] * 6


def test_each_branch_generates_with_its_own_generation_config(tmp_path):
    """a's generation config bans repeats (repetition_penalty, no_repeat_ngram_size), b's does not: each branch
    generates as its own model's ``generate`` does, alone, in one call with the other (rows of branches whose
    configs process logits differently run as separate batches), and by beam search; before, every branch of a
    group took its first branch's config."""
    base = make_tiny_llama(tmp_path / "base", seed=0)
    for n, seed in (("a", 1), ("b", 2)):
        make_finetune(base, tmp_path / n, seed=seed)
        save_char_tokenizer(tmp_path / n)
    gc = GenerationConfig.from_pretrained(tmp_path / "a")
    gc.repetition_penalty, gc.no_repeat_ngram_size = 5.0, 1
    gc.save_pretrained(tmp_path / "a")
    cfg = write_config(tmp_path / "c.yaml", [{"name": n, "model": str(tmp_path / n)} for n in "ab"], compress_rate=0.0)
    run_merge(load_config(cfg), tmp_path / "bundle", progress=False)
    b = branchmerge.load(tmp_path / "bundle", dtype="float32")
    p = [1, 5, 5, 5, 7]
    want = {}
    with torch.no_grad():
        for n in "ab":
            out = _hf(tmp_path / n).generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0)
            want[n] = out[0, len(p):].tolist()
    assert len(set(want["a"])) == 12 and len(set(want["b"])) < 12  # (a's config does change its answer)
    assert [b.generate_ids([p], [n], max_new_tokens=12)[0].new_ids for n in "ab"] == [want["a"], want["b"]]
    assert [o.new_ids for o in b.generate_ids([p, p], ["b", "a"], max_new_tokens=12)] == [want["b"], want["a"]]
    assert b.beam_search(p, "a", beams=1, max_new_tokens=12)[0].new_ids == want["a"]
