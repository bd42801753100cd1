"""PEFT LoRA adapters as merge inputs: each adapter, read over its base, is the model PEFT's
``merge_and_unload`` makes (LoRA, rsLoRA, rank/alpha patterns, embeddings, DoRA, lora_bias, modules_to_save,
GPT-2's Conv1D), it becomes a branch like a full fine-tune, and bad adapters are refused by name."""

from __future__ import annotations

import copy
import json
import shutil
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from branchmerge.config import parse_config
from branchmerge.errors import ModelInputError
from branchmerge.io.adapters import LoraSource, open_model
from branchmerge.io.bundle import BundleReader
from branchmerge.merge import run_merge
from tests.cli_util import run_cli
from tests.conftest import make_tiny_llama, write_config

CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "rich": dict(r=4, lora_alpha=16, use_rslora=True, rank_pattern={"o_proj": 2},
                 alpha_pattern={"layers.1.self_attn.q_proj": 3}, target_modules=["q_proj", "o_proj", "embed_tokens"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "down_proj"]),
}


def make_adapter(base, folder, seed: int, **lora_kw):
    """A real PEFT adapter over ``base`` whose factors are random (B starts at zero in PEFT), saved in
    ``folder``; returns PEFT's merged model."""
    torch.manual_seed(seed)  # (PEFT draws A from the global generator)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(folder)
    return model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapters(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = family["base"][1]
    return {name: (root / name, make_adapter(base, root / name, i, **kw)) for i, (name, kw) in enumerate(CASES.items())}


def _same_as_peft(src: LoraSource, merged) -> float:
    sd = merged.state_dict()
    assert set(src.names()) <= set(sd)
    return max(float((src.get(k).float() - sd[k].float()).abs().max()) for k in src.names())


@pytest.mark.parametrize("case", list(CASES))
def test_an_adapter_reads_as_peft_merges_it(family, adapters, case):
    folder, merged = adapters[case]
    src = open_model(case, str(folder), base=str(family["base"][0]))
    assert isinstance(src, LoraSource) and src.changes
    assert _same_as_peft(src, merged) < 1e-6
    moved = max(float((merged.state_dict()[k] - family["base"][1].state_dict()[k]).abs().max()) for k in src.names())
    assert moved > 0.01  # (the adapter changes the model: the comparison above could fail)


def test_lora_bias_and_gpt2_conv1d(tmp_path):
    """``lora_bias`` adds B's scaled bias to the base's; GPT-2's Conv1D weights are stored [in, out]."""
    llama = make_tiny_llama(tmp_path / "llama", seed=3, attention_bias=True)
    merged = make_adapter(llama, tmp_path / "bias", 1, r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True)
    src = open_model("bias", str(tmp_path / "bias"), base=str(tmp_path / "llama"))
    assert "model.layers.0.self_attn.q_proj.bias" in src.changes
    assert _same_as_peft(src, merged) < 1e-6
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64)).eval()
    gpt2.save_pretrained(tmp_path / "gpt2")
    merged = make_adapter(gpt2, tmp_path / "g", 2, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                          fan_in_fan_out=True)
    src = open_model("g", str(tmp_path / "g"), base=str(tmp_path / "gpt2"))
    assert _same_as_peft(src, merged) < 1e-6


