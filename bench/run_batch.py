"""`branchmerge run-batch` offline: a JSONL file of chat requests over three SmolLM2-135M-based branches (r=0.95,
float32), answered with requests batched together (--max-in-flight 256, --max-batch 16, mixed branches) and one
at a time (--max-in-flight 1: what a loop over the file does), side by side in one run. Reported: wall
seconds, requests/s and generated tokens/s, the speedup, and how many greedy answers agree between the two.

    python bench/run_batch.py [--requests 48] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import smollm2_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import branchmerge  # noqa: E402
from branchmerge.front import front_for  # noqa: E402
from branchmerge.server.batch import run_batch_file  # noqa: E402

TOPICS = ["the sea", "a library", "mountains", "bread", "a violin", "winter", "trains", "honey", "a lighthouse",
          "chess", "rain", "a garden", "clocks", "the moon", "coffee", "bridges"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    _, bdir = smollm2_bundle(0.95)
    bundle = branchmerge.load(bdir, dtype="float32")
    front = front_for(bundle)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        src.write_text("".join(json.dumps({
            "custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": f"m{i % 3}", "max_tokens": args.max_tokens, "temperature": 0,
                     "messages": [{"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]}."}]}
        }) + "\n" for i in range(args.requests)))
        run_batch_file(front, src, Path(tmp) / "warm.jsonl", max_in_flight=4, progress=False)  # (first-call costs)
        rows = {}
        for name, flight in (("batched (--max-in-flight 256)", 256), ("one at a time (--max-in-flight 1)", 1)):
            out = Path(tmp) / f"out-{flight}.jsonl"
            t = time.perf_counter()
            counts = run_batch_file(front, src, out, max_in_flight=flight, max_batch=16, progress=False)
            wall = time.perf_counter() - t
            recs = [json.loads(x) for x in out.read_text().splitlines()]
            assert counts["succeeded"] == args.requests, counts
            texts = [r["response"]["body"]["choices"][0]["message"]["content"] for r in recs]
            tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in recs)
            rows[name] = {"wall": wall, "tokens": tokens, "texts": texts}
    print(f"{args.requests} chat requests over 3 branches (m0, m1, m2 in turn), {args.max_tokens} tokens at most, "
          "greedy; SmolLM2-135M-based bundle r=0.95 float32, this CPU")
    print("| mode | wall s | requests/s | tokens/s |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall']:.1f} | {args.requests / r['wall']:.2f} | {r['tokens'] / r['wall']:.1f} |")
    batched, single = rows.values()
    same = sum(a == b for a, b in zip(batched["texts"], single["texts"]))
    print(f"batched vs one at a time: {single['wall'] / batched['wall']:.2f}× faster; "
          f"{same}/{args.requests} answers identical")


if __name__ == "__main__":
    main()
