"""Decoder families beyond Llama's as branches: for each, two fine-tunes of one tiny base merged at r=0 answer
exactly as their models, alone and mixed in one batch (generation included), and an exported branch is a folder
transformers loads and that answers as its model. Families with a template merge without the fallback rule,
and a dense template compresses what the fallback rule would (the template adds names and kernels' siblings,
not other choices)."""

import logging

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import branchmerge
from branchmerge.architectures import fallback_role, known
from branchmerge.config import parse_config
from branchmerge.io.bundle import BundleReader
from branchmerge.merge import run_merge
from tests.cli_util import run_cli
from tests.conftest import check_mixed_as_alone, save_char_tokenizer

SPLIT = {"gemma3n"}
X = torch.tensor([[1, 5, 9, 3, 7, 11, 4, 20], [1, 8, 2, 30, 6, 12, 40, 9]])
_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_C = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
          max_position_embeddings=128, tie_word_embeddings=False, **_IDS)
_GQA = dict(_C, num_key_value_heads=2)
_GPT = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128, **_IDS)
# model class, config class, config fields, whether a packaged template covers it
FAMILIES = {
    "phi": ("Phi", dict(_C, qk_layernorm=True), True),
    "phi3": ("Phi3", _GQA, True),
    "gemma": ("Gemma", dict(_GQA, head_dim=8), True),
    "falcon": ("Falcon", dict(_C, new_decoder_architecture=True, num_kv_heads=2), True),
    "falcon_old": ("Falcon", dict(_C, new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                                  bias=True), True),
    "gpt_neox": ("GPTNeoX", _C, True),
    "stablelm": ("StableLm", _GQA, True),
    "starcoder2": ("Starcoder2", _GQA, True),
    "granite": ("Granite", dict(_GQA, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0,
                                attention_multiplier=0.2), True),
    "cohere": ("Cohere", _GQA, True),
    "olmo3": ("Olmo3", _GQA, True),
    "opt": ("OPT", dict(_C, ffn_dim=48, word_embed_proj_dim=32), True),
    "bloom": ("Bloom", dict(vocab_size=64, hidden_size=32, n_layer=2, n_head=4, **_IDS), True),
    "smollm3": ("SmolLM3", _GQA, True),
    "exaone4": ("Exaone4", _GQA, True),
    "glm4": ("Glm4", dict(_GQA, head_dim=8), True),
    "seed_oss": ("SeedOss", dict(_GQA, head_dim=8), True),
    "hunyuan_dense": ("HunYuanDenseV1", dict(_GQA, head_dim=8), True),
    "ernie4_5": ("Ernie4_5", dict(_GQA, head_dim=8), True),
    "arcee": ("Arcee", _GQA, True),
    "nemotron": ("Nemotron", _GQA, True),
    "granitemoe": ("GraniteMoe", dict(_GQA, num_local_experts=4, num_experts_per_tok=2), True),
    "granitemoeshared": ("GraniteMoeShared", dict(_GQA, num_local_experts=4, num_experts_per_tok=2,
                                                  shared_intermediate_size=40), True),
    "gptj": ("GPTJ", dict(_GPT, rotary_dim=4), True),
    "codegen": ("CodeGen", dict(_GPT, rotary_dim=4, n_ctx=128), True),
    "gpt_bigcode": ("GPTBigCode", _GPT, True),
    "mpt": ("Mpt", dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=128, **_IDS), True),
    "mpt_biased": ("Mpt", dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=128, no_bias=False,
                               **_IDS), True),
    # on the fallback rule (a warning names it), and still exact
    "persimmon": ("Persimmon", _C, False),
    "granite_swa": ("GraniteSWA", dict(_GQA, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                                       layer_rope_theta=[10000.0, 10000.0]), False),
    # attention sinks per branch (taken per row inside the attention function), as gpt-oss's and Granite-SWA's
    "flint": ("Flint", dict(_GQA, head_dim=8, sliding_window=4, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=24, shared_expert_intermediate_size=24, mlp_only_layers=[0],
                            layer_types=["sliding_attention", "full_attention"]), True),
    "mimo_v2_flash": ("MiMoV2Flash", dict(_GQA, head_dim=8, v_head_dim=8, moe_intermediate_size=24, n_routed_experts=4,
                                          num_experts_per_tok=2, mlp_layer_types=["dense", "sparse"], sliding_window=4,
                                          layer_types=["sliding_attention", "full_attention"]), True),
    # routers and fused experts of their own forward (gpt-oss, Llama 4), run per expert
    "gpt_oss": ("GptOss", dict(_GQA, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                               layer_types=["sliding_attention", "full_attention"]), True),
    "llama4": ("Llama4Text", dict(_GQA, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
                                  intermediate_size_mlp=48, interleave_moe_layer_step=1), True),
    "llama4_dense_too": ("Llama4Text", dict(_GQA, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                            intermediate_size_mlp=40, interleave_moe_layer_step=2), True),
    # modules holding per-branch parameters of their own beside sublayers (Mamba's A_log, D, dt_bias; Gemma 3n's
    # AltUp): each branch runs as a model of its own, sharing the group's mean weights
    "mamba2": ("Mamba2", dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8,
                              state_size=8, n_groups=1, chunk_size=8, **_IDS), False),
    "falcon_h1": ("FalconH1", dict(_GQA, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                   mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8), False),
    "qwen3_next": ("Qwen3Next", dict(_GQA, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                     shared_expert_intermediate_size=24, linear_num_value_heads=4,
                                     linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                                     layer_types=["linear_attention", "full_attention"]), True),
    "jamba": ("Jamba", dict(_GQA, num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
                            expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_expand=2), True),
    "granitemoehybrid": ("GraniteMoeHybrid", dict(_GQA, num_local_experts=4, num_experts_per_tok=2,
                                                  shared_intermediate_size=40, mamba_n_heads=4, mamba_d_head=16,
                                                  mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8,
                                                  layer_types=["mamba", "attention"]), True),
    "nemotron_h": ("NemotronH", dict(_GQA, head_dim=8, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8,
                                     n_groups=1, chunk_size=8, hybrid_override_pattern="M*-"), True),
    "nemotron_h_moe": ("NemotronH", dict(_GQA, head_dim=8, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8,
                                         n_groups=1, chunk_size=8, hybrid_override_pattern="ME*", n_routed_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=24,
                                         moe_shared_expert_intermediate_size=24, n_group=1, topk_group=1,
                                         moe_latent_size=16), True),  # (Nemotron 3's experts on a latent width)
    "bamba": ("Bamba", dict(_GQA, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
                            mamba_chunk_size=8, attn_layer_indices=[1]), False),
    "zamba2": ("Zamba2", dict(_GQA, mamba_d_state=8, mamba_headdim=16, n_mamba_heads=4, mamba_ngroups=1,
                              chunk_size=8, layers_block_type=["mamba", "hybrid"], hybrid_layer_ids=[1]), False),
    "lfm2": ("Lfm2", dict(_GQA, conv_L_cache=3, layer_types=["conv", "full_attention"]), False),
    "falcon_mamba": ("FalconMamba", dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8,
                                         **_IDS), False),
    "gemma3n": ("Gemma3nText", dict(_GQA, head_dim=8, hidden_size_per_layer_input=8, vocab_size_per_layer_input=64,
                                    laurel_rank=4, altup_num_inputs=2, num_kv_shared_layers=0,
                                    activation_sparsity_pattern=[0.0, 0.0],
                                    layer_types=["sliding_attention", "full_attention"]), False),
    "xglm": ("XGLM", dict(vocab_size=64, d_model=32, num_layers=2, attention_heads=4, ffn_dim=48,
                          max_position_embeddings=128, **_IDS), False),
}


