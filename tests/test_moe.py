"""moe: a Mixtral mixture of experts from fine-tunes of one base (mergekit-moe's job), loaded back with
transformers: tensors placed where Mixtral reads them, routers that send each expert's prompts to it."""

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from branchmerge.errors import BranchmergeError, ModelInputError
from branchmerge.moe import build_moe, load_moe_config
from tests.cli_util import run_cli
from tests.conftest import make_tiny_llama, save_char_tokenizer

PROMPTS = {"a": ["add 2+3=", "add 7+1="], "b": ["rev hello=", "rev abc="]}


def _write(tmp_path, family, **kw):
    data = {"base_model": str(family["base"][0]), "gate_mode": "hidden", "dtype": "float32",
            "experts": [{"source_model": str(family[n][0]), "positive_prompts": PROMPTS[n]} for n in "ab"], **kw}
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_experts_are_the_fine_tunes_mlps_and_the_rest_is_the_base(family, tmp_path):
    build_moe(load_moe_config(_write(tmp_path, family)), tmp_path / "out", progress=False)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 2
    assert moe.config.num_experts_per_tok == 2
    sd = moe.state_dict()
    a, b, base = (family[n][1].state_dict() for n in ("a", "b", "base"))
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp"
        for e, src in enumerate((a, b)):
            gate_up = sd[f"{pre}.experts.gate_up_proj"][e]
            torch.testing.assert_close(gate_up, torch.cat([src[f"{pre}.gate_proj.weight"], src[f"{pre}.up_proj.weight"]]))
            torch.testing.assert_close(sd[f"{pre}.experts.down_proj"][e], src[f"{pre}.down_proj.weight"])
        torch.testing.assert_close(sd[f"model.layers.{layer}.self_attn.q_proj.weight"],
                                   base[f"model.layers.{layer}.self_attn.q_proj.weight"])
    torch.testing.assert_close(sd["lm_head.weight"], base["lm_head.weight"])
    assert (tmp_path / "out" / "tokenizer.json").is_file() and "mixture of experts" in (tmp_path / "out" / "README.md").read_text()
    out = moe.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_copies_of_one_model_answer_as_that_model(family, tmp_path):
    """Every expert the same fine-tune and the base that fine-tune: the MoE's logits are the fine-tune's
    (the router's top-k weights sum to 1), so expert placement and the config are right end to end."""
    a = str(family["a"][0])
    data = {"base_model": a, "gate_mode": "random", "dtype": "float32", "experts_per_token": 2,
            "experts": [{"source_model": a}, {"source_model": a}, {"source_model": a}]}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(data))
    build_moe(load_moe_config(tmp_path / "m.yml"), tmp_path / "out", progress=False)
    x = torch.tensor([[1, 5, 9, 3, 7, 11]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(x).logits
        want = family["a"][1](x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg", "cheap_embed"])
def test_each_experts_prompts_route_to_it(family, tmp_path, mode):
    build_moe(load_moe_config(_write(tmp_path, family, gate_mode=mode)), tmp_path / "out", progress=False)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tok = AutoTokenizer.from_pretrained(family["base"][0])
    base = family["base"][1]
    for e, name in enumerate("ab"):
        for p in PROMPTS[name]:
            ids = tok(tok.bos_token + p, return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                states = base(ids, output_hidden_states=True).hidden_states
            # what enters the last layer (for `hidden`, the last token: at layer 0 it is "=" in every prompt)
            if mode == "cheap_embed":
                h = states[0][0].mean(0)
            else:
                h = states[-2][0].mean(0) if mode == "hidden_avg" else states[-2][0, -1]
            logits = moe.model.layers[-1].mlp.gate.weight @ h
            assert int(logits.argmax()) == e, (mode, p, logits)


def test_bad_configs_and_models_are_named(family, tmp_path, capsys):
    base = str(family["base"][0])
    cases = [({"experts_per_token": 3}, "experts_per_token 3 is more than the 2 experts"),
             ({"experts": [{"source_model": base, "positive_prompts": ["x"]},
                           {"source_model": base}]}, "experts[1]"),
             ({"experts": [{"source_model": base, "positive_prompts": ["x"]},
                           {"source_model": base, "positive_prompts": ["x"]}]}, "the same prompts"),
             ({"shared_experts": [{"source_model": base}]}, "shared_experts"),
             ({"gate_mode": "psychic"}, "gate_mode"), ({"dtype": "int3"}, "dtype")]
    for change, needle in cases:
        path = _write(tmp_path, family, **change)
        code, _, err = run_cli(capsys, "moe", path, "-o", tmp_path / "bad", "--no-progress")
        assert code != 0 and needle in err and not (tmp_path / "bad").exists(), (change, err)
    wide = make_tiny_llama(tmp_path / "wide", seed=1, hidden=64)
    del wide
    save_char_tokenizer(tmp_path / "wide")
    path = _write(tmp_path, family, experts=[{"source_model": str(family["a"][0]), "positive_prompts": ["x"]},
                                             {"source_model": str(tmp_path / "wide"), "positive_prompts": ["y"]}])
    with pytest.raises(ModelInputError, match="has hidden_size 64 but the base has 32"):
        build_moe(load_moe_config(path), tmp_path / "bad", progress=False)
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64)).save_pretrained(tmp_path / "gpt")
    path = _write(tmp_path, family, base_model=str(tmp_path / "gpt"), gate_mode="random")
    with pytest.raises(BranchmergeError, match="'gpt2' model; a Mixtral is built from llama or mistral"):
        build_moe(load_moe_config(path), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    code, out, err = run_cli(capsys, "moe", _write(tmp_path, family), "-o", tmp_path / "ok", "--no-progress")
    assert code == 0 and "2 experts" in out, err


def test_many_long_prompts_run_in_bounded_batches(family, tmp_path, monkeypatch):
    """Gates from prompts run 16 at a time and cut to the context give the same vectors as one batch."""
    import branchmerge.moe as moe_mod
    many = {"a": [f"add {i}+{i}=" for i in range(40)], "b": ["rev " + "ab" * 200 + "="] * 3 + ["rev x="]}
    data = {"base_model": str(family["base"][0]), "gate_mode": "hidden_avg", "dtype": "float32",
            "experts": [{"source_model": str(family[n][0]), "positive_prompts": many[n]} for n in "ab"]}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(data))
    cfg = load_moe_config(tmp_path / "m.yml")
    from branchmerge.io.models import ModelSource
    base = ModelSource.open("base", str(family["base"][0]))
    small = moe_mod.gate_vectors(cfg, base)
    monkeypatch.setattr(moe_mod, "PROMPT_BATCH", 1000)
    whole = moe_mod.gate_vectors(cfg, base)
    torch.testing.assert_close(small, whole, atol=1e-5, rtol=1e-5)