def test_adapters_become_branches_at_r0_and_generate(capsys, family, adapters, tmp_path):
    """A base and three adapters (given with `base:`, mergekit's `BASE+ADAPTER` and the config's
    `base_model`) merge at r=0 into branches whose logits are PEFT's merged models'."""
    base = str(family["base"][0])
    cfg = write_config(tmp_path / "m.yaml", [
        {"name": "base", "model": base},
        {"name": "plain", "model": str(adapters["plain"][0]), "base": base},
        {"name": "rich", "model": f"{base}+{adapters['rich'][0]}"},
        {"name": "dora", "model": str(adapters["dora"][0])},
    ], compress_rate=0.0, base_model=base)
    code, _, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "b", "--no-progress")
    assert code == 0, err
    import branchmerge

    bundle = branchmerge.load(tmp_path / "b", dtype="float32")
    x = torch.randint(3, 64, (2, 10))
    want = {"base": family["base"][1], **{n: m for n, (_, m) in adapters.items()}}
    for name, model in want.items():
        with bundle.use(name) as m, torch.no_grad():
            torch.testing.assert_close(m(x).logits, model(x).logits, atol=1e-4, rtol=0, msg=name)
    assert len(bundle.generate(["abc"], branch="rich", max_new_tokens=4)) == 1
    assert (tmp_path / "b" / "branches" / "rich" / "tokenizer.json").is_file()  # the base's tokenizer
    import yaml

    front = yaml.safe_load((tmp_path / "b" / "README.md").read_text().split("---")[1])
    assert front["base_model"][0] == base and str(adapters["rich"][0]) in front["base_model"]  # the card's


def test_a_baseline_method_takes_adapters(family, adapters, tmp_path):
    base = str(family["base"][0])
    cfg = parse_config({"method": "linear", "dtype": "float32", "base_model": base,
                        "branches": [{"name": n, "model": str(adapters[n][0])} for n in ("plain", "dora")]})
    run_merge(cfg, tmp_path / "lin", progress=False)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "lin").state_dict()
    a, b = adapters["plain"][1].state_dict(), adapters["dora"][1].state_dict()
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        assert torch.allclose(got[k], (a[k] + b[k]) / 2, atol=1e-6), k


# --- bad adapters: a clear error naming the culprit, and no output -------------------------------------------


def _adapter_copy(adapters, tmp_path, case="plain"):
    return shutil.copytree(adapters[case][0], tmp_path / f"ad-{case}")


def _edit_config(folder, **changes):
    p = folder / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def _merge_fails(capsys, tmp_path, branches, *needles, **kw):
    cfg = write_config(tmp_path / "bad.yaml", branches, **kw)
    code, _, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "out", "--no-progress")
    assert code != 0
    for n in needles:
        assert n in err, (n, err)
    assert not (tmp_path / "out").exists()
    return err


def test_a_base_path_written_in_the_adapter_is_not_followed(capsys, family, adapters, tmp_path):
    ad = _adapter_copy(adapters, tmp_path)
    _edit_config(ad, base_model_name_or_path=str(family["base"][0]))  # an absolute path: refused
    _merge_fails(capsys, tmp_path, [{"name": "p", "model": str(ad)}], "'p'", "is not followed", "base:")
    _edit_config(ad, base_model_name_or_path=None)
    _merge_fails(capsys, tmp_path, [{"name": "p", "model": str(ad)}], "names no base_model_name_or_path")


def test_base_for_a_model_that_is_no_adapter(capsys, family, tmp_path):
    _merge_fails(capsys, tmp_path, [{"name": "a", "model": str(family["a"][0]), "base": str(family["base"][0])}],
                 "'a'", "not a PEFT adapter folder")


@pytest.mark.parametrize(("changes", "needle"), [
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"r": 0}, "r: "),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ({"lora_alpha": "big"}, "lora_alpha"),
    ({"alpha_pattern": {"(q_proj": 2}}, "not a valid regular expression"),
])
def test_bad_adapter_configs(capsys, family, adapters, tmp_path, changes, needle):
    ad = _adapter_copy(adapters, tmp_path)
    _edit_config(ad, **changes)
    _merge_fails(capsys, tmp_path, [{"name": "p", "model": str(ad), "base": str(family["base"][0])}], needle)


def test_patterns_that_never_end_are_stopped(capsys, family, adapters, tmp_path):
    """An alpha_pattern key is a regular expression from the file: one that backtracks without end, or many
    slow ones, stop the merge at open (2 s for all of an adapter's matching), naming the pattern."""
    ad = _adapter_copy(adapters, tmp_path)
    _edit_config(ad, alpha_pattern={"(.|..|...)*(?<=x)": 2})  # exponential backtracking on every module name
    t = time.monotonic()
    with pytest.raises(ModelInputError, match=r"took over 2 s \(at '\(\.\|"):
        open_model("p", str(ad), base=str(family["base"][0]))
    assert time.monotonic() - t < 10


