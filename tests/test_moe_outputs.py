"""moe's Qwen outputs (mergekit-moe's `qwen` and `qwen3`): a Qwen2-MoE with one shared expert from Llama or
Qwen2 fine-tunes, a Qwen3-MoE from Qwen3 fine-tunes, loaded back with transformers; how the output
architecture is chosen, and every refusal named."""

import pytest
import torch
import yaml
from transformers import (AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from branchmerge.errors import BranchmergeError
from branchmerge.moe import build_moe, load_moe_config
from tests.cli_util import run_cli
from tests.conftest import make_tiny_llama, save_char_tokenizer

PROMPTS = {"a": ["add 2+3=", "add 7+1="], "b": ["rev hello=", "rev abc="], "c": ["dup ab=", "dup xyz="]}
X = torch.tensor([[1, 5, 9, 3, 7, 11, 4]])
SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             tie_word_embeddings=False)


def _save(model, path, seed: int, scale: float):
    """`model` with every parameter (biases included) moved by seeded noise, saved with a tokenizer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.eval().save_pretrained(path)
    save_char_tokenizer(path)
    return model


@pytest.fixture(scope="module")
def qwens(tmp_path_factory):
    """A tiny Qwen2 (q/k/v biases, made non-zero) and a tiny Qwen3 (q/k norms, head_dim 16), each a base and
    two fine-tunes."""
    root = tmp_path_factory.mktemp("qwens")
    out = {}
    for kind, cfg_cls, cls, extra in (("qwen2", Qwen2Config, Qwen2ForCausalLM, {}),
                                      ("qwen3", Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16})):
        torch.manual_seed(0)
        base = cls(cfg_cls(**SHAPE, **extra))
        out[kind] = {"base": (root / f"{kind}-base", _save(base, root / f"{kind}-base", 0, 0.05))}
        for i, n in enumerate("ab"):
            ft = cls(base.config)
            ft.load_state_dict(base.state_dict())
            out[kind][n] = (root / f"{kind}-{n}", _save(ft, root / f"{kind}-{n}", 10 + i, 0.02))
    return out


def _config(tmp_path, base, experts, shared=None, **kw) -> object:
    data = {"base_model": str(base), "gate_mode": "random", "dtype": "float32", "experts": experts, **kw}
    if shared is not None:
        data["shared_experts"] = shared
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def _logits(folder) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(X).logits


def test_qwen2_moe_from_llama_copies_answers_as_the_model(family, tmp_path):
    """Experts that are all one fine-tune, and a shared expert silenced (residual_scale 0): the Qwen2-MoE's
    logits are that fine-tune's, so attention (with the zero q/k/v biases written for Llama), norms, the
    config's conversion and the experts' placement are right end to end."""
    a = str(family["a"][0])
    path = _config(tmp_path, a, [{"source_model": a}] * 3, shared=[{"source_model": a, "residual_scale": 0.0}])
    rep = build_moe(load_moe_config(path), tmp_path / "out", progress=False)
    assert rep["architecture"] == "Qwen2MoeForCausalLM" and rep["shared_experts"] == 1
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(moe).__name__ == "Qwen2MoeForCausalLM" and moe.config.num_experts == 3
    assert moe.config.norm_topk_prob and moe.config.qkv_bias and moe.config.mlp_only_layers == []
    assert float(moe.model.layers[0].self_attn.q_proj.bias.detach().abs().max()) == 0.0
    with torch.no_grad():
        want = family["a"][1](X).logits
    torch.testing.assert_close(_logits(tmp_path / "out"), want, atol=1e-5, rtol=1e-5)
    # the shared expert at full strength changes the answer: it is really in the forward pass
    path = _config(tmp_path, a, [{"source_model": a}] * 3, shared=[{"source_model": a}])
    build_moe(load_moe_config(path), tmp_path / "loud", progress=False)
    assert not torch.allclose(_logits(tmp_path / "loud"), want, atol=1e-3)


def test_qwen2_moe_places_experts_and_gates_the_shared_one_from_its_prompts(family, tmp_path):
    base = family["base"]
    experts = [{"source_model": str(family[n][0]), "positive_prompts": PROMPTS[n]} for n in "ab"]
    shared = [{"source_model": str(family["c"][0]), "positive_prompts": PROMPTS["c"]}]
    path = _config(tmp_path, base[0], experts, shared=shared, gate_mode="hidden", architecture="qwen")
    code = build_moe(load_moe_config(path), tmp_path / "out", progress=False)
    assert code["experts"] == 2
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    sd = moe.state_dict()
    tok = AutoTokenizer.from_pretrained(base[0])
    c = family["c"][1].state_dict()
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp"
        for e, n in enumerate("ab"):
            src = family[n][1].state_dict()
            torch.testing.assert_close(sd[f"{pre}.experts.gate_up_proj"][e],
                                       torch.cat([src[f"{pre}.gate_proj.weight"], src[f"{pre}.up_proj.weight"]]))
            torch.testing.assert_close(sd[f"{pre}.experts.down_proj"][e], src[f"{pre}.down_proj.weight"])
        for p in ("gate_proj", "up_proj", "down_proj"):
            torch.testing.assert_close(sd[f"{pre}.shared_expert.{p}.weight"], c[f"{pre}.{p}.weight"])
        # the shared gate: the base's state entering this layer at the shared prompts' last token, normalized
        states = []
        for p in PROMPTS["c"]:
            ids = tok(tok.bos_token + p, return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                states.append(base[1](ids, output_hidden_states=True).hidden_states[layer][0, -1])
        v = torch.stack(states).mean(0)
        torch.testing.assert_close(sd[f"{pre}.shared_expert_gate.weight"], (v / v.norm())[None], atol=1e-5, rtol=1e-4)
    assert "shared" in (tmp_path / "out" / "README.md").read_text()
    assert moe.generate(X[:, :3], max_new_tokens=4, do_sample=False).shape == (1, 7)


def test_qwen2_fine_tunes_keep_their_biases(qwens, tmp_path):
    """Qwen2 inputs (biases on q/k/v) become a Qwen2-MoE without being named: Mixtral cannot hold them."""
    q = qwens["qwen2"]
    path = _config(tmp_path, q["base"][0], [{"source_model": str(q["base"][0])}] * 2,
                   shared=[{"source_model": str(q["a"][0]), "residual_scale": 0.0}])
    assert build_moe(load_moe_config(path), tmp_path / "out", progress=False)["architecture"] == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        want = q["base"][1](X).logits
    torch.testing.assert_close(_logits(tmp_path / "out"), want, atol=1e-5, rtol=1e-5)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(moe.model.layers[1].self_attn.k_proj.bias, q["base"][1].model.layers[1].self_attn.k_proj.bias)
    experts = [{"source_model": str(q[n][0]), "positive_prompts": PROMPTS[n]} for n in "ab"]
    path = _config(tmp_path, q["base"][0], experts, gate_mode="hidden_avg",
                   shared=[{"source_model": str(q["base"][0]), "positive_prompts": PROMPTS["c"]}])
    build_moe(load_moe_config(path), tmp_path / "two", progress=False)
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "two").generate(X[:, :3], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("architecture", [None, "qwen", "qwen3"])
def test_qwen3_fine_tunes_become_a_qwen3_moe(qwens, tmp_path, architecture):
    """`qwen` is a prefix, as in mergekit: without a shared expert, Qwen3 inputs make a Qwen3-MoE."""
    q = qwens["qwen3"]
    path = _config(tmp_path, q["base"][0], [{"source_model": str(q["base"][0])}] * 3, experts_per_token=2,
                   **({"architecture": architecture} if architecture else {}))
    rep = build_moe(load_moe_config(path), tmp_path / "out", progress=False)
    assert rep["architecture"] == "Qwen3MoeForCausalLM"
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert moe.config.head_dim == 16 and moe.config.num_experts == 3 and moe.config.num_experts_per_tok == 2
    torch.testing.assert_close(moe.model.layers[0].self_attn.q_norm.weight, q["base"][1].model.layers[0].self_attn.q_norm.weight)
    with torch.no_grad():
        want = q["base"][1](X).logits
    torch.testing.assert_close(_logits(tmp_path / "out"), want, atol=1e-5, rtol=1e-5)


def test_outputs_that_do_not_fit_are_refused_by_name(family, qwens, tmp_path, capsys):
    a, q2, q3 = str(family["a"][0]), str(qwens["qwen2"]["base"][0]), str(qwens["qwen3"]["base"][0])
    two = [{"source_model": a}] * 2
    cases = [
        ({"base": q2, "experts": [{"source_model": q2}] * 2},
         ["no MoE output architecture fits", "Mixtral: base_model", "'qwen2' model",
          "Qwen2-MoE needs exactly one shared_experts entry (0 given)", "a Qwen3-MoE is built from qwen3 models"]),
        ({"base": a, "experts": two, "shared": [{"source_model": a}], "architecture": "mixtral"},
         ["Mixtral has no shared expert"]),
        ({"base": a, "experts": two, "shared": [{"source_model": a}] * 2}, ["2 shared experts"]),
        ({"base": a, "experts": two, "architecture": "deepseek"}, ["remote code"]),
        ({"base": a, "experts": two, "architecture": "gpt"}, ["unknown architecture 'gpt'"]),
        ({"base": a, "experts": two, "architecture": "qwen3"}, ["'llama' model; a Qwen3-MoE is built from qwen3"]),
        ({"base": a, "experts": [{"source_model": a}, {"source_model": q2}], "shared": [{"source_model": a}]},
         ["experts[1]", "'qwen2' model"]),
        ({"base": a, "experts": [{"source_model": a, "positive_prompts": ["x"]},
                                 {"source_model": a, "positive_prompts": ["y"]}],
          "shared": [{"source_model": a}], "gate_mode": "hidden"}, ["shared_experts[0]", "no positive_prompts"]),
        ({"base": q3, "experts": [{"source_model": q3}] * 2, "shared": [{"source_model": q3}]},
         ["Qwen3-MoE has no shared expert", "'qwen3' model"]),
    ]
    for case, needles in cases:
        path = _config(tmp_path, case.pop("base"), case.pop("experts"), shared=case.pop("shared", None), **case)
        code, _, err = run_cli(capsys, "moe", path, "-o", tmp_path / "bad", "--no-progress")
        assert code != 0 and not (tmp_path / "bad").exists(), err
        for needle in needles:
            assert needle in " ".join(err.split()), (needle, err)
    biased = make_tiny_llama(tmp_path / "biased", seed=3, attention_bias=True)
    del biased
    save_char_tokenizer(tmp_path / "biased")
    b = str(tmp_path / "biased")
    path = _config(tmp_path, b, [{"source_model": b}] * 2, shared=[{"source_model": b}])
    with pytest.raises(BranchmergeError, match="has attention_bias: true; Qwen2-MoE's layers have no such biases"):
        build_moe(load_moe_config(path), tmp_path / "bad", progress=False)
    code, out, err = run_cli(capsys, "moe", _config(tmp_path, a, two, shared=[{"source_model": a}]),
                             "-o", tmp_path / "ok", "--no-progress")
    assert code == 0 and "Qwen2MoeForCausalLM, 2 experts and a shared expert" in out, err
