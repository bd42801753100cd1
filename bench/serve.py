"""Load test of `branchmerge serve` on loopback, batching on vs off; staged vs single-stage answers.

A bundle of three SmolLM2-135M-based branches (r=0.95) is served by a `branchmerge serve` subprocess
bound to 127.0.0.1. 32 concurrent clients send /v1/completions requests (16 new tokens, branches
round-robin) for a bounded time; the run stops by itself. Same load with `--max-batch 1` (one request
at a time), side by side. Then a small question set with a format requirement (answer with only the
final number): one stage vs two stages (answer, then rewrite to the number), accuracy and compliance.

    python bench/serve.py [--seconds 60] [--clients 32]
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import subprocess
import threading
import time

import httpx

from _common import CACHE, VENV_BIN, fan_out, free_port, perturbed_copies, smollm2_folder
from branchmerge.config import parse_config
from branchmerge.merge import run_merge


def start_server(bundle, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    p = subprocess.Popen([str(VENV_BIN / "branchmerge"), "-q", "serve", str(bundle), "--port", str(port),
                          "--max-batch", str(max_batch), "--batch-wait-ms", "20"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return p, url
        except httpx.HTTPError:
            pass
        if p.poll() is not None:
            raise RuntimeError(p.stderr.read())
        time.sleep(0.2)
    raise RuntimeError("server did not start")


def load_run(url: str, seconds: float, clients: int, branches: list[str]) -> dict:
    stop_at = time.monotonic() + seconds
    lat, toks, errors = [], [], [0]
    lock = threading.Lock()
    words = ["The capital of France is", "Water boils at", "A good way to learn Python is", "The largest planet is"]

    def client(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(timeout=300) as c:
            while time.monotonic() < stop_at:
                body = {"model": branches[i % len(branches)], "prompt": rng.choice(words), "max_tokens": 16}
                t0 = time.perf_counter()
                try:
                    r = c.post(url + "/v1/completions", json=body)
                    r.raise_for_status()
                    n = r.json()["usage"]["completion_tokens"]
                except (httpx.HTTPError, KeyError):
                    with lock:
                        errors[0] += 1
                    continue
                with lock:
                    lat.append(time.perf_counter() - t0)
                    toks.append(n)

    wall = fan_out(client, clients)
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else [float("nan")] * 19
    return {"requests": len(lat), "rps": len(lat) / wall, "tps": sum(toks) / wall, "p50": statistics.median(lat) if lat else float("nan"),
            "p95": q[18], "errors": errors[0], "wall": wall}


QUESTIONS = [
    ("Tom has {a} apples and buys {b} more. How many apples does he have now?", lambda a, b: a + b),
    ("A box holds {a} pens. {b} pens are taken out. How many pens are left in the box?", lambda a, b: a - b),
    ("Each bag has {a} marbles. How many marbles are in {b} bags?", lambda a, b: a * b),
]


def staged_vs_single(url: str, n: int = 30) -> dict:
    rng = random.Random(0)
    items = []
    for i in range(n):
        tpl, f = QUESTIONS[i % len(QUESTIONS)]
        a, b = rng.randint(3, 12), rng.randint(2, 9)
        if f is QUESTIONS[1][1] and b > a:
            a, b = b + a, b
        items.append((tpl.format(a=a, b=b), f(a, b)))
    fmt = " Answer with only the final number."
    res = {}
    with httpx.Client(timeout=600) as c:
        for mode in ("single", "staged", "staged_fewshot", "staged_extract"):
            correct = compliant = 0
            for q, ans in items:
                if mode == "single":
                    r = c.post(url + "/v1/chat/completions", json={
                        "model": "m0", "messages": [{"role": "user", "content": q + fmt}], "max_tokens": 48})
                else:
                    pipe = {"staged": "answer_then_format", "staged_fewshot": "answer_then_fewshot",
                            "staged_extract": "answer_then_extract"}[mode]
                    r = c.post(url + "/v1/chat/completions", json={
                        "model": pipe, "messages": [{"role": "user", "content": q}]})
                r.raise_for_status()
                out = r.json()["choices"][0]["message"]["content"].strip()
                compliant += bool(re.fullmatch(r"-?\d+", out))
                nums = re.findall(r"-?\d+", out)
                correct += bool(nums) and int(nums[-1]) == ans
            res[mode] = {"accuracy": correct / n, "format": compliant / n}
    return res


PIPELINES = """
pipelines:
  - name: answer_then_format
    stages:
      - {branch: m0, user: "{question} Let's think step by step.", max_tokens: 96}
      - branch: m0
        system: "You rewrite answers. Reply with only the final number, nothing else."
        user: "Question: {question}\\nAnswer: {previous}\\nWhat is the final number? Reply with the number only."
        max_tokens: 8
  - name: answer_then_fewshot          # stage 2 as a plain completion with two worked examples
    stages:
      - {branch: m0, user: "{question} Let's think step by step.", max_tokens: 96}
      - branch: m0
        chat: false
        user: "Answer: Sam has 4 + 3 = 7 pens now.\\nFinal number: 7\\n\\nAnswer: So the total is 12 apples.\\nFinal number: 12\\n\\nAnswer: {previous}\\nFinal number:"
        max_tokens: 6
        stop: ["\\n"]
  - name: answer_then_extract          # stage 2 rewrites; a regex keeps the number (format without re-reasoning)
    stages:
      - {branch: m0, user: "{question} Let's think step by step.", max_tokens: 96}
      - branch: m0
        system: "You rewrite answers. Reply with only the final number, nothing else."
        user: "Question: {question}\nAnswer: {previous}\nWhat is the final number? Reply with the number only."
        max_tokens: 8
        extract: '(-?\\d+)(?!.*\\d)'
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--questions", type=int, default=30)
    args = ap.parse_args()
    base = smollm2_folder()
    models = [base, *perturbed_copies(base, 2)]
    bdir = CACHE / "rt-bundle-0.95"
    if not (bdir / "manifest.json").is_file():
        cfg = parse_config({"branches": [{"name": f"m{i}", "model": str(p)} for i, p in enumerate(models)],
                            "compress_rate": 0.95, "dtype": "float32"})
        run_merge(cfg, bdir, force=True, progress=False)
    (bdir / "pipelines.yaml").write_text(PIPELINES)
    rows = {}
    for label, mb in (("batching on (max-batch 32)", 32), ("batching off (max-batch 1)", 1)):
        proc, url = start_server(bdir, mb)
        try:
            load_run(url, 5, 4, ["m0"])  # warm-up
            rows[label] = load_run(url, args.seconds, args.clients, ["m0", "m1", "m2"])
            if mb == 32:
                staged = staged_vs_single(url, args.questions)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"{args.clients} concurrent clients, {args.seconds:.0f} s each, /v1/completions with 16 new tokens, "
          "3 branches round-robin, SmolLM2-135M-based bundle r=0.95 float32, server on 127.0.0.1")
    print("| mode | requests | req/s | tokens/s | p50 s | p95 s | errors |\n|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['requests']} | {r['rps']:.2f} | {r['tps']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['errors']} |")
    on, off = rows["batching on (max-batch 32)"], rows["batching off (max-batch 1)"]
    print(f"\nbatching throughput gain: {on['tps'] / off['tps']:.2f}× tokens/s, {on['rps'] / off['rps']:.2f}× req/s (target ≥ 2×)")
    print(f"\nstaged vs single stage, {args.questions} arithmetic word problems, answer must be only the final number:")
    print("| mode | accuracy | format compliance |\n|---|---|---|")
    for k, r in staged.items():
        print(f"| {k} | {r['accuracy']:.2f} | {r['format']:.2f} |")


if __name__ == "__main__":
    main()