def test_bad_adapter_weights(capsys, family, adapters, tmp_path):
    base = str(family["base"][0])
    ad = _adapter_copy(adapters, tmp_path)
    f = ad / "adapter_model.safetensors"
    sd = load_file(f)
    key_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

    def write(tensors):
        save_file(tensors, f)

    write({k: v for k, v in sd.items() if k != key_b})
    _merge_fails(capsys, tmp_path, [{"name": "p", "model": str(ad), "base": base}], "only one of its two")
    write({**sd, key_b: torch.full_like(sd[key_b], float("nan"))})
    _merge_fails(capsys, tmp_path, [{"name": "p", "model": str(ad), "base": base}], key_b, "NaN")
    write({**sd, "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": sd[key_b.replace("B", "A")].clone(),
           "base_model.model.model.layers.9.mlp.up_proj.lora_B.weight": sd[key_b].clone()})
    _merge_fails(capsys, tmp_path, [{"name": "p", "model": str(ad), "base": base}],
                 "model.layers.9.mlp.up_proj.weight", "does not have")
    write({**sd, key_b: torch.zeros(7, 4)})
    _merge_fails(capsys, tmp_path, [{"name": "p", "model": str(ad), "base": base}], "make a [7, ", "[32, 32]")
    write({**sd, "base_model.model.model.norm.weight": torch.ones(5)})
    _merge_fails(capsys, tmp_path, [{"name": "p", "model": str(ad), "base": base}], "norm.weight is [5]")
    f.write_bytes(b"not safetensors")
    _merge_fails(capsys, tmp_path, [{"name": "p", "model": str(ad), "base": base}], "not a readable safetensors")
    f.unlink()
    (ad / "adapter_model.bin").write_bytes(b"pickle")
    _merge_fails(capsys, tmp_path, [{"name": "p", "model": str(ad), "base": base}], "adapter_model.bin", "pickled")


def test_plus_form_and_folders_with_a_plus_in_their_name(capsys, family, adapters, tmp_path, monkeypatch):
    """`BASE+ADAPTER` is read as two paths only when the whole is not a path that exists: a model folder
    named with a '+' merges as it is; a half-given form is a missing path, named."""
    cfg = parse_config({"branches": [{"name": "p", "model": "base/dir+ad/dir"}]})
    assert cfg.branches[0].model_and_base() == ("ad/dir", "base/dir") and set(cfg.inputs()) == {"ad/dir", "base/dir"}
    plus = shutil.copytree(family["a"][0], tmp_path / "c++model")
    (tmp_path / "bad").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "m.yaml", [{"name": "a", "model": "c++model"}, {"name": "b", "model": "./c++model"},
                                             {"name": "c", "model": f"{family['base'][0]}+{adapters['plain'][0]}"}],
                       compress_rate=0.0)
    code, _, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "out", "--no-progress")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["branches"]["a"]["source"] == str(plus) and manifest["branches"]["c"]["source"] == str(
        adapters["plain"][0])
    for model in ("+x", "x+"):
        _merge_fails(capsys, tmp_path / "bad", [{"name": "p", "model": model}], model, "does not exist")


