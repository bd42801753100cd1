"""Long prompts off the event loop: what clients sending 100,000-character conversations cost the others.

A bundle of three SmolLM2-135M-based branches (r=0.95, float32) served in-process on 127.0.0.1. Flooding
clients send chat requests of 100,000 characters (SmolLM2's tokenizer and chat template render them into
~22k tokens, past its 8,192-token context: each gets a 400 once its prompt is read). Meanwhile a probe reads
`/health` every 20 ms and a streaming client asks for 24 tokens again and again. Five servers one after another
in one run: prompts read on the event loop (before), on asyncio's default thread pool, on 2 threads or 1
thread for all prompts, and on one thread for short prompts and one for long (now). Reported: the probe's
latency, the stream's gaps between chunks and its time to its first chunk (sent once its prompt is read).

    python bench/serve_long_prompts.py [--seconds 20] [--flooders 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from _common import smollm2_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.serving: a uvicorn server in a thread

import branchmerge  # noqa: E402
from branchmerge.server import api, create_app  # noqa: E402
from tests.serving import serving  # noqa: E402

LONG = ("The quick brown fox jumps over the lazy dog. " * 2300)[:100_000]


@contextmanager
def prompts_read(mode: str):
    """Where the server reads prompts: ``loop`` (on the event loop, as before), ``default`` (asyncio's default
    thread pool, ``asyncio.to_thread``), ``N`` threads for all prompts, or ``now`` (one thread for short
    prompts, one for long)."""
    real = api.OpenAIService.off_loop
    if mode == "now":
        yield
        return
    pool = ThreadPoolExecutor(int(mode)) if mode.isdigit() else None

    async def off_loop(self, fn, *args, chars=0):
        if mode == "loop":
            return fn(*args)
        if mode == "default":
            return await asyncio.to_thread(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(pool, lambda: fn(*args))

    api.OpenAIService.off_loop = off_loop
    try:
        yield
    finally:
        api.OpenAIService.off_loop = real
        if pool is not None:
            pool.shutdown()


def run(bundle, seconds: float, flooders: int, mode: str) -> dict:
    stop = threading.Event()
    health: list[float] = []
    gaps: list[float] = []
    ttft: list[float] = []
    refused = [0]

    def flood(url: str) -> None:
        with httpx.Client(timeout=60) as h:
            while not stop.is_set():
                r = h.post(url + "/v1/chat/completions", json={"model": "m1", "max_tokens": 4,
                                                                "messages": [{"role": "user", "content": LONG}]})
                refused[0] += r.status_code == 400

    def probe(url: str) -> None:
        with httpx.Client(timeout=60) as h:
            while not stop.is_set():
                t = time.perf_counter()
                h.get(url + "/health")
                health.append(time.perf_counter() - t)
                time.sleep(0.02)

    def stream(url: str) -> None:
        with httpx.Client(timeout=120) as h:
            while not stop.is_set():
                last, t = None, time.perf_counter()
                with h.stream("POST", url + "/v1/completions", json={
                        "model": "m0", "prompt": "Count: one, two, three,", "max_tokens": 24, "temperature": 0,
                        "stream": True}) as r:
                    for line in r.iter_lines():
                        now = time.perf_counter()
                        if line.startswith("data: {"):
                            if last is not None:
                                gaps.append(now - last)
                            else:
                                ttft.append(now - t)
                            last = now

    with prompts_read(mode), serving(create_app(bundle, max_batch=8, wait_ms=5)) as url:
        httpx.post(url + "/v1/completions", json={"model": "m0", "prompt": "warm", "max_tokens": 2}, timeout=120)
        threads = [threading.Thread(target=flood, args=(url,)) for _ in range(flooders)]
        threads += [threading.Thread(target=probe, args=(url,)), threading.Thread(target=stream, args=(url,))]
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
    def q(xs):  # the 99th percentile
        return statistics.quantiles(xs, n=100, method="inclusive")[98]

    return {"refused": refused[0], "health_p50": statistics.median(health), "health_p99": q(health),
            "health_max": max(health), "gap_p50": statistics.median(gaps), "gap_p99": q(gaps),
            "gap_max": max(gaps), "chunks": len(gaps), "ttft_p50": statistics.median(ttft), "ttft_p99": q(ttft)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--flooders", type=int, default=4)
    args = ap.parse_args()
    _, bdir = smollm2_bundle(0.95)
    bundle = branchmerge.load(bdir, dtype="float32")
    modes = {"on the event loop (before)": "loop", "asyncio.to_thread (default pool)": "default",
             "2 threads of their own": "2", "1 thread of their own": "1",
             "1 thread for short, 1 for long (now)": "now"}
    rows = {name: run(bundle, args.seconds, args.flooders, mode) for name, mode in modes.items()}
    print(f"{args.flooders} clients sending 100,000-character chats (refused past the context) for "
          f"{args.seconds:g} s; /health every 20 ms; one client streaming 24 tokens at a time")
    print("| prompts read | long requests | /health p50 ms | p99 ms | max ms | stream gap p50 ms | p99 ms | max ms "
          "| first chunk p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['refused']} | {1e3 * r['health_p50']:.1f} | {1e3 * r['health_p99']:.1f} | "
              f"{1e3 * r['health_max']:.1f} | {1e3 * r['gap_p50']:.1f} | {1e3 * r['gap_p99']:.1f} | "
              f"{1e3 * r['gap_max']:.1f} | {1e3 * r['ttft_p50']:.1f} | {1e3 * r['ttft_p99']:.1f} |")
    before, now = rows["on the event loop (before)"], rows["1 thread for short, 1 for long (now)"]
    print(f"now vs before: /health p99 {before['health_p99'] / now['health_p99']:.2f}× lower; stream gap p99 "
          f"{before['gap_p99'] / now['gap_p99']:.2f}× lower; stream first chunk p50 {before['ttft_p50'] / now['ttft_p50']:.2f}× lower")

if __name__ == "__main__":
    main()
