"""The embedded default: a family of tiny Llama fine-tunes, trained in code on CPU, deterministic.

A base model is trained briefly on a mixture of four synthetic skills, then each skill gets a full
fine-tune from that base. Each skill is a prompt → answer mapping judged by exact match of the greedy
answer:

* ``rev``    — ``rev hello=`` → ``olleh``
* ``shift``  — ``shift abc=`` → ``def`` (each letter moved 3 forward)
* ``dup``    — ``dup abc=`` → ``aabbcc``
* ``recall`` — ``key qz=`` → a value from a fixed random table; the base learned another table for the
  same keys, so the fine-tune must learn facts the base could not know

The family is saved as ordinary Hugging Face folders (config, safetensors, a character tokenizer with a
chat-free format), so every command of the project, and mergekit, can read them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import string
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SKILLS = ("rev", "shift", "dup", "recall")
FAMILY_VERSION = 3
CHARS = " " + string.ascii_lowercase + string.digits + "+="
PAD, BOS, EOS = 0, 1, 2
VOCAB = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{c: i + 3 for i, c in enumerate(CHARS)}}
VOCAB_SIZE = 64
N_KEYS = 40


def _recall_table(seed: int) -> dict[str, str]:
    rng = random.Random(4242)
    keys: list[str] = []
    while len(keys) < N_KEYS:
        k = "".join(rng.choice(string.ascii_lowercase) for _ in range(2))
        if k not in keys:
            keys.append(k)
    rng = random.Random(seed)
    return {k: "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(3)) for k in keys}


RECALL_TABLE = _recall_table(99)
BASE_TABLE = _recall_table(7)  # what the base learns for `key`; the recall fine-tune learns new facts


def _word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def make_example(skill: str, rng: random.Random, *, base: bool = False) -> tuple[str, str]:
    """One ``(prompt, answer)`` pair of ``skill`` (``base``: the base model's own recall table)."""
    if skill == "rev":
        w = _word(rng)
        return f"rev {w}=", w[::-1]
    if skill == "shift":
        w = _word(rng)
        return f"shift {w}=", "".join(chr((ord(c) - 97 + 3) % 26 + 97) for c in w)
    if skill == "dup":
        w = _word(rng, 2, 5)
        return f"dup {w}=", "".join(c + c for c in w)
    if skill == "recall":
        table = BASE_TABLE if base else RECALL_TABLE
        k = rng.choice(list(table))
        return f"key {k}=", table[k]
    raise ValueError(f"unknown skill {skill!r}; skills are {', '.join(SKILLS)}")


def sample_prompts(skill: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct held-out ``(prompt, answer)`` pairs (recall: the table itself, cycled)."""
    if skill == "recall":
        items = [(f"key {k}=", v) for k, v in RECALL_TABLE.items()]
        random.Random(seed).shuffle(items)
        return [items[i % len(items)] for i in range(n)]
    rng = random.Random(10_000 + seed * 31 + SKILLS.index(skill))
    out: dict[str, str] = {}
    while len(out) < n:
        p, a = make_example(skill, rng)
        out[p] = a
    return list(out.items())


@cache
def held_out(skill: str) -> frozenset[str]:
    return frozenset(p for p, _ in sample_prompts(skill, 100, seed=0)) if skill != "recall" else frozenset()


def save_tokenizer(folder: Path):
    """A character-level fast tokenizer, saved as ``tokenizer.json`` with its config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(VOCAB)
    while len(vocab) < VOCAB_SIZE:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    tok.save_pretrained(folder)
    return tok


def encode(text: str) -> list[int]:
    return [VOCAB[c] for c in text]


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        architectures=["LlamaForCausalLM"],
    )


def _batch(skills: tuple[str, ...], rng: random.Random, size: int, base: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and labels (answer tokens only), right-padded: ``[B, T]`` each."""
    seqs, starts = [], []
    for _ in range(size):
        skill = rng.choice(skills)
        excluded = held_out(skill)
        while True:
            p, a = make_example(skill, rng, base=base)
            if p not in excluded:
                break
        ids = [BOS, *encode(p)]
        starts.append(len(ids))
        seqs.append(ids + encode(a) + [EOS])
    width = max(map(len, seqs))
    ids = torch.full((size, width), PAD)
    labels = torch.full((size, width), -100)
    mask = torch.zeros((size, width), dtype=torch.long)
    for r, (s, st) in enumerate(zip(seqs, starts)):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
        labels[r, st : len(s)] = torch.tensor(s[st:])
    return ids, mask, labels


def train(model, skills: tuple[str, ...], steps: int, lr: float, seed: int, progress: bool = False, desc: str = "",
          base: bool = False):
    """AdamW with linear warm-up and decay; loss on answer tokens only."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    model.train()
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        ids, mask, labels = _batch(skills, rng, 64, base=base)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(generate: Callable[[list[str]], list[str]], skill: str, n: int = 100, seed: int = 0) -> float:
    """Exact-match accuracy of ``generate`` (prompts → answers) on held-out prompts of ``skill``."""
    pairs = sample_prompts(skill, n, seed=seed)
    answers = generate([p for p, _ in pairs])
    return sum(a.strip() == e for a, (_, e) in zip(answers, pairs)) / len(pairs)


def hf_generate(model, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
    """Greedy answers of a plain HF model for a batch of prompts (left-padded)."""
    seqs = [[BOS, *encode(p)] for p in prompts]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=PAD, eos_token_id=EOS)
    inv = {v: k for k, v in VOCAB.items()}
    res = []
    for row in out[:, width:].tolist():
        text = []
        for t in row:
            if t == EOS:
                break
            text.append(inv.get(t, ""))
        res.append("".join(x for x in text if len(x) == 1))
    return res


def default_family_dir() -> Path:
    """Where the family is built once and reused by ``make demo``, the tests and the benchmarks:
    ``$BRANCHMERGE_CACHE/family-vN``, by default ``~/.cache/branchmerge/family-vN``."""
    root = os.environ.get("BRANCHMERGE_CACHE") or Path.home() / ".cache" / "branchmerge"
    return Path(root) / f"family-v{FAMILY_VERSION}"


def build_family(folder: str | Path | None = None, *, base_steps: int = 150, ft_steps: int = 300,
                 ft_lr: float = 1e-3, progress: bool = False) -> dict[str, Path]:
    """Build (or reuse, when its stamp matches) the base and one fine-tune per skill, in ``folder``
    (default :func:`default_family_dir`). About 80 s on 2 quiet cores; written to a temporary folder and
    renamed into place, so an interrupted build leaves nothing that looks complete.

    Returns:
        ``{"base": path, skill: path, ...}``, each an HF folder.
    """
    from transformers import LlamaForCausalLM

    from branchmerge.io.writer import atomic_output_dir

    folder = Path(folder) if folder is not None else default_family_dir()
    names = ["base", *SKILLS]
    meta = {"version": FAMILY_VERSION, "base_steps": base_steps, "ft_steps": ft_steps, "ft_lr": ft_lr}
    if _complete(folder, meta, names):
        return {n: folder / n for n in names}
    t0 = time.perf_counter()
    say = logger.warning if progress else logger.info  # the demo shows each step; a library user asked for quiet
    say("training the embedded family into %s (about 80 s on 2 cores, once; reused afterwards)", folder)
    with atomic_output_dir(folder, force=True, owned_only=False) as tmp:
        torch.manual_seed(0)
        base = LlamaForCausalLM(model_config())
        train(base, SKILLS, base_steps, 3e-3, seed=1, progress=progress, desc="base (mixture)", base=True)
        _save(base, tmp / "base")
        report = {}
        for i, skill in enumerate(SKILLS):
            ft = LlamaForCausalLM(model_config())
            ft.load_state_dict(base.state_dict())
            train(ft, (skill,), ft_steps, ft_lr, seed=10 + i, progress=progress, desc=f"fine-tune {skill}")
            _save(ft, tmp / skill)
            report[skill] = accuracy(lambda ps: hf_generate(ft, ps), skill)
            say("fine-tune %s: accuracy %.2f (%.0f s so far)", skill, report[skill], time.perf_counter() - t0)
        (tmp / "family.json").write_text(json.dumps({"params": meta, "accuracy": report,
                                                     "seconds": time.perf_counter() - t0}, indent=2))
    logger.info("family built in %.0fs: %s", time.perf_counter() - t0, report)
    return {n: folder / n for n in names}


def _complete(folder: Path, meta: dict, names: list[str]) -> bool:
    stamp = folder / "family.json"
    try:
        ok = json.loads(stamp.read_text()).get("params") == meta
    except (OSError, ValueError):
        return False
    return ok and all((folder / n / "model.safetensors").is_file() for n in names)


def _save(model, path: Path) -> None:
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.save_pretrained(path)
    save_tokenizer(path)


def router_config(base: str | Path, samples_per_skill: int = 5):
    """The family's router: the base model as embedder, the write-up's phrase in lower case (the character
    tokenizer has no capitals) right after the input, last-token pooling at layer 1 (best of a grid over
    templates, pooling and layers on a validation set of prompts disjoint from the evaluation set)."""
    from branchmerge.router import RouterConfig

    phrase = "these questions belong to the field of"
    return RouterConfig(
        samples={s: [p for p, _ in sample_prompts(s, samples_per_skill, seed=77)] for s in SKILLS},
        embedder=str(base),
        template="{input} " + phrase,
        phrase=phrase,
        pooling="last",
        layer=1,
    )