def test_select_measures_adapter_candidates(capsys, family, adapters, tmp_path):
    """`select` takes LoRA adapters as fine-tune candidates of their base: measured through lm_eval as the
    model PEFT's merge makes (`pretrained=BASE,peft=ADAPTER`), written into merge.yaml with their base, and that
    merge.yaml merges; an adapter without its base candidate is reported by name, the others go on."""
    import yaml

    from branchmerge.selection.config import load_select_config
    from branchmerge.selection.run import Selection, evaluate

    items = [{"question": f"add {i}+1=", "choices": [str(i + 1), str(i + 2)], "answer": 0} for i in range(8)]
    (tmp_path / "adds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    cands = [{"name": "base", "model": str(family["base"][0]), "role": "base"},
             {"name": "plain", "model": str(adapters["plain"][0]), "role": "finetune", "base": "base"},
             {"name": "dora", "model": str(adapters["dora"][0]), "role": "finetune", "base": "base"},
             {"name": "stray", "model": str(adapters["rich"][0])}]
    data = {"candidates": cands, "tasks": [{"name": "adds", "path": str(tmp_path / "adds.jsonl")}],
            "budget_gb": 1, "limit": 6, "dev_items": 2, "dtype": "float32", "compress_rates": [0.0]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    code, out, err = run_cli(capsys, "select", tmp_path / "s.yaml", "-o", tmp_path / "sel", "--no-progress")
    assert code == 0, err
    res = json.loads((tmp_path / "sel" / "select.json").read_text())
    assert "stray" in res["errors"] and "role: finetune" in res["errors"]["stray"]
    sel = Selection(load_select_config(tmp_path / "s.yaml"), tmp_path / "ref")
    for name in ("plain",):  # the same score as PEFT's merged model saved as a plain folder
        adapters[name][1].save_pretrained(tmp_path / f"merged-{name}")
        shutil.copy(family["base"][0] / "tokenizer.json", tmp_path / f"merged-{name}")
        for f in ("tokenizer_config.json", "special_tokens_map.json"):
            if (family["base"][0] / f).is_file():
                shutil.copy(family["base"][0] / f, tmp_path / f"merged-{name}")
        want = evaluate({"pretrained": str(tmp_path / f"merged-{name}")}, ["adds"], sel.task_manager, 6)
        assert res["candidates"][name]["accuracy"] == want, name
        assert res["candidates"][name]["params"] == res["candidates"]["base"]["params"]
    merge = yaml.safe_load((tmp_path / "sel" / "merge.yaml").read_text())
    chosen = [b for b in merge["branches"] if b["name"] in ("plain", "dora")]
    assert chosen and all(b["base"] == str(family["base"][0]) for b in chosen), merge  # (plain: 4/6 vs 3/6)
    run_merge(parse_config(merge), tmp_path / "bundle", progress=False)
    assert (tmp_path / "bundle" / "branches" / chosen[0]["name"]).is_dir()
    stored = sum(r.bytes for g in BundleReader(tmp_path / "bundle").manifest.tensors.values() for r in g.values())
    assert stored <= res["choice"]["bytes"] and stored > 0.9 * res["choice"]["bytes"]  # (predicted from headers)


def test_adapters_of_one_base_are_kept_exactly_at_any_rate(capsys, family, adapters, tmp_path):
    """`lora: exact` (the default): adapters of one base keep their own factors over it, so even r=0.99 gives
    PEFT's models exactly, in about the bytes of base + adapters; DoRA's tensors are compressed at the rate;
    `lora: merged` compresses the merged models instead (lossy at r=0.99); a budget asks for `lora: merged`."""
    import branchmerge

    base = str(family["base"][0])
    names = ("plain", "rich", "dora")
    branches = [{"name": "base", "model": base}] + [{"name": n, "model": str(adapters[n][0])} for n in names]
    x = torch.randint(3, 64, (2, 10))
    want = {"base": family["base"][1], **{n: adapters[n][1] for n in names}}

    def merged(mode):
        out = tmp_path / f"b-{mode}"
        run_merge(parse_config({"branches": branches, "base_model": base, "compress_rate": 0.99, "dtype": "float32",
                                "lora": mode}), out, progress=False)
        b = branchmerge.load(out, dtype="float32")
        with torch.no_grad():
            diffs = {}
            for n in want:
                with b.use(n) as m:
                    diffs[n] = float((m(x).logits - want[n](x).logits).abs().max())
        return BundleReader(out).manifest, diffs

    manifest, diffs = merged("exact")
    assert diffs["base"] < 1e-4 and diffs["plain"] < 1e-4 and diffs["rich"] < 1e-4, diffs
    assert manifest.groups["main"].lora_base == base  # (`inspect` says so)
    code, out, err = run_cli(capsys, "inspect", tmp_path / "b-exact")
    assert code == 0 and "main (exact LoRA)" in out, out + err
    recs = manifest.tensors["main"]
    q0 = recs["model.layers.0.self_attn.q_proj.weight"]
    assert q0.rank == 4 and max(q0.rel_error.values()) < 1e-6  # plain and rich: rank 4; dora and base: zeros
    assert recs["model.layers.0.self_attn.o_proj.weight"].rank == 2  # rich's rank_pattern
    k0 = recs["model.layers.0.self_attn.k_proj.weight"]  # dora's: compressed at r=0.99 (rank 0 of 32)
    assert k0.rank == 0 and k0.rel_error["dora"] > 1e-3
    merged_manifest, merged_diffs = merged("merged")
    assert merged_manifest.groups["main"].lora_base is None
    assert min(merged_diffs[n] for n in ("plain", "rich")) > 1e-3, merged_diffs
    with pytest.raises(Exception, match="lora: merged"):
        run_merge(parse_config({"branches": branches, "base_model": base, "budget": {"branch_bytes": 0.5},
                                "dtype": "float32"}),
                  tmp_path / "budget", progress=False)
    assert not (tmp_path / "budget").exists()


def test_adapters_round_trip_through_the_vllm_export(family, adapters, tmp_path):
    """PEFT adapters → an exact-LoRA bundle → `export-vllm` → PEFT adapters over the exported base that make
    the original adapters' models again (the scales are all 1, so nothing is refactored)."""
    from peft import PeftModel

    from branchmerge.export_vllm import export_vllm

    base = str(family["base"][0])
    run_merge(parse_config({"branches": [{"name": n, "model": str(adapters[n][0])} for n in ("plain", "rich")],
                            "base_model": base, "compress_rate": 0.95, "dtype": "float32"}), tmp_path / "b",
              progress=False)
    report = export_vllm(tmp_path / "b", tmp_path / "v", per_branch="lora", dtype="float32", progress=False)
    x = torch.randint(3, 64, (2, 10))
    for n in ("plain", "rich"):
        assert report["groups"]["main"]["branches"][n]["max_rel_error_lora_tensors"] < 1e-5
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "v" / "base"),
                                          tmp_path / "v" / "adapters" / n).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, adapters[n][1](x).logits, atol=1e-3, rtol=0, msg=n)


