"""Triton kernels of the branched layer against the torch reference, in Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest): `make test` runs a subset, `make test-kernels` every case."""

from __future__ import annotations

import os

import pytest
import torch

import branchmerge
from branchmerge.runtime import kernels


def _layer(n: int, rank: int, kp: int, k_in: int, n_out: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n_out, k_in, generator=g)
    v = torch.zeros(n * kp, k_in)
    ut = torch.zeros(n * kp, n_out)
    for b in range(n):
        v[b * kp:b * kp + rank] = torch.randn(rank, k_in, generator=g)
        ut[b * kp:b * kp + rank] = torch.randn(rank, n_out, generator=g) * 0.3
    scales = torch.rand(n, generator=g) + 0.5
    b_cat = torch.randn(n, n_out, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(mean), cast(v), cast(ut), scales.to(dtype), cast(b_cat)


def _reference(x, mean, v, ut, scales, kp, ids, bias):
    """The branched layer's definition, row by row, in float64 from the same (rounded) weights."""
    out = []
    for r in range(x.shape[0]):
        b = ids[r]
        vb, ub = v[b * kp:(b + 1) * kp].double(), ut[b * kp:(b + 1) * kp].double()
        y = scales[b].double() * (x[r].double() @ mean.double().T) + (x[r].double() @ vb.T) @ ub
        out.append(y if bias is None else y + bias[b].double())
    return torch.stack(out)


# where the kernel cases run: here the interpreter on CPU tensors; bench/gpu.sh runs them compiled on a GPU
# (BRANCHMERGE_KERNEL_DEVICE=cuda TRITON_INTERPRET=0) before it measures anything
DEV = torch.device(os.environ.get("BRANCHMERGE_KERNEL_DEVICE", "cpu"))


def _on(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


def _tol(dtype: torch.dtype) -> float:
    if dtype != torch.float32:
        return 2e-2  # bfloat16 and float16: rounding of inputs and output
    return 1e-4 if DEV.type == "cpu" else 5e-3  # a GPU's float32 dots run in TF32


def _check(rows, n, rank, kp, dtype, bias, ids=None, seed=0, k_in=48, splits=None):
    n_out = 40
    mean, v, ut, scales, b_cat = _layer(n, rank, kp, k_in, n_out, dtype, bias, seed)
    x = torch.randn(rows, k_in, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    if ids is None:
        ids = torch.randint(0, n, (rows,), generator=torch.Generator().manual_seed(seed + 2))
    xd, md, vd, utd, sd, bd = _on(x, mean, v, ut, scales, b_cat)
    y = kernels.branched_linear(xd, md, vd, utd, sd, kp, ids if isinstance(ids, torch.Tensor) else int(ids), bd,
                                splits=splits).cpu()
    want = _reference(x, mean, v, ut, scales, kp, ids if isinstance(ids, torch.Tensor) else [ids] * rows, b_cat)
    assert y.shape == (rows, n_out) and y.dtype == dtype
    err = float((y.double() - want).abs().max() / want.abs().max())
    assert err < _tol(dtype), err


# ---- the subset `make test` runs --------------------------------------------------------------------
def test_single_branch_decode_and_prefill_rows():
    for rows in (1, 17):
        _check(rows, n=3, rank=5, kp=5, dtype=torch.float32, bias=True, ids=1)


def test_mixed_rows_uneven_segments_with_an_empty_one():
    ids = torch.tensor([2, 0, 0, 2, 2, 2, 0, 3, 2, 0, 0])  # branch 1 has no rows; 3 has one
    _check(11, n=4, rank=13, kp=13, dtype=torch.float32, bias=True, ids=ids)
    _check(11, n=4, rank=13, kp=16, dtype=torch.float32, bias=False, ids=ids)  # zero-padded ranks (fused layout)


def test_shrink_split_over_the_input_dimension():
    """Decode on a GPU splits the shrink's K loop across programs, each storing its own slice; the expand
    must add every slice, also when the last split is short and when a split count does not divide the
    input (nor is a power of two)."""
    ids = torch.tensor([1, 0, 1])
    for splits in (2, 3, 7):
        _check(3, n=2, rank=6, kp=8, dtype=torch.float32, bias=True, ids=ids, k_in=200, splits=splits)
    _check(1, n=2, rank=6, kp=8, dtype=torch.float32, bias=False, ids=1, k_in=1000)  # the default: 4 programs per SM-ish
    assert kernels.split_k(14336, 7, 64, torch.device("cpu")) == (1, 14336)  # 8 programs' worth of 4 SMs: no split
    assert kernels.split_k(14336, 1, 64, torch.device("cpu")) == (8, 1792)
    assert kernels.split_k(100, 1, 64, torch.device("cpu")) == (1, 128)  # too short to split
    # an 8B down_proj decode step on a 132-SM GPU: 7 rank chunks, 16 splits (the cap) of 896 columns
    assert kernels.split_k(14336, 7, 64, torch.device("cuda")) == (16, 896)
    # 32-row tiles (a batch of 17 to 32 rows) load at most 8 slices at once, 64-row tiles 4 (registers)
    assert kernels.split_k(14336, 7, 64, torch.device("cuda"), rows=32) == (8, 1792)
    assert kernels.split_k(14336, 3, 64, torch.device("cuda"), rows=64) == (4, 3584)


def _check_siblings(rows, outs, ranks, kps, dtype, bias, ids, splits=None, k_in=56):
    """Sibling layers (q/k/v) as one call: concatenated buffers and a member table, against each
    member's own reference; column tiles of 32 straddle members whose widths are not multiples of 32."""
    n = 3
    layers = [_layer(n, rk, kp, k_in, out, dtype, bias, seed=7 * j + rk) for j, (out, rk, kp) in
              enumerate(zip(outs, ranks, kps))]
    x = torch.randn(rows, k_in, generator=torch.Generator().manual_seed(rows)).to(dtype)
    ids_list = ids.tolist() if isinstance(ids, torch.Tensor) else [ids] * rows
    want = torch.cat([_reference(x, mean, v, ut, sc, kp, ids_list, b) for (mean, v, ut, sc, b), kp in zip(layers, kps)], 1)
    table = kernels.member_table(list(outs), list(kps), n, DEV)
    cat = lambda i: torch.cat([la[i].reshape(-1) if i in (2, 3, 4) else la[i] for la in layers]).to(DEV)  # noqa: E731
    y = kernels.branched_linear(x.to(DEV), cat(0), cat(1), cat(2), cat(3), sum(kps), ids, cat(4) if bias else None,
                                splits=splits, members=table).cpu()
    assert y.shape == (rows, sum(outs))
    err = float((y.double() - want).abs().max() / want.abs().max())
    assert err < _tol(dtype), err


def test_sibling_layers_run_as_one_call():
    ids = torch.tensor([2, 0, 0, 2, 1, 2, 0])
    _check_siblings(7, outs=(40, 24, 24), ranks=(5, 3, 3), kps=(8, 3, 3), dtype=torch.float32, bias=True, ids=ids)
    _check_siblings(1, outs=(64, 32, 32), ranks=(13, 6, 6), kps=(16, 8, 8), dtype=torch.float32, bias=False, ids=1,
                    splits=2)
    _check_siblings(5, outs=(48, 80), ranks=(9, 4), kps=(9, 4), dtype=torch.bfloat16, bias=True, ids=2)  # gate/up


@pytest.mark.kernels_full
@pytest.mark.parametrize("rows", [1, 3, 16, 33])
@pytest.mark.parametrize("outs,ranks,kps", [((40, 24, 24), (5, 3, 3), (8, 3, 3)), ((32, 32), (1, 20), (8, 24)),
                                            ((96, 16, 16), (33, 2, 2), (40, 8, 8))])
@pytest.mark.parametrize("bias", [True, False])
def test_every_sibling_case(rows, outs, ranks, kps, bias):
    ids = torch.randint(0, 3, (rows,), generator=torch.Generator().manual_seed(rows))
    _check_siblings(rows, outs, ranks, kps, torch.float32, bias, ids)
    _check_siblings(rows, outs, ranks, kps, torch.float32, bias, 0, splits=3)


def test_bfloat16_within_tolerance():
    _check(9, n=3, rank=7, kp=8, dtype=torch.bfloat16, bias=True)


def test_autotuning_tries_each_row_bucket_its_own_configs():
    """On CUDA each config is a compile: decode buckets try GEMV-like tiles, prefill GEMM-like ones."""
    prune = kernels._expand_tuned.early_config_prune
    for bucket, want in ((16, kernels.DECODE_CONFIGS), (32, kernels.DECODE_CONFIGS), (64, kernels.PREFILL_CONFIGS)):
        got = prune(kernels._expand_tuned.configs, {"M_BUCKET": bucket})
        assert sorted((c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.num_stages) for c in got) == sorted(want)


def test_segments_group_rows_by_branch():
    idx, tb, ts, te = kernels.segments(torch.tensor([1, 0, 1, 1, 0]), 5, 16, torch.device("cpu"))
    assert idx.tolist() == [1, 4, 0, 2, 3] and tb.tolist() == [0, 1] and ts.tolist() == [0, 2] and te.tolist() == [2, 5]
    idx, tb, ts, te = kernels.segments(torch.tensor([0] * 40), 40, 16, torch.device("cpu"))
    assert tb.tolist() == [0, 0, 0] and ts.tolist() == [0, 16, 32] and te.tolist() == [40] * 3


def test_mixed_rows_share_one_pass_over_the_mean():
    """The shrink reads each branch's V over that branch's rows; the expand reads W̄ once per tile of
    consecutive rows, whatever their branches (a decode batch of 8 over 3 branches is one tile, not 3)."""
    t = kernels.tiles(torch.tensor([1, 0, 1, 1, 0]), 5, torch.device("cpu"))
    assert t.shrink[1].tolist() == [0, 1] and t.expand[2].tolist() == [0] and t.expand[3].tolist() == [5]
    assert t.row_branch.tolist() == [1, 0, 1, 1, 0] and t.expand[0].tolist() == [0, 1, 2, 3, 4]
    t = kernels.tiles(torch.tensor([2] * 20 + [0] * 20), 40, torch.device("cpu"))  # 32-row tiles
    assert t.expand[2].tolist() == [0, 32] and t.expand[3].tolist() == [32, 40] and t.shrink[1].tolist() == [0, 2]
    one = kernels.tiles(3, 7, torch.device("cpu"))
    assert one.row_branch is None and one.expand is one.shrink


def test_whole_model_triton_equals_torch(bundles):
    torch_b = branchmerge.load(bundles[0.9], dtype="float32", kernels="torch")
    tri_b = branchmerge.load(bundles[0.9], dtype="float32", kernels="triton")
    assert tri_b.kernels == "triton" and any(getattr(m, "use_triton", False) for m in tri_b.groups["main"].model.modules())
    layer = tri_b.groups["main"].model.model.layers[0]
    assert layer.self_attn.q_proj.sibling is layer.self_attn.v_proj.sibling is not None  # q/k/v as one call
    assert layer.mlp.gate_proj.sibling is not None and layer.mlp.down_proj.sibling is None
    assert tri_b.memory_bytes() == torch_b.memory_bytes()  # the members' weights are views: no second copy
    ids = torch.tensor([[1, 5, 9, 14, 3, 22, 7], [1, 7, 7, 30, 12, 4, 9], [1, 3, 3, 3, 3, 3, 3]])
    for names in (["a", "a", "a"], ["a", "c", "b"], ["c", "a", "c"]):
        want, got = torch_b.logits(ids, names), tri_b.logits(ids, names)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), names
    prompts = ["abc", "hello", "xyz"]
    assert tri_b.generate(prompts, ["a", "b", "c"], max_new_tokens=4) == torch_b.generate(prompts, ["a", "b", "c"],
                                                                                           max_new_tokens=4)


def test_kernels_choice_is_checked(monkeypatch):
    cpu = torch.device("cpu")
    assert kernels.resolve("auto", cpu) == "torch"  # the interpreter is never picked by itself
    with pytest.raises(ValueError, match="kernels must be"):
        kernels.resolve("cuda", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA, or TRITON_INTERPRET=1"):
        kernels.resolve("triton", cpu)


def test_static_cache_generate_equals_the_eager_path(bundles):
    eager = branchmerge.load(bundles[0.9], dtype="float32")
    static = branchmerge.load(bundles[0.9], dtype="float32", static_cache=True)
    prompts = ["abc", "hello there", "xyz"]
    for names in (["a", "a", "a"], ["a", "b", "c"]):
        assert static.generate(prompts, names, max_new_tokens=6) == eager.generate(prompts, names, max_new_tokens=6)


# ---- every case: `make test-kernels` ----------------------------------------------------------------
@pytest.mark.kernels_full
@pytest.mark.parametrize("rows", [1, 2, 7, 16, 17, 33, 64])
@pytest.mark.parametrize("rank,kp", [(1, 1), (5, 8), (13, 13), (24, 24), (33, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_case(rows, rank, kp, dtype):
    _check(rows, n=3, rank=rank, kp=kp, dtype=dtype, bias=rows % 2 == 1, seed=rows * 7 + rank)
    _check(rows, n=3, rank=rank, kp=kp, dtype=dtype, bias=False, ids=2, seed=rows)


def test_a_failing_or_wrong_kernel_turns_itself_off(bundles, monkeypatch, caplog):
    torch_b = branchmerge.load(bundles[0.9], dtype="float32", kernels="torch")
    tri_b = branchmerge.load(bundles[0.9], dtype="float32", kernels="triton")
    ids = torch.tensor([[1, 5, 9, 14], [1, 7, 7, 30]])
    want = torch_b.logits(ids, ["a", "b"])
    for broken in (lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no kernel image for this GPU")),
                   lambda x, mean, *a, **k: torch.zeros(x.shape[0], mean.shape[0], dtype=x.dtype)):
        monkeypatch.setitem(kernels.STATE, "ok", True)
        monkeypatch.setitem(kernels.STATE, "checked", False)
        monkeypatch.setattr(kernels, "branched_linear", broken)
        with caplog.at_level("WARNING"):
            got = tri_b.logits(ids, ["a", "b"])
        assert torch.allclose(got, want, atol=1e-5)  # the answer never suffers
        assert kernels.STATE["ok"] is False and "turned off" in caplog.text


def test_a_single_branch_forward_compiles_without_graph_breaks(loaded):
    """What CUDA graphs need (static_cache=True lets transformers compile the decode step): one branch's
    whole forward is one graph for torch.compile — no Python-level branch selection breaks it."""
    g = loaded[0.9].groups["main"]
    ids = torch.tensor([[1, 5, 9, 14, 3, 22]])
    torch._dynamo.reset()
    with g.state.select(branch=1), torch.no_grad():
        exp = torch._dynamo.explain(g.model)(input_ids=ids)
    assert exp.graph_count == 1 and exp.graph_break_count == 0, [str(r.reason)[:200] for r in exp.break_reasons]


def test_gpu_bench_script_rehearses_on_cpu(tmp_path):
    """bench/gpu.sh is what a session with a lent GPU runs in its few minutes: rehearsed here at the tiny
    shape (CPU, no Triton), so a broken step is found before device time is spent on it."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PY": sys.executable, "DEVICE": "cpu", "SHAPES": "tiny", "IN_MEMORY": "tiny",
           "LAYOUTS": "split,fused", "IN_MEMORY_LAYOUTS": "split,fused", "REPEAT": "1", "OUT": str(tmp_path),
           # the GPU's sampler shape (64 rows, 1024-token prompts) took over its 30 s on two busy CPU cores
           "SAMPLER_ROWS": "16", "SAMPLER_PROMPT": "256", "SAMPLER_LIMIT": "120", "KERNEL_TESTS_LIMIT": "300"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(["bash", str(root / "bench" / "gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    bundles = (tmp_path / "bundles.log").read_text()
    in_memory = (tmp_path / "in_memory.log").read_text()
    assert "pydantic" in (tmp_path / "env.log").read_text()
    cases = (tmp_path / "kernel_tests.log").read_text()  # the kernel cases (compiled, on a GPU) come first
    assert re.search(r"\b[5-9] passed", cases) and "failed" not in cases, cases[-2000:]
    for layout in ("split", "fused"):
        assert re.search(rf"\| tiny \| {layout}: eager decode, batch 1, .*\| \d+\.\d+ \(quartiles", bundles)
        assert re.search(rf"\| tiny \| {layout}: static-cache \(not captured\) decode step, batch 8, ", bundles)
        assert re.search(rf"\| tiny \(in memory\) \| {layout}: CUDA graph decode, batch 8 mixed: .*\| \d", in_memory)
    err = float(re.search(r"fused vs split logits, mixed batch: relative error (\S+)", bundles).group(1))
    assert err < 2e-2
    assert "static cache + graphs gives the eager tokens: True" in bundles
    assert re.search(r"\| whole batch \(RowSampler.adjust\) \| \d+\.\d+ \|", (tmp_path / "sampler.log").read_text())
    for layout in ("split", "fused"):  # the targets' verdicts, one per layout and step with a target
        assert len(re.findall(rf"\| tiny \| {layout} \| (decode, batch 1|decode, batch 8 mixed|prefill, \d+ tokens) \| "
                              r"\d+\.\d+ \| ≤ 1\.\d+ \| (met|missed) \|", in_memory)) == 3


def test_siblings_never_serve_a_stale_output(bundles):
    """A sibling's cached output is for one input tensor, unchanged, under one branch selection: another
    input, the same one changed in place, or another branch all compute afresh."""
    torch_b = branchmerge.load(bundles[0.9], dtype="float32", kernels="torch")
    tri_b = branchmerge.load(bundles[0.9], dtype="float32", kernels="triton")
    att_t = torch_b.groups["main"].model.model.layers[1].self_attn
    att = tri_b.groups["main"].model.model.layers[1].self_attn
    g_t, g = torch_b.groups["main"].state, tri_b.groups["main"].state
    x = torch.randn(2, 5, att.q_proj.in_features)
    with torch.no_grad(), g.select(branch=0), g_t.select(branch=0):
        assert torch.allclose(att.q_proj(x), att_t.q_proj(x), atol=1e-5)
        other = torch.randn_like(x)
        assert torch.allclose(att.k_proj(other), att_t.k_proj(other), atol=1e-5)  # not q's input
        assert torch.allclose(att.q_proj(x), att_t.q_proj(x), atol=1e-5)
        x.mul_(2)  # the same tensor, changed in place
        assert torch.allclose(att.k_proj(x), att_t.k_proj(x), atol=1e-5)
        assert torch.allclose(att.v_proj(x), att_t.v_proj(x), atol=1e-5)
        assert att.q_proj.sibling._cache is None  # the last sibling let the outputs go
        att.q_proj(x)
    with torch.no_grad(), g.select(branch=2), g_t.select(branch=2):
        assert torch.allclose(att.k_proj(x), att_t.k_proj(x), atol=1e-5)  # another branch, the same x
    model = tri_b.groups["main"].model
    model.to(torch.float64)  # a move or cast leaves the group's buffers behind: the members go one by one
    assert att.q_proj.sibling is None
    with torch.no_grad(), g.select(branch=1), g_t.select(branch=1):
        assert torch.allclose(att.v_proj(x.double()).float(), att_t.v_proj(x), atol=1e-5)


def test_the_triton_path_compiles_without_graph_breaks(bundles, monkeypatch):
    """What transformers' compiled static-cache decode needs on a GPU: the Python around the kernels
    (the first-use check, sibling groups and their cached outputs, row tiles) traces into one graph.
    The interpreter itself cannot be traced, so a torch stand-in takes the kernel's place here."""
    tri_b = branchmerge.load(bundles[0.9], dtype="float32", kernels="triton")
    monkeypatch.setitem(kernels.STATE, "ok", True)
    monkeypatch.setitem(kernels.STATE, "checked", True)
    calls = []
    monkeypatch.setattr(kernels, "branched_linear",
                        lambda x, mean, *a, members=None, **k: calls.append(members is not None) or x @ mean.T)
    g = tri_b.groups["main"]
    torch._dynamo.reset()
    with g.state.select(branch=1), torch.no_grad():
        exp = torch._dynamo.explain(g.model)(input_ids=torch.tensor([[1, 5, 9, 14, 3, 22]]))
    assert exp.graph_break_count == 0 and exp.graph_count == 1, [str(r.reason)[:300] for r in exp.break_reasons]
    layers = len(g.model.model.layers)
    assert calls.count(True) == 2 * layers and calls.count(False) == 2 * layers  # q/k/v, gate/up; o, down


def test_a_long_one_branch_prefill_leaves_the_mean_gemm_to_torch(bundles, monkeypatch):
    """Past ``triton_max_rows`` rows of one branch the layer takes the torch path (cuBLAS on a GPU); mixed
    rows and decode-sized inputs keep the kernels."""
    from branchmerge.runtime.modules import BranchedLinear

    torch_b = branchmerge.load(bundles[0.9], dtype="float32", kernels="torch")
    tri_b = branchmerge.load(bundles[0.9], dtype="float32", kernels="triton")
    monkeypatch.setattr(BranchedLinear, "triton_max_rows", 100)
    real, calls = kernels.branched_linear, []
    monkeypatch.setattr(kernels, "branched_linear", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    ids = torch.randint(3, 60, (3, 40), generator=torch.Generator().manual_seed(0))
    for names, used in ((["b"] * 3, False), (["a", "b", "a"], True), (["c"], True)):
        calls.clear()
        rows = ids[:len(names)]
        assert torch.allclose(tri_b.logits(rows, names), torch_b.logits(rows, names), atol=1e-4)
        assert bool(calls) is used and all(n == rows.numel() for n in calls), (names, calls)


def test_load_checks_the_kernels_before_any_request(bundles, monkeypatch):
    """load(kernels="triton") runs one token through each model, so the kernels' first-use comparison
    with the torch path happens at load (eagerly), not inside a user's compiled or captured step."""
    monkeypatch.setitem(kernels.STATE, "ok", True)
    monkeypatch.setitem(kernels.STATE, "checked", False)
    branchmerge.load(bundles[0.9], dtype="float32", kernels="torch")
    assert kernels.STATE["checked"] is False
    branchmerge.load(bundles[0.9], dtype="float32", kernels="triton")
    assert kernels.STATE["checked"] is True and kernels.STATE["ok"] is True


def test_mixed_rows_compile_to_one_graph_once_their_plan_exists(loaded):
    """transformers runs the prefill eagerly and compiles the decode steps: by then the rows' plan (built
    from their branch ids, data-dependent) exists, and a mixed batch's forward is one graph."""
    g = loaded[0.9].groups["main"]
    ids = torch.tensor([[1, 5, 9, 14, 3, 22]] * 3)
    torch._dynamo.reset()
    with g.state.select(rows=[0, 2, 1]), torch.no_grad():
        g.model(input_ids=ids)  # the eager prefill
        exp = torch._dynamo.explain(g.model)(input_ids=ids)
    assert exp.graph_break_count == 0 and exp.graph_count == 1, [str(r.reason)[:300] for r in exp.break_reasons]


def test_kernels_that_fail_at_load_leave_the_torch_layout(bundles, monkeypatch, caplog):
    """A GPU whose kernels fail (or disagree) on the load-time token gets the bundle rebuilt for the torch
    paths (the fused layout on CUDA), not the kernels' split layout served through the fallback."""
    monkeypatch.setitem(kernels.STATE, "ok", True)
    monkeypatch.setitem(kernels.STATE, "checked", False)
    monkeypatch.setattr(kernels, "branched_linear",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no kernel image for this GPU")))
    with caplog.at_level("WARNING"):
        b = branchmerge.load(bundles[0.9], dtype="float32", kernels="triton")
    assert b.kernels == "torch" and "no kernel image" in caplog.text
    mods = list(b.groups["main"].model.modules())
    assert not any(getattr(m, "use_triton", False) or getattr(m, "sibling", None) for m in mods)
    ref = branchmerge.load(bundles[0.9], dtype="float32", kernels="torch")
    ids = torch.tensor([[1, 5, 9, 14], [1, 7, 7, 30]])
    assert torch.allclose(b.logits(ids, ["a", "c"]), ref.logits(ids, ["a", "c"]), atol=1e-5)


def _shared_memory_check(which: str, arch: int) -> str:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    cmd = [sys.executable, str(root / "bench" / "kernel_smem.py"), "--which", which, "--arch", str(arch)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_the_largest_tiles_fit_in_a_hopper_sms_shared_memory():
    """Compiled for sm_90 (no GPU needed): the biggest autotuning config of each row bucket, with every
    split-K slice of ``h`` to sum, fits in an H100/H200's 227 KB, and the slices do not multiply it (the
    first GPU run lost its kernels to that: the pipeliner multi-buffered the slices' loads, 288 KB)."""
    out = _shared_memory_check("largest", 90)
    assert "every case fits" in out and out.count("| fits") == 5, out


@pytest.mark.kernels_full
@pytest.mark.parametrize("arch", [90, 80])
def test_every_tile_config_fits_in_shared_memory(arch):
    out = _shared_memory_check("all", arch)
    assert "every case fits" in out and "OVER" not in out, out
