"""The server's prefix cache: finished requests' KV caches serve later requests that begin the same way
(`create_app(prefix_cache_tokens=8192)`, the default) against none kept (`prefix_cache_tokens=0`), side by
side in one run, rounds interleaved.

The SmolLM2-135M bundle of `serve_auto.py` (branch m0, r=0.95, float32), served in-process on loopback.
Two chat workloads, `--clients` closed-loop clients each:

- **conversations**: each client holds a conversation of `--turns` turns (a question, the answer appended,
  the next question…), 16 new tokens a turn: from the second turn on, a request begins with the previous
  one's text;
- **shared system prompt**: a long system prompt (about 400 tokens) before each client's own question,
  8 new tokens: every request begins the same way.

Reported: requests (turns) per second, the median time to a whole answer, and the prompt tokens not
prefilled (from /metrics' `kv_reused_tokens_total`, which also counts running rows' caches kept between
segments: that part is in both setups).

    python bench/serve_prefix_cache.py [--seconds 20] [--clients 8] [--rounds 2] [--turns 4]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import httpx
from _common import closed_loop
from serve_auto import PROMPTS, bundle_with_router

import branchmerge
from branchmerge.server import create_app
from tests.serving import serving

SYSTEM = " ".join(["You are a careful assistant for a small engineering team. Answer in one short sentence, "
                   "name the unit of every number, say so when a question is ambiguous, and never invent a "
                   "source. Prefer plain words to jargon, and give the result before the reasoning."] * 6)
_SERIAL = itertools.count()


def reused(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("branchmerge_kv_reused_tokens_total"):
            return float(line.split()[-1])
    return 0.0


def conversations(url: str, clients: int, seconds: float, turns: int) -> tuple[float, float, int]:
    """(requests/s, median seconds a request, requests) of closed-loop clients holding conversations."""
    def send(http, i: int, k: int) -> list[float]:
        msgs, lat = [], []
        for t in range(turns):
            msgs.append({"role": "user", "content": f"{PROMPTS[(k + t) % len(PROMPTS)]} (#{next(_SERIAL)})"})
            t0 = time.monotonic()
            r = http.post(url + "/v1/chat/completions", json={"model": "m0", "messages": msgs, "max_tokens": 16})
            r.raise_for_status()
            lat.append(time.monotonic() - t0)
            msgs.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
        return lat

    wall, lat = closed_loop(send, clients, seconds)
    return len(lat) / wall, statistics.median(lat), len(lat)


def system_prompt(url: str, clients: int, seconds: float) -> tuple[float, float, int]:
    """(requests/s, median seconds a request, requests) of closed-loop clients, one long system prompt."""
    def send(http, i: int, k: int) -> None:
        msgs = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"{PROMPTS[k % len(PROMPTS)]} (#{next(_SERIAL)})"}]
        http.post(url + "/v1/chat/completions", json={"model": "m0", "messages": msgs, "max_tokens": 8}
                  ).raise_for_status()

    wall, lat = closed_loop(send, clients, seconds)
    return len(lat) / wall, statistics.median(lat), len(lat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--turns", type=int, default=4)
    args = ap.parse_args()
    bundle = branchmerge.load(bundle_with_router())
    setups = {"prefix cache (8,192 tokens)": 8192, "no prefix cache": 0}
    loads = {"conversations": lambda url: conversations(url, args.clients, args.seconds, args.turns),
             "shared system prompt": lambda url: system_prompt(url, args.clients, args.seconds)}
    for load, run in loads.items():
        got: dict[str, list[tuple[float, float, int, float]]] = {n: [] for n in setups}
        for r in range(args.rounds):
            for name, tokens in setups.items():
                with serving(create_app(bundle, max_batch=16, wait_ms=20, prefix_cache_tokens=tokens)) as url:
                    rate, med, n = run(url)
                    got[name].append((rate, med, n, reused(url)))
                print(f"round {r + 1}, {load}: {name}: {rate:.3f} req/s, median {med:.2f} s, {n} done, "
                      f"{got[name][-1][3]:.0f} tokens not prefilled", flush=True)
        base = statistics.mean(x[0] for x in got["no prefix cache"])
        print(f"\n{load}: {args.clients} clients, {args.seconds:g} s × {args.rounds} rounds, SmolLM2-135M bundle "
              f"r=0.95 float32, branch m0\n\n| setup | requests/s | median s a request | prompt tokens not prefilled "
              f"(per round) | vs no cache |\n|---|---|---|---|---|")
        for name in setups:
            rate = statistics.mean(x[0] for x in got[name])
            print(f"| {name} | {rate:.3f} | {statistics.mean(x[1] for x in got[name]):.2f} | "
                  f"{statistics.mean(x[3] for x in got[name]):.0f} | {rate / base:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