def test_gpt2_adapters_are_kept_exactly_in_a_transposed_group(tmp_path):
    """GPT-2's Conv1D weights are stored [in, out] (a transposed group): adapters (fan_in_fan_out) kept as
    exact factors give PEFT's models, the base too, in one mixed batch."""
    import branchmerge

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64)).eval()
    gpt2.save_pretrained(tmp_path / "gpt2")
    want = {"base": gpt2}
    for i, (name, targets) in enumerate((("x", ["c_attn", "c_fc"]), ("y", ["c_attn", "c_proj"]))):
        want[name] = make_adapter(gpt2, tmp_path / name, i, r=4 + 2 * i, lora_alpha=8, target_modules=targets,
                                  fan_in_fan_out=True)
    run_merge(parse_config({"branches": [{"name": "base", "model": str(tmp_path / "gpt2")}] + [
        {"name": n, "model": str(tmp_path / n), "base": str(tmp_path / "gpt2")} for n in ("x", "y")],
        "compress_rate": 0.95, "dtype": "float32"}), tmp_path / "b", progress=False)
    bundle = branchmerge.load(tmp_path / "b", dtype="float32")
    rec = BundleReader(tmp_path / "b").manifest.tensors["main"]["transformer.h.0.attn.c_attn.weight"]
    assert rec.rank == 6  # (y's rank; x's factors zero-padded to it)
    x = torch.randint(0, 64, (3, 9))
    with torch.no_grad():
        mixed = bundle.logits(x, ["base", "x", "y"])
        for i, name in enumerate(("base", "x", "y")):
            torch.testing.assert_close(mixed[i], want[name](x[i:i + 1]).logits[0], atol=1e-4, rtol=0, msg=name)


