"""A new user's first hour, as tests: real architectures as standalone branches, defaults that fit,
dtype and device spellings, readable output."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel

import branchmerge
from branchmerge.config import load_config
from branchmerge.errors import BranchmergeError
from branchmerge.merge import run_merge
from tests.cli_util import run_cli
from tests.conftest import save_char_tokenizer, write_config


@pytest.fixture(scope="module")
def mixed(family, tmp_path_factory):
    """A bundle of the a/b group plus a tiny Gemma-3 and a tiny GPT-2 (learned positions) as standalone
    branches, with the reference models."""
    root = tmp_path_factory.mktemp("mixed")
    torch.manual_seed(0)
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=64, max_position_embeddings=128, sliding_window=16, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64,
                                      bos_token_id=1, eos_token_id=2)).eval()
    for name, m in (("gemma", gemma), ("gpt2", gpt2)):
        m.save_pretrained(root / name)
        save_char_tokenizer(root / name)
    cfg = write_config(root / "c.yaml", [
        {"name": "a", "model": str(family["a"][0])}, {"name": "b", "model": str(family["b"][0])},
        {"name": "gemma", "model": str(root / "gemma"), "standalone": True},
        {"name": "gpt2", "model": str(root / "gpt2"), "standalone": True}], compress_rate=0.5)
    run_merge(load_config(cfg), root / "bundle", progress=False)
    return {"path": root / "bundle", "gemma": gemma, "gpt2": gpt2}


@pytest.mark.parametrize("name", ["gemma", "gpt2"])
def test_other_architectures_as_standalone_branches(mixed, name):
    """Gemma-3 (whose embedding has a computed `embed_scale` buffer) and GPT-2 load, equal their originals,
    generate, and do not stop the other branches from loading."""
    b = branchmerge.load(mixed["path"], dtype="float32")
    x = torch.randint(3, 64, (2, 9))
    with b.use(name) as m, torch.no_grad():
        torch.testing.assert_close(m(x).logits, mixed[name](x).logits, atol=1e-5, rtol=0)
    ids = b.encode("abc", name)
    want = mixed[name].generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=2,
                                pad_token_id=0)[0, len(ids):]
    want = want.tolist()[:want.tolist().index(2)] if 2 in want.tolist() else want.tolist()  # up to eos
    assert b.generate_ids([ids], [name], max_new_tokens=5)[0].new_ids == want
    assert b.generate(["add 1+2=", "abc"], ["a", name], max_new_tokens=3)[1] == b.generate("abc", name,
                                                                                            max_new_tokens=3)[0]


def test_tensors_shared_by_some_branches_are_stored_once(capsys, family, tmp_path):
    """Two of three fine-tunes left the embeddings alone: one stored copy for those two, `inspect` says so,
    and every branch still reads its own values (export equals the original)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from branchmerge.export import export_branch

    c = tmp_path / "c"
    shutil.copytree(family["c"][0], c)
    sd = load_file(c / "model.safetensors")
    sd["model.embed_tokens.weight"] = load_file(family["b"][0] / "model.safetensors")["model.embed_tokens.weight"]
    save_file(sd, c / "model.safetensors", metadata={"format": "pt"})
    cfg = write_config(tmp_path / "m.yaml", [{"name": "a", "model": str(family["a"][0])},
                                             {"name": "b", "model": str(family["b"][0])},
                                             {"name": "c", "model": str(c)}], compress_rate=0.0)
    run_merge(load_config(cfg), tmp_path / "out", progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    rec = m["tensors"]["main"]["model.embed_tokens.weight"]
    assert rec["role"] == "per_branch" and rec["same_as"] == {"c": "b"} and rec["bytes"] == 2 * 64 * 32 * 4
    assert "b.c|model.embed_tokens.weight" not in m["weight_map"]
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "out", "--json")
    assert code == 0 and json.loads(out)["groups"]["main"]["deduplicated"] >= 1
    exp = AutoModelForCausalLM.from_pretrained(export_branch(tmp_path / "out", "c", tmp_path / "e", progress=False))
    assert torch.equal(exp.state_dict()["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    b = branchmerge.load(tmp_path / "out", dtype="float32")
    emb = b.groups["main"].model.get_input_embeddings()
    assert emb.copies[1].weight.data_ptr() == emb.copies[2].weight.data_ptr()  # held once in memory too
    x = torch.randint(3, 64, (1, 6))
    with b.use("c") as model, torch.no_grad():
        torch.testing.assert_close(model(x).logits, exp(x).logits, atol=1e-5, rtol=0)


def test_dtype_and_device_spellings(capsys, bundles):
    for spelled in (torch.bfloat16, "bf16", "BF16", "torch.bfloat16", "bfloat16"):
        assert branchmerge.load(bundles[0.9], dtype=spelled).dtype == torch.bfloat16
    assert branchmerge.load(bundles[0.9], dtype="auto").dtype == torch.float32  # the bundle's own
    with pytest.raises(BranchmergeError, match="'int8' is not a dtype; use float32"):
        branchmerge.load(bundles[0.9], dtype="int8")
    code, out, err = run_cli(capsys, "generate", bundles[0.9], "add 1+2=", "--branch", "a", "--dtype", "bf16", "-n", "3")
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", bundles[0.9], "x", "--branch", "a", "--dtype", "int4")
    assert code == 1 and "'int4' is not a dtype" in err and "Traceback" not in err
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "generate", bundles[0.9], "x", "--branch", "a", "--device", "cuda")
        assert code == 1 and "no CUDA device is available" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "generate", bundles[0.9], "x", "--branch", "a", "--device", "tpu9")
    assert code == 1 and "'tpu9'" in err


