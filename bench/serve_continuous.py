"""Continuous batching under concurrent load: jobs join a running batch and leave it when they end
(`Engine(continuous=True)`, the default), the rows going on keeping their KV cache between segments
(`keep_kv=True`, the default), against the same with their text prefilled again at each segment
(`keep_kv=False`, what the engine did before) and static batches that run until their longest row ends
(`continuous=False`), side by side in one run, rounds interleaved.

The SmolLM2-135M bundle of `serve_auto.py` (three branches, r=0.95), branch m0 named, served in-process
on loopback. `--clients` threads send /v1/completions for `--seconds` per round: "Question: …\\nAnswer:"
with up to 64 new tokens, answers from 0 to 64 tokens long (one of the 8 questions runs to 64). Two
workloads: stop at a blank line or "Question:" (lm_eval's GSM8K `until`), and no stop strings. Then one
request of all 16 prompts at once (each question twice; no one joins, rows only leave), timed.

    python bench/serve_continuous.py [--seconds 15] [--clients 16] [--rounds 2]
"""

from __future__ import annotations

import time

import httpx
from serve_auto import PROMPTS, arguments, bundle_with_router, compare
from serve_stop import FORM, MAX_TOKENS, STOP

import branchmerge
from branchmerge.server import create_app
from tests.serving import serving


def app(bundle, continuous: bool, keep_kv: bool = True):
    a = create_app(bundle, max_batch=16, wait_ms=20)
    a.state.engine.continuous, a.state.engine.keep_kv = continuous, keep_kv
    return a


SETUPS = {"continuous, KV kept (now)": (True, True), "continuous, re-prefill": (True, False),
          "static batches": (False, False)}


def main() -> None:
    args = arguments(__doc__)
    bundle = branchmerge.load(bundle_with_router())
    for load, body in (("stop strings", {"max_tokens": MAX_TOKENS, "stop": STOP}),
                       ("no stop strings", {"max_tokens": MAX_TOKENS})):
        setups = {name: (app(bundle, *how), "m0", {"body": lambda i, b=body: b, "form": FORM})
                  for name, how in SETUPS.items()}
        compare(setups, args, "continuous, re-prefill", f"{load}, SmolLM2-135M bundle r=0.95 float32, branch m0, "
                "in-process server on 127.0.0.1", "re-prefill", tokens=f"up to {MAX_TOKENS} new tokens")
    body = {"model": "m0", "prompt": [FORM.format(p) for p in PROMPTS * 2], "max_tokens": MAX_TOKENS}
    times: dict[str, list[float]] = {name: [] for name in SETUPS}
    for _ in range(args.rounds):
        for name, how in SETUPS.items():
            with serving(app(bundle, *how)) as url, httpx.Client(timeout=600) as c:
                t = time.perf_counter()
                c.post(url + "/v1/completions", json=body).raise_for_status()
                times[name].append(time.perf_counter() - t)
    print(f"\none request of {len(body['prompt'])} prompts (up to {MAX_TOKENS} new tokens), best of {args.rounds}: "
          + ", ".join(f"{name} {min(t):.2f} s" for name, t in times.items()))


if __name__ == "__main__":
    main()
