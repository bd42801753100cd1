"""The merge methods mergekit has beyond TIES and DARE: DELLA, SCE, nuslerp, multislerp, the Karcher mean,
nearswap and Arcee Fusion (math checked against properties and hand-worked values; the benchmark
``bench/baselines_vs_mergekit.py`` compares them with mergekit itself), and the streaming merge's checks."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from branchmerge.config import load_config
from branchmerge.errors import ConfigError, ModelInputError
from branchmerge.merge import run_merge
from branchmerge.methods import (METHODS, arcee_fusion, della, della_linear, della_sparsify, karcher, multislerp,
                                 nearswap, nuslerp, sce, task_arithmetic, ties)
from tests.conftest import write_config


def test_della_keeps_large_entries_more_often_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    tv = torch.arange(1, 101, dtype=torch.float32).repeat(2000, 1)  # each row: magnitudes 1..100
    tv[::2] *= -1
    out = della_sparsify(tv, 0.5, 0.2, rescale=False, generator=g)
    kept = (out != 0).float().mean(0)
    assert abs(kept[0].item() - 0.3) < 0.03 and abs(kept[-1].item() - 0.7) < 0.03  # density ∓ epsilon
    assert abs(kept.mean().item() - 0.5) < 0.01 and kept[-10:].mean() > kept[:10].mean() + 0.3
    assert torch.equal(out[out != 0], tv[out != 0])  # kept entries unchanged without rescale
    again = della_sparsify(tv, 0.5, 0.2, rescale=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    scaled = della_sparsify(tv, 0.5, 0.2, rescale=True, generator=torch.Generator().manual_seed(1))
    assert math.isclose(scaled.abs().sum().item(), tv.abs().sum().item(), rel_tol=1e-5)
    vec = della_sparsify(torch.randn(1000), 0.4, 0.1, generator=torch.Generator().manual_seed(2))
    assert vec.shape == (1000,) and 0.3 < (vec != 0).float().mean() < 0.5


def test_della_at_full_density_is_ties_and_della_linear_task_arithmetic():
    base = torch.randn(6, 5)
    ts = [base + torch.randn(6, 5) for _ in range(3)]
    w = [1.0, 0.5, 2.0]
    torch.testing.assert_close(della(ts, base=base, weights=w, density=1.0),
                               ties(ts, base=base, weights=w, density=1.0))
    torch.testing.assert_close(della_linear(ts, base=base, weights=w, density=1.0, lambda_=0.7),
                               task_arithmetic(ts, base=base, weights=w, lambda_=0.7))
    pruned = della(ts, base=base, density=0.5, epsilon=0.1, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(pruned, ties(ts, base=base, density=1.0))


def test_della_parameters_name_an_impossible_epsilon():
    with pytest.raises(ValueError, match="epsilon 0.15 with density 0.1"):
        METHODS["della"].parse_params({"density": 0.1})
    with pytest.raises(ValueError, match="epsilon"):
        METHODS["della_linear"].params_for({"density": 0.9, "epsilon": 0.2}, "", 0.0)
    assert METHODS["della"].parse_params({"density": 1.0, "epsilon": 0.5}).density == 1.0  # (no pruning at all)


def test_sce_weights_by_mean_square_and_erases_minority_signs():
    base = torch.zeros(2)
    t1, t2 = torch.tensor([1.0, -1.0]), torch.tensor([3.0, 2.0])
    # mean squares 1 and 6.5 → weights 1/7.5, 6.5/7.5; entry 1: the sum is positive, so t1's −1 is erased
    out = sce([t1, t2], base=base)
    torch.testing.assert_close(out, torch.tensor([(1 * 1 + 3 * 6.5) / 7.5, 2.0]))
    only = sce([t1], base=base)
    torch.testing.assert_close(only, t1)  # one model: itself
    # select_topk keeps the entries that vary most across the models; an entry they agree on is dropped
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 1.0, 0.0, 5.0]), torch.tensor([1.0, 3.0, 0.5, -5.0])
    kept = sce([a, b], base=base, select_topk=0.34)  # 3 entries vary; 0.34·3 → 1 kept: the last
    assert kept[:3].tolist() == [0.0, 0.0, 0.0] and kept[3] != 0


def test_nuslerp_interpolates_on_the_sphere():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(nuslerp([a, b], weights=[1.0, 0.0]), a)
    torch.testing.assert_close(nuslerp([a, b], weights=[0.0, 3.0]), b)
    mid = nuslerp([a, b], weights=[1.0, 1.0])
    torch.testing.assert_close(mid, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))  # a unit vector, not 0.5s
    base = torch.tensor([[2.0, 2.0]])
    torch.testing.assert_close(nuslerp([base + a, base + b], weights=[1.0, 1.0], base=base), base + mid)
    rows_a, rows_b = torch.eye(3), torch.roll(torch.eye(3), 1, dims=1)
    rows = nuslerp([rows_a, rows_b], nuslerp_flatten=False)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(3))  # each row on its own circle
    cols = nuslerp([rows_a, rows_b], nuslerp_flatten=False, nuslerp_row_wise=True)
    torch.testing.assert_close(cols.norm(dim=0), torch.ones(3))
    same = nuslerp([a, 2 * a], weights=[1.0, 1.0])  # colinear: linear
    torch.testing.assert_close(same, 1.5 * a)


def test_multislerp_and_karcher_agree_with_the_geodesic():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    half = torch.tensor([math.sqrt(0.5), math.sqrt(0.5)])
    torch.testing.assert_close(multislerp([a, b]), half)
    torch.testing.assert_close(karcher([a, b]), half)
    torch.testing.assert_close(multislerp([3 * a]), 3 * a)
    # weighted Karcher mean of two points: the point w₂/(w₁+w₂) of the way along their geodesic
    k = karcher([a, b], weights=[3.0, 1.0], max_iter=200, tol=1e-9)
    torch.testing.assert_close(k, torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8)]), atol=1e-5, rtol=0)
    torch.testing.assert_close(karcher([a, 3 * a]), 2 * a)  # one direction: the mean norm
    assert torch.equal(karcher([torch.zeros(2), torch.zeros(2)]), torch.zeros(2))
    three = torch.tensor([1.0, 0.0, 0.0])
    up = torch.tensor([0.0, 1.0, 0.0])
    m = multislerp([three, -three, up])  # two cancel; the mean direction is the third's
    torch.testing.assert_close(m / m.norm(), up)
    with pytest.raises(ValueError, match="cancel out"):
        multislerp([three, -three, three, -three])
    torch.testing.assert_close(multislerp([three, -three]), torch.zeros(3))  # two antipodal: linear


def test_nearswap_takes_near_entries_and_moves_far_ones_by_t():
    base = torch.tensor([0.0, 0.0, 0.0])
    other = torch.tensor([0.05, 1.0, -4.0])
    out = nearswap([other], base=base, t=0.1)
    torch.testing.assert_close(out, torch.tensor([0.05, 0.1, -0.1]))
    torch.testing.assert_close(nearswap([other], base=base, t=100.0), other)


def test_arcee_fusion_takes_only_the_outlying_changes():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 64, generator=g)
    other = base + 1e-3 * torch.randn(16, 64, generator=g)
    other[3, 7] += 5.0  # one large, important change
    out = arcee_fusion([other], base=base)
    torch.testing.assert_close(out[3, 7], other[3, 7])
    changed = out != base
    assert changed[3].all()  # the row whose softmax moved (high KL) is taken whole
    assert changed.sum() - 64 < 0.1 * (base.numel() - 64)  # elsewhere only the outlying small changes
    assert torch.equal(arcee_fusion([base.clone()], base=base), base)


def _config(tmp_path, family, method, names="ab", base=True, **params):
    return write_config(tmp_path / f"{method}.yaml", [{"name": n, "model": str(family[n][0])} for n in names],
                        method=method, parameters=params, **({"base_model": str(family["base"][0])} if base else {}))


KEY = "model.layers.1.self_attn.o_proj.weight"


@pytest.mark.parametrize("method,names,base,params", [
    ("della", "abc", True, {"density": 0.6, "epsilon": 0.1}), ("della_linear", "ab", True, {"density": 0.8}),
    ("sce", "abc", True, {"select_topk": 0.5}), ("nuslerp", "ab", False, {}), ("nuslerp", "ab", True, {}),
    ("multislerp", "abc", True, {}), ("karcher", "abc", False, {}), ("nearswap", "a", True, {"t": 0.001}),
    ("arcee_fusion", "a", True, {}),
])
def test_each_method_merges_models_that_load(family, tmp_path, method, names, base, params):
    cfg = _config(tmp_path, family, method, names, base, **params)
    run_merge(load_config(cfg), tmp_path / "out", progress=False)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()[KEY]
    ws = [family[n][1].state_dict()[KEY] for n in names]
    b = family["base"][1].state_dict()[KEY]
    fn = METHODS[method].fn
    kw = {"base": b} if base else {}
    if METHODS[method].seeded:  # the merge seeds each tensor: same config, same weights
        run_merge(load_config(cfg), tmp_path / "again", progress=False)
        assert torch.equal(got, AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()[KEY])
        assert not torch.equal(got, b)
    else:
        torch.testing.assert_close(got, fn(ws, weights=[1.0] * len(ws), **kw, **params), atol=1e-6, rtol=0)


def test_model_counts_and_bad_tensors_are_named(family, tmp_path):
    with pytest.raises(ConfigError, match="'nuslerp' needs exactly 2 models besides the base, got 3"):
        run_merge(load_config(_config(tmp_path, family, "nuslerp", "abc")), tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="'nearswap' interpolates `base_model` and one other"):
        run_merge(load_config(_config(tmp_path, family, "nearswap", "ab", t=0.1)), tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="needs `base_model`"):
        run_merge(load_config(_config(tmp_path, family, "sce", "ab", base=False)), tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="parameters.t"):
        run_merge(load_config(_config(tmp_path, family, "nearswap", "a")), tmp_path / "o", progress=False)
    # the base listed among the models is the base (mergekit's reading): nuslerp then has two others
    cfg = write_config(tmp_path / "listed.yaml", [{"name": n, "model": str(family[n][0])} for n in ("base", "a", "b")],
                       method="nuslerp", base_model=str(family["base"][0]))
    run_merge(load_config(cfg), tmp_path / "listed", progress=False)
    assert (tmp_path / "listed" / "config.json").exists() and not (tmp_path / "o").exists()


def test_a_method_that_cannot_merge_a_tensor_names_it_and_writes_nothing(tmp_path, family):
    # three copies of one model, one negated: their directions cancel out for multislerp
    from safetensors.torch import load_file, save_file
    import shutil
    src = family["a"][0]
    neg, neg2 = tmp_path / "neg", tmp_path / "neg2"
    for folder, sign in ((neg, -1.0), (neg2, 1.0)):
        shutil.copytree(src, folder)
        for f in folder.glob("*.safetensors"):
            tensors = load_file(f)
            save_file({k: sign * v if k == KEY else v for k, v in tensors.items()}, f, metadata={"format": "pt"})
    cfg = write_config(tmp_path / "c.yaml", [{"name": "p", "model": str(src)}, {"name": "n", "model": str(neg)},
                                             {"name": "q", "model": str(neg2)}, {"name": "r", "model": str(neg)}],
                       method="multislerp")
    with pytest.raises(ModelInputError, match=f"tensor {KEY}: method 'multislerp': .*cancel out"):
        run_merge(load_config(cfg), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_mergekit_nuslerp_config_takes_its_per_model_weights(family, tmp_path):
    import yaml
    mk = {"merge_method": "nuslerp", "dtype": "float32", "base_model": str(family["base"][0]),
          "models": [{"model": str(family["a"][0]), "parameters": {"weight": 1.0}},
                     {"model": str(family["b"][0]), "parameters": {"weight": 3.0}}]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(mk))
    run_merge(load_config(tmp_path / "mk.yml"), tmp_path / "out", progress=False)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()[KEY]
    a, b, base = (family[n][1].state_dict()[KEY] for n in ("a", "b", "base"))
    torch.testing.assert_close(got, nuslerp([a, b], weights=[1.0, 3.0], base=base), atol=1e-6, rtol=0)
    assert not torch.allclose(got, nuslerp([a, b], weights=[1.0, 1.0], base=base))


def test_per_model_parameters_and_weight_settings(family, tmp_path):
    """mergekit's per-model parameters: each model its own density, a weight gradient over the layers and
    weight filter rules; the merge computes each tensor with them."""
    base_m, a_m, b_m = (family[n][1].state_dict() for n in ("base", "a", "b"))
    branches = [{"name": "a", "model": str(family["a"][0]), "parameters": {"density": 0.3}},
                {"name": "b", "model": str(family["b"][0]), "parameters": {"density": 0.9}}]
    cfg = write_config(tmp_path / "t.yaml", branches, method="ties", base_model=str(family["base"][0]),
                       parameters={"density": 0.5})
    run_merge(load_config(cfg), tmp_path / "ties", progress=False)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "ties").state_dict()[KEY]
    want = ties([a_m[KEY], b_m[KEY]], base=base_m[KEY], density=[0.3, 0.9])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(got, ties([a_m[KEY], b_m[KEY]], base=base_m[KEY], density=0.5))
    # the list is each model's own trim
    from branchmerge.methods import magnitude_sparsify
    tv = [magnitude_sparsify(x[KEY] - base_m[KEY], d) for x, d in ((a_m, 0.3), (b_m, 0.9))]
    torch.testing.assert_close(want, ties([base_m[KEY] + t for t in tv], base=base_m[KEY], density=1.0))

    layers = len({k.split(".")[2] for k in a_m if k.startswith("model.layers.")})
    assert layers >= 2
    grad = [{"name": "a", "model": str(family["a"][0]), "parameters": {"weight": [0.0, 1.0]}},
            {"name": "b", "model": str(family["b"][0]),
             "parameters": {"weight": [{"filter": "mlp", "value": 3.0}, {"value": 1.0}]}}]
    run_merge(load_config(write_config(tmp_path / "g.yaml", grad, method="linear")), tmp_path / "lin", progress=False)
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "lin").state_dict()
    first, last = "model.layers.0.self_attn.q_proj.weight", f"model.layers.{layers - 1}.self_attn.q_proj.weight"
    torch.testing.assert_close(out[first], b_m[first])  # a weighs 0 at the first layer
    torch.testing.assert_close(out[last], (a_m[last] + b_m[last]) / 2)  # 1 and 1 at the last
    mlp = f"model.layers.{layers - 1}.mlp.up_proj.weight"
    torch.testing.assert_close(out[mlp], (a_m[mlp] + 3 * b_m[mlp]) / 4)  # b's mlp rule: 3


@pytest.mark.parametrize("method,own,needle", [
    ("branch", {"density": 0.5}, "branches[0] (a): `parameters` are a baseline method's per-model values"),
    ("ties", {"lambda": 2.0}, "branches[0] (a): method 'ties': lambda cannot differ per model"),
    ("ties", {"density": 1.5}, "branches[0] (a): method 'ties': parameters.density"),
    ("della", {"density": 0.1}, "branches[0] (a): method 'della': .*epsilon 0.15 with density 0.1"),
    ("linear", {"weight": [{"filter": "mlp", "value": "heavy"}]}, "branches[0] (a): .*`weight` must be a number"),
    ("linear", {"density": 0.5}, "density cannot differ per model \\(per model: weight\\)"),
])
def test_bad_per_model_parameters_are_named(family, tmp_path, method, own, needle):
    branches = [{"name": "a", "model": str(family["a"][0]), "parameters": own},
                {"name": "b", "model": str(family["b"][0])}]
    cfg = write_config(tmp_path / "c.yaml", branches, method=method, base_model=str(family["base"][0]))
    with pytest.raises(ConfigError, match=needle.replace("(a)", "\\(a\\)").replace("[0]", "\\[0\\]")):
        load_config(cfg)


def test_mergekit_readme_ties_example_reads_as_it_is(family, tmp_path):
    import yaml
    m = [str(family[n][0]) for n in ("a", "b", "c")]
    mk = {"models": [{"model": m[0], "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                     {"model": m[1], "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                     {"model": m[2], "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5},
                                                                                  {"value": 0}]}}],
          "merge_method": "ties", "base_model": str(family["base"][0]),
          "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float16"}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(mk))
    cfg = load_config(tmp_path / "mk.yml")
    assert [b.parameters for b in cfg.branches] == [{"density": [1, 0.7, 0.1]},
                                                     {"weight": [0, 0.3, 0.7, 1], "density": 0.5},
                                                     {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}],
                                                      "density": 0.33}]
    assert cfg.parameters == {"normalize": True} and cfg.dtype == "float16"
    run_merge(cfg, tmp_path / "out", progress=False)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.float16


def test_dare_and_ties_rescale_as_mergekit_by_default_or_as_the_paper():
    from branchmerge.methods import dare_sparsify, dare_ties, magnitude_sparsify
    tv = torch.randn(200, 50, generator=torch.Generator().manual_seed(0))
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731 - the same draw for each mode
    paper, l1, none = (dare_sparsify(tv, 0.3, gen(), r) for r in ("density", True, False))
    kept = none != 0
    assert torch.equal(kept, paper != 0) and torch.equal(kept, l1 != 0) and 0.25 < kept.float().mean() < 0.35
    torch.testing.assert_close(paper[kept], tv[kept] / 0.3)
    torch.testing.assert_close(none[kept], tv[kept])
    assert math.isclose(l1.abs().sum().item(), tv.abs().sum().item(), rel_tol=1e-5)
    # mergekit's defaults: DARE rescales to the L1 norm and does not normalize; TIES does neither by default
    assert METHODS["dare_ties"].parse_params({}).normalize is False
    assert METHODS["dare_ties"].parse_params({}).rescale is True
    assert METHODS["dare_linear"].parse_params({"rescale": "density"}).rescale == "density"
    with pytest.raises(ValueError, match="rescale"):
        METHODS["dare_ties"].parse_params({"rescale": "l2"})
    base = torch.zeros_like(tv)
    one = dare_ties([tv], base=base, density=0.3, generator=gen())
    torch.testing.assert_close(one, l1)  # one model, no normalize: its pruned, L1-rescaled task vector
    trimmed = magnitude_sparsify(tv, 0.1, rescale=True)
    assert (trimmed != 0).sum() == 1000 and math.isclose(trimmed.abs().sum().item(), tv.abs().sum().item(),
                                                         rel_tol=1e-5)
    assert (magnitude_sparsify(torch.tensor([3.0, -1.0, 0.5]), 0.01) != 0).tolist() == [True, False, False]
    torch.testing.assert_close(ties([tv], base=base, density=0.1, rescale=True), trimmed)


def test_tokenizer_source_and_differing_vocabularies(family, tmp_path, caplog):
    """mergekit's tokenizer_source: base, a model, or union; models whose vocabularies differ have their
    embeddings and head lined up token by token (a token one model lacks takes the other's row), and are
    warned about without a source (entry by entry, as mergekit does)."""
    import json as _json
    import shutil

    import yaml as _yaml

    base, a, b = (str(family[n][0]) for n in ("base", "a", "b"))
    mk = {"merge_method": "linear", "dtype": "float32", "base_model": base, "tokenizer_source": a,
          "models": [{"model": a}, {"model": b}]}
    (tmp_path / "mk.yml").write_text(_yaml.safe_dump(mk))
    cfg = load_config(tmp_path / "mk.yml")
    assert cfg.tokenizer_source == "a"
    run_merge(cfg, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (family["a"][0] / "tokenizer.json").read_bytes()
    for source in ("base", "union", "b"):
        run_merge(cfg.model_copy(update={"tokenizer_source": source}), tmp_path / source, progress=False)
        assert (tmp_path / source / "tokenizer.json").is_file()
    # a model whose vocabulary differs (a token renamed): refused with a source, a warning without
    odd = tmp_path / "odd"
    shutil.copytree(family["b"][0], odd)
    tj = _json.loads((odd / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["Z"] = vocab.pop(next(k for k in vocab if k == "a"))
    (odd / "tokenizer.json").write_text(_json.dumps(tj))
    bad = cfg.model_copy(update={"branches": [cfg.branches[0], cfg.branches[1].model_copy(update={"model": str(odd)})]})
    from safetensors.torch import load_file

    for source, size in (("a", 64), ("union", 65)):
        run_merge(bad.model_copy(update={"tokenizer_source": source}), tmp_path / f"lined-{source}", progress=False)
        out = load_file(tmp_path / f"lined-{source}" / "model.safetensors")["model.embed_tokens.weight"]
        v = AutoTokenizer.from_pretrained(tmp_path / f"lined-{source}").get_vocab()  # (added tokens too)
        assert out.shape[0] == size == _json.loads((tmp_path / f"lined-{source}" / "config.json").read_text())["vocab_size"]
        wa, wb = family["a"][1].model.embed_tokens.weight, family["b"][1].model.embed_tokens.weight
        own = _json.loads((family["a"][0] / "tokenizer.json").read_text())["model"]["vocab"]
        torch.testing.assert_close(out[v["a"]], wa[own["a"]])  # only a has "a": its row, not a mean with a stranger's
        torch.testing.assert_close(out[v["b"]], (wa[own["b"]] + wb[own["b"]]) / 2)  # both have "b"
        assert ("Z" in v) == (source == "union")
        if source == "union":
            torch.testing.assert_close(out[v["Z"]], wb[vocab["Z"]])  # only odd has "Z" (b's row of "a")
    run_merge(bad.model_copy(update={"tokenizer_source": None}), tmp_path / "warned", progress=False)
    assert "vocabularies differ" in caplog.text
    # only a template changed: the same vocabulary
    same = tmp_path / "same"
    shutil.copytree(family["b"][0], same)
    tc = _json.loads((same / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{{ messages }}"
    (same / "tokenizer_config.json").write_text(_json.dumps(tc))
    ok = cfg.model_copy(update={"branches": [cfg.branches[0], cfg.branches[1].model_copy(update={"model": str(same)})]})
    run_merge(ok, tmp_path / "same-out", progress=False)
    for bad_source, needle in (("nope", "must be base or a branch's name"),):
        with pytest.raises(ConfigError, match=needle):
            load_config(write_config(tmp_path / "t.yaml", [{"name": "a", "model": a}], method="linear",
                                     tokenizer_source=bad_source))
    with pytest.raises(ConfigError, match="applies to baseline methods"):
        load_config(write_config(tmp_path / "t.yaml", [{"name": "a", "model": a}], tokenizer_source="a"))


def test_chat_template_auto_named_and_jinja(family, tmp_path):
    """mergekit's chat_template: auto (the most common among the models), a packaged name, or Jinja text,
    written as chat_template.jinja that transformers' tokenizer then uses."""
    import json as _json
    import shutil

    from transformers import AutoTokenizer

    a = str(family["a"][0])
    with_t = []
    for i, tpl in enumerate(["{{ 'A:' + messages[0]['content'] }}", "{{ 'A:' + messages[0]['content'] }}",
                             "{{ 'B:' + messages[0]['content'] }}"]):
        d = tmp_path / f"m{i}"
        shutil.copytree(family["a"][0], d)
        tc = _json.loads((d / "tokenizer_config.json").read_text())
        tc["chat_template"] = tpl
        (d / "tokenizer_config.json").write_text(_json.dumps(tc))
        with_t.append(str(d))
    msgs = [{"role": "user", "content": "hi"}]
    branches = [{"name": f"m{i}", "model": m} for i, m in enumerate(with_t)]
    for setting, want in (("auto", "A:hi"), ("chatml", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
                          ("{{ 'custom ' + messages[0]['content'] }}", "custom hi")):
        cfg = load_config(write_config(tmp_path / "c.yaml", branches, method="linear", chat_template=setting))
        run_merge(cfg, tmp_path / "out", progress=False, force=True)
        tok = AutoTokenizer.from_pretrained(tmp_path / "out")
        got = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=setting == "chatml")
        assert got == want, (setting, got)
    for bad, needle in (("llama9", "must be auto, one of alpaca, chatml, llama3, mistral"),):
        with pytest.raises(ConfigError, match=needle):
            load_config(write_config(tmp_path / "c.yaml", branches, method="linear", chat_template=bad))
    plain = load_config(write_config(tmp_path / "p.yaml", [{"name": "a", "model": a}], method="linear",
                                     chat_template="auto"))
    if not (family["a"][0] / "chat_template.jinja").exists() and "chat_template" not in (
            family["a"][0] / "tokenizer_config.json").read_text():
        with pytest.raises(ConfigError, match="none of the models has a chat template"):
            run_merge(plain, tmp_path / "none", progress=False)
        assert not (tmp_path / "none").exists()
