"""Baseline merge methods: pure math and the streaming baseline merge."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from branchmerge.config import load_config
from branchmerge.errors import ConfigError
from branchmerge.merge import run_merge
from branchmerge.methods import METHODS, dare_ties, linear, magnitude_sparsify, merge_method, task_arithmetic, ties
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
