"""Fine-tunes of a mixture-of-experts base as branches: bytes, fidelity and speed side by side.

The base is a Mixtral of SmolLM2-135M-Instruct's shape built by `branchmerge moe` (4 experts from perturbed
copies, top 2; ~370M parameters), saved by transformers in the checkpoint layout (one tensor per expert and
projection, as real Mixtral fine-tunes are); three "fine-tunes" of it move every block weight by a rank-16
delta (router gates included). Each rate's bundle: bytes against the three dense models, each branch's
logits against its model (relative error, top-1 agreement), a greedy answer, and timings in one run: a decode
step (batch 1, one branch; batch 3 mixed over the 3 branches, each expert's tokens of all branches as one
mixed-row call, and for comparison each sparse block run once per branch) and a 128-token prefill, against the
dense fine-tune under transformers at the same batch.

    python bench/moe_branches.py [--rates 0.9,0.95] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import branchmerge
from _common import CACHE, dir_bytes, perturbed_copies, smollm2_folder
from branchmerge.config import parse_config
from branchmerge.merge import run_merge
from branchmerge.moe import build_moe, load_moe_config
from branchmerge.runtime.experts import RowsByBranch

PROMPTS = ["The capital of France is", "def fibonacci(n):", "The patient presents with a fever and"]


def mixtral_base() -> object:
    """SmolLM2 → a 4-expert Mixtral (built once), re-saved by transformers in the checkpoint layout."""
    out = CACHE / "smol-mixtral-ckpt"
    if (out / "config.json").is_file():
        return out
    base = smollm2_folder()
    experts = perturbed_copies(base, 4, seed=7)
    cfg = {"base_model": str(base), "gate_mode": "random", "dtype": "float32", "experts_per_token": 2,
           "experts": [{"source_model": str(e)} for e in experts]}
    (CACHE / "smol-mixtral.yml").write_text(yaml.safe_dump(cfg))
    build_moe(load_moe_config(CACHE / "smol-mixtral.yml"), CACHE / "smol-mixtral", force=True, progress=False)
    AutoModelForCausalLM.from_pretrained(CACHE / "smol-mixtral", dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def timed(fn, repeat: int) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def decode_step(model_fn, ids: torch.Tensor) -> callable:
    """One decode step after a prefill of ``ids`` (the cache of the prefill reused each call)."""
    with torch.no_grad():
        out = model_fn(ids, use_cache=True)
    cache, nxt = out.past_key_values, ids[:, -1:]  # (each step adds one token, then drops it)

    def step():
        with torch.no_grad():
            model_fn(nxt, cache=cache, use_cache=True)
            cache.crop(-1)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0.9,0.95")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = mixtral_base()
    fts = perturbed_copies(base, 3, rank=16, scale=0.02)
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    dense = [AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval() for f in fts]
    dense_bytes = sum(dir_bytes(f) for f in fts)
    ids = tok(PROMPTS, return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        want = [m(ids).logits for m in dense]
    long = torch.randint(100, 40000, (1, 128))
    print(f"3 fine-tunes of a {sum(p.numel() for p in dense[0].parameters()) / 1e6:.0f}M-parameter Mixtral "
          f"(4 experts, top 2): {dense_bytes / 1e9:.2f} GB dense", flush=True)
    rows = []
    for rate in [float(r) for r in args.rates.split(",")]:
        out = CACHE / f"moe-branches-{rate}"
        t, merge_s = time.perf_counter(), float("nan")  # (nan: merged by an earlier run, cached)
        if not (out / "manifest.json").is_file():
            cfg = parse_config({"branches": [{"name": f"ft{i}", "model": str(f)} for i, f in enumerate(fts)],
                                "compress_rate": rate, "dtype": "float32"})
            run_merge(cfg, out, force=True, progress=False)
            merge_s = time.perf_counter() - t
        b = branchmerge.load(out, dtype="float32")
        model = b.groups["main"].model
        errs, top1 = [], []
        for i in range(3):
            got = b.logits(ids, [f"ft{i}"] * len(PROMPTS))
            errs.append(float((got - want[i]).norm() / want[i].norm()))
            top1.append(float((got.argmax(-1) == want[i].argmax(-1)).float().mean()))
        answer = b.generate(PROMPTS[0], "ft0", chat=False, max_new_tokens=8, do_sample=False)[0]
        ref = dense[0].generate(**tok(PROMPTS[0], return_tensors="pt"), max_new_tokens=8, do_sample=False)
        ref_answer = tok.decode(ref[0, tok(PROMPTS[0], return_tensors="pt")["input_ids"].shape[1]:])
        state = b.groups["main"].state
        t1 = ids[:1]
        with state.select(branch=0):
            ours_1 = timed(decode_step(model, t1), args.repeat)
        dense_1 = timed(decode_step(dense[0], t1), args.repeat)
        with state.select([0, 1, 2]):
            ours_3 = timed(decode_step(model, ids), args.repeat)
        dense_3 = timed(decode_step(dense[0], ids), args.repeat)
        layers = model.model.layers  # the same batch with each sparse block run once per branch instead
        blocks = [layer.mlp for layer in layers]
        for layer in layers:
            layer.mlp = RowsByBranch(state, layer.mlp)
        with state.select([0, 1, 2]):
            per_branch_3 = timed(decode_step(model, ids), args.repeat)
        for layer, block in zip(layers, blocks):
            layer.mlp = block
        with state.select(branch=0), torch.no_grad():
            ours_p = timed(lambda: model(long), args.repeat)
        with torch.no_grad():
            dense_p = timed(lambda: dense[0](long), args.repeat)
        rows.append((rate, b.reader.manifest.total_bytes / dense_bytes, max(errs), min(top1), merge_s,
                     ours_1 / dense_1, ours_3 / dense_3, per_branch_3 / dense_3, ours_p / dense_p, answer, ref_answer))
        print(f"r={rate}: merged in {merge_s:.0f} s", flush=True)
    print("\n| rate | bytes vs 3 dense | max rel. logit error | min top-1 agreement | merge s | decode b=1 vs dense "
          "| decode 3 mixed vs dense b=3 | (blocks per branch) | prefill 128 vs dense | ft0 greedy (dense ft0) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r, by, e, a, ms, d1, d3, d3b, p, ans, ref in rows:
        print(f"| {r} | {by:.3f} | {e:.4f} | {a:.3f} | {ms:.0f} | {d1:.2f}× | {d3:.2f}× | {d3b:.2f}× | {p:.2f}× | "
              f"{ans.strip()!r} ({ref.strip()!r}) |")


if __name__ == "__main__":
    main()
