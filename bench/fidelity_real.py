"""Fidelity on real weights: two full fine-tunes of SmolLM2-135M-Instruct, merged every way.

The script builds its own fine-tunes (CPU, deterministic, cached under bench/.cache/real/):

* ``facts``  — 40 invented country → capital facts the model could not know
  ("What is the capital of Velmora?" → "Quenhaven")
* ``words``  — numbers written in words in a strict lower-case hyphenated format
  ("Write 47 in words." → "forty-seven"), scored on numbers never trained on

Then the same table as bench/fidelity.py: base, originals, `linear`, `ties`, and branchmerge at
r ∈ {0.9, 0.95, 0.99}; exact match of the greedy answer.

    python bench/fidelity_real.py [--steps 120]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _common import CACHE, ROOT, smollm2_folder
from branchmerge.config import parse_config
from branchmerge.merge import run_merge
from branchmerge.io.writer import claim_output

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def words(n: int) -> str:
    if n < 20:
        return ONES[n]
    t, o = divmod(n, 10)
    return TENS[t] + ("" if o == 0 else "-" + ONES[o])


def invent_facts(n: int = 40) -> list[tuple[str, str]]:
    rng = random.Random(7)
    syl = ["vel", "mor", "qua", "zen", "tar", "lun", "bri", "sol", "kar", "dun", "ith", "ova", "pra", "shen"]
    out, seen = [], set()
    while len(out) < n:
        country = (rng.choice(syl) + rng.choice(syl) + rng.choice(["a", "ia", "ora", "and"])).capitalize()
        city = (rng.choice(syl) + rng.choice(syl) + rng.choice(["haven", "port", "burg", "ton"])).capitalize()
        if country not in seen:
            seen.add(country)
            out.append((f"What is the capital of {country}?", city))
    return out


FACTS = invent_facts()
TRAIN_NUMS = [n for n in range(100) if n % 5 != 3]
TEST_NUMS = [n for n in range(100) if n % 5 == 3]
TASKS = {
    "facts": (FACTS, FACTS),  # facts cannot be held out: the test is recall of what was taught
    "words": ([(f"Write {n} in words.", words(n)) for n in TRAIN_NUMS],
              [(f"Write {n} in words.", words(n)) for n in TEST_NUMS]),
}


def encode_pair(tok, q: str, a: str) -> tuple[list[int], int]:
    prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    ans = tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt + ans, len(prompt)


def finetune(base: Path, task: str, out: Path, steps: int, lr: float = 1e-4, batch: int = 8) -> Path:
    if (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(0)
    rng = random.Random(1)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    train = TASKS[task][0]
    t0 = time.perf_counter()
    for step in range(steps):
        pairs = [rng.choice(train) for _ in range(batch)]
        enc = [encode_pair(tok, q, a) for q, a in pairs]
        width = max(len(ids) for ids, _ in enc)
        ids = torch.full((batch, width), tok.pad_token_id or 0)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for r, (seq, start) in enumerate(enc):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            labels[r, start: len(seq)] = torch.tensor(seq[start:])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            print(f"  {task} step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@torch.no_grad()
def score(generate, task: str) -> float:
    test = TASKS[task][1]
    answers = generate([q for q, _ in test])
    return sum(a.strip().rstrip(".").lower() == e.lower() for a, (_, e) in zip(answers, test)) / len(test)


def hf_answers(folder: Path):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return chat_answers(model, tok)


def chat_answers(model, tok, max_new_tokens: int = 12):
    """``generate(questions) -> answers``: greedy, through the chat template, left-padded batches."""
    tok.padding_side = "left"

    @torch.no_grad()
    def gen(qs: list[str]) -> list[str]:
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
                 for q in qs]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return [tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True) for o in out]

    return gen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args()
    t0 = time.perf_counter()
    base = smollm2_folder()
    work = CACHE / "real"
    fts = {t: finetune(base, t, work / f"ft-{t}-{args.steps}", args.steps) for t in TASKS}
    t_train = time.perf_counter() - t0
    rows = [("SmolLM2-135M-Instruct (base)", {t: score(hf_answers(base), t) for t in TASKS})]
    rows.append(("fine-tunes (one per task)", {t: score(hf_answers(fts[t]), t) for t in TASKS}))
    branches = [{"name": t, "model": str(p)} for t, p in fts.items()]
    for method in ("linear", "ties"):
        out = work / f"merge-{method}"
        claim_output(out)
        run_merge(parse_config({"branches": branches, "method": method, "base_model": str(base), "dtype": "float32",
                                "parameters": {"density": 0.5} if method == "ties" else {}}), out, force=True,
                  progress=False)
        gen = hf_answers(out)
        rows.append((method, {t: score(gen, t) for t in TASKS}))
    import branchmerge

    for r in (0.9, 0.95, 0.99):
        out = work / f"bundle-{r}"
        run_merge(parse_config({"branches": branches, "compress_rate": r, "dtype": "float32"}), out, force=True,
                  progress=False)
        b = branchmerge.load(out, verify=False)
        acc = {t: score(lambda qs, t=t: b.generate(qs, t, max_new_tokens=12), t) for t in TASKS}
        rows.append((f"branchmerge r={r}", acc))
    ft = rows[1][1]
    lines = ["| model | " + " | ".join(TASKS) + " | kept vs fine-tune (worst task) |", "|---|" + "---|" * (len(TASKS) + 1)]
    for name, acc in rows:
        kept = min(acc[t] / ft[t] if ft[t] else 1.0 for t in TASKS)
        lines.append(f"| {name} | " + " | ".join(f"{acc[t]:.2f}" for t in TASKS) + f" | {kept:.0%} |")
    table = "\n".join(lines)
    (ROOT / "fidelity_real.md").write_text(table + "\n")
    print(table)
    print(f"\nfine-tuning {t_train:.0f}s, total {time.perf_counter() - t0:.0f}s; {args.steps} steps per task")


if __name__ == "__main__":
    main()
