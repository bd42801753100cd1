"""mergekit's slices: layer ranges of the models merged slice by slice and stacked (passthrough
frankenmerges, depth up-scaling, a method per slice); checked tensor by tensor and by running the result."""

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from branchmerge.config import load_config
from branchmerge.errors import ConfigError, ModelInputError
from branchmerge.merge import run_merge
from branchmerge.methods import slerp, ties
from tests.conftest import make_finetune, make_tiny_llama, save_char_tokenizer, write_config


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 4-layer base and one fine-tune of it."""
    root = tmp_path_factory.mktemp("deep")
    base = make_tiny_llama(root / "base", seed=3, layers=4)
    save_char_tokenizer(root / "base")
    tune = make_finetune(base, root / "tune", seed=7)
    save_char_tokenizer(root / "tune")
    return {"base": (root / "base", base.state_dict()), "tune": (root / "tune", tune.state_dict())}


def _sd(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_passthrough_stacks_layers_from_two_models(family, tmp_path):
    branches = [{"name": "a", "model": str(family["a"][0])}, {"name": "b", "model": str(family["b"][0])}]
    slices = [{"sources": [{"branch": "a", "layer_range": [0, 2]}]},
              {"sources": [{"branch": "b", "layer_range": [1, 2]}]}]
    run_merge(load_config(write_config(tmp_path / "c.yaml", branches, method="passthrough", slices=slices)),
              tmp_path / "out", progress=False)
    assert AutoConfig.from_pretrained(tmp_path / "out").num_hidden_layers == 3
    got, a, b = _sd(tmp_path / "out"), family["a"][1].state_dict(), family["b"][1].state_dict()
    assert len(got) == len(a) + len([k for k in a if ".layers.0." in k])
    for out_layer, (src, layer) in enumerate([(a, 0), (a, 1), (b, 1)]):
        for k in [k for k in a if k.startswith("model.layers.0.")]:
            rest = k.removeprefix("model.layers.0.")
            assert torch.equal(got[f"model.layers.{out_layer}.{rest}"], src[f"model.layers.{layer}.{rest}"]), k
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # the first slice's
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"])  # the last slice's
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    out = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_depth_upscaling_and_a_mergekit_slices_config(family, tmp_path):
    """mergekit's depth up-scaling config (one model's layers twice, scaled) reads as it is."""
    a = str(family["a"][0])
    mk = {"merge_method": "passthrough", "dtype": "float32",
          "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                     {"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"scale": [
                         {"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0},
                         {"value": 1.0}]}}]}]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(mk))
    cfg = load_config(tmp_path / "mk.yml")
    assert [b.name for b in cfg.branches] == ["a"] and len(cfg.slices) == 2
    run_merge(cfg, tmp_path / "out", progress=False)
    got, src = _sd(tmp_path / "out"), family["a"][1].state_dict()
    assert AutoConfig.from_pretrained(tmp_path / "out").num_hidden_layers == 4
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], src["model.layers.1.mlp.up_proj.weight"])
    assert not got["model.layers.2.self_attn.o_proj.weight"].any()  # scale 0 under the o_proj filter
    assert torch.equal(got["model.layers.0.self_attn.o_proj.weight"], src["model.layers.0.self_attn.o_proj.weight"])


def test_a_method_per_slice_with_gradients_over_the_slice(deep, tmp_path):
    """slerp of the base and a fine-tune on layers 1-3 with t from 0 to 1 over the slice (mergekit's t is the
    layer's place in its slice), ties on layer 0; the base named among each slice's sources is the base."""
    (bp, b), (tp, t) = deep["base"], deep["tune"]
    branches = [{"name": "base", "model": str(bp)}, {"name": "tune", "model": str(tp)}]
    slices = [{"sources": [{"branch": "base", "layer_range": [1, 4]}, {"branch": "tune", "layer_range": [1, 4]}],
               "parameters": {"t": [0.0, 1.0]}}]
    cfg = write_config(tmp_path / "c.yaml", branches, method="slerp", base_model=str(bp), slices=slices)
    run_merge(load_config(cfg), tmp_path / "out", progress=False)
    got = _sd(tmp_path / "out")
    assert AutoConfig.from_pretrained(tmp_path / "out").num_hidden_layers == 3
    k = "model.layers.{}.mlp.down_proj.weight"
    torch.testing.assert_close(got[k.format(0)], b[k.format(1)])  # t = 0: the base's layer 1
    torch.testing.assert_close(got[k.format(2)], t[k.format(3)])  # t = 1: the fine-tune's layer 3
    torch.testing.assert_close(got[k.format(1)], slerp([t[k.format(2)]], base=b[k.format(2)], t=0.5))
    # ties over a slice whose sources are all listed (base included), per-source density
    slices = [{"sources": [{"branch": "base", "layer_range": [0, 1]},
                           {"branch": "tune", "layer_range": [2, 3], "parameters": {"density": 0.3}}]}]
    cfg = write_config(tmp_path / "t.yaml", branches, method="ties", base_model=str(bp), slices=slices)
    run_merge(load_config(cfg), tmp_path / "ties", progress=False)
    got = _sd(tmp_path / "ties")
    torch.testing.assert_close(got[k.format(0)], ties([t[k.format(2)]], base=b[k.format(0)], density=0.3))


@pytest.mark.parametrize("slices,method,needle,error", [
    ([{"sources": [{"branch": "a", "layer_range": [0, 3]}]}], "passthrough",
     "slices[0].sources[0]: layer_range [0, 3] is past the 2 layers of 'a'", ConfigError),
    ([{"sources": [{"branch": "a", "layer_range": [0, 2]}, {"branch": "b", "layer_range": [0, 1]}]}], "linear",
     "slices[0]: every source must give the same number of layers", ConfigError),
    ([{"sources": [{"branch": "zz", "layer_range": [0, 1]}]}, {"sources": [{"branch": "a", "layer_range": [0, 1]}]},
      {"sources": [{"branch": "b", "layer_range": [0, 1]}]}], "passthrough", "no branch named 'zz'", ConfigError),
    ([{"sources": [{"branch": "a", "layer_range": [0, 1]}]}], "passthrough", "['b'] are in no slice", ConfigError),
    ([{"sources": [{"branch": "a", "layer_range": [1, 1]}]}], "passthrough", "0 <= start < end", ConfigError),
    ([{"sources": [{"branch": "a", "layer_range": [0, 1]}, {"branch": "b", "layer_range": [0, 1]}]}],
     "passthrough", "slices[0]: method 'passthrough' needs exactly 1 models besides the base, got 2", ConfigError),
    ([{"sources": [{"branch": "a", "layer_range": [0, 1]}, {"branch": "b", "layer_range": [0, 1]}]}], "ties",
     "slices[0]: method 'ties' needs `base_model` among the slice's sources", ConfigError),
    ([{"sources": [{"branch": "a", "layer_range": [0, 1]}, {"branch": "b", "layer_range": [0, 1]}]}], "branch",
     "`slices` build one plain model", ConfigError),
    ([{"sources": [{"branch": "a", "layer_range": [0, 1], "parameters": {"lambda": 2}},
                   {"branch": "b", "layer_range": [0, 1]}]}], "linear",
     "slices[0].sources[0]: method 'linear': lambda cannot differ per model", ConfigError),
])
def test_bad_slices_are_named_and_write_nothing(family, tmp_path, slices, method, needle, error):
    used = sorted({src["branch"] for sl in slices for src in sl["sources"]} - {"zz"})
    names = "ab" if "in no slice" in needle or "zz" in needle else used  # (else only the slices' branches)
    branches = [{"name": n, "model": str(family[n][0])} for n in names]
    cfg = write_config(tmp_path / "c.yaml", branches, method=method, slices=slices,
                       **({"base_model": str(family["base"][0])} if method == "ties" else {}))
    with pytest.raises(error) as e:
        run_merge(load_config(cfg), tmp_path / "out", progress=False)
    assert needle in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_slice_source_of_another_layout_is_named(family, tmp_path):
    other = make_tiny_llama(tmp_path / "wide", seed=1, layers=2, hidden=64)
    del other
    branches = [{"name": "a", "model": str(family["a"][0])}, {"name": "w", "model": str(tmp_path / "wide")}]
    slices = [{"sources": [{"branch": "a", "layer_range": [0, 1]}, {"branch": "w", "layer_range": [1, 2]}]}]
    with pytest.raises(ModelInputError, match="has shape .* in branch 'w'"):
        run_merge(load_config(write_config(tmp_path / "c.yaml", branches, method="linear", slices=slices)),
                  tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
