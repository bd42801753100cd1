"""Answer logprobs recorded as tokens are drawn, against a second scoring pass over prompt and answer
(what the server did for chat `logprobs` before), and against no logprobs at all; side by side in one run,
rounds interleaved (this machine is noisy).

The SmolLM2-135M bundle of `serve_auto.py` (three branches, r=0.95, float32), its serving engine in-process
(no HTTP): each round submits `--prompts` chat prompts over the three branches at once, `--tokens` new
tokens each (end of text ignored), greedy, and waits for all of them. The recorded and the scored values of
each token are compared too.

    python bench/logprobs.py [--rounds 5] [--prompts 16] [--tokens 32] [--top 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from serve_auto import PROMPTS, bundle_with_router

import branchmerge
from branchmerge.runtime.sampling import RowSettings
from branchmerge.server.engine import Engine, Job


def one_round(engine: Engine, bundle, prompts: list[tuple[list[int], str]], tokens: int, top: int | None,
              score: bool) -> tuple[float, list[Job], list[Job]]:
    """(seconds, generation jobs, scoring jobs) of one round."""
    t0 = time.perf_counter()
    jobs = engine.submit_many([Job(ids, b, tokens, sampling=RowSettings(ignore_eos=True, logprobs=top))
                               for ids, b in prompts])
    for j in jobs:
        assert j.finished.wait(600) and j.error is None, j.error
    scored: list[Job] = []
    if score:  # as the server did: one scoring job per answer, prompt + answer, once the answers are in
        scored = engine.submit_many([Job(j.ids + j.new_ids, j.branch, 0, score=(top or 0, False)) for j in jobs])
        for j in scored:
            assert j.finished.wait(600) and j.error is None, j.error
    return time.perf_counter() - t0, jobs, scored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--top", type=int, default=5)
    args = ap.parse_args()
    bundle = branchmerge.load(bundle_with_router())
    names = bundle.branch_names
    prompts = [(bundle.encode_messages([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], names[i % len(names)]),
                names[i % len(names)]) for i in range(args.prompts)]
    engine = Engine(bundle, max_batch=args.prompts, wait_ms=5)
    setups = {"no logprobs": (None, False), f"logprobs, top {args.top}, recorded as drawn (now)": (args.top, False),
              f"logprobs, top {args.top}, second scoring pass (before)": (None, True)}
    times: dict[str, list[float]] = {n: [] for n in setups}
    one_round(engine, bundle, prompts[:2], 4, None, True)  # warm
    diff = 0.0
    for r in range(args.rounds):
        runs = {}
        for name, (top, score) in setups.items():
            runs[name] = one_round(engine, bundle, prompts, args.tokens, top, score)
            times[name].append(runs[name][0])
        (_, rec, _), (_, _, sc) = runs[list(setups)[1]], runs[list(setups)[2]]
        for j, s in zip(rec, sc):
            diff = max(diff, max(abs(e.logprob - v) for e, v in zip(j.record, s.scored.logprobs[len(j.ids):])))
        print(f"round {r + 1}: " + ", ".join(f"{n}: {t[-1]:.2f} s" for n, t in times.items()), flush=True)
    base = statistics.median(times["no logprobs"])
    print(f"\n{args.prompts} chat prompts over {len(names)} branches, {args.tokens} new tokens each, greedy, one "
          f"engine batch; SmolLM2-135M bundle r=0.95 float32; median of {args.rounds} rounds\n")
    print("| setup | seconds a round | vs no logprobs |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.2f} | {statistics.median(t) / base:.2f}× |")
    print(f"\nlargest difference between a recorded and a scored token logprob: {diff:.1e}")


if __name__ == "__main__":
    main()
