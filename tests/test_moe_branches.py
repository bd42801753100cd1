"""Fine-tunes of a mixture-of-experts base (Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE) as branches:
each expert compressed as its own weight, the routers kept per branch, every branch answering as its model,
alone and in mixed batches, and exported back as a folder transformers loads."""

import logging

import pytest
import torch
from transformers import (AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,
                          DeepseekV3ForCausalLM, Glm4MoeConfig, Glm4MoeForCausalLM, MixtralConfig, MixtralForCausalLM,
                          OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

import branchmerge
from branchmerge.config import parse_config
from branchmerge.io.bundle import BundleReader
from branchmerge.merge import run_merge
from tests.cli_util import run_cli
from tests.conftest import check_mixed_as_alone, save_char_tokenizer

X = torch.tensor([[1, 5, 9, 3, 7, 11, 4, 20], [1, 8, 2, 30, 6, 12, 40, 9]])
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
KINDS = {
    "mixtral": (MixtralForCausalLM, MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                                                  num_experts_per_tok=2)),
    "qwen2_moe": (Qwen2MoeForCausalLM, Qwen2MoeConfig(**COMMON, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                                      intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                                      qkv_bias=True)),
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(**COMMON, moe_intermediate_size=24, intermediate_size=48,
                                                      num_experts=4, num_experts_per_tok=2, head_dim=16,
                                                      mlp_only_layers=[1])),  # (a dense MLP layer too)
    "olmoe": (OlmoeForCausalLM, OlmoeConfig(**COMMON, intermediate_size=24, num_experts=4, num_experts_per_tok=2)),
}
# MLA attention (low-rank q and kv projections), a sigmoid router with groups and a score-correction bias,
# shared experts, the first layer dense: DeepSeek-V3's layout (Kimi K2's), V2's, and GLM-4.5's
_DS = dict(COMMON, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4,
           num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)
_MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
KINDS |= {
    "deepseek_v3": (DeepseekV3ForCausalLM, DeepseekV3Config(**_DS, **_MLA)),
    "deepseek_v2": (DeepseekV2ForCausalLM, DeepseekV2Config(**_DS, **_MLA)),
    "glm4_moe": (Glm4MoeForCausalLM, Glm4MoeConfig(**dict(_DS, num_key_value_heads=2), attention_bias=True,
                                                   use_qk_norm=True)),
}
SPARSE_LAYERS = {"qwen3_moe": 1, "deepseek_v3": 1, "deepseek_v2": 1, "glm4_moe": 1}  # (the others: 2 of 2)


@pytest.fixture(scope="module")
def moes(tmp_path_factory):
    """Per kind, two fine-tunes of one tiny MoE base (every parameter moved by seeded noise), saved by
    transformers (in the checkpoint layout: one tensor per expert and projection)."""
    root = tmp_path_factory.mktemp("moes")
    out = {}
    for kind, (cls, cfg) in KINDS.items():
        torch.manual_seed(0)
        base = cls(cfg).eval()
        out[kind] = {}
        for i, n in enumerate("ab"):
            m = cls(cfg).eval()
            m.load_state_dict(base.state_dict())
            g = torch.Generator().manual_seed(i + 1)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
            m.save_pretrained(root / f"{kind}-{n}")
            save_char_tokenizer(root / f"{kind}-{n}")
            out[kind][n] = (root / f"{kind}-{n}", m)
    return out


def _merge(models, out, rate):
    cfg = parse_config({"branches": [{"name": n, "model": str(p)} for n, (p, _) in models.items()],
                        "compress_rate": rate, "dtype": "float32"})
    run_merge(cfg, out, progress=False)
    return out


def _hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


@pytest.mark.parametrize("kind", list(KINDS))
def test_moe_fine_tunes_are_branches(moes, tmp_path, caplog, kind):
    """At r=0 each branch is its model exactly, alone and in a mixed batch; every expert's projection is
    compressed as its own weight (no fallback rule), the routers stay per branch; generation runs."""
    with caplog.at_level(logging.WARNING):
        bundle_dir = _merge(moes[kind], tmp_path / "b0", 0.0)
    assert "fallback rule" not in caplog.text
    reader = BundleReader(bundle_dir)
    records = next(iter(reader.manifest.tensors.values()))
    experts = [t for t in records if ".experts.3." in t]
    sparse = SPARSE_LAYERS.get(kind, 2)  # (a dense MLP layer's weights are compressed too)
    assert len(experts) == 3 * sparse and all(records[t].role == "compressed" for t in experts), experts
    if sparse == 1:
        dense = "model.layers.1" if kind == "qwen3_moe" else "model.layers.0"
        assert records[f"{dense}.mlp.gate_proj.weight"].role == "compressed"
    gates = [t for t in records if t.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight",
                                               "shared_expert_gate.weight"))]
    assert gates and all(records[t].role == "per_branch" for t in gates)
    b = branchmerge.load(bundle_dir, dtype="float32")
    want = {n: _hf_logits(m) for n, (_, m) in moes[kind].items()}
    for n in "ab":
        torch.testing.assert_close(b.logits(X, [n, n]), want[n], atol=1e-4, rtol=1e-4)
    check_mixed_as_alone(b, X, want, 6)


