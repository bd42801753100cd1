"""A new user's first hour, as tests: real architectures as standalone branches, defaults that fit,
dtype and device spellings, readable output."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel

import branchmerge
from branchmerge.config import load_config
from branchmerge.errors import BranchmergeError
from branchmerge.merge import run_merge
from tests.cli_util import run_cli
from tests.conftest import save_char_tokenizer, write_config


@pytest.fixture(scope="module")
def mixed(family, tmp_path_factory):
    """A bundle of the a/b group plus a tiny Gemma-3 and a tiny GPT-2 (learned positions) as standalone
    branches, with the reference models."""
    root = tmp_path_factory.mktemp("mixed")
    torch.manual_seed(0)
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=64, max_position_embeddings=128, sliding_window=16, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64,
                                      bos_token_id=1, eos_token_id=2)).eval()
    for name, m in (("gemma", gemma), ("gpt2", gpt2)):
        m.save_pretrained(root / name)
        save_char_tokenizer(root / name)
    cfg = write_config(root / "c.yaml", [
        {"name": "a", "model": str(family["a"][0])}, {"name": "b", "model": str(family["b"][0])},
        {"name": "gemma", "model": str(root / "gemma"), "standalone": True},
        {"name": "gpt2", "model": str(root / "gpt2"), "standalone": True}], compress_rate=0.5)
    run_merge(load_config(cfg), root / "bundle", progress=False)
    return {"path": root / "bundle", "gemma": gemma, "gpt2": gpt2}


@pytest.mark.parametrize("name", ["gemma", "gpt2"])
def test_other_architectures_as_standalone_branches(mixed, name):
    """Gemma-3 (whose embedding has a computed `embed_scale` buffer) and GPT-2 load, equal their originals,
    generate, and do not stop the other branches from loading."""
    b = branchmerge.load(mixed["path"], dtype="float32")
    x = torch.randint(3, 64, (2, 9))
    with b.use(name) as m, torch.no_grad():
        torch.testing.assert_close(m(x).logits, mixed[name](x).logits, atol=1e-5, rtol=0)
    ids = b.encode("abc", name)
    want = mixed[name].generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=2,
                                pad_token_id=0)[0, len(ids):]
    want = want.tolist()[:want.tolist().index(2)] if 2 in want.tolist() else want.tolist()  # up to eos
    assert b.generate_ids([ids], [name], max_new_tokens=5)[0].new_ids == want
    assert b.generate(["add 1+2=", "abc"], ["a", name], max_new_tokens=3)[1] == b.generate("abc", name,
                                                                                            max_new_tokens=3)[0]
