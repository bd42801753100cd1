"""Tiny Llama models built in code (hidden 32–64, 2 layers), saved as real safetensors folders.

"Fine-tunes" are the base plus known low-rank deltas, so tests can assert exact recovery.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

# Triton kernels run on CPU tensors in Triton's interpreter (read when a kernel is defined, so set first)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

logging.getLogger("branchmerge").setLevel(logging.WARNING)


def tiny_config(hidden: int = 32, layers: int = 2, vocab: int = 64, **kw) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=kw.pop("max_position_embeddings", 128),
        tie_word_embeddings=kw.pop("tie_word_embeddings", False),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **kw,
    )


def make_tiny_llama(path: Path, seed: int = 0, **cfg_kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**cfg_kw)).eval()
    model.save_pretrained(path)
    return model


def make_finetune(base: LlamaForCausalLM, path: Path, seed: int, rank: int = 2, scale: float = 0.05,
                  touch_norms: bool = True) -> LlamaForCausalLM:
    """Copy of `base` with a rank-`rank` delta added to every 2-D block weight (and perturbed norms)."""
    g = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(copy.deepcopy(base.config)).eval()
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ".layers." in name:
                m, n = p.shape
                a = torch.randn(m, rank, generator=g) * scale
                b = torch.randn(rank, n, generator=g)
                p.add_(a @ b / rank**0.5 * p.abs().mean())
            elif touch_norms and "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            elif "embed" in name or "lm_head" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.save_pretrained(path)
    return model


def save_char_tokenizer(folder, chat: bool = False):
    """A real fast tokenizer over single characters (vocab 64), saved into a model folder."""
    chars = list(" abcdefghijklmnopqrstuvwxyz0123456789+-=.,?!:{}[]\"_<>/")  # (JSON's and tags: structured outputs)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for c in chars:
        vocab[c] = len(vocab)
    while len(vocab) < 64:
        vocab[f"<x{len(vocab)}>"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()  # decode is lossless: "add 5+5=", not "a d d   5 + 5 ="
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat:
        tok.chat_template = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, tuple[Path, LlamaForCausalLM]]:
    """A tiny base and three fine-tunes (branches a, b, c) saved as HF folders with a character tokenizer.
    Tests read these folders and never write into them."""
    root = tmp_path_factory.mktemp("family")
    base = make_tiny_llama(root / "base", seed=0)
    save_char_tokenizer(root / "base")
    out = {"base": (root / "base", base)}
    for i, name in enumerate(["a", "b", "c"]):
        out[name] = (root / name, make_finetune(base, root / name, seed=100 + i))
        save_char_tokenizer(root / name)
    return out


@pytest.fixture(scope="session")
def bundles(family, tmp_path_factory) -> dict[float, Path]:
    """Bundles of a, b, c at r=0 and r=0.9, merged once for the whole session (read-only: copy to change)."""
    from branchmerge.config import load_config
    from branchmerge.merge import run_merge

    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for r in (0.0, 0.9):
        cfg = write_config(root / f"c{r}.yaml", [{"name": n, "model": str(family[n][0])} for n in "abc"],
                           compress_rate=r)
        run_merge(load_config(cfg), root / f"b{r}", progress=False)
        out[r] = root / f"b{r}"
    return out


@pytest.fixture(scope="module")
def loaded(bundles):
    import branchmerge

    return {r: branchmerge.load(p, dtype="float32") for r, p in bundles.items()}


def write_config(path: Path, branches: list[dict], **kw) -> Path:
    data = {"branches": branches, "dtype": "float32", **kw}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture()
def family_config(family, tmp_path):
    def _make(rate: float = 0.0, names=("a", "b", "c"), **kw) -> Path:
        return write_config(
            tmp_path / f"merge-{rate}.yaml",
            [{"name": n, "model": str(family[n][0])} for n in names],
            compress_rate=rate,
            **kw,
        )

    return _make


def read_json(p: Path) -> dict:
    return json.loads(Path(p).read_text())


def check_mixed_as_alone(bundle, x, want: dict, max_new_tokens: int = 5, *, logits: bool = True) -> None:
    """Branches "a" and "b" of ``bundle`` in one batch answer as each alone: the rows of one forward of ``x``
    (row 0 through b, row 1 through a) equal ``want``'s logits (with ``logits``), and a mixed generation equals
    each prompt generated alone."""
    import torch

    if logits:
        mixed = bundle.logits(x, ["b", "a"])
        torch.testing.assert_close(mixed[0], want["b"][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mixed[1], want["a"][1], atol=1e-4, rtol=1e-4)
    kw = dict(chat=False, max_new_tokens=max_new_tokens, do_sample=False)
    outs = bundle.generate(["abc", "hello"], ["a", "b"], **kw)
    assert outs == [bundle.generate("abc", "a", **kw)[0], bundle.generate("hello", "b", **kw)[0]]