def test_default_max_new_tokens_fits_the_context(family, tmp_path, capsys):
    """A 64-token model (the demo's) with the default max_new_tokens: the default is cut to what the context
    leaves instead of failing; an explicit value that does not fit is still refused."""
    from tests.conftest import make_tiny_llama

    small = tmp_path / "small"
    make_tiny_llama(small, max_position_embeddings=64)
    save_char_tokenizer(small)
    run_merge(load_config(write_config(tmp_path / "c.yaml", [{"name": "s", "model": str(small)}])), tmp_path / "b",
              progress=False)
    b = branchmerge.load(tmp_path / "b")
    prompt = "abcdefghij" * 5  # 50 tokens: 14 left
    ids = b.encode(prompt, "s")
    assert b.fit_max_new_tokens([ids], ["s"]) == 64 - len(ids)
    assert b.generate([prompt], ["s"]) == b.generate([prompt], ["s"], max_new_tokens=64 - len(ids))
    assert b.fit_max_new_tokens([b.encode("ab", "s")], ["s"]) == 62  # "a", "b": the default 64 cut to 62
    with pytest.raises(BranchmergeError, match="exceeds the 64-token context"):
        b.generate([prompt], ["s"], max_new_tokens=20)
    code, out, err = run_cli(capsys, "generate", tmp_path / "b", prompt, "--branch", "s")
    assert code == 0, err