def test_dry_run_plans_adapter_ranks_and_the_lora_flag(capsys, family, adapters, tmp_path):
    from branchmerge.merge.plan import plan_merge

    base = str(family["base"][0])
    data = {"branches": [{"name": n, "model": str(adapters[n][0])} for n in ("plain", "rich")], "base_model": base,
            "compress_rate": 0.5, "dtype": "float32"}
    assert plan_merge(parse_config(data))["groups"]["main"]["ranks"] == [2, 4]  # the adapters' own (from headers)
    assert plan_merge(parse_config({**data, "lora": "merged"}))["groups"]["main"]["ranks"] == [8, 16]  # the rate's
    cfg = write_config(tmp_path / "m.yaml", data["branches"], base_model=base)
    code, _, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "out", "--lora", "nope")
    assert code != 0 and "lora" in err and "'exact'" in err and not (tmp_path / "out").exists()
    code, out, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "out", "--lora", "merged", "--no-progress")
    assert code == 0, err
    assert BundleReader(tmp_path / "out").manifest.tensors["main"]["model.layers.0.self_attn.q_proj.weight"].rank == 2


def test_serve_adapters_as_vllm_does(capsys, family, adapters, tmp_path):
    """vLLM's `serve BASE --lora-modules NAME=PATH`: the base and its adapters become one exact bundle, served
    under the adapters' names (and the base's); an answer is PEFT's model's own greedy answer."""
    import openai

    import branchmerge
    from branchmerge.merge import merge_adapters
    from branchmerge.server import create_app
    from tests.serving import serving

    base = str(family["base"][0])
    merge_adapters(base, {"plain": str(adapters["plain"][0]), "rich": str(adapters["rich"][0])}, tmp_path / "b",
                   base_name="tiny", progress=False)
    bundle = branchmerge.load(tmp_path / "b", dtype="float32")
    prompt = [1, 5, 9, 14, 3, 22]
    with torch.no_grad():
        want = adapters["rich"][1].generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                            pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    with serving(create_app(bundle)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
        assert {"tiny", "plain", "rich"} <= {m.id for m in client.models.list().data}
        got = client.completions.create(model="rich", prompt=prompt, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert got.choices[0].text == bundle.tokenizer("rich").decode(want)
    # the command itself, as a process: it answers under the adapters' names, and SIGTERM removes its bundle
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from tests.serving import free_port, wait_listening

    port, tmp = free_port(), tmp_path / "tmp"
    tmp.mkdir()
    make_adapter(family["base"][1], tmp_path / "loras" / "qv", 7, r=2, lora_alpha=4, target_modules=["q_proj"])
    proc = subprocess.Popen([sys.executable, "-m", "branchmerge.cli.main", "serve", base, "--port", str(port),
                             "--lora-modules", f"plain={adapters['plain'][0]}", "--served-model-name", "tiny",
                             "--served-model-name", "tiny-too", "--lora-dir", str(tmp_path / "loras")],
                            env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        ids = [m["id"] for m in wait_listening(proc, f"http://127.0.0.1:{port}/v1/models").json()["data"]]
        assert {"tiny", "plain"} <= set(ids) and [p.name for p in tmp.iterdir() if p.name.startswith("branchmerge-base-")]
        # --lora-dir: vLLM's runtime loading, over the base (named by --served-model-name)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/load_lora_adapter", json={"lora_name": "qv", "lora_path": "qv"},
                       timeout=60)
        assert r.status_code == 200, r.text
        models = {m["id"]: m for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]}
        assert models["qv"]["parent"] == "tiny" and "parent" not in models["plain"]
        assert models["tiny-too"]["root"] == "tiny"  # (a second bare name: another name of the base)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode != 0 and not list(tmp.iterdir())  # (stopped, and its temporary bundle is gone)
    # a bad --lora-modules value is refused by name before anything is merged
    for bad in ("nope", "=x", "a="):
        code, _, err = run_cli(capsys, "serve", base, "--lora-modules", bad)
        assert code == 2 and "--lora-modules" in err, (bad, err)


def test_mixed_groups_say_so_and_exact_factors_quantize(family, adapters, tmp_path, caplog):
    """Adapters beside a full fine-tune are compressed as merged models, with a warning naming the group and
    what keeps them exact; exact adapter factors can be stored at 8 bits (close, not exact)."""
    import logging

    import branchmerge

    base = str(family["base"][0])
    with caplog.at_level(logging.WARNING, logger="branchmerge"):
        run_merge(parse_config({"branches": [{"name": "a", "model": str(family["a"][0])},
                                             {"name": "plain", "model": str(adapters["plain"][0]), "base": base}],
                                "compress_rate": 0.5, "dtype": "float32"}), tmp_path / "mixed", progress=False)
    assert "group 'main' holds LoRA adapters with a full fine-tune" in caplog.text
    scales = BundleReader(tmp_path / "mixed").get("g.main|model.layers.0.self_attn.q_proj.weight|scales")
    assert not torch.allclose(scales, torch.ones(2))  # (the method's norms, not exact mode's ones)
    run_merge(parse_config({"branches": [{"name": n, "model": str(adapters[n][0])} for n in ("plain", "rich")],
                            "base_model": base, "factor_bits": 8, "dtype": "float32"}), tmp_path / "q8", progress=False)
    rec = BundleReader(tmp_path / "q8").manifest.tensors["main"]["model.layers.0.self_attn.q_proj.weight"]
    assert rec.bits == [(8, 4)] and 0 < max(rec.rel_error.values()) < 0.01
    bundle = branchmerge.load(tmp_path / "q8", dtype="float32")
    x = torch.randint(3, 64, (2, 10))
    with bundle.use("rich") as m, torch.no_grad():
        torch.testing.assert_close(m(x).logits, adapters["rich"][1](x).logits, atol=0.05, rtol=0)


def test_the_chooser_predicts_exact_adapter_groups():
    """`select`'s arithmetic for a group of adapters and their base: weights no adapter changes once, the
    others with every branch's factors at the largest rank (the rate's where one changes it otherwise); a
    group with a full fine-tune is predicted as the method compresses it."""
    from branchmerge.compress import rank_for
    from branchmerge.selection.choose import Profile, bundle_bytes

    shapes = ((64, 32), (32, 32), (48, 32))
    base = Profile("base", "g", {}, shapes, 100, lora_ranks=(0, 0, 0))
    a = Profile("a", "g", {}, shapes, 100, lora_ranks=(4, 0, 0))
    b = Profile("b", "g", {}, shapes, 100, lora_ranks=(8, 0, -1))
    dora_rank = rank_for((48, 32), 0.5)
    want = ((64 * 32 + 3 * 8 * (64 + 32)) + 32 * 32 + (48 * 32 + 3 * dora_rank * (48 + 32))) * 2 + 3 * 4 * 2 + 300 * 2
    assert bundle_bytes([base, a, b], 0.5, 2) == want
    assert bundle_bytes([a], 0.5, 2) == (sum(m * n for m, n in shapes) + 100) * 2  # one alone: its dense model
    from branchmerge.compress import stored_bytes

    full = Profile("full", "g", {}, shapes, 100)  # (the rate's ranks for every weight)
    assert bundle_bytes([a, full], 0.9, 2) == sum(sum(stored_bytes(s, rank_for(s, 0.9), 2, 2)) for s in shapes) + 400


def test_the_chooser_predicts_an_exact_merge_from_headers(family, adapters, tmp_path):
    from branchmerge.selection.choose import Profile, bundle_bytes
    from branchmerge.selection.config import CandidateSpec
    from branchmerge.selection.run import shape_profile

    base = str(family["base"][0])
    profiles = []
    for name, model, b in (("base", base, None), ("plain", str(adapters["plain"][0]), base),
                           ("rich", str(adapters["rich"][0]), base)):
        spec = CandidateSpec(name=name, model=model, role="base" if b is None else "finetune",
                             base=None if b is None else "base")
        comp, other, _, lora = shape_profile(spec, b)
        profiles.append(Profile(name, "base", {}, comp, other, tuple(lora)))
    assert max(profiles[1].lora_ranks) == 4 and 2 in profiles[2].lora_ranks and not any(profiles[0].lora_ranks)
    run_merge(parse_config({"branches": [{"name": "base", "model": base}] + [
        {"name": n, "model": str(adapters[n][0]), "base": base} for n in ("plain", "rich")],
        "compress_rate": 0.95, "dtype": "float32"}), tmp_path / "b", progress=False)
    stored = sum(r.bytes for g in BundleReader(tmp_path / "b").manifest.tensors.values() for r in g.values())
    predicted = bundle_bytes(profiles, 0.95, 4)
    assert 0.8 * predicted < stored <= predicted, (stored, predicted)  # (an upper bound: equal tensors stored once)


def test_an_adapter_that_resizes_the_vocabulary(capsys, family, tmp_path):
    """An adapter trained after ``resize_token_embeddings`` (its embeddings and head stored at 72 rows over a
    64-token base) is read as PEFT merges it and joins its base's group, kept exactly (`serve --lora-modules`)
    or compressed; a resize that leaves the head behind, or one loaded into a running bundle, is refused by name."""
    import branchmerge
    from branchmerge.merge import merge_adapters

    base = family["base"]
    grown = copy.deepcopy(base[1])
    grown.resize_token_embeddings(72, mean_resizing=False)
    want = make_adapter(grown, tmp_path / "big", 4, r=4, lora_alpha=8, target_modules=["q_proj"],
                        modules_to_save=["embed_tokens", "lm_head"])
    make_adapter(base[1], tmp_path / "small", 5, r=2, lora_alpha=4, target_modules=["v_proj"])
    src = open_model("big", str(tmp_path / "big"), base=str(base[0]))
    assert src.hf_config["vocab_size"] == 72 and src.shape("lm_head.weight") == (72, 32)
    assert _same_as_peft(src, want) < 1e-6
    merge_adapters(base[0], {"small": tmp_path / "small", "big": tmp_path / "big"}, tmp_path / "b", base_name="tiny",
                   progress=False)
    bundle = branchmerge.load(tmp_path / "b", dtype="float32")
    assert bundle.reader.branch("big").group == bundle.reader.branch("small").group == "main"
    assert bundle.reader.manifest.groups["main"].lora_base is not None  # kept exactly, embeddings per branch
    x = torch.tensor([[1, 70, 9, 71, 3]])  # (ids past the base's vocabulary: the new tokens)
    with bundle.use("big") as m, torch.no_grad():
        torch.testing.assert_close(m(x).logits, want(x).logits, atol=1e-5, rtol=0)
    outs = bundle.generate_ids([[1, 70, 9], [1, 5, 9]], ["big", "tiny"], max_new_tokens=[4, 4])
    with torch.no_grad():
        greedy = want.generate(torch.tensor([[1, 70, 9]]), max_new_tokens=4, do_sample=False, pad_token_id=0,
                               eos_token_id=None)[0, 3:].tolist()
    assert outs[0].new_ids == greedy and len(outs[1].new_ids) == 4
    with pytest.raises(ModelInputError, match="resizes the vocabulary"):
        bundle.load_lora("big2", tmp_path / "big", base="tiny")
    cfg = write_config(tmp_path / "one.yaml", [{"name": "tiny", "model": str(base[0])},
                                               {"name": "big", "model": str(tmp_path / "big"), "base": str(base[0])}],
                       compress_rate=0.0)
    code, _, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "one", "--no-progress")
    assert code == 0, err
    one = branchmerge.load(tmp_path / "one", dtype="float32")
    assert len(one.reader.manifest.groups) == 1
    torch.testing.assert_close(one.logits(x, ["big"]), want(x).logits, atol=1e-5, rtol=0)
    half = tmp_path / "half"  # the head left at 64 rows while the embeddings grew
    shutil.copytree(tmp_path / "big", half)
    sd = load_file(half / "adapter_model.safetensors")
    sd = {k: v for k, v in sd.items() if "lm_head" not in k}
    save_file(sd, half / "adapter_model.safetensors")
    with pytest.raises(ModelInputError, match="resizes the vocabulary .* but not lm_head.weight"):
        open_model("half", str(half), base=str(base[0]))
