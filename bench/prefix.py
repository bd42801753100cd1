"""Shared prompt prefixes, computed once vs per row, side by side in one run.

A 3-branch SmolLM2-135M bundle at r=0.95 (float32, CPU), through ``Bundle.generate_ids`` and
``Bundle.token_logprobs_many`` with ``share_prefix`` on and off:

* chat: 8 questions with one system prompt, through the branch's chat template, 16 new tokens;
* samples: 8 sampled completions of one prompt (the server's ``n=8``);
* scoring: 4 MMLU-style questions × 4 answers (lm_eval's loglikelihood requests).

    python bench/prefix.py [--repeat 6]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import branchmerge
from _common import smollm2_bundle
from runtime import paired, spread

SYSTEM = ("You are a careful assistant for a hospital's clinical staff. Answer in at most two sentences, "
          "name the guideline you rely on, and say when a question needs a physician's judgement instead.")
QUESTIONS = ["What is a normal resting heart rate?", "How is type 2 diabetes diagnosed?",
             "What does a high CRP level mean?", "When is an MRI preferred over a CT scan?",
             "What are the signs of dehydration?", "How long does a flu vaccine protect?",
             "What is the first aid for a burn?", "Why is potassium monitored with diuretics?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=6)
    args = ap.parse_args()
    _, bdir = smollm2_bundle(0.95)
    b = branchmerge.load(bdir, dtype="float32")
    tok = b.tokenizer("m1")

    def chat_ids(q: str) -> list[int]:
        ids = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                      add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    chats = [chat_ids(q) for q in QUESTIONS]
    one = chat_ids(QUESTIONS[0])
    stems = [f"Question: {q}\nA. yes\nB. no\nC. sometimes\nD. never\nAnswer:" for q in QUESTIONS[:4]]
    scored = [tok(s)["input_ids"] + tok(f" {c}")["input_ids"] for s in stems for c in "ABCD"]
    cases = {
        "chat, 8 prompts, one system prompt": lambda share: b.generate_ids(
            chats, ["m1"] * 8, max_new_tokens=16, share_prefix=share),
        "8 samples of one prompt (n=8)": lambda share: b.generate_ids(
            [one] * 8, ["m1"] * 8, max_new_tokens=16, share_prefix=share, do_sample=True, temperature=0.8),
        "scoring, 4 questions × 4 answers": lambda share: b.token_logprobs_many(
            scored, ["m1"] * 16, top=1, greedy_next=True, share_prefix=share),
    }
    print(f"prompt lengths: chat {min(map(len, chats))}–{max(map(len, chats))} tokens "
          f"(shared {len(os.path.commonprefix(chats))}); scoring {len(scored[0])}–{max(map(len, scored))}")
    print("\n| workload | time, shared prefix / not shared (median, quartiles) | seconds not shared |\n|---|---|---|")
    for name, fn in cases.items():
        fn(True), fn(False)  # warm-up
        ratios, secs = paired(lambda: fn(False), lambda: fn(True), args.repeat)
        print(f"| {name} | {spread(ratios)} | {statistics.median(secs) / statistics.median(ratios):.2f} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