@pytest.mark.parametrize("kind", ["deepseek_v3", "glm4_moe"])
def test_routers_stay_float32_in_a_bfloat16_bundle(capsys, moes, tmp_path, kind):
    """transformers keeps DeepSeek's and GLM's router gates (and score-correction biases) in float32 at
    bfloat16 (`_keep_in_fp32_modules_strict`): a rounded gate picks other experts and weighs them otherwise.
    A bfloat16 bundle stores them in float32, unrounded and never compressed (the dry-run's bytes count them
    so), and runs them so: each branch's router gives exactly the routing of its model loaded by transformers at
    bfloat16; the rest of the bundle is bfloat16."""
    models = moes[kind]
    cfg = parse_config({"branches": [{"name": n, "model": str(p)} for n, (p, _) in models.items()],
                        "compress_rate": 0.9, "dtype": "bfloat16"})
    from branchmerge.merge.plan import plan_merge

    plan = plan_merge(cfg)
    d = tmp_path / "b"
    run_merge(cfg, d, progress=False)
    reader = BundleReader(d)
    records = next(iter(reader.manifest.tensors.values()))
    gate = "model.layers.1.mlp.gate.weight"
    assert records[gate].role == "per_branch"
    assert reader.get(f"b.a|{gate}").dtype == torch.float32
    torch.testing.assert_close(reader.get(f"b.a|{gate}"), models["a"][1].model.layers[1].mlp.gate.weight,
                               atol=0, rtol=0)
    assert reader.get("g.main|model.layers.1.mlp.experts.0.up_proj.weight|mean").dtype == torch.bfloat16
    group = next(iter(plan["groups"].values()))
    assert group["bytes"] >= reader.manifest.total_bytes  # (the plan is an upper bound, float32 gates included)
    b = branchmerge.load(d, dtype="bfloat16")
    h = torch.randn(5, COMMON["hidden_size"], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for n, (path, _) in models.items():
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        with torch.no_grad(), b.use(n) as model:
            got = model.model.layers[1].mlp.gate(h)
            want = hf.model.layers[1].mlp.gate(h)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
    assert b.logits(X, ["a", "b"]).dtype == torch.bfloat16
    code, _, err = run_cli(capsys, "export-branch", d, "a", "-o", tmp_path / "exported")  # (at the bundle's dtype)
    assert code == 0, err
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.bfloat16)
    torch.testing.assert_close(exported.model.layers[1].mlp.gate.weight.detach(),
                               models["a"][1].model.layers[1].mlp.gate.weight.detach(), atol=0, rtol=0)


