"""extract-lora: a fine-tune's difference from its base as a PEFT adapter, checked by loading it with PEFT
over the base and comparing logits with the fine-tune (and by reading it back as a branch)."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from branchmerge.errors import BranchmergeError, ConfigError, ModelInputError
from branchmerge.extract_lora import extract_lora
from tests.cli_util import run_cli
from tests.conftest import make_finetune, make_tiny_llama

X = torch.tensor([[1, 5, 9, 3, 7, 11, 2]])


def _logits(model_dir, adapter=None):
    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        m = PeftModel.from_pretrained(m, adapter).eval()
    with torch.no_grad():
        return m(X).logits


def test_full_rank_adapter_reproduces_the_fine_tune_through_peft(family, tmp_path):
    base, tune = family["base"][0], family["a"][0]
    rep = extract_lora(base, tune, tmp_path / "lora", rank=64, progress=False)
    want, plain = _logits(tune), _logits(base)
    got = _logits(base, tmp_path / "lora")
    assert (plain - want).abs().max() > 1e-3  # the fine-tune differs from the base
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == rep["rank"] == 32
    # changed norms and the (full-rank-noised) embeddings are saved whole; every block linear is a LoRA pair
    assert "model.norm" in cfg["modules_to_save"] and "model.embed_tokens" in cfg["modules_to_save"]
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"} == \
        set(cfg["target_modules"])
    assert rep["max_rel_error_of_difference"] < 1e-5
    assert (tmp_path / "lora" / "tokenizer.json").is_file() and not (tmp_path / "lora" / "config.json").exists()


def test_rank_target_error_and_the_reported_error(family, tmp_path):
    base, tune = family["base"][0], family["b"][0]
    rep = extract_lora(base, tune, tmp_path / "r1", rank=1, progress=False)
    tensors = load_file(tmp_path / "r1" / "adapter_model.safetensors")
    key = "model.layers.0.mlp.up_proj"
    a, b = tensors[f"base_model.model.{key}.lora_A.weight"], tensors[f"base_model.model.{key}.lora_B.weight"]
    assert a.shape[0] == 1
    sd_t = family["b"][1].state_dict()
    sd_b = family["base"][1].state_dict()
    delta = sd_t[f"{key}.weight"] - sd_b[f"{key}.weight"]
    err = float((delta - b @ a).norm() / delta.norm())
    assert 0.01 < err and err == pytest.approx(rep["modules"][key]["rel_error_of_difference"], rel=1e-4)
    # the fine-tune's block deltas are rank 2: a small target error gives rank 2 there, more for lm_head's noise
    rep = extract_lora(base, tune, tmp_path / "t", rank=32, target_error=1e-4, progress=False)
    ranks = {m: v["rank"] for m, v in rep["modules"].items()}
    assert all(r == 2 for m, r in ranks.items() if ".layers." in m) and ranks["lm_head"] > 2
    cfg = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"]["model\\.layers\\.0\\.mlp\\.up_proj"] == 2
    torch.testing.assert_close(_logits(base, tmp_path / "t"), _logits(tune), atol=1e-4, rtol=0)
    one = extract_lora(base, tune, tmp_path / "e", rank=32, sv_epsilon=1e9, exclude=["lm_head"], progress=False)
    assert one["modules"] == {}  # every singular value under epsilon: only the modules saved whole remain


def test_embed_lora_skip_undecomposable_and_module_filters(family, tmp_path):
    base, tune = family["base"][0], family["c"][0]
    rep = extract_lora(base, tune, tmp_path / "emb", rank=64, embed_lora=True, skip_undecomposable=True,
                       progress=False)
    tensors = load_file(tmp_path / "emb" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (32, 64)  # [r, vocab]
    assert rep["modules_to_save"] == [] and "model.norm.weight" in rep["lost"] and rep["lost"]["model.norm.weight"] > 0
    # norms kept as the base's: the adapter equals the fine-tune with the base's norms
    hybrid = AutoModelForCausalLM.from_pretrained(tune)
    sd_b = family["base"][1].state_dict()
    with torch.no_grad():
        for n, p in hybrid.named_parameters():
            if "norm" in n:
                p.copy_(sd_b[n])
        want = hybrid(X).logits
    torch.testing.assert_close(_logits(base, tmp_path / "emb"), want, atol=1e-5, rtol=0)
    rep = extract_lora(base, tune, tmp_path / "attn", rank=64, include=[r"self_attn"], exclude=[r"layers\.1\."],
                       skip_undecomposable=True, progress=False)
    assert rep["modules"] and all("layers.0.self_attn" in m for m in rep["modules"])
    assert "model.embed_tokens.weight" not in rep["lost"]  # not included: not extracted, not lost
    rep = extract_lora(base, tune, tmp_path / "head", rank=8, modules_to_save=["lm_head"], progress=False)
    assert "lm_head" in rep["modules_to_save"] and "lm_head" not in rep["modules"]
    torch.testing.assert_close(load_file(tmp_path / "head" / "adapter_model.safetensors")["base_model.model.lm_head.weight"],
                               family["c"][1].state_dict()["lm_head.weight"])


def test_the_adapter_reads_back_as_a_branch(family, tmp_path):
    """branchmerge's own PEFT reader takes the extracted adapter over its base as the fine-tuned model."""
    from branchmerge.io.adapters import open_model

    extract_lora(family["base"][0], family["a"][0], tmp_path / "lora", rank=64, progress=False)
    src = open_model("a", str(tmp_path / "lora"), None, str(family["base"][0]))
    want = family["a"][1].state_dict()
    for name in ("model.layers.1.self_attn.v_proj.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(src.get(name).float(), want[name], atol=1e-5, rtol=0)


def test_bad_inputs_are_named_and_write_nothing(family, tmp_path, capsys):
    base = family["base"][0]
    wide = make_tiny_llama(tmp_path / "wide", seed=1, hidden=64)
    del wide
    with pytest.raises(ModelInputError, match=r"tensor \S+ has shape \[.*\] in the model but .*in the base; a LoRA cannot"):
        extract_lora(base, tmp_path / "wide", tmp_path / "o1", progress=False)
    with pytest.raises(BranchmergeError, match="equals the base"):
        extract_lora(base, base, tmp_path / "o2", progress=False)
    with pytest.raises(ConfigError, match="--exclude '\\(' is not a regular expression"):
        extract_lora(base, family["a"][0], tmp_path / "o3", exclude=["("], progress=False)
    with pytest.raises(ConfigError, match="--rank must be"):
        extract_lora(base, family["a"][0], tmp_path / "o4", rank=0, progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, err = run_cli(capsys, "extract-lora", family["a"][0], "--base", base, "-o", tmp_path / "mine",
                           "--no-progress")
    assert code != 0 and "mine" in err and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    code, out, err = run_cli(capsys, "extract-lora", family["a"][0], "--base", base, "-o", tmp_path / "ok",
                             "--rank", "4", "--target-error", "0.2", "--no-progress")
    assert code == 0 and "LoRA rank <= 4" in out and "saved whole" in out, err
    gpt = tmp_path / "gpt"
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64)).save_pretrained(gpt)
    with pytest.raises(ModelInputError, match="a LoRA needs the same layout"):
        extract_lora(base, gpt, tmp_path / "o5", progress=False)


