"""Baseline merges of fine-tunes whose vocabularies differ (mergekit's tokenizer merge: ``tokenizer_source``
and the ``tokenizer:`` block): the output tokenizer, each model's embeddings and head lined up token by token
before the method runs, rows for tokens a model lacks, padding; the merged folder loads and generates; bad
blocks are named. (``bench/baselines_vs_mergekit.py`` compares the outputs with mergekit's own.)"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from branchmerge.config import load_config
from branchmerge.errors import ConfigError
from branchmerge.merge import run_merge
from tests.conftest import write_config
from tests.test_vocabulary import ADDED, _family

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokmerge")
    out = _family(root, tied=False)
    out["base"] = root / "base"
    return out


def _tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(next(folder.glob("*.safetensors")))


def _vocab(folder) -> dict[str, int]:
    return AutoTokenizer.from_pretrained(folder).get_vocab()


def test_union_lines_up_every_models_rows(models, tmp_path):
    """linear over a (64 tokens) and g (64 + 3 added): the output has all 67, g's rows for its own tokens, the
    mean for the ones both have; the folder loads, its tokenizer reads the added tokens, and it generates."""
    cfg = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(models["a"])},
                                             {"name": "g", "model": str(models["g"])}],
                       method="linear", tokenizer_source="union")
    run_merge(load_config(cfg), tmp_path / "out", progress=False)
    out, a, g = _tensors(tmp_path / "out"), _tensors(models["a"]), _tensors(models["g"])
    v = _vocab(tmp_path / "out")
    assert len(v) == 67 and json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 67
    va, vg = _vocab(models["a"]), _vocab(models["g"])
    for key in (EMBED, HEAD):
        assert out[key].shape == (67, 32)
        for tok in ADDED:
            torch.testing.assert_close(out[key][v[tok]], g[key][vg[tok]])
        for tok in ("a", "</s>", "7"):
            torch.testing.assert_close(out[key][v[tok]], (a[key][va[tok]] + g[key][vg[tok]]) / 2)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok("ab<|q|>", add_special_tokens=False).input_ids
    assert ids[-1] == v["<|q|>"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    gen = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, len(ids) + 4) and int(gen.max()) < 67


def test_the_tokenizer_block(models, tmp_path):
    """mergekit's ``tokenizer:`` block, as mergekit writes it (models by path): a forced zero row, a row taken
    from another model's token, a token no model has (added, zeros), rows padded to a multiple of 16."""
    a, g, base = (str(models[n]) for n in ("a", "g", "base"))
    mk = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
          "models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": g, "parameters": {"weight": 0.5}}],
          "tokenizer": {"source": "union", "pad_to_multiple_of": 16, "tokens": {
              "<|q|>": {"source": {"kind": "zero"}, "force": True},
              "<|r|>": {"source": {"kind": "model_token", "model": a, "token": "z"}},
              "<new>": {"source": {"kind": "zero"}}}}}
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(mk))
    cfg = load_config(tmp_path / "mk.yaml")
    assert cfg.tokenizer.tokens["<|r|>"].source.model == "a" and cfg.tokenizer.pad_to_multiple_of == 16
    run_merge(cfg, tmp_path / "out", progress=False)
    out, ta = _tensors(tmp_path / "out"), _tensors(models["a"])
    v, va = _vocab(tmp_path / "out"), _vocab(models["a"])
    assert len(v) == 68 and out[EMBED].shape == (80, 32)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 80
    assert not out[EMBED][v["<|q|>"]].any() and not out[EMBED][v["<new>"]].any()
    # <|r|>: a and the base lack it and take a's row of "z"; g keeps its own: base + Σ w (row − base row)
    gz = _tensors(models["g"])[EMBED][_vocab(models["g"])["<|r|>"]]
    az = ta[EMBED][va["z"]]
    torch.testing.assert_close(out[EMBED][v["<|r|>"]], az + 0.5 * (az - az) + 0.5 * (gz - az))
    assert torch.equal(out[EMBED][70], out[EMBED][79])  # the padding: each model's mean row, merged
    assert not torch.equal(out[EMBED][70], out[EMBED][3])


@pytest.mark.parametrize("block,extra,needle", [
    ({"tokens": {"<|q|>": {"source": "nobody"}}}, {}, r"tokenizer\.tokens\['<\|q\|>'\]\.source` must be base or a "
                                                       r"branch's name"),
    ({"tokens": {"<|q|>": {"source": {"kind": "model_token", "model": "a"}}}}, {}, "`token` or `token_id`, exactly one"),
    ({"pad_to_multiple_of": 0}, {}, "pad_to_multiple_of"),
    ({"source": "base"}, {}, "`tokenizer.source: base` needs `base_model`"),
    ({"source": "union"}, {"method": "branch"}, "applies to baseline methods"),
    ({"source": "union"}, {"tokenizer_source": "a"}, "give `tokenizer_source` or `tokenizer`, not both"),
    ({"extra": 1}, {}, "Extra inputs are not permitted"),
])
def test_bad_tokenizer_blocks_are_named(models, tmp_path, block, extra, needle):
    kw = {"method": "linear", **extra}
    cfg = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(models["a"])},
                                             {"name": "g", "model": str(models["g"])}], tokenizer=block, **kw)
    with pytest.raises(ConfigError, match=needle):
        load_config(cfg)


def test_a_token_source_the_model_lacks_is_named_and_nothing_is_written(models, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(models["a"])},
                                             {"name": "g", "model": str(models["g"])}], method="linear",
                       tokenizer={"tokens": {"<|q|>": {"source": {"kind": "model_token", "model": "a",
                                                                  "token": "<|tool|>"}}}})
    with pytest.raises(ConfigError, match=r"token '<\|tool\|>' is not in model 'a''s vocabulary"):
        run_merge(load_config(cfg), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_slices_line_up_the_rows_of_the_models_each_tensor_comes_from(models, tmp_path):
    """A frankenmerge of a's layers then g's (passthrough slices) with tokenizer_source union: the embeddings
    come from a alone, so g's added tokens get zero rows there (as mergekit), and the head from g, with its
    own rows; config.json has the union's 67 tokens and the layers of both slices."""
    mk = {"merge_method": "passthrough", "dtype": "float32", "tokenizer_source": "union",
          "slices": [{"sources": [{"model": str(models["a"]), "layer_range": [0, 2]}]},
                     {"sources": [{"model": str(models["g"]), "layer_range": [1, 2]}]}]}
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(mk))
    run_merge(load_config(tmp_path / "mk.yaml"), tmp_path / "out", progress=False)
    out, a, g = _tensors(tmp_path / "out"), _tensors(models["a"]), _tensors(models["g"])
    v, va, vg = _vocab(tmp_path / "out"), _vocab(models["a"]), _vocab(models["g"])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert len(v) == 67 and cfg["vocab_size"] == 67 and cfg["num_hidden_layers"] == 3
    for tok in ADDED:
        assert not out[EMBED][v[tok]].any()
        torch.testing.assert_close(out[HEAD][v[tok]], g[HEAD][vg[tok]])
    torch.testing.assert_close(out[EMBED][v["a"]], a[EMBED][va["a"]])
    torch.testing.assert_close(out[HEAD][v["a"]], g[HEAD][vg["a"]])