def _classes(stem: str):
    """The causal LM and config classes named by ``stem`` (``Llama4Text``: ``Llama4TextConfig``, and the model
    ``Llama4ForCausalLM``)."""
    model = getattr(transformers, f"{stem}ForCausalLM", None) or getattr(transformers,
                                                                         f"{stem.removesuffix('Text')}ForCausalLM")
    config = getattr(transformers, f"{stem}Config", None) or getattr(transformers, f"{stem}TextConfig")
    return model, config


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def _fine_tunes(family: str, folder) -> dict:
    """Two fine-tunes of one tiny base of ``family`` (every parameter moved by its own seeded noise), saved
    by transformers with a tokenizer: ``{name: model}``."""
    stem, fields, _ = FAMILIES[family]
    model_cls, config_cls = _classes(stem)
    torch.manual_seed(0)
    base = model_cls(config_cls(**fields)).eval()
    models = {}
    for i, n in enumerate("ab"):
        m = model_cls(base.config).eval()
        m.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        m.save_pretrained(folder / n)
        save_char_tokenizer(folder / n)
        models[n] = m
    return models


def _merge(folder, rate: float):
    cfg = parse_config({"branches": [{"name": n, "model": str(folder / n)} for n in "ab"],
                        "compress_rate": rate, "dtype": "float32"})
    run_merge(cfg, folder / "bundle", progress=False)
    return folder / "bundle"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_fine_tunes_are_exact_branches(family, tmp_path, caplog, capsys):
    templated = FAMILIES[family][2]
    models = _fine_tunes(family, tmp_path)
    base = models["a"]
    with caplog.at_level(logging.WARNING):
        _merge(tmp_path, 0.0)
    assert ("fallback rule" in caplog.text) is not templated, caplog.text
    records = next(iter(BundleReader(tmp_path / "bundle").manifest.tensors.values()))
    compressed = {t for t, r in records.items() if r.role == "compressed"}
    assert len(compressed) >= 2 * base.config.num_hidden_layers  # (every layer's: attention's, MLP's, mixer's)
    arch = known(models["a"].config.to_dict())
    if templated and arch.experts is None:
        assert compressed == {t for t, r in records.items() if fallback_role(t, tuple(r.shape)) == "compress"}

    b = branchmerge.load(tmp_path / "bundle", dtype="float32")
    want = {n: _logits(m) for n, m in models.items()}
    for n in models:
        torch.testing.assert_close(b.logits(X, [n, n]), want[n], atol=1e-4, rtol=1e-4)
    if family in SPLIT:  # a model per branch; the mean weights held once
        assert b.runtime_group("a") is not b.runtime_group("b") and len(b.groups) == 2
        shared = [r for r in records.values() if r.role in ("compressed", "shared")]
        assert shared and b.memory_bytes() < 2 * sum(r.bytes for r in records.values())
        assert all(sum(p.numel() for p in g.model.parameters()) > 0 for g in b.groups.values())
    else:
        assert b.runtime_group("a") is b.runtime_group("b")
    check_mixed_as_alone(b, X, want, logits=family not in SPLIT)  # (split: generation, model by model)

    code, _, err = run_cli(capsys, "export-branch", tmp_path / "bundle", "b", "-o", tmp_path / "exported")
    assert code == 0, err
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(exported), want["b"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["phi", "gptj", "granitemoe", "gpt_oss", "llama4", "nemotron_h_moe"])
def test_family_branches_through_the_triton_kernels(family, tmp_path):
    """Compressed branches of templates with sibling layers (q, k, v with biases; Phi's and GPT-J's parallel
    blocks) and of stacked experts (GraniteMoE's; gpt-oss's, with biases), and Nemotron-H's gateless experts
    beside its Mamba mixers, run in Triton's kernels (the interpreter here) as in torch, mixed where one model
    runs them."""
    _fine_tunes(family, tmp_path)
    d = _merge(tmp_path, 0.5)
    tri = branchmerge.load(d, dtype="float32", kernels="triton")
    assert tri.kernels == "triton"
    ref = branchmerge.load(d, dtype="float32", kernels="torch")
    for rows in ([["a", "a"], ["b", "b"]] if family in SPLIT else [["b", "a"]]):  # (a model per branch: alone)
        torch.testing.assert_close(tri.logits(X, rows), ref.logits(X, rows), atol=1e-4, rtol=1e-4)


