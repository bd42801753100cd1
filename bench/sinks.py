"""Attention sinks per branch in a mixed batch: what switching them per row costs, side by side.

A Granite-SWA model (attention sinks in every layer, sliding and full attention alternating) of SmolLM2-135M's
shape with random weights, and three "fine-tunes" of it (every block weight moved by a rank-16 delta). Two
bundles at one rate: one whose fine-tunes also moved their sinks (each branch's sinks differ: a mixed batch
calls the attention once per branch, each on its rows, `runtime/sinks.py`), one whose fine-tunes left them
alone (stored once: one attention call for any batch). Timed in one run: a decode step with a filled KV
cache, batch 8, one branch and mixed over the 3 branches, in both bundles, against the dense fine-tune under
transformers at the same batch; then a prefill of 64 tokens per row.

    python bench/sinks.py [--context 256] [--prefill 64] [--rate 0.9] [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

import torch
from transformers import GraniteSWAConfig, GraniteSWAForCausalLM

import branchmerge
from _common import CACHE
from branchmerge.config import parse_config
from branchmerge.merge import run_merge

SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, sliding_window=128,
             layer_rope_theta=[10000.0] * 30, layer_types=["sliding_attention", "full_attention"] * 15)


def fine_tunes(move_sinks: bool) -> list:
    """Three fine-tunes of one random base (saved once per variant under bench/.cache)."""
    root = CACHE / f"sinks-{'moved' if move_sinks else 'kept'}"
    names = [root / f"ft{i}" for i in range(3)]
    if all((n / "config.json").is_file() for n in names):
        return names
    torch.manual_seed(0)
    base = GraniteSWAForCausalLM(GraniteSWAConfig(**SHAPE)).eval()
    with torch.no_grad():
        for mod in base.modules():
            if hasattr(mod, "sinks"):
                mod.sinks.normal_(0, 1)
    for i, n in enumerate(names):
        g = torch.Generator().manual_seed(100 + i)
        m = GraniteSWAForCausalLM(base.config).eval()
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.ndim == 2 and "layers." in name:
                    u = torch.randn(p.shape[0], 16, generator=g) / 16
                    v = torch.randn(16, p.shape[1], generator=g) * p.std()
                    p.add_(u @ v)
                elif name.endswith("sinks") and move_sinks:
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
        m.save_pretrained(n)
    return names


def bundle(move_sinks: bool, rate: float):
    out = CACHE / f"sinks-{'moved' if move_sinks else 'kept'}-r{rate}"
    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        cfg = parse_config({"branches": [{"name": f"b{i}", "model": str(m)} for i, m in enumerate(fine_tunes(move_sinks))],
                            "compress_rate": rate, "dtype": "float32"})
        run_merge(cfg, out, progress=False)
    return branchmerge.load(out, dtype="float32")


def timed(fn, repeat: int) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def decode_step(forward, ids: torch.Tensor):
    """One decode step after a prefill of ``ids`` (each step adds one token to the cache, then drops it)."""
    with torch.no_grad():
        out = forward(ids, use_cache=True)
    cache, nxt = out.past_key_values, ids[:, -1:]

    def step():
        with torch.no_grad():
            forward(nxt, cache=cache, use_cache=True)
            cache.crop(-1)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=64, help="prefill tokens timed per row")
    ap.add_argument("--rate", type=float, default=0.9)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(1)
    ids = torch.randint(3, SHAPE["vocab_size"], (8, args.context))
    one, mixed = [0] * 8, [0, 1, 2, 0, 1, 2, 0, 1]
    dense = GraniteSWAForCausalLM.from_pretrained(fine_tunes(True)[0], dtype=torch.float32).eval()
    rows = [("dense fine-tune (transformers)", "—", timed(decode_step(dense, ids), args.repeat),
             timed(lambda: dense(ids[:, :args.prefill]), args.repeat))]
    for moved in (False, True):
        b = bundle(moved, args.rate)
        g = next(iter(b.groups.values()))
        sinks = "per branch" if moved else "shared"
        for label, sel in (("one branch", one), ("mixed over 3", mixed)):
            with g.state.select(sel):
                step = timed(decode_step(g.model, ids), args.repeat)
                prefill = timed(lambda: g.model(ids[:, :args.prefill]), args.repeat)
            rows.append((f"bundle r={args.rate}, {label}", sinks, step, prefill))
    base_step, base_prefill = rows[0][2], rows[0][3]
    print(f"Granite-SWA at SmolLM2-135M's shape, batch 8, context {args.context} (prefill {args.prefill}), float32, "
          f"{torch.get_num_threads()} threads; medians of {args.repeat}\n")
    print("| model | sinks | decode step ms | vs dense | prefill ms | vs dense |\n|---|---|---|---|---|---|")
    for label, sinks, step, prefill in rows:
        print(f"| {label} | {sinks} | {step * 1e3:.1f} | {step / base_step:.2f}× | {prefill * 1e3:.0f} | "
              f"{prefill / base_prefill:.2f}× |")
    by = {(r[0], r[1]): r for r in rows}
    shared = by[(f"bundle r={args.rate}, mixed over 3", "shared")]
    own = by[(f"bundle r={args.rate}, mixed over 3", "per branch")]
    print(f"\nsinks switched per row, mixed batch: decode {own[2] / shared[2]:.2f}×, prefill {own[3] / shared[3]:.2f}× "
          "the same batch with the sinks shared")


if __name__ == "__main__":
    main()