def test_a_tied_model_and_a_fine_tune_of_only_some_layers(tmp_path):
    base = make_tiny_llama(tmp_path / "base", seed=2, tie_word_embeddings=True)
    make_finetune(base, tmp_path / "tune", seed=9, touch_norms=False)
    rep = extract_lora(tmp_path / "base", tmp_path / "tune", tmp_path / "lora", rank=64, embed_lora=True,
                       progress=False)
    assert rep["modules"]["lm_head"]["rank"] == rep["modules"]["model.embed_tokens"]["rank"]  # the tied head too
    assert rep["modules_to_save"] == []
    want = _logits(tmp_path / "tune")
    torch.testing.assert_close(_logits(tmp_path / "base", tmp_path / "lora"), want, atol=1e-5, rtol=0)
    rep = extract_lora(tmp_path / "base", tmp_path / "tune", tmp_path / "whole", rank=64, progress=False)
    assert rep["modules_to_save"] == ["lm_head", "model.embed_tokens"]
    torch.testing.assert_close(_logits(tmp_path / "base", tmp_path / "whole"), want, atol=1e-5, rtol=0)


def test_a_fine_tune_with_added_tokens(tmp_path):
    """A fine-tune whose vocabulary grew (chat tokens added): embeddings and head saved whole, the base resized
    to it before PEFT loads the adapter, as PEFT expects; the logits are the fine-tune's."""
    base = make_tiny_llama(tmp_path / "base", seed=4)
    grown = make_finetune(base, tmp_path / "tmp", seed=8)
    grown.resize_token_embeddings(70)
    with torch.no_grad():
        grown.get_input_embeddings().weight[64:] = torch.randn(6, 32)
        grown.lm_head.weight[64:] = torch.randn(6, 32)
    grown.save_pretrained(tmp_path / "tune")
    rep = extract_lora(tmp_path / "base", tmp_path / "tune", tmp_path / "lora", rank=64, progress=False)
    assert rep["resized_vocabulary"] == 70 and {"model.embed_tokens", "lm_head"} <= set(rep["modules_to_save"])
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    m.resize_token_embeddings(70)
    m = PeftModel.from_pretrained(m, tmp_path / "lora").eval()
    x = torch.tensor([[1, 5, 66, 9, 69]])  # new tokens too
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, grown.eval()(x).logits, atol=1e-5, rtol=0)
    with pytest.raises(ModelInputError, match="a resized vocabulary.*it is excluded"):
        extract_lora(tmp_path / "base", tmp_path / "tune", tmp_path / "ex", exclude=["embed"], progress=False)


