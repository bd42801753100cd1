"""Compact branches: byte-budget rank allocation, quantized factors, delta-compression baselines."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import branchmerge
from branchmerge.compress.allocate import Spectrum, allocate, remaining_error, spectrum
from branchmerge.compress.baselines import DELTA_CODECS
from branchmerge.compress.quant import (
    pack_int4,
    quantize_factors,
    quantize_rows,
    triplet_bytes,
    triplet_errors,
    unpack_int4,
)
from branchmerge.config import load_config
from branchmerge.errors import BundleError
from branchmerge.export import export_branch
from branchmerge.merge import run_merge
from tests.cli_util import run_cli
from tests.conftest import write_config


# ---- allocation ------------------------------------------------------------------------------------
def _spec(key: str, sigma2: list[float], cost: dict[int, int], qerr: dict[int, list[float]] | None = None) -> Spectrum:
    s2 = torch.tensor(sigma2)
    return spectrum(key, s2, float(s2.sum()) + 0.1, cost, {b: torch.tensor(e) for b, e in (qerr or {}).items()})


def _brute(spectra: list[Spectrum], budget: int, widths: tuple[int, ...]) -> float:
    """Least remaining error over every prefix allocation (per tensor: h high-width, then l low-width)."""
    hi, lo = widths[0], widths[-1]
    options = []
    for s in spectra:
        opts = []
        for k in range(s.cap + 1):
            for h in (range(k + 1) if hi != lo else [0]):
                parts = [(hi, h), (lo, k - h)] if hi != lo else [(lo, k)]
                c = sum(s.cost[b] * n for b, n in parts)
                opts.append((c, remaining_error(s, parts)))
        options.append(opts)
    best = float("inf")
    for combo in itertools.product(*options):
        if sum(c for c, _ in combo) <= budget:
            best = min(best, sum(e for _, e in combo))
    return best


def test_greedy_equals_brute_force_with_equal_costs():
    g = torch.Generator().manual_seed(0)
    spectra = []
    for t in range(3):
        s2 = sorted(torch.rand(5, generator=g).tolist(), reverse=True)
        spectra.append(_spec(f"t{t}", s2, {16: 10}))
    for budget in range(0, 160, 10):
        a = allocate(spectra, budget, (16,))
        assert a.spent <= budget
        assert a.error == pytest.approx(_brute(spectra, budget, (16,)), abs=1e-6), budget


def test_greedy_within_one_triplet_of_brute_force_with_unequal_costs_and_mixed_bits():
    g = torch.Generator().manual_seed(1)
    for trial in range(6):
        spectra = []
        for t in range(3):
            s2 = sorted((torch.rand(3, generator=g) ** 2).tolist(), reverse=True)
            cost = {8: int(torch.randint(6, 12, (1,), generator=g)), 4: int(torch.randint(3, 6, (1,), generator=g))}
            qerr = {8: [x * 0.001 for x in s2], 4: [x * 0.05 for x in s2]}
            spectra.append(_spec(f"t{t}", s2, cost, qerr))
        most = max(max(float(s.gains[4][0]), float(s.gains[8][0])) for s in spectra)
        for budget in (0, 7, 15, 26, 40, 60):
            a = allocate(spectra, budget, (8, 4))
            assert a.spent <= budget
            best = _brute(spectra, budget, (8, 4))
            assert best - 1e-9 <= a.error <= best + most, (trial, budget, a.error, best)


def test_budget_is_met_within_one_triplet():
    g = torch.Generator().manual_seed(2)
    spectra = [_spec(f"t{t}", sorted(torch.rand(40, generator=g).tolist(), reverse=True), {16: 7 + t})
               for t in range(4)]
    for budget in (50, 333, 777):
        a = allocate(spectra, budget, (16,))
        assert budget - max(s.cost[16] for s in spectra) < a.spent <= budget
        assert sum(a.rank(s.key) * s.cost[16] for s in spectra) == a.spent


# ---- quantization ----------------------------------------------------------------------------------
def test_int4_packing_round_trips_every_value():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # [3, 32]
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (3, 16)
    assert torch.equal(unpack_int4(p), q)
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("bits,lo,hi", [(8, 1e-3, 1.5e-2), (4, 3e-2, 0.2)])
def test_quantization_error_per_bit_width(bits, lo, hi):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 300, generator=g)  # 300: not a multiple of the group size
    x = x / x.norm(dim=1, keepdim=True)
    q = quantize_rows(x, bits, 64)
    y = q.dequantize()
    assert y.shape == x.shape
    rel = float((y - x).norm() / x.norm())
    assert lo < rel < hi, rel
    assert q.nbytes == 16 * (320 * bits // 8 + 5 * 2)


def test_triplet_errors_are_exact_and_mixed_factors_dequantize():
    g = torch.Generator().manual_seed(4)
    u, v = torch.randn(48, 6, generator=g), torch.randn(6, 40, generator=g)
    for bits in (8, 4):
        err = triplet_errors(u, v, bits, 32)
        du, dv = quantize_factors(u, v, [(bits, 6)], 32).dequantize()
        direct = torch.stack([(torch.outer(u[:, j], v[j]) - torch.outer(du[:, j], dv[j])).pow(2).sum() for j in range(6)])
        assert torch.allclose(err, direct, rtol=1e-3, atol=1e-6)
    mixed = quantize_factors(u, v, [(8, 2), (4, 4)], 32)
    du, dv = mixed.dequantize()
    e8 = (du[:, :2] @ dv[:2] - u[:, :2] @ v[:2]).norm()
    e4 = (du[:, 2:] @ dv[2:] - u[:, 2:] @ v[2:]).norm()
    assert e8 < e4 / 4  # the top triplets got more bits
    assert mixed.nbytes == 6 * 4 + 2 * triplet_bytes(48, 40, 8, 32, 2) - 2 * 4 + 4 * triplet_bytes(48, 40, 4, 32, 2) - 4 * 4


# ---- baselines -------------------------------------------------------------------------------------
def test_delta_codecs_keep_their_bytes_and_their_definitions():
    g = torch.Generator().manual_seed(5)
    d = torch.randn(64, 48, generator=g)
    approx, nb = DELTA_CODECS["bitdelta"].fn(d, 0)
    assert nb == 64 * 48 // 8 + 4
    assert torch.equal(approx.sign(), d.sign()) and torch.allclose(approx.abs(), d.abs().mean().expand_as(d))
    budget = 1000
    approx, nb = DELTA_CODECS["topk"].fn(d, budget, esize=2)
    assert nb <= budget
    kept = approx != 0
    assert d.abs()[kept].min() >= d.abs()[~kept].max()  # the largest entries, exactly
    approx, nb = DELTA_CODECS["dare"].fn(d, budget, esize=2, generator=torch.Generator().manual_seed(0))
    kept = approx != 0
    p = (budget - 8) // 2 / d.numel()
    assert torch.allclose(approx[kept], d[kept] / p)
    assert abs(nb - budget) < 0.25 * budget


# ---- merges under a budget -------------------------------------------------------------------------
def _branches(family, names="abc"):
    return [{"name": n, "model": str(family[n][0])} for n in names]


def _weights(folder):
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_budget_for_everything_reproduces_the_originals(family, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", _branches(family), budget={"branch_bytes": 2.0})
    man = run_merge(load_config(cfg), tmp_path / "b", progress=False)
    assert man["allocation"]["exact"] is True
    for n in "ab":
        export_branch(tmp_path / "b", n, tmp_path / f"x{n}", dtype="float32")
        got, want = _weights(tmp_path / f"x{n}"), family[n][1].state_dict()
        for k, v in want.items():
            assert torch.allclose(got[k], v, atol=1e-5, rtol=1e-5), k


@pytest.mark.parametrize("bits", [16, 8, "mixed"])
def test_total_bytes_budget_is_met_within_one_triplet(family, tmp_path, bits):
    cfg = write_config(tmp_path / "c.yaml", _branches(family), budget={"total_bytes": 160_000}, factor_bits=bits,
                       group_size=32)
    man = run_merge(load_config(cfg), tmp_path / "b", progress=False)
    a = man["allocation"]
    assert man["total_bytes"] <= 160_000
    widest = max(3 * triplet_bytes(64, 32, w, 32, 4) for w in a["widths"])  # the largest tensor's triplet
    assert a["factor_budget_bytes"] - widest < a["factor_bytes"] <= a["factor_budget_bytes"]
    ranks = {r["rank"] for r in man["tensors"]["main"].values() if r["role"] == "compressed"}
    assert len(ranks) > 1  # allocated, not uniform
    recs = [r for r in man["tensors"]["main"].values() if r["role"] == "compressed" and r["rank"]]
    if bits == "mixed":
        assert all(r["bits"][0][0] == 8 and r["bits"][1][0] == 4 for r in recs)
        assert any(r["bits"][0][1] and r["bits"][1][1] for r in recs)  # some tensors really mix


def test_budget_allocation_beats_a_uniform_rate_at_equal_bytes(family, tmp_path):
    """The allocation minimizes the summed error of the differences; at the bytes a uniform rate uses it
    must reach a lower summed error."""
    uni = run_merge(load_config(write_config(tmp_path / "u.yaml", _branches(family), compress_rate=0.9)),
                    tmp_path / "u", progress=False)
    bud = run_merge(load_config(write_config(tmp_path / "b.yaml", _branches(family),
                                             budget={"total_bytes": uni["total_bytes"]}, factor_bits=8)),
                    tmp_path / "b", progress=False)
    assert bud["total_bytes"] <= uni["total_bytes"]

    def err(man):
        return sum(e ** 2 for r in man["tensors"]["main"].values() if r["role"] == "compressed"
                   for e in r["rel_error"].values())

    assert err(bud) < 0.5 * err(uni)


def test_quantized_bundle_runs_like_dequantize_then_run(family, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", _branches(family), budget={"branch_bytes": 0.6}, factor_bits="mixed",
                       group_size=32)
    run_merge(load_config(cfg), tmp_path / "b", progress=False)
    ids = torch.tensor([[1, 5, 9, 14, 3, 22], [1, 7, 7, 30, 12, 4]])
    deq = branchmerge.load(tmp_path / "b", dtype="float32")
    inmem = branchmerge.load(tmp_path / "b", dtype="float32", factors="quantized")
    assert any(type(m).__name__ == "QuantizedBranchedLinear" for m in inmem.groups["main"].model.modules())
    for n in "abc":
        export_branch(tmp_path / "b", n, tmp_path / f"x{n}", dtype="float32")
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / f"x{n}", dtype=torch.float32).eval()
        with torch.no_grad():
            want = ref(input_ids=ids).logits
        assert torch.allclose(deq.logits(ids, [n, n]), want, atol=1e-4)
        assert torch.allclose(inmem.logits(ids, [n, n]), want, atol=1e-4)
    mixed = inmem.logits(ids, ["a", "c"])
    assert torch.allclose(mixed, deq.logits(ids, ["a", "c"]), atol=1e-4)
    assert inmem.generate(["abc"], "b", max_new_tokens=4) == deq.generate(["abc"], "b", max_new_tokens=4)


def test_uniform_rate_with_int4_factors(family, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", _branches(family), compress_rate=0.8, factor_bits=4, group_size=32)
    man = run_merge(load_config(cfg), tmp_path / "b", progress=False)
    recs = [r for r in man["tensors"]["main"].values() if r["role"] == "compressed"]
    assert all(r["bits"] == [[4, r["rank"]]] for r in recs if r["rank"] and not r["dense"])
    b = branchmerge.load(tmp_path / "b", dtype="float32")
    assert b.generate(["abc"], "a", max_new_tokens=3)


# ---- bad input -------------------------------------------------------------------------------------
def test_budget_below_the_fixed_part_is_refused_before_work(family, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", _branches(family), budget={"branch_bytes": 0.001})
    code, _, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "out", "--no-progress")
    assert code != 0 and "smallest branch_bytes this merge can meet is" in err, err
    assert not (tmp_path / "out").exists()
    cfg = write_config(tmp_path / "d.yaml", _branches(family), budget={"total_bytes": "10KB"})
    code, _, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "out", "--no-progress")
    assert code != 0 and "total_bytes" in err and "before any factor" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


@pytest.mark.parametrize("extra,needle", [
    ({"budget": {"branch_bytes": 0.1}, "compress_rate": 0.9}, "exclusive"),
    ({"budget": {"branch_bytes": 0.1}, "compress_overrides": [{"pattern": "*", "compress_rate": 0.5}]}, "exclusive"),
    ({"factor_bits": "mixed"}, "needs a `budget`"),
    ({"factor_bits": 3}, "factor_bits"),
    ({"factor_bits": 8, "group_size": 48}, "group_size"),
    ({"budget": {"branch_bytes": 0.1, "total_bytes": "1GB"}}, "exactly one"),
    ({"budget": {"total_bytes": "lots"}}, "budget.total_bytes"),
])
def test_bad_budget_and_bits_configs(family, tmp_path, capsys, extra, needle):
    data = {"branches": _branches(family), "dtype": "float32", **extra}
    (tmp_path / "c.yaml").write_text(json.dumps(data))
    code, _, err = run_cli(capsys, "merge", tmp_path / "c.yaml", "-o", tmp_path / "out", "--no-progress")
    assert code != 0 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_crafted_quantized_records_are_refused(family, tmp_path):
    import shutil

    cfg = write_config(tmp_path / "c.yaml", _branches(family), compress_rate=0.8, factor_bits=8, group_size=32)
    run_merge(load_config(cfg), tmp_path / "b", progress=False)
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    name = next(t for t, r in man["tensors"]["main"].items() if r.get("bits"))
    bad = json.loads(json.dumps(man))
    bad["tensors"]["main"][name]["bits"] = [[8, 999]]  # does not count the record's triplets
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(BundleError, match="bits"):
        branchmerge.load(tmp_path / "c")
    bad["tensors"]["main"][name]["bits"] = man["tensors"]["main"][name]["bits"]
    bad["tensors"]["main"][name]["group_size"] = 64  # the stored scales are per 32 entries
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(BundleError, match="implies"):
        branchmerge.load(tmp_path / "c")


def test_inspect_shows_budget_bits_and_errors(family, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", _branches(family), budget={"branch_bytes": 0.25}, factor_bits="mixed",
                       group_size=32)
    run_merge(load_config(cfg), tmp_path / "b", progress=False)
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "b", "--tensors")
    assert code == 0
    assert "ranks by budget" in out and "budget: branch_bytes 0.25" in out and "mixed 8/4" in out and "factors:" in out
    assert "@8" in out and "@4" in out and "max rel. error" in out


def test_dry_run_with_a_budget_predicts_the_bytes(family, tmp_path, capsys):
    from branchmerge.merge.plan import plan_merge

    cfg = write_config(tmp_path / "c.yaml", _branches(family), budget={"total_bytes": 160_000}, factor_bits=8)
    plan = plan_merge(load_config(cfg))
    code, out, _ = run_cli(capsys, "merge", cfg, "-o", tmp_path / "out", "--dry-run")
    assert code == 0 and "ranks by budget" in out and "for factors" in out and not (tmp_path / "out").exists()
    man = run_merge(load_config(cfg), tmp_path / "b", progress=False)
    assert plan["bundle_bytes"] == 160_000  # fixed parts + what is left for factors = the budget
    assert plan["factor_budget_bytes"] == man["allocation"]["factor_budget_bytes"]  # nothing deduplicated here
    short = write_config(tmp_path / "d.yaml", _branches(family), budget={"total_bytes": 50_000})
    code, out, _ = run_cli(capsys, "merge", short, "-o", tmp_path / "out", "--dry-run")
    assert "short of what the bundle needs" in out


def test_cli_budget_and_bits_overrides(family, tmp_path, capsys):
    data = {"branches": _branches(family), "dtype": "float32"}
    (tmp_path / "c.yaml").write_text(json.dumps(data))
    code, out, err = run_cli(capsys, "merge", tmp_path / "c.yaml", "-o", tmp_path / "b", "--no-progress",
                             "--budget", "0.25", "--factor-bits", "mixed")
    assert code == 0, err
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert man["allocation"]["branch_bytes"] == 0.25 and man["allocation"]["widths"] == [8, 4]
    code, _, err = run_cli(capsys, "merge", tmp_path / "c.yaml", "-o", tmp_path / "c", "--no-progress",
                           "--budget", "lots")
    assert code != 0 and "budget.total_bytes" in err and not (tmp_path / "c").exists()
    code, _, err = run_cli(capsys, "merge", tmp_path / "c.yaml", "-o", tmp_path / "c", "--no-progress",
                           "--budget", "0.25", "--compress-rate", "0.9")
    assert code != 0 and "exclusive" in err