def test_stacking_experts_for_export_refuses_a_missing_one():
    """An export that restacks a layer's experts (GraniteMoE) names the layer when the bundle lacks one of the
    config's experts, rather than writing a checkpoint transformers would fill with random experts."""
    from branchmerge.errors import BundleError
    from branchmerge.export import stack_experts

    arch = known({"architectures": ["GraniteMoeForCausalLM"]})
    m = "model.layers.0.block_sparse_moe.experts"
    full = [(f"{m}.{e}.{p}.weight", torch.full((3, 2) if p != "down_proj" else (2, 3), float(e)))
            for e in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    out = dict(stack_experts(arch, [("model.norm.weight", torch.ones(2)), *full], {"num_local_experts": 2}))
    assert set(out) == {"model.norm.weight", "model.layers.0.block_sparse_moe.input_linear.weight",
                        "model.layers.0.block_sparse_moe.output_linear.weight"}
    assert out["model.layers.0.block_sparse_moe.input_linear.weight"].shape == (2, 6, 2)
    assert out["model.layers.0.block_sparse_moe.output_linear.weight"][1].eq(1).all()
    with pytest.raises(BundleError, match=r"layers\.0\.block_sparse_moe\.experts: 5 expert tensors .* 2 experts"):
        list(stack_experts(arch, full[:5], {"num_local_experts": 2}))
    with pytest.raises(BundleError, match="expert 1 lacks its up_proj weight"):
        list(stack_experts(arch, full[:4] + full[5:] + [(f"{m}.2.up_proj.weight", full[4][1])],  # (2, not 1)
                           {"num_local_experts": 2}))


@pytest.mark.parametrize("family,batches", [("gemma3n", 2), ("gpt_oss", 1), ("mamba2", 1)])
def test_branches_are_served_in_one_batch_or_one_per_model(tmp_path, family, batches):
    """Served over HTTP (the openai SDK as client), concurrent requests for both branches answer as each does
    alone: a Gemma 3n group (a model per branch) in one batch per branch's model, a gpt-oss group (attention
    sinks per row) and a Mamba-2 group (mixers per branch, with their rows of the cache) in one mixed batch;
    /v1/models lists both branches."""
    from tests.serving import served_together

    _fine_tunes(family, tmp_path)
    b = branchmerge.load(_merge(tmp_path, 0.5), dtype="float32")
    prompts = [("abc", "a"), ("hello", "b"), ("xyz", "b"), ("key", "a")]
    expected = [b.generate(p, n, chat=False, max_new_tokens=5, do_sample=False)[0] for p, n in prompts]
    assert b.generate([p for p, _ in prompts], [n for _, n in prompts], chat=False, max_new_tokens=5,
                      do_sample=False) == expected  # (one call: split by model where it must, answered in order)
    got, took, listed = served_together(b, prompts)
    assert got == expected and took == batches and listed >= {"a", "b"}


@pytest.mark.parametrize("family,experts", [("gpt_oss", "mlp.experts"), ("llama4", "feed_forward.experts")])
def test_fused_experts_compress_one_by_one_and_export_fused(tmp_path, capsys, family, experts):
    """gpt-oss's fused experts (gate and up in alternate columns of ``[E, H, 2I]``, biases) and Llama 4's (gate
    columns, then up's) are read one 2-D weight per expert and projection: each compresses as its own weight
    (biases per branch), the bundle shrinks and moves off the model as r rises, and an export stacks them
    again as transformers loads them."""
    models = _fine_tunes(family, tmp_path)
    sizes, errs = [], []
    for rate in (0.0, 0.5):
        d = tmp_path / f"bundle-{rate}"
        run_merge(parse_config({"branches": [{"name": n, "model": str(tmp_path / n)} for n in "ab"],
                                "compress_rate": rate, "dtype": "float32"}), d, progress=False)
        records = next(iter(BundleReader(d).manifest.tensors.values()))
        assert records[f"model.layers.1.{experts}.3.gate_proj.weight"].role == "compressed"
        assert records[f"model.layers.1.{experts}.3.down_proj.weight"].shape == [32, 48]
        if family == "gpt_oss":
            assert records[f"model.layers.1.{experts}.3.up_proj.bias"].role == "per_branch"
        sizes.append(BundleReader(d).manifest.total_bytes)
        b = branchmerge.load(d, dtype="float32")
        got, want = b.logits(X, ["a", "a"]), _logits(models["a"])
        errs.append(float((got - want).norm() / want.norm()))
    assert errs[0] < 1e-5 < errs[1] and sizes[1] < sizes[0], (errs, sizes)
    code, _, err = run_cli(capsys, "export-branch", d, "a", "-o", tmp_path / "exported")
    assert code == 0, err
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(exported), got, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family,target,rate", [("mamba2", "in_proj", 0.5), ("gpt_oss", "q_proj", 0.75)])
def test_a_lora_loaded_at_runtime_over_a_branch_of_a_hybrid_or_sinks_group(tmp_path, family, target, rate):
    """A PEFT LoRA of a Mamba-2 fine-tune (its group's mixers run per branch on their rows) or of a gpt-oss one
    (attention sinks per row) loads at runtime over its branch: its rows take the base's own mixer parameters
    or sinks; it answers as PEFT does over the exported branch, alongside the other branch in one batch, and
    unloads."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from branchmerge.export import export_branch

    models = _fine_tunes(family, tmp_path)
    d = _merge(tmp_path, rate)  # (every layer low-rank: the factor layout adapters join)
    peft = get_peft_model(models["a"], LoraConfig(r=4, lora_alpha=8, target_modules=[target],
                                                  init_lora_weights=False))
    peft.save_pretrained(tmp_path / "lora")
    export_branch(d, "a", tmp_path / "exported", progress=False)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32),
                                    tmp_path / "lora").eval()
    b = branchmerge.load(d, dtype="float32")
    b.load_lora("tuned", tmp_path / "lora", base="a")
    assert b.runtime_group("tuned") is b.runtime_group("a")
    torch.testing.assert_close(b.logits(X, ["tuned", "tuned"]), _logits(ref), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(b.logits(X, ["a", "a"]), _logits(ref), atol=1e-2)
    mixed = b.logits(X, ["tuned", "b"])
    torch.testing.assert_close(mixed[0], _logits(ref)[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[1], b.logits(X, ["b", "b"])[1], atol=1e-4, rtol=1e-4)
    outs = b.generate(["abc", "hello"], ["tuned", "b"], chat=False, max_new_tokens=4, do_sample=False)
    assert outs == [b.generate("abc", "tuned", chat=False, max_new_tokens=4, do_sample=False)[0],
                    b.generate("hello", "b", chat=False, max_new_tokens=4, do_sample=False)[0]]
    b.unload_lora("tuned")
    assert b.branch_names == ["a", "b"]


@pytest.mark.parametrize("family", ["phi", "bloom", "gpt_neox", "opt", "gpt_bigcode", "falcon_old"])
def test_extract_lora_of_a_family_loads_in_peft_and_gives_the_fine_tune(family, tmp_path):
    """extract-lora over families whose every linear layer has a bias (Phi, BLOOM: they left PEFT no module to
    target before), whose head transformers renames (GPT-NeoX's embed_out is lm_head) and whose learned
    positions are no token embedding (OPT): PEFT loads the adapter over the base and gives the fine-tune's
    logits; changed biases of targeted layers ride with their pairs (bias="lora_only"), not whole modules."""
    from peft import PeftModel

    from branchmerge.extract_lora import extract_lora

    models = _fine_tunes(family, tmp_path)  # a: the fine-tune, b: the base
    rep = extract_lora(tmp_path / "b", tmp_path / "a", tmp_path / "lora", rank=64, progress=False)
    cfg = __import__("json").loads((tmp_path / "lora" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    torch.testing.assert_close(_logits(peft), _logits(models["a"]), atol=1e-4, rtol=1e-4)
    assert rep["modules"] and cfg["target_modules"]
    if family in ("phi", "bloom", "gpt_bigcode", "falcon_old"):
        assert cfg["bias"] == "lora_only" and rep["biases_with_pairs"]
        assert not any(m in (cfg["modules_to_save"] or []) for m in rep["modules"])
    if family == "gpt_neox":  # (and read back as a branch over its base: PEFT's names mapped to the checkpoint's)
        assert "lm_head" in rep["modules"] and not any("embed_out" in m for m in cfg["modules_to_save"] or [])
        run_merge(parse_config({"branches": [{"name": "base", "model": str(tmp_path / "b")},
                                             {"name": "tuned", "model": str(tmp_path / "lora"),
                                              "base": str(tmp_path / "b")}], "compress_rate": 0.5,
                                "dtype": "float32"}), tmp_path / "bundle", progress=False)
        b = branchmerge.load(tmp_path / "bundle", dtype="float32")
        torch.testing.assert_close(b.logits(X, ["tuned", "tuned"]), _logits(models["a"]), atol=1e-4, rtol=1e-4)
    if family == "opt":
        assert "model.decoder.embed_positions" in cfg["modules_to_save"]


def test_inspect_says_which_groups_run_a_model_per_branch(tmp_path, capsys):
    """`inspect` names a group whose branches run as models of their own and the modules why (text and
    JSON); a group one model runs says nothing of the kind; one whose attention sinks switch per row says so,
    and one whose sequence mixers run per branch on their rows."""
    import json

    def inspect(family: str) -> tuple[str, dict]:  # (the text, and the JSON's group)
        _fine_tunes(family, tmp_path / family)
        _merge(tmp_path / family, 0.5)
        code, out, err = run_cli(capsys, "inspect", tmp_path / family / "bundle")
        assert code == 0, err
        code, js, err = run_cli(capsys, "inspect", tmp_path / family / "bundle", "--json")
        assert code == 0, err
        return out, json.loads(js)["groups"]["main"]

    out, group = inspect("gemma3n")
    assert "each branch runs as a model of its own" in out and "altup" in out and "correct_output_scale" in out
    assert any("correct_output_scale" in w for w in group["model_per_branch"])
    out, group = inspect("phi")
    assert not any(w in out for w in ("model of its own", "sinks", "mixers")) and "model_per_branch" not in group
    out, group = inspect("gpt_oss")
    assert "model of its own" not in out and "attention sinks differ between branches in 2 layer(s)" in out
    assert group["attention_sinks_per_row"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert "model_per_branch" not in group
    out, group = inspect("mamba2")
    assert "model of its own" not in out and "sequence mixers differ between branches in 2" in out
    assert group["mixers_per_branch"] == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    assert "model_per_branch" not in group


def test_attention_sinks_switch_per_row(tmp_path):
    """gpt-oss's attention sinks differ per branch and mix in one batch (bfloat16, as served): each row equals
    its branch alone; branches whose sinks are equal run as one attention call; an attention implementation
    whose mask is no tensor is refused by name for a mixed batch rather than given one branch's sinks."""
    from branchmerge.runtime.modules import BranchState
    from branchmerge.runtime.sinks import BranchSinks, _wrapped

    _fine_tunes("gpt_oss", tmp_path)
    b = branchmerge.load(_merge(tmp_path, 0.5), dtype="bfloat16")
    attn = b.runtime_group("a").model.model.layers[0].self_attn
    assert isinstance(attn.branch_sinks, BranchSinks) and attn.branch_sinks.stacked.shape == (2, 4)
    mixed = b.logits(X, ["b", "a"])
    torch.testing.assert_close(mixed[0], b.logits(X[:1], ["b"])[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(mixed[1], b.logits(X[1:], ["a"])[0], atol=2e-2, rtol=2e-2)
    with pytest.raises(NotImplementedError, match="'flex_attention' attention implementation gives a object"):
        with attn.branch_sinks.state.select([1, 0]):
            q = torch.zeros(2, 4, 3, 8)
            _wrapped(lambda *a, **k: None, "flex_attention")(attn, q, q[:, :2], q[:, :2], object())
    # branches with equal sinks: one row of the stack, their rows in one call (the whole batch when alone)
    state = BranchState(["x", "y", "z"])
    s1, s2 = torch.randn(4), torch.randn(4)
    mod = torch.nn.Module()
    mod.sinks, mod.proj = torch.nn.Parameter(s1), torch.nn.Linear(2, 2)
    bs = BranchSinks(state, [s1, s1.clone(), s2], mod)
    assert bs.stacked.shape == (2, 4) and bs.holder == [0, 0, 1]
    with state.select([0, 2, 1, 1]):
        groups = bs.groups(4, torch.device("cpu"))
    assert [(torch.equal(v.sinks, w), rows.tolist()) for (v, rows), w in zip(groups, [s1, s2])] == [
        (True, [0, 2, 3]), (True, [1])]
    assert groups[1][0].proj is mod.proj and torch.equal(mod.sinks, s1)  # (views share the rest; the module is as it was)
    with state.select([1, 0]):
        (v, rows), = bs.groups(2, torch.device("cpu"))
    assert rows is None and torch.equal(v.sinks, s1)
    bs.double()  # (cast or moved: the views read the new rows)
    assert bs.views[1].sinks.dtype == torch.float64 and torch.equal(bs.views[1].sinks, s2.double())


def test_a_branched_layer_gives_its_branchs_weight_to_code_that_reads_it(tmp_path):
    """Code that reads a linear layer's ``weight`` and ``bias`` instead of calling it (mamba-ssm's fused Mamba-2
    kernel on CUDA reads ``out_proj.weight``) gets the selected branch's dense weight from a compressed layer:
    the one its exported model holds; under a batch mixing branches the read is refused, naming them."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from branchmerge.export import export_branch
    from branchmerge.runtime.modules import BranchedLinear

    _fine_tunes("phi", tmp_path)  # (q/k/v/dense with biases)
    d = _merge(tmp_path, 0.5)
    b = branchmerge.load(d, dtype="float32")
    g = b.runtime_group("b")
    layer = g.model.model.layers[1].self_attn.dense
    assert isinstance(layer, BranchedLinear) and layer.bias is not None
    export_branch(d, "b", tmp_path / "exported", progress=False)
    want = load_file(tmp_path / "exported" / "model.safetensors")
    x = torch.randn(3, 32)
    with g.state.select(branch=1):
        torch.testing.assert_close(layer.weight, want["model.layers.1.self_attn.dense.weight"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.bias, want["model.layers.1.self_attn.dense.bias"])
        torch.testing.assert_close(F.linear(x, layer.weight, layer.bias), layer(x), atol=1e-5, rtol=1e-5)
    with g.state.select([1, 1, 1]):  # (rows all of one branch: that branch's)
        torch.testing.assert_close(layer.weight, want["model.layers.1.self_attn.dense.weight"], atol=1e-5, rtol=1e-5)
    with g.state.select([0, 1]), pytest.raises(AttributeError, match=r"mixing branches \['a', 'b'\]"):
        layer.weight


def _decode(g, rows, ids, steps):
    """Logits of the last position of a prefill of ``ids`` and of each decode step fed ``steps`` (``[B, 1]``
    each), through the group's model with a cache, rows selected by ``rows``: ``[B, 1 + len(steps), V]``."""
    with g.state.select(rows=rows), torch.no_grad():
        out = g.model(input_ids=ids, use_cache=True)
        cache, logits = out.cache if hasattr(out, "cache") else out.past_key_values, [out.logits[:, -1]]
        assert cache is not None
        for t in steps:
            logits.append(g.model(input_ids=t, cache=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("family", ["mamba2", "falcon_h1", "qwen3_next", "jamba", "granitemoehybrid", "nemotron_h",
                                    "nemotron_h_moe", "bamba", "zamba2", "lfm2", "falcon_mamba"])
def test_hybrid_branches_mix_per_row_with_their_rows_of_the_cache(family, tmp_path):
    """Fine-tunes of Mamba-1/2 and hybrid families (their mixers hold ``A_log``, ``D``, ``dt_bias`` of their
    own beside their projections: Mamba-2, Falcon-H1, Jamba, Granite 4.0-H, Nemotron-H (and its MoE, whose
    experts have no gate), Bamba, Zamba2, FalconMamba; Qwen3-Next's Gated DeltaNet; LFM2's short
    convolutions) run in one model: a batch mixing
    three rows of two branches, prefill then decode steps on the cache, gives each row its branch's logits
    alone (the mixer runs once per branch on its rows, reading and writing only those rows' conv and
    recurrent states)."""
    from branchmerge.runtime.mixers import BranchMixer

    _fine_tunes(family, tmp_path)
    b = branchmerge.load(_merge(tmp_path, 0.0), dtype="float32")
    g = b.runtime_group("a")
    assert g is b.runtime_group("b") and any(isinstance(m, BranchMixer) for m in g.model.modules())
    paths = {n for n, _ in g.model.named_modules()}  # (at its place: templates and adapters name its sublayers)
    assert paths >= {n for n, _ in AutoModelForCausalLM.from_pretrained(tmp_path / "a").named_modules()
                     if ".experts" not in n}  # (an MoE's fused experts are per-expert layers here)
    ids = torch.cat([X, X[:1].flip(1)])
    steps = [torch.tensor([[5], [7], [9]]), torch.tensor([[9], [3], [4]]), torch.tensor([[11], [13], [6]])]
    mixed = _decode(g, [1, 0, 1], ids, steps)
    for row, branch in enumerate([1, 0, 1]):
        alone = _decode(g, [branch], ids[row:row + 1], [s[row:row + 1] for s in steps])
        torch.testing.assert_close(mixed[row], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], _decode(g, [0], ids[:1], [s[:1] for s in steps])[0], atol=1e-3)


def test_a_mixer_whose_branches_differ_only_in_projections_runs_once(tmp_path):
    """Mamba-2 fine-tunes that changed only the mixers' projections (a LoRA's targets; ``A_log``, ``D``,
    ``dt_bias``, conv and norms left as the base's): the mixers stay as transformers runs them, one call for a
    mixed batch whose branched projections take the rows, and each row still gets its branch's logits
    through prefill and decode steps."""
    from branchmerge.runtime.mixers import BranchMixer

    models = _fine_tunes("mamba2", tmp_path)
    with torch.no_grad():  # (b keeps a's every tensor but the 2-D projections and embeddings)
        for (name, p), q in zip(models["b"].named_parameters(), models["a"].parameters()):
            if p.ndim != 2:
                p.copy_(q)
    models["b"].save_pretrained(tmp_path / "b")
    b = branchmerge.load(_merge(tmp_path, 0.0), dtype="float32")
    g = b.runtime_group("a")
    assert g is b.runtime_group("b") and not any(isinstance(m, BranchMixer) for m in g.model.modules())
    ids = torch.cat([X, X[:1].flip(1)])
    steps = [torch.tensor([[5], [7], [9]]), torch.tensor([[9], [3], [4]])]
    mixed = _decode(g, [1, 0, 1], ids, steps)
    for row, branch in enumerate([1, 0, 1]):
        alone = _decode(g, [branch], ids[row:row + 1], [s[row:row + 1] for s in steps])
        torch.testing.assert_close(mixed[row], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.logits(X, ["b", "b"]), _logits(models["b"]), atol=1e-4, rtol=1e-4)


def test_a_mixers_rows_of_the_cache_refuse_what_they_cannot_split(tmp_path):
    """A mixed batch's mixer needs its layer of the cache to hold linear-attention states it can take by row:
    an attention layer, or one recording past states (assisted decoding's rollback), is refused by name."""
    from transformers import DynamicCache

    from branchmerge.runtime.mixers import CacheRows

    models = _fine_tunes("jamba", tmp_path)
    cache = DynamicCache(config=models["a"].config)
    with pytest.raises(NotImplementedError, match=r"layer 1 of the cache .* DynamicLayer"):
        CacheRows(cache, 1, 2)
    with pytest.raises(NotImplementedError, match="layer 7 of the cache"):
        CacheRows(cache, 7, 2)
    cache.layers[0].activate_past_recording()
    with pytest.raises(NotImplementedError, match="records past states"):
        CacheRows(cache, 0, 2)
    CacheRows(DynamicCache(config=models["a"].config), 0, 2)  # (a linear-attention layer: taken)


def test_mixed_rows_through_torch_compile(tmp_path):
    """Under torch.compile (what transformers does to a static cache's decode on CUDA), a mixed batch answers
    as eagerly: a dense family with attention sinks per row in one graph, no breaks; a Mamba-2 group's batch
    of one branch in one graph, a mixed one with its mixers run eagerly per branch; gpt-oss's sparse block
    (its experts run eagerly: their routing is data-dependent, and a graph break inside a branch selection
    would resume outside it)."""
    _fine_tunes("granite_swa", tmp_path / "dense")
    g = branchmerge.load(_merge(tmp_path / "dense", 0.5), dtype="float32").runtime_group("a")
    torch._dynamo.reset()
    ids = torch.cat([X, X[:1]])
    with g.state.select(rows=[0, 1, 0]), torch.no_grad():
        want = g.model(input_ids=ids).logits
        exp = torch._dynamo.explain(g.model)(input_ids=ids)
        got = torch.compile(g.model, backend="eager")(input_ids=ids).logits
    assert exp.graph_break_count == 0, [str(r.reason)[:300] for r in exp.break_reasons]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    _fine_tunes("mamba2", tmp_path / "mamba2")  # (mixers per branch: a one-branch batch in one graph; mixed, eager)
    g = branchmerge.load(_merge(tmp_path / "mamba2", 0.5), dtype="float32").runtime_group("a")
    for rows in ([1, 1, 1], [0, 1, 0]):
        torch._dynamo.reset()
        with g.state.select(rows=rows), torch.no_grad():
            want = g.model(input_ids=ids).logits
            exp = torch._dynamo.explain(g.model)(input_ids=ids)
            got = torch.compile(g.model, backend="eager")(input_ids=ids).logits
        if len(set(rows)) == 1:
            assert exp.graph_break_count == 0, [str(r.reason)[:300] for r in exp.break_reasons]
        else:  # (breaks only around each mixer's per-branch calls)
            assert all("BranchMixer._mixed" in str(r.reason) for r in exp.break_reasons), exp.break_reasons
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    _fine_tunes("gpt_oss", tmp_path / "moe")
    g = branchmerge.load(_merge(tmp_path / "moe", 0.5), dtype="float32").runtime_group("a")
    block, h = g.model.model.layers[1].mlp, torch.randn(3, 8, 32)
    torch._dynamo.reset()
    with g.state.select(rows=[0, 1, 0]), torch.no_grad():
        want = block(h)
        got = torch.compile(block, backend="eager")(h)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_gpt_oss_checkpoint_in_mxfp4_merges_as_transformers_dequantizes_it(tmp_path, capsys):
    """gpt-oss's released checkpoints hold their experts in MXFP4 (``*_blocks``, ``*_scales``, a
    ``quantization_config``): such a folder joins a group with a bfloat16 fine-tune; each expert's weight is
    read dequantized alone (as transformers' own dequantization gives it), the branch answers as transformers
    answers the MXFP4 folder, and its export is a dense folder (no ``quantization_config``)."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import Mxfp4Config
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from branchmerge.io.models import ModelSource
    from branchmerge.io.mxfp4 import dequantize_mxfp4, quantize_mxfp4

    stem, fields, _ = FAMILIES["gpt_oss"]
    model_cls, config_cls = _classes(stem)
    torch.manual_seed(0)
    base = model_cls(config_cls(**{**fields, "intermediate_size": 64})).eval()  # (MXFP4 blocks are 32 wide)
    for i, n in enumerate("ab"):
        with torch.no_grad():
            for p in base.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i + 1)) * 0.05)
        base.save_pretrained(tmp_path / n)
        save_char_tokenizer(tmp_path / n)
    f = tmp_path / "a" / "model.safetensors"
    w = load_file(f)
    for name in [k for k in w if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = quantize_mxfp4(w.pop(name).transpose(1, 2))  # (stored as [E, rows, H/32, 16])
        w[name + "_blocks"], w[name + "_scales"] = blocks, scales
        ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # transformers' dequantization
        torch.testing.assert_close(dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2), ref)
    save_file(w, f, metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                       "model.layers.*.mlp.router",
                                                                                       "model.embed_tokens", "lm_head"]}
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))

    src = ModelSource.open("a", str(tmp_path / "a"))
    assert "quantization_config" not in src.hf_config and not any("_blocks" in n or "_scales" in n
                                                                  for n in src.names())
    assert src.shape("model.layers.1.mlp.experts.3.up_proj.weight") == (64, 32)
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32,  # (its kernels: a hub fetch)
                                                quantization_config=Mxfp4Config(dequantize=True)).eval()
    d = _merge(tmp_path, 0.0)
    b = branchmerge.load(d, dtype="float32")
    torch.testing.assert_close(b.logits(X, ["a", "a"]), _logits(want), atol=1e-4, rtol=1e-4)
    code, _, err = run_cli(capsys, "export-branch", d, "a", "-o", tmp_path / "exported")
    assert code == 0, err
    assert "quantization_config" not in json.loads((tmp_path / "exported" / "config.json").read_text())
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(exported), _logits(want), atol=1e-4, rtol=1e-4)
    # blocks without their scales, or scales of another shape: named, nothing merged
    from branchmerge.errors import ModelInputError

    gone = "model.layers.0.mlp.experts.down_proj_scales"
    save_file({k: v for k, v in w.items() if k != gone}, f, metadata={"format": "pt"})
    with pytest.raises(ModelInputError, match=r"MXFP4 tensor model\.layers\.0\.mlp\.experts\.down_proj_blocks has no "
                                              r"model\.layers\.0\.mlp\.experts\.down_proj_scales"):
        ModelSource.open("a", str(tmp_path / "a"))
    save_file({**w, gone: w[gone][:, :, :1].contiguous()}, f, metadata={"format": "pt"})
    with pytest.raises(ModelInputError, match=r"experts\.1\.down_proj\.weight .* could not be read: MXFP4 blocks"):
        ModelSource.open("a", str(tmp_path / "a")).get("model.layers.0.mlp.experts.1.down_proj.weight")