@pytest.mark.parametrize("tied", [False, True])
def test_a_fine_tune_that_trained_only_some_token_rows(tmp_path, tied):
    """A fine-tune that added tokens to embeddings it left alone, and retrained two old rows: those rows only,
    as PEFT's trainable tokens (the head's too when untied), not the whole matrices; PEFT over the resized base
    gives the fine-tune's logits, and our reader reads the adapter as the fine-tune; --no-token-rows saves
    them whole."""
    from branchmerge.io.adapters import open_model

    base = make_tiny_llama(tmp_path / "base", seed=4, tie_word_embeddings=tied)
    tune = make_finetune(base, tmp_path / "tmp", seed=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        tune.get_input_embeddings().weight.copy_(base.get_input_embeddings().weight)
        tune.lm_head.weight.copy_(base.lm_head.weight)
        tune.resize_token_embeddings(67, mean_resizing=False)
        tune.get_input_embeddings().weight[[5, 9, 64, 65, 66]] = torch.randn(5, 32, generator=g)
        if not tied:
            tune.lm_head.weight[[7, 64, 65, 66]] = torch.randn(4, 32, generator=g)
    tune.save_pretrained(tmp_path / "tune")
    rep = extract_lora(tmp_path / "base", tmp_path / "tune", tmp_path / "lora", rank=64, progress=False)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    rows = {"embed_tokens": [5, 9, 64, 65, 66], "lm_head": [7, 64, 65, 66]}
    assert cfg["trainable_token_indices"] == (rows["embed_tokens"] if tied else rows)
    assert not any("embed" in m or "lm_head" in m for m in cfg["modules_to_save"] or [])
    assert rep["trainable_tokens"] == ({"model.embed_tokens": 5} if tied else {"model.embed_tokens": 5, "lm_head": 4})
    stored = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert stored["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape == (5, 32)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    m.resize_token_embeddings(67)
    m = PeftModel.from_pretrained(m, tmp_path / "lora").eval()
    x = torch.tensor([[1, 5, 66, 9, 64, 7]])
    with torch.no_grad():
        want = tune.eval()(x).logits
        torch.testing.assert_close(m(x).logits, want, atol=1e-5, rtol=0)
    src = open_model("t", str(tmp_path / "lora"), base=str(tmp_path / "base"))
    assert max(float((src.get(k).float() - tune.state_dict()[k].float()).abs().max()) for k in src.names()) < 1e-5
    whole = extract_lora(tmp_path / "base", tmp_path / "tune", tmp_path / "whole", rank=64, token_rows=False,
                         progress=False)
    assert "model.embed_tokens" in whole["modules_to_save"] and not whole["trainable_tokens"]
    assert whole["adapter_bytes"] > rep["adapter_bytes"] + 64 * 32 * 4