def test_a_bfloat16_baseline_merge_keeps_routers_float32(moes, tmp_path):
    """A linear merge written at bfloat16 keeps the routers' average in float32 (as transformers runs them);
    the experts are bfloat16; transformers loads the folder."""
    from safetensors import safe_open

    models = moes["deepseek_v3"]
    cfg = parse_config({"method": "linear", "dtype": "bfloat16",
                        "branches": [{"name": n, "model": str(p)} for n, (p, _) in models.items()]})
    run_merge(cfg, tmp_path / "m", progress=False)
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        gate = f.get_tensor("model.layers.1.mlp.gate.weight")
        assert f.get_tensor("model.layers.1.mlp.experts.0.up_proj.weight").dtype == torch.bfloat16
    want = (models["a"][1].model.layers[1].mlp.gate.weight + models["b"][1].model.layers[1].mlp.gate.weight) / 2
    assert gate.dtype == torch.float32
    torch.testing.assert_close(gate, want.detach(), atol=1e-6, rtol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    torch.testing.assert_close(merged.model.layers[1].mlp.gate.weight.detach(), gate, atol=0, rtol=0)


def test_compressed_experts_trade_size_for_error_and_export(capsys, moes, tmp_path):
    """Compressing the experts' differences: the bundle shrinks and the branch moves off its model as the
    rate rises (r=1: the normalized average); an exported branch is a folder transformers loads (in the
    checkpoint layout it converts) and answers as the bundle's branch."""
    models = moes["mixtral"]
    errs, sizes = [], []
    for rate in (0.0, 0.5, 1.0):
        d = _merge(models, tmp_path / f"b{rate}", rate)
        sizes.append(BundleReader(d).manifest.total_bytes)
        b = branchmerge.load(d, dtype="float32")
        got = b.logits(X, ["a", "a"])
        errs.append(float((got - _hf_logits(models["a"][1])).norm() / _hf_logits(models["a"][1]).norm()))
    assert errs[0] < 1e-5 < errs[1] < errs[2], errs
    assert sizes[0] > sizes[1] > sizes[2], sizes
    code, _, err = run_cli(capsys, "export-branch", tmp_path / "b0.5", "a", "-o", tmp_path / "exported")
    assert code == 0, err
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    b = branchmerge.load(tmp_path / "b0.5", dtype="float32")
    torch.testing.assert_close(_hf_logits(exported), b.logits(X, ["a", "a"]), atol=1e-4, rtol=1e-4)


def test_moes_in_the_fused_layout_are_branches(family, tmp_path):
    """Mixtrals written by `moe` (transformers 5's fused experts, 3-D tensors, as mergekit-moe writes them)
    are read one 2-D tensor per expert: their experts compress like a checkpoint's, a fused one and a
    checkpoint-layout one (transformers' save_pretrained) join one group, and each branch answers as its
    model, alone and mixed."""
    import yaml

    from branchmerge.io.models import ModelSource
    from branchmerge.moe import build_moe, load_moe_config

    models = {}
    for name, (x, y) in {"ab": ("a", "b"), "bc": ("b", "c")}.items():
        data = {"base_model": str(family[x][0]), "gate_mode": "random", "dtype": "float32",  # (attention: a's, b's)
                "experts": [{"source_model": str(family[x][0])}, {"source_model": str(family[y][0])}]}
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(data))
        build_moe(load_moe_config(tmp_path / f"{name}.yml"), tmp_path / name, progress=False)
        models[name] = (tmp_path / name, AutoModelForCausalLM.from_pretrained(tmp_path / name).eval())
    src = ModelSource.open("ab", str(tmp_path / "ab"))
    assert "model.layers.0.mlp.experts.gate_up_proj" not in src.names()
    w3 = src.get("model.layers.1.block_sparse_moe.experts.1.w3.weight")  # expert 1 is b: its up_proj
    torch.testing.assert_close(w3, family["b"][1].model.layers[1].mlp.up_proj.weight)
    assert src.shape("model.layers.1.block_sparse_moe.experts.1.w2.weight") == tuple(w3.shape[::-1])
    models["bc"][1].save_pretrained(tmp_path / "bc-ckpt")  # the same model in the checkpoint layout
    models["bc"] = (tmp_path / "bc-ckpt", models["bc"][1])
    bundle_dir = _merge(models, tmp_path / "bundle", 0.5)
    reader = BundleReader(bundle_dir)
    assert len(reader.groups) == 1
    records = next(iter(reader.manifest.tensors.values()))
    assert records["model.layers.0.block_sparse_moe.experts.0.w1.weight"].role == "compressed"
    assert records["model.layers.0.block_sparse_moe.gate.weight"].role != "compressed"  # (equal random gates)
    b = branchmerge.load(bundle_dir, dtype="float32")
    ref = branchmerge.load(_merge(models, tmp_path / "exact", 0.0), dtype="float32")
    for n in models:
        torch.testing.assert_close(ref.logits(X, [n, n]), _hf_logits(models[n][1]), atol=1e-4, rtol=1e-4)
    mixed = b.logits(X, ["bc", "ab"])
    torch.testing.assert_close(mixed[0], b.logits(X[:1], ["bc"])[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[1], b.logits(X[1:], ["ab"])[0], atol=1e-4, rtol=1e-4)


def test_moe_branches_through_the_triton_kernels(moes, tmp_path):
    """The experts' and attention's branched layers in Triton's kernels (the interpreter here) give the torch
    path's logits in a mixed batch."""
    d = _merge(moes["qwen2_moe"], tmp_path / "b", 0.5)
    torch_b = branchmerge.load(d, dtype="float32", kernels="torch")
    tri_b = branchmerge.load(d, dtype="float32", kernels="triton")
    assert tri_b.kernels == "triton"
    torch.testing.assert_close(tri_b.logits(X, ["b", "a"]), torch_b.logits(X, ["b", "a"]), atol=1e-4, rtol=1e-4)


def test_export_vllm_of_an_moe_bundle_is_dense_only(capsys, moes, tmp_path):
    """vLLM's LoRAs cannot carry per-expert differences or routers: the LoRA export refuses by name and
    leaves nothing; --mode dense writes each branch as a folder transformers loads."""
    d = _merge(moes["mixtral"], tmp_path / "b", 0.5)
    code, _, err = run_cli(capsys, "export-vllm", d, "-o", tmp_path / "v")
    assert code != 0 and "mixture of experts" in err and "--mode dense" in err and not (tmp_path / "v").exists()
    code, _, err = run_cli(capsys, "export-vllm", d, "-o", tmp_path / "v", "--mode", "dense")
    assert code == 0, err
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "v" / "b", dtype=torch.float32).eval()
    torch.testing.assert_close(_hf_logits(exported), branchmerge.load(d, dtype="float32").logits(X, ["b", "b"]),
                               atol=1e-4, rtol=1e-4)


