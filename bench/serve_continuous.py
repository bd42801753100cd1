"""Continuous batching under concurrent load: jobs join a running batch and leave it when they end
(`Engine(continuous=True)`, the default), the rows going on keeping their KV cache between segments
(`keep_kv=True`, the default), against the same with their text prefilled again at each segment
(`keep_kv=False`, what the engine did before) and static batches that run until their longest row ends
(`continuous=False`), side by side in one run, rounds interleaved.

The SmolLM2-135M bundle of `serve_auto.py` (three branches, r=0.95), branch m0 named, served in-process
on loopback. `--clients` threads send /v1/completions for `--seconds` per round: "Question: …\\nAnswer:"
with up to 64 new tokens, answers from 0 to 64 tokens long (one of the 8 questions runs to 64). Two
workloads: stop at a blank line or "Question:" (lm_eval's GSM8K `until`), and no stop strings. Then one
request of all 16 prompts at once (each question twice; no one joins, rows only leave), timed. Before
those, the engine alone (no HTTP, and end of text ignored, so every setup does the same work): 48 jobs of
fixed answer lengths sent by 16 closed-loop clients.

    python bench/serve_continuous.py [--seconds 15] [--clients 16] [--rounds 2]
"""

from __future__ import annotations

import statistics
import threading
import time

import httpx
from _common import fan_out
from serve_auto import PROMPTS, arguments, bundle_with_router, compare
from serve_stop import FORM, MAX_TOKENS, STOP

import branchmerge
from branchmerge.runtime.sampling import RowSettings
from branchmerge.server import create_app
from branchmerge.server.engine import Engine, Job
from tests.serving import serving


def app(bundle, continuous: bool, keep_kv: bool = True):
    a = create_app(bundle, max_batch=16, wait_ms=20)
    a.state.engine.continuous, a.state.engine.keep_kv = continuous, keep_kv
    return a


SETUPS = {"continuous, KV kept (now)": (True, True), "continuous, re-prefill": (True, False),
          "static batches": (False, False)}


LENGTHS = [64, 6, 12, 20, 9, 30, 15, 40]  # answer lengths of the closed-loop engine run (end of text ignored)


def engine_run(bundle, keep_kv: bool, continuous: bool = True, jobs: int = 48, clients: int = 16
               ) -> tuple[float, int, int]:
    """``(seconds, segments, tokens)`` of ``jobs`` jobs sent by ``clients`` threads straight to an engine
    (no HTTP), each client sending its next job when its last is answered; job ``k`` asks for
    ``LENGTHS[3k mod 8]`` tokens of question ``k mod 8`` with end of text ignored, so every setup does the
    same work."""
    ids = [bundle.encode(FORM.format(p), "m0", chat=False) for p in PROMPTS]
    engine = Engine(bundle, max_batch=16, wait_ms=20, continuous=continuous, keep_kv=keep_kv)
    sent, tokens, lock = [0], [0], threading.Lock()

    def client(_: int) -> None:
        while True:
            with lock:
                if sent[0] >= jobs:
                    return
                k = sent[0]
                sent[0] += 1
            job = engine.submit(Job(list(ids[k % len(ids)]), "m0", LENGTHS[3 * k % len(LENGTHS)],
                                    sampling=RowSettings(ignore_eos=True)))
            job.finished.wait()
            with lock:
                tokens[0] += len(job.new_ids)

    wall = fan_out(client, clients)
    return wall, engine.segments, tokens[0]


def main() -> None:
    args = arguments(__doc__)
    bundle = branchmerge.load(bundle_with_router())
    got: dict[str, list[tuple[float, int, int]]] = {name: [] for name in SETUPS}
    for _ in range(args.rounds):
        for name, (on, keep) in SETUPS.items():
            got[name].append(engine_run(bundle, keep, on))
    ref = statistics.median(x[0] for x in got["continuous, re-prefill"])
    print(f"\nengine alone, closed loop: 48 jobs from 16 clients, answers of {sorted(set(LENGTHS))} tokens, median of "
          f"{args.rounds}\n\n| setup | seconds | segments | tokens | speed vs re-prefill |\n|---|---|---|---|---|")
    for name, runs in got.items():
        sec = statistics.median(x[0] for x in runs)
        print(f"| {name} | {sec:.2f} | {runs[0][1]} | {runs[0][2]} | {ref / sec:.2f}× |", flush=True)
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