def test_dry_run_predicts_the_merge(capsys, family, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", [{"name": n, "model": str(family[n][0])} for n in "abc"],
                       compress_rate=0.5, dtype="bfloat16")
    from branchmerge.merge.plan import plan_merge

    plan = plan_merge(load_config(cfg))
    code, out, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "out", "--dry-run")
    assert code == 0 and not (tmp_path / "out").exists() and "bundle ≈" in out and "W̄ MB" in out
    run_merge(load_config(cfg), tmp_path / "out", progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    recs = m["tensors"]["main"]
    comp = sum(r["bytes"] for r in recs.values() if r["role"] == "compressed")
    g = plan["groups"]["main"]
    assert g["parts"]["mean"] + g["parts"]["factors"] + g["parts"]["dense_deltas"] == comp  # exact for compressed
    assert g["ranks"] == sorted({r["rank"] for r in recs.values() if r["role"] == "compressed"})
    assert m["total_bytes"] <= plan["bundle_bytes"]  # per-branch parts are an upper bound (dedupe)
    assert plan["input_bytes_at_dtype"] * 2 == sum(b["source_params"] for b in m["branches"].values()) * 4


def test_inspect_never_cuts_numbers_when_piped(capsys, bundles):
    code, out, _ = run_cli(capsys, "inspect", bundles[0.9])
    s = json.loads(run_cli(capsys, "inspect", bundles[0.9], "--json")[1])
    assert code == 0 and "…" not in out
    assert f"{s['bundle_bytes'] / 1e6:.2f}" in out and f"{s['input_bytes_at_dtype'] / 1e6:.2f}" in out


def test_bundle_routes_from_any_working_folder(capsys, bundles, family, tmp_path, monkeypatch):
    """A router built with an external embedder named by a relative path (as the demo does) still loads,
    and a named branch needs no router at all, when the bundle is used from another folder."""
    from branchmerge.front import build_bundle_router
    from branchmerge.router import RouterConfig

    work = tmp_path / "work"
    shutil.copytree(family["base"][0], work / "emb")
    shutil.copytree(bundles[0.9], work / "bundle")
    monkeypatch.chdir(work)
    cfg = RouterConfig(samples={"a": ["add 1+2="], "b": ["rev abc="], "c": ["key zz="]}, embedder="emb",
                       template="{input} field of", phrase="field of")
    build_bundle_router(branchmerge.load("bundle"), cfg)
    stored = (work / "bundle" / "router" / "router.yaml").read_text()
    assert str(work / "emb") in stored
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    b = branchmerge.load(work / "bundle")
    assert b.router.route(["rev hello="]) == ["b"]
    shutil.move(work / "emb", tmp_path / "moved")  # the embedder is gone: a named branch still runs
    code, out, err = run_cli(capsys, "generate", work / "bundle", "add 1+2=", "--branch", "a", "-n", "3")
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", work / "bundle", "add 1+2=", "--branch", "auto", "-n", "3")
    assert code == 1 and "embedder" in err


def test_cli_output_is_quiet_and_plain(capsys, bundles):
    """No transformers loading bars on a command; --help lists flags without a `<bool>` metavar."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    code, out, err = run_cli(capsys, "generate", bundles[0.9], "add 1+2=", "--branch", "a", "-n", "2")
    assert code == 0 and "Loading weights" not in err and "\x1b[" not in err
    assert not hf_logging.is_progress_bar_enabled()  # a command turns transformers' bars off
    code, out, _ = run_cli(capsys, "merge", "--help")
    assert code == 0 and "--dry-run" in out and "<bool>" not in out


def test_cli_samples_as_the_server_does(capsys, bundles):
    """`generate -t T --seed S` gives the text the server gives a request with that seed (one sampler for
    both); another seed gives another text; a tiny `--top-p` keeps only the likeliest token (greedy)."""
    from transformers import LogitsProcessorList

    from branchmerge.runtime.sampling import RowSampler, RowSettings

    b = branchmerge.load(bundles[0.9])
    ids = b.encode("rev abcdef=", "b")

    def cli(*extra):
        code, out, err = run_cli(capsys, "generate", bundles[0.9], "rev abcdef=", "--branch", "b", "-n", "12", *extra)
        assert code == 0, err
        return out.rstrip("\n")

    served = b.generate_ids([ids], ["b"], max_new_tokens=12,
                            logits_processor=LogitsProcessorList([RowSampler([RowSettings(1.5, seed=4)])]))[0].text
    assert cli("-t", "1.5", "--seed", "4") == served == cli("-t", "1.5", "--seed", "4")
    assert len({cli("-t", "1.5", "--seed", str(s)) for s in range(5, 9)} | {served}) > 1
    assert cli("-t", "2", "--top-p", "1e-6", "--seed", "1") == b.generate("rev abcdef=", "b", max_new_tokens=12)[0]
    assert cli("-t", "2", "--top-k", "1") == cli("-t", "2", "--min-p", "1") == cli()  # only the likeliest token left
    with b.use("b") as m, torch.no_grad():  # transformers' own repetition penalty on the same prompt
        out = m.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, repetition_penalty=1.5,
                         eos_token_id=sorted(b.stop_ids("b")), pad_token_id=0, temperature=None, top_p=None, top_k=None)
    assert cli("--repetition-penalty", "1.5") == b.tokenizer("b").decode(out[0, len(ids):], skip_special_tokens=True)
    assert cli("--repetition-penalty", "1.5") != cli()
    code, _, err = run_cli(capsys, "generate", bundles[0.9], "x", "--branch", "b", "--top-p", "1.5")
    assert code == 2 and "not in (0, 1]" in err
