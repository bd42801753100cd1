"""`model: auto` under concurrent load: routing batched across requests vs one request at a time, and
both vs naming the branch (no routing), side by side in one run, rounds interleaved (this machine is noisy).

A bundle of three SmolLM2-135M-based branches (r=0.95) with a stored router (the bundle's first branch
embeds; the write-up's template), served in-process on loopback. `--clients` threads send
/v1/completions (8 new tokens) for `--seconds` per round. Every question is new (a serial number is
appended), except in the last setup, where 8 questions repeat and the router's memory answers them.

    python bench/serve_auto.py [--seconds 15] [--clients 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

from _common import CACHE, closed_loop, perturbed_copies, smollm2_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.serving: a uvicorn server in a thread

import branchmerge  # noqa: E402
from branchmerge.config import parse_config  # noqa: E402
from branchmerge.front import build_bundle_router  # noqa: E402
from branchmerge.merge import run_merge  # noqa: E402
from branchmerge.router import RouterConfig  # noqa: E402
from branchmerge.server import create_app  # noqa: E402
from tests.serving import serving  # noqa: E402

PROMPTS = ["What is 7 times 8?", "Write a haiku about rain.", "What causes tides?", "Compute 12+30.",
           "Name a prime above 50.", "Describe a cat in one line.", "Why is the sky blue?", "Sort 3, 1, 2."]
SAMPLES = {"m0": ["What is 2+2?", "Solve 3x=9.", "Compute 15*4."], "m1": ["Write a poem.", "Tell a story."],
           "m2": ["What is DNA?", "Explain photosynthesis.", "Why do seasons change?"]}


def bundle_with_router() -> Path:
    base = smollm2_folder()
    models = [base, *perturbed_copies(base, 2)]
    bdir = CACHE / "auto-bundle"
    if not (bdir / "router").is_dir():
        run_merge(parse_config({"branches": [{"name": f"m{i}", "model": str(p)} for i, p in enumerate(models)],
                                "compress_rate": 0.95, "dtype": "float32"}), bdir, force=True, progress=False)
        build_bundle_router(branchmerge.load(bdir), RouterConfig(samples=SAMPLES))
    return bdir


_SERIAL = itertools.count()


def load_round(url: str, model: str, clients: int, seconds: float,
               body=lambda i: {}, distinct: bool = False, form: str = "{}",
               prompts: list[str] = PROMPTS) -> tuple[float, float]:
    """(requests/s, median latency s) of ``clients`` threads sending requests for ``seconds``; client i
    adds ``body(i)`` to each of its requests. With ``distinct``, each request's text is new (a serial
    number after the question), so the router's memory of past questions never answers. ``form``: the
    prompt around each of ``prompts``."""
    def send(http, i: int, k: int) -> None:
        prompt = form.format(prompts[k % len(prompts)] + (f" (#{next(_SERIAL)})" if distinct else ""))
        http.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8,
                                                 **body(i)}).raise_for_status()

    wall, lat = closed_loop(send, clients, seconds)
    return len(lat) / wall, statistics.median(lat)


def compare(setups: dict[str, tuple], args: argparse.Namespace, ref: str, header: str, vs: str,
            tokens: str = "8 new tokens") -> None:
    """Rounds of ``load_round`` over ``setups`` (name -> (app, model, load_round keywords)), interleaved, then a
    markdown table of the mean requests/s and median latency of each, with its throughput against ``ref``."""
    got: dict[str, list[tuple[float, float]]] = {n: [] for n in setups}
    for r in range(args.rounds):
        for name, (app, model, kw) in setups.items():
            with serving(app) as url:
                load_round(url, model, 2, 2, **kw)  # warm
                got[name].append(load_round(url, model, args.clients, args.seconds, **kw))
            print(f"round {r + 1}: {name}: {got[name][-1][0]:.2f} req/s, median {got[name][-1][1]:.2f} s", flush=True)
    base = statistics.mean(x[0] for x in got[ref])
    print(f"\n{args.clients} clients, {args.seconds:g} s × {args.rounds} rounds each, {tokens}, {header}\n")
    print(f"| setup | requests/s | median latency (s) | throughput vs {vs} |\n|---|---|---|---|")
    for name in setups:
        rps = statistics.mean(x[0] for x in got[name])
        print(f"| {name} | {rps:.2f} | {statistics.mean(x[1] for x in got[name]):.2f} | {rps / base:.2f}× |")


def arguments(doc: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    return ap.parse_args()


def main() -> None:
    args = arguments(__doc__)
    bundle = branchmerge.load(bundle_with_router())
    setups = {name: (create_app(bundle, max_batch=16, wait_ms=20, route_batch=rb), model, {"distinct": distinct})
              for name, (rb, model, distinct) in {
                  "branch m0 (no routing)": (64, "m0", True), "auto, routing batched": (64, "auto", True),
                  "auto, routed one by one": (1, "auto", True),
                  "auto, routing batched, 8 questions repeated": (64, "auto", False)}.items()}
    compare(setups, args, "branch m0 (no routing)", "SmolLM2-135M bundle r=0.95 float32, in-process server on "
            "127.0.0.1; every question new except in the last row (the router remembers 1,024 routed questions)",
            "naming the branch")


if __name__ == "__main__":
    main()