def test_extract_lora_from_an_moe_fine_tune(capsys, moes, tmp_path):
    """A LoRA cannot carry a change to an expert or a router (PEFT cannot target transformers' fused experts or
    its routers): refused by name, nothing written; leaving them out, the adapter loads with PEFT and carries
    the attention's change."""
    from peft import PeftModel

    (a, _), (b, model_b) = moes["mixtral"]["a"], moes["mixtral"]["b"]
    code, _, err = run_cli(capsys, "extract-lora", b, "--base", a, "-o", tmp_path / "lora", "--rank", "32")
    assert code != 0 and "block_sparse_moe" in err and "--exclude" in err and not (tmp_path / "lora").exists()
    code, _, err = run_cli(capsys, "extract-lora", b, "--base", a, "-o", tmp_path / "lora", "--rank", "32",
                           "--exclude", "experts|gate", "--skip-undecomposable")
    assert code == 0, err
    base = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    q = peft.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        merged_q = q.get_base_layer().weight + q.get_delta_weight("default")
    torch.testing.assert_close(merged_q, model_b.model.layers[0].self_attn.q_proj.weight, atol=1e-5, rtol=1e-4)


def test_an_moe_bundle_served_answers_mixed_requests_as_alone(moes, tmp_path):
    """Served over HTTP (the openai SDK as client): concurrent requests for both branches of a Qwen2-MoE
    bundle run as one mixed batch and answer as each does alone."""
    from tests.serving import served_together

    b = branchmerge.load(_merge(moes["qwen2_moe"], tmp_path / "b", 0.5), dtype="float32")
    prompts = [("abc", "a"), ("hello", "b"), ("xyz", "b"), ("key", "a")]
    expected = [b.generate(p, n, chat=False, max_new_tokens=5, do_sample=False)[0] for p, n in prompts]
    got, batches, _ = served_together(b, prompts)
    assert got == expected and batches == 1


def test_a_config_claiming_more_experts_than_stored_is_refused_at_once(moes, tmp_path):
    """A bundle is input: a branch config claiming a million experts is refused naming both counts, before a
    module (or a shape to check) is made for each claimed expert."""
    import json

    from branchmerge.errors import BundleError

    d = _merge(moes["mixtral"], tmp_path / "b", 0.5)
    m = json.loads((d / "manifest.json").read_text())
    for b in ("a", "b"):
        m["branches"][b]["hf_config"]["num_local_experts"] = 1_000_000
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="has 1000000 experts, but the bundle stores tensors for 4"):
        branchmerge.load(d, dtype="float32")


def test_float32_lookup_takes_only_transformers_model_classes():
    """A config is input: its `architectures` names are looked up as transformers' own model classes only —
    dunder names, dotted paths and non-model attributes give no float32 rule, and nothing is imported or run."""
    from branchmerge.architectures import float32_tensors

    hostile = {"architectures": ["__class__", "os.system", "AutoConfig", "logging", "__import__"],
               "model_type": "no_such_model"}
    keep = float32_tensors(hostile, torch.bfloat16)
    assert not keep("model.layers.1.mlp.gate.weight") and not keep("e_score_correction_bias")
    real = float32_tensors({"architectures": ["__class__", "DeepseekV3ForCausalLM"]}, torch.bfloat16)
    assert real("model.layers.1.mlp.gate.weight") and not real("model.layers.1.mlp.experts.0.up_proj.weight")
    assert not float32_tensors({"architectures": ["DeepseekV3ForCausalLM"]}, torch.float32)("mlp.gate.weight")
