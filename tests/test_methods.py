"""Baseline merge methods: pure math and the streaming baseline merge."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from branchmerge.config import load_config
from branchmerge.errors import ConfigError
from branchmerge.merge import run_merge
from branchmerge.methods import (METHODS, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, evaluate_setting, linear,
                                 magnitude_sparsify, merge_method, model_stock, outlier_sparsify, slerp,
                                 task_arithmetic, ties)
from tests.cli_util import run_cli
from tests.conftest import write_config


def test_linear_is_weighted_mean():
    a, b = torch.ones(3, 3), torch.zeros(3, 3)
    assert torch.allclose(linear([a, b]), torch.full((3, 3), 0.5))
    assert torch.allclose(linear([a, b], weights=[3.0, 1.0]), torch.full((3, 3), 0.75))


def test_task_arithmetic_adds_task_vectors():
    base = torch.zeros(4)
    out = task_arithmetic([torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 2.0, 0, 0])], base=base, lambda_=0.5)
    assert torch.allclose(out, torch.tensor([0.5, 1.0, 0, 0]))


def test_ties_trims_and_elects_sign():
    base = torch.zeros(4)
    t1 = torch.tensor([1.0, -0.1, 3.0, 0.0])
    t2 = torch.tensor([-2.0, 0.2, 1.0, 0.0])
    t3 = torch.tensor([-1.0, 0.3, 2.0, 0.0])
    out = ties([t1, t2, t3], base=base, density=1.0)
    # entry 0: sum = -2 → negative sign wins; mean of agreeing (-2, -1) = -1.5
    assert torch.allclose(out, torch.tensor([-1.5, 0.25, 2.0, 0.0]))
    assert magnitude_sparsify(torch.tensor([0.1, -5.0, 2.0, 0.3]), 0.5).tolist() == [0.0, -5.0, 2.0, 0.0]


def test_dare_ties_is_seeded_and_unbiased_in_expectation():
    base = torch.zeros(20000)
    t = torch.ones(20000)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = dare_ties([t], base=base, density=0.3, generator=g1, normalize=False)
    assert torch.equal(a, dare_ties([t], base=base, density=0.3, generator=g2, normalize=False))
    assert abs(float(a.mean()) - 1.0) < 0.05


def test_registry_rejects_duplicates_and_bad_names():
    with pytest.raises(ValueError, match="already registered"):
        merge_method("linear", reference_url="x")(lambda ts, **_: ts[0])
    with pytest.raises(ValueError, match="lower_snake_case"):
        merge_method("Bad-Name", reference_url="x")
    assert {"branch", "linear", "task_arithmetic", "ties", "dare_ties"} <= set(METHODS)
    assert all(m.reference_url for m in METHODS.values())


@pytest.mark.parametrize("method,params", [("linear", {}), ("task_arithmetic", {"lambda": 0.5}),
                                           ("ties", {"density": 1.0}), ("dare_ties", {"density": 0.5})])
def test_baseline_merge_writes_loadable_model(family, tmp_path, method, params):
    cfg = write_config(tmp_path / "c.yaml", [{"name": n, "model": str(family[n][0])} for n in "abc"],
                       method=method, base_model=str(family["base"][0]), parameters=params)
    run_merge(load_config(cfg), tmp_path / "out", progress=False)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()["model.layers.0.mlp.up_proj.weight"]
    key = "model.layers.0.mlp.up_proj.weight"
    ws = [family[n][1].state_dict()[key] for n in "abc"]
    base = family["base"][1].state_dict()[key]
    if method == "linear":
        torch.testing.assert_close(got, sum(ws) / 3, atol=1e-6, rtol=0)
    elif method == "task_arithmetic":  # base + λ·Σ task vectors
        torch.testing.assert_close(got, base + 0.5 * sum(w - base for w in ws), atol=1e-6, rtol=0)
    elif method == "ties":  # density 1: no trimming, sign election only
        torch.testing.assert_close(got, base + ties(ws, base=base, density=1.0) - base, atol=1e-6, rtol=0)
    else:  # seeded: the same merge again gives the same weights, and it moved away from the base
        run_merge(load_config(cfg), tmp_path / "out", progress=False, force=True)
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()[key]
        assert torch.equal(got, again) and not torch.allclose(got, base)


def test_method_parameters_are_declared_and_checked(family, tmp_path):
    """A misspelt or foreign parameter is an error naming it and the parameters the method takes, not
    silently ignored; a value out of range is named too."""
    branches = [{"name": n, "model": str(family[n][0])} for n in "ab"]
    for params, needle in [({"densty": 0.5}, "parameters.densty: unknown parameter"),
                           ({"density": 1.5}, "parameters.density"),
                           ({"density": 0.5}, "parameters.density: unknown parameter")]:
        method = "linear" if needle.endswith("unknown parameter") and "densty" not in str(params) else "ties"
        cfg = write_config(tmp_path / "c.yaml", branches, method=method, base_model=str(family["base"][0]),
                           parameters=params)
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as e:
            load_config(cfg)
        assert "parameters it takes" in str(e.value)
    cfg = write_config(tmp_path / "c.yaml", branches, parameters={"density": 0.5})
    with pytest.raises(ConfigError, match="method 'branch' takes no `parameters`"):
        load_config(cfg)
    assert METHODS["ties"].parse_params({"density": 0.3, "lambda": 2}).lambda_ == 2


def test_method_errors(family, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(family["a"][0])}], method="ties")
    with pytest.raises(ConfigError, match="needs `base_model`"):
        run_merge(load_config(cfg), tmp_path / "o", progress=False)
    cfg = write_config(tmp_path / "d.yaml", [{"name": "a", "model": str(family["a"][0])}], method="soup")
    code, _, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "o2")
    assert code != 0 and "unknown merge method 'soup'" in err and "linear" in err
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0 and "dare_ties" in out and "arxiv" in out
    assert "per model" in out and "epsilon" in out and "nuslerp" in out  # (which parameters a model may override)


def test_settings_resolve_per_tensor_as_mergekit_does():
    """Scalars, gradients (interpolated over the layers), and {filter, value} rules (first match wins)."""
    assert evaluate_setting(0.3, "x", 0.7) == 0.3
    grad = [0, 0.5, 0.3, 0.7, 1]
    assert evaluate_setting(grad, "x", 0.0) == 0 and evaluate_setting(grad, "x", 1.0) == 1
    assert evaluate_setting(grad, "x", 0.5) == pytest.approx(0.3)
    assert evaluate_setting(grad, "x", 1 / 3) == pytest.approx(0.5 * (2 / 3) + 0.3 * (1 / 3))  # layer 1 of 4
    assert evaluate_setting(["a", "b"], "x", 0.99) == "a"  # non-numbers are picked, not interpolated
    rules = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.9}, {"value": 0.5}]
    assert evaluate_setting(rules, "model.layers.1.self_attn.q_proj.weight", 0.25) == pytest.approx(0.25)
    assert evaluate_setting(rules, "model.layers.1.mlp.up_proj.weight", 0.25) == 0.9
    assert evaluate_setting(rules, "model.norm.weight", 0.0) == 0.5
    assert evaluate_setting(rules[:2], "model.norm.weight", 0.0) is None  # no rule applies: the default
    assert evaluate_setting({"filter": "*", "value": 2}, "y", 0) == 2
    for bad in ({"filt": "mlp", "value": 1}, [{"filter": "mlp"}], [1, {"value": 2}], None):
        with pytest.raises(ValueError, match="setting|rule"):
            evaluate_setting(bad, "x", 0.0)


def test_slerp_math():
    a, b = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(2, 2), torch.tensor([0.0, 3.0, 0.0, 0.0]).view(2, 2)
    torch.testing.assert_close(slerp([b], base=a, t=0.0), a)
    torch.testing.assert_close(slerp([b], base=a, t=1.0), b)
    half = slerp([b], base=a, t=0.5)  # orthogonal: the arc's middle, sin(π/4)/sin(π/2) of each
    torch.testing.assert_close(half, (a + b) * 2 ** -0.5)
    torch.testing.assert_close(slerp([2 * a], base=a, t=0.25), 1.25 * a)  # collinear: linear
    with pytest.raises(ValueError, match="one other model"):
        slerp([a, b], base=a, t=0.5)


def test_slerp_merge_with_gradients_per_filter(family, tmp_path, capsys):
    """mergekit's slerp example: t climbs over the layers for attention, falls for the MLP, 0.5 elsewhere;
    the base may be listed among the branches or not."""
    base, a = family["base"], family["a"]
    t = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": [1, 0]}, {"value": 0.5}]
    for branches in ([{"name": "a", "model": str(a[0])}],
                     [{"name": "base", "model": str(base[0])}, {"name": "a", "model": str(a[0])}]):
        cfg = write_config(tmp_path / "s.yaml", branches, method="slerp", base_model=str(base[0]), parameters={"t": t})
        code, _, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "s", "--no-progress", "--force")
        assert code == 0, err
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "s").state_dict()
        sb, sa = base[1].state_dict(), a[1].state_dict()
        last = base[1].config.num_hidden_layers - 1
        for key, want in [("model.layers.0.self_attn.q_proj.weight", sb), (f"model.layers.{last}.self_attn.q_proj.weight", sa),
                          ("model.layers.0.mlp.up_proj.weight", sa), (f"model.layers.{last}.mlp.up_proj.weight", sb)]:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
        key = "model.embed_tokens.weight"
        torch.testing.assert_close(got[key], slerp([sa[key]], base=sb[key], t=0.5), atol=1e-6, rtol=0)
        assert not torch.allclose(got[key], sb[key], atol=1e-4)
    three = [{"name": n, "model": str(family[n][0])} for n in "ab"]
    for params, needle in [({"t": t}, "one other model; the branches list 2"), ({}, "parameters.t: Field required"),
                           ({"t": [{"filter": "mlp", "value": 1.5}]}, "parameters.t"),
                           ({"t": [{"filt": "mlp", "value": 0.5}]}, "a rule is")]:
        cfg = write_config(tmp_path / "bad.yaml", three if "branches list" in needle else branches, method="slerp",
                           base_model=str(base[0]), parameters=params)
        code, _, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "bad", "--no-progress")
        assert code != 0 and needle in err and not (tmp_path / "bad").exists(), (params, err)


def test_breadcrumbs_drop_outliers_and_the_smallest():
    tv = torch.arange(1.0, 101.0) * torch.tensor([1.0, -1.0]).repeat(50)  # |entries| 1..100
    kept = outlier_sparsify(tv, density=0.9, gamma=0.05)
    assert torch.equal(kept != 0, (tv.abs() > 5) & (tv.abs() <= 95))  # 5 largest and 5 smallest gone
    assert torch.equal(outlier_sparsify(tv, 0.98, 0.05) != 0, tv.abs() <= 98)  # density first: 2 outliers dropped
    assert torch.equal(outlier_sparsify(tv, 1.0, 0.05), tv)
    re = outlier_sparsify(tv, 0.5, 0.1, rescale=True)
    assert float(re.abs().sum()) == pytest.approx(float(tv.abs().sum()))
    base = torch.zeros(100)
    torch.testing.assert_close(breadcrumbs([base + tv], base=base, density=0.9, gamma=0.05), kept)
    a, b = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([-1.0, 1.0, -1.0])
    torch.testing.assert_close(breadcrumbs_ties([a, b], base=torch.zeros(3), density=1.0),
                               torch.tensor([1.0, 3.0, -4.0]))  # ties at zero count as positive: +1 kept, -1 not
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    once, again = dare_linear([a, b], base=torch.zeros(3), generator=g()), dare_linear([a, b], base=torch.zeros(3),
                                                                                      generator=g())
    assert torch.equal(once, again)


def test_model_stock_ratio():
    base = torch.zeros(2, 3)
    same = torch.ones(2, 3)
    torch.testing.assert_close(model_stock([same, same], base=base), same)  # agreeing fine-tunes: their average
    torch.testing.assert_close(model_stock([same, -same], base=base), base)  # opposite: no finite ratio, the base
    a, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # cos 0.5 overall
    t = 2 * 0.5 / (1 + 0.5)  # N·cos / (1 + (N−1)·cos)
    torch.testing.assert_close(model_stock([a, b], base=torch.zeros(2, 2)), t * (a + b) / 2)
    rows = model_stock([a, b], base=torch.zeros(2, 2), filter_wise=True)  # row 2 agrees fully, row 1 not at all
    torch.testing.assert_close(rows, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="at least two"):
        model_stock([same], base=base)


def test_new_baselines_merge_and_the_base_listed_is_the_base(family, tmp_path, capsys):
    """breadcrumbs_ties, model_stock and dare_linear merge loadable models; a branch that is the base model is
    not counted as a fine-tune (the same weights as without it); model_stock refuses one fine-tune."""
    fts = [{"name": n, "model": str(family[n][0])} for n in "abc"]
    with_base = [{"name": "base", "model": str(family["base"][0])}, *fts]
    for method, params in [("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05, "normalize": True}),
                           ("model_stock", {}), ("dare_linear", {"density": 0.7})]:
        got = []
        for i, branches in enumerate((fts, with_base)):
            cfg = write_config(tmp_path / "c.yaml", branches, method=method, base_model=str(family["base"][0]),
                               parameters=params)
            run_merge(load_config(cfg), tmp_path / f"{method}{i}", progress=False)
            got.append(AutoModelForCausalLM.from_pretrained(tmp_path / f"{method}{i}").state_dict())
        key = "model.layers.1.mlp.down_proj.weight"
        assert torch.equal(got[0][key], got[1][key]), method
        assert not torch.allclose(got[0][key], family["base"][1].state_dict()[key]), method
    cfg = write_config(tmp_path / "one.yaml", with_base[:2], method="model_stock", base_model=str(family["base"][0]))
    code, _, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "one", "--no-progress")
    assert code != 0 and "needs at least 2 models besides the base, got 1" in err


def test_a_mergekit_config_merges_as_the_same_native_one(family, tmp_path, capsys):
    """mergekit's own YAML (models with per-model weight and density, the base listed among them) merges to the
    same weights as the branchmerge config it stands for; what has no counterpart is refused by name."""
    import yaml

    base, a, b = (str(family[n][0]) for n in ("base", "a", "b"))
    mk = {"models": [{"model": base}, {"model": a, "parameters": {"weight": 0.7, "density": 0.6}},
                     {"model": b, "parameters": {"weight": 0.3, "density": 0.6}}],
          "merge_method": "ties", "base_model": base, "parameters": {"normalize": True}, "dtype": "float32"}
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(mk))
    code, _, err = run_cli(capsys, "merge", tmp_path / "mk.yaml", "-o", tmp_path / "from-mk", "--no-progress")
    assert code == 0, err
    native = write_config(tmp_path / "n.yaml", [{"name": "a", "model": a, "weight": 0.7},
                                                {"name": "b", "model": b, "weight": 0.3}],
                          method="ties", base_model=base, parameters={"density": 0.6, "normalize": True}, dtype="float32")
    run_merge(load_config(native), tmp_path / "native", progress=False)
    x = AutoModelForCausalLM.from_pretrained(tmp_path / "from-mk").state_dict()
    y = AutoModelForCausalLM.from_pretrained(tmp_path / "native").state_dict()
    assert all(torch.equal(x[k], y[k]) for k in y)
    cfg = load_config(tmp_path / "mk.yaml")
    assert [br.name for br in cfg.branches] == ["base", "a", "b"] and cfg.parameters["density"] == 0.6
    bad = [({"slices": []}, "give `models` or `slices`, not both"), ({"modules": {"text": {}}}, "per-module definitions"),
           ({"tokenizer": {"source": "union"}, "tokenizer_source": "union"}, "give `tokenizer_source` or `tokenizer`"),
           ({"merge_method": None}, "`merge_method` is missing"), ({"extra": 1}, "unknown key `extra`"),
           ({"models": [{"model": a, "parameters": {"lambda": 0.5}}, {"model": b, "parameters": {"lambda": 0.7}}]},
            "lambda cannot differ per model"),
           ({"models": [{"model": a, "parameters": {"weight": [0, "x"]}}]}, "`weight` must be a number"),
           ({"models": [{"model": a, "lora": 1}]}, "models[0] must be")]
    for change, needle in bad:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**mk, **change}))
        code, _, err = run_cli(capsys, "merge", tmp_path / "bad.yaml", "-o", tmp_path / "bad", "--no-progress")
        assert code != 0 and needle in err and not (tmp_path / "bad").exists(), (change, err)
    same = {**mk, "models": [{"model": a}, {"model": str(tmp_path / "x" / "a")}], "merge_method": "linear"}
    (tmp_path / "x").mkdir()
    (tmp_path / "same.yaml").write_text(yaml.safe_dump(same))
    assert [br.name for br in load_config(tmp_path / "same.yaml").branches] == ["a", "a-2"]  # names made unique
    ours = {"models": [{"model": a}, {"model": b}], "merge_method": "branch", "compress_rate": 0.5}
    (tmp_path / "branch.yaml").write_text(yaml.safe_dump(ours))  # the branch method, with its own keys
    cfg = load_config(tmp_path / "branch.yaml")
    assert cfg.method == "branch" and cfg.compress_rate == 0.5 and [br.name for br in cfg.branches] == ["a", "b"]
