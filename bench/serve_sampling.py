"""Sampled requests under concurrent load: rows with their own temperature, top-p and seed in one batch,
against greedy requests and against running each seeded request alone (what the server did before it
sampled per row), side by side in one run, rounds interleaved (this machine is noisy).

The SmolLM2-135M bundle of `serve_auto.py` (three branches, r=0.95), branch m0 named, served in-process
on loopback. `--clients` threads send /v1/completions (8 new tokens) for `--seconds` per round.

    python bench/serve_sampling.py [--seconds 15] [--clients 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics

from serve_auto import bundle_with_router, load_round

import branchmerge
from branchmerge.server import create_app
from tests.serving import serving


def seeded(i: int) -> dict:
    """Client i's own seed and settings: temperatures 0.5-1.25, top-p 0.9 or none."""
    return {"seed": 1000 + i, "temperature": 0.5 + 0.05 * i, **({"top_p": 0.9} if i % 2 else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    bundle = branchmerge.load(bundle_with_router())
    setups = {"greedy": (16, lambda i: {}), "sampled, own seed and settings per client": (16, seeded),
              "same, each request alone (before)": (1, seeded)}
    apps = {name: create_app(bundle, max_batch=mb, wait_ms=20) for name, (mb, _) in setups.items()}
    got: dict[str, list[tuple[float, float]]] = {n: [] for n in setups}
    for r in range(args.rounds):
        for name, (_, body) in setups.items():
            with serving(apps[name]) as url:
                load_round(url, "m0", 2, 2, body)  # warm
                got[name].append(load_round(url, "m0", args.clients, args.seconds, body))
            print(f"round {r + 1}: {name}: {got[name][-1][0]:.2f} req/s, median {got[name][-1][1]:.2f} s", flush=True)
    ref = statistics.mean(x[0] for x in got["greedy"])
    print(f"\n{args.clients} clients, {args.seconds:g} s × {args.rounds} rounds each, 8 new tokens, "
          "SmolLM2-135M bundle r=0.95 float32, branch m0, in-process server on 127.0.0.1\n")
    print("| setup | requests/s | median latency (s) | throughput vs greedy |\n|---|---|---|---|")
    for name in setups:
        rps = statistics.mean(x[0] for x in got[name])
        print(f"| {name} | {rps:.2f} | {statistics.mean(x[1] for x in got[name]):.2f} | {rps / ref:.2f}× |")


if __name__ == "__main__":
    main()
