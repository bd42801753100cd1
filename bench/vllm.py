"""A bundle served by vLLM (shared base + one LoRA per branch) behind the gateway, against our own server.

A 3-branch SmolLM2-135M bundle (the instruct model as `general`, and the `facts` and `words` fine-tunes
of bench/fidelity_real.py's recipe, 60 steps, cached) is merged at r=0.95 and exported with
`branchmerge export-vllm`. vLLM's CPU build runs from its own virtual environment (its torch differs from
ours: never in `.venv`), `--enforce-eager`, with the three adapters; `branchmerge gateway` sits in front of
it. Side by side in one run:

* every export choice (``--scale refactor|ignore`` × ``--per-branch lora|mean``): relative weight
  error, logit error (PEFT on the exported base vs the bundle) and task accuracy, per branch;
* per branch: greedy answers through gateway + vLLM vs our runtime (agreement, task accuracy);
* throughput of 32 concurrent clients: gateway + vLLM vs `branchmerge serve`.

If vLLM cannot load the adapters, the error is printed and the dense export is served instead.

    python bench/vllm.py [--vllm-python /work/vllm-env/bin/python] [--clients 32] [--requests 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
import yaml

from _common import CACHE, ROOT, fan_out, free_port, smollm2_folder

sys.path.insert(0, str(ROOT))
import fidelity_real as fr  # noqa: E402

import branchmerge  # noqa: E402
from branchmerge.config import parse_config  # noqa: E402
from branchmerge.export_vllm import export_vllm  # noqa: E402
from branchmerge.merge import run_merge  # noqa: E402
from branchmerge.io.writer import claim_output  # noqa: E402


def wait_up(url: str, proc: subprocess.Popen, log: Path, limit: float = 900) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n" + log.read_text()[-3000:])
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up within {limit:.0f} s:\n" + log.read_text()[-3000:])


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    # cwd: not bench/, where this file would shadow the vllm package for `python -m vllm...`
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})}, cwd=log.parent)


def ask(url: str, model: str, question: str, max_tokens: int = 12) -> str:
    r = httpx.post(url + "/chat/completions", timeout=600, json={
        "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
        "temperature": 0.0})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"] or ""


def throughput(url: str, models: list[str], clients: int, per_client: int, max_tokens: int = 16) -> dict:
    """``clients`` threads, each sending ``per_client`` chat requests in turn; requests/s and tokens/s."""
    done, tokens, errors = [0], [0], []
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=900) as c:
            for k in range(per_client):
                try:
                    r = c.post(url + "/chat/completions", json={
                        "model": models[(i + k) % len(models)], "max_tokens": max_tokens, "temperature": 0.0,
                        "messages": [{"role": "user", "content": f"Write {10 + (i * 7 + k) % 80} in words."}]})
                    r.raise_for_status()
                    with lock:
                        done[0] += 1
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                except httpx.HTTPError as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}"[:200])

    dt = fan_out(client, clients)
    return {"requests": done[0], "seconds": dt, "req_s": done[0] / dt, "tok_s": tokens[0] / dt, "errors": errors[:3],
            "failed": len(errors)}


def peft_logit_error(out: Path, bundle, branches: list[str]) -> dict[str, float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    errs = {}
    for b in branches:
        tok = bundle.tokenizer(b)
        ids = tok([q for q, _ in fr.TASKS["facts"][1][:4]], return_tensors="pt", padding=True)["input_ids"]
        base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
        model = PeftModel.from_pretrained(base, out / "adapters" / b).eval()
        with torch.no_grad():
            got = model(input_ids=ids).logits
        want = bundle.logits(ids, [b] * ids.shape[0])
        errs[b] = float((got - want).norm() / want.norm())
    return errs


def export_choices(bundle_dir: Path, bundle, branches: list[str], work: Path) -> None:
    """Every way export-vllm can carry what a LoRA cannot: max relative weight error, logit error (PEFT on
    the exported base vs our runtime) and task accuracy (PEFT, adapter not merged) per branch."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("\n| scale | per-branch tensors | branch | max rel. weight error | logit error | facts | words |"
          "\n|---|---|---|---|---|---|---|", flush=True)
    for scale in ("refactor", "ignore"):
        for pb in ("lora", "mean"):
            out = work / f"choice-{scale}-{pb}"
            claim_output(out)
            rep = export_vllm(bundle_dir, out, scale=scale, per_branch=pb, force=True, progress=False)
            logit = peft_logit_error(out, bundle, branches)
            for b in branches:
                tok = AutoTokenizer.from_pretrained(out / "base")
                base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
                # not merged: with tied embeddings, merging both the embed_tokens and the lm_head LoRA into the
                # one tied tensor would add the difference twice (PEFT warns); vLLM does not merge either
                model = PeftModel.from_pretrained(base, out / "adapters" / b).eval()
                gen = fr.chat_answers(model, tok)
                acc = {t: fr.score(gen, t) for t in fr.TASKS}
                w = rep["groups"]["main"]["branches"][b]["max_rel_weight_error"]
                print(f"| {scale} | {pb} | {b} | {w:.3g} | {logit[b]:.3g} | {acc['facts']:.2f} | {acc['words']:.2f} |",
                      flush=True)
    ours = {b: {t: fr.score(lambda qs, b=b: bundle.generate(qs, b, max_new_tokens=12), t) for t in fr.TASKS}
            for b in branches}
    print("our runtime: " + "; ".join(f"{b} facts {a['facts']:.2f} words {a['words']:.2f}" for b, a in ours.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default="/work/vllm-env/bin/python", help="python of vLLM's own venv")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--per-branch", default="lora", help="export-vllm --per-branch (lora or mean)")
    ap.add_argument("--kv-gb", default="2", help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--skip-choices", action="store_true", help="skip the table of export choices (PEFT)")
    ap.add_argument("--only-choices", action="store_true", help="only the table of export choices (no vLLM)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    work = CACHE / "vllm"
    work.mkdir(parents=True, exist_ok=True)
    base = smollm2_folder()
    folders = {"general": base, **{t: fr.finetune(base, t, CACHE / "real" / f"ft-{t}-60", 60) for t in fr.TASKS}}
    branches = list(folders)
    bundle_dir = work / "bundle"
    run_merge(parse_config({"branches": [{"name": b, "model": str(p)} for b, p in folders.items()],
                            "compress_rate": 0.95, "dtype": "bfloat16"}), bundle_dir, force=True, progress=False)
    bundle = branchmerge.load(bundle_dir, dtype="float32", verify=False)
    if not args.skip_choices:
        export_choices(bundle_dir, bundle, branches, work)
    if args.only_choices:
        return
    logs = work / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        mode, vport = "lora", free_port()
        out = work / "export"
        claim_output(out)
        report = export_vllm(bundle_dir, out, per_branch=args.per_branch, force=True, port=vport, progress=False)
        g = report["groups"]["main"]
        print(f"export (lora, --per-branch {args.per_branch}): rank {g['max_lora_rank']}; max relative weight error "
              + ", ".join(f"{b} {g['branches'][b]['max_rel_weight_error']:.3g}" for b in branches), flush=True)
        print("logit error, PEFT on the exported base vs our runtime: "
              + ", ".join(f"{b} {e:.3g}" for b, e in peft_logit_error(out, bundle, branches).items()), flush=True)
        vllm_env = {"VLLM_CPU_KVCACHE_SPACE": args.kv_gb, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(out / "base"),
               "--served-model-name", "main", "--dtype", "bfloat16", "--enforce-eager", "--enable-lora",
               "--max-lora-rank", str(g["max_lora_rank"]), "--max-loras", str(len(branches)), "--max-model-len", "1024",
               "--lora-modules", *[f"{b}={out / 'adapters' / b}" for b in branches], "--port", str(vport)]
        t = time.perf_counter()
        procs.append(start(cmd, logs / "vllm.log", vllm_env))
        try:
            wait_up(f"http://127.0.0.1:{vport}/v1/models", procs[-1], logs / "vllm.log")
        except RuntimeError as e:
            print(f"vLLM could not serve the LoRA export: {str(e)[-1500:]}\n-> serving the dense export instead",
                  flush=True)
            procs[-1].kill()
            mode = "dense"
            out = work / "export-dense"
            claim_output(out)
            report = export_vllm(bundle_dir, out, mode="dense", force=True, port=vport, progress=False)
            dense = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--dtype", "bfloat16",
                     "--enforce-eager", "--max-model-len", "1024"]
            ports = {}
            for b in branches:
                ports[b] = free_port()
                procs.append(start([*dense, "--model", str(out / b), "--served-model-name", b, "--port",
                                    str(ports[b])], logs / f"vllm-{b}.log", vllm_env))
                wait_up(f"http://127.0.0.1:{ports[b]}/v1/models", procs[-1], logs / f"vllm-{b}.log")
        print(f"vLLM ({mode}) up in {time.perf_counter() - t:.0f} s", flush=True)
        if mode == "lora":
            gw = {"upstreams": {"vllm": {"base_url": f"http://127.0.0.1:{vport}/v1", "max_concurrency": 64,
                                         "timeout_s": 900}},
                  "branches": {b: {"upstream": "vllm"} for b in branches}}
        else:
            gw = {"upstreams": {b: {"base_url": f"http://127.0.0.1:{p}/v1", "max_concurrency": 64, "timeout_s": 900}
                                for b, p in ports.items()},
                  "branches": {b: {"upstream": b} for b in branches}}
        (work / "gateway.yaml").write_text(yaml.safe_dump(gw))
        gport, sport = free_port(), free_port()
        bm = [sys.executable, "-m", "branchmerge.cli.main"]
        procs.append(start([*bm, "gateway", str(work / "gateway.yaml"), "--port", str(gport)], logs / "gateway.log"))
        procs.append(start([*bm, "serve", str(bundle_dir), "--port", str(sport), "--dtype", "float32"],
                           logs / "serve.log"))
        wait_up(f"http://127.0.0.1:{gport}/health", procs[-2], logs / "gateway.log")
        wait_up(f"http://127.0.0.1:{sport}/health", procs[-1], logs / "serve.log")
        gw_url, our_url = f"http://127.0.0.1:{gport}/v1", f"http://127.0.0.1:{sport}/v1"
        print("\n| branch | task | accuracy via gateway + vLLM | accuracy via branchmerge serve | greedy answers "
              "agreeing |\n|---|---|---|---|---|")
        for b in branches:
            for task in fr.TASKS:
                test = fr.TASKS[task][1][:20]
                a = [ask(gw_url, b, q) for q, _ in test]
                o = [ask(our_url, b, q) for q, _ in test]
                acc = lambda xs: sum(x.strip().rstrip(".").lower() == e.lower() for x, (_, e) in zip(xs, test)) / len(test)  # noqa: E731
                agree = sum(x.strip() == y.strip() for x, y in zip(a, o)) / len(test)
                print(f"| {b} | {task} | {acc(a):.2f} | {acc(o):.2f} | {agree:.0%} |", flush=True)
        res = {}
        direct = [("vLLM directly (no gateway)", f"http://127.0.0.1:{vport}/v1")] if mode == "lora" else []
        for label, url in (("gateway + vLLM", gw_url), *direct, ("branchmerge serve", our_url)):
            throughput(url, branches, 4, 1)  # warm-up
            res[label] = throughput(url, branches, args.clients, args.requests)
        print(f"\nthroughput, {args.clients} concurrent clients × {args.requests} chat requests (max_tokens 16, greedy, "
              "mixed over the 3 branches), this 2-core CPU:\n| server | requests/s | tokens/s | failed |\n|---|---|---|---|")
        for label, r in res.items():
            print(f"| {label} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['failed']} {r['errors']} |")
        ratio = res["gateway + vLLM"]["tok_s"] / max(res["branchmerge serve"]["tok_s"], 1e-9)
        print(f"gateway + vLLM / branchmerge serve: {ratio:.2f}× tokens/s; total {time.perf_counter() - t0:.0f} s")
        (work / "result.json").write_text(json.dumps({"mode": mode, "throughput": res}, indent=2))
    finally:
        for p in procs:
            p.kill()


if __name__ == "__main__":
    main()
