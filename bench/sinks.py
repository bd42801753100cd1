"""Attention sinks per branch in a mixed batch: what switching them per row costs, side by side.

A Granite-SWA model (attention sinks in every layer, sliding and full attention alternating) of SmolLM2-135M's
shape with random weights, and three "fine-tunes" of it (every block weight moved by a rank-16 delta). Two
bundles at one rate: one whose fine-tunes also moved their sinks (each branch's sinks differ: a mixed batch
calls the attention once per branch, each on its rows, `runtime/sinks.py`), one whose fine-tunes left them
alone (stored once: one attention call for any batch). Timed in one run: a decode step with a filled KV
cache, batch 8, one branch and mixed over the 3 branches, in both bundles, against the dense fine-tune under
transformers at the same batch, and against what running each branch as a model of its own did before (each
branch's rows a batch of their own, one after another); then a prefill of 64 tokens per row.

    python bench/sinks.py [--context 256] [--prefill 64] [--rate 0.9] [--repeat 9]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import time

import torch
from transformers import GraniteSWAConfig, GraniteSWAForCausalLM

import branchmerge
from _common import CACHE, random_fine_tunes
from branchmerge.config import parse_config
from branchmerge.merge import run_merge

SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, sliding_window=128,
             layer_rope_theta=[10000.0] * 30, layer_types=["sliding_attention", "full_attention"] * 15,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


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
    def move(name: str, p: torch.Tensor, g: torch.Generator) -> None:
        if name.endswith("sinks") and move_sinks:
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    random_fine_tunes(base, names, move)
    return names


def bundle(move_sinks: bool, rate: float):
    out = CACHE / f"sinks-{'moved' if move_sinks else 'kept'}-r{rate}"
    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        cfg = parse_config({"branches": [{"name": f"b{i}", "model": str(m)} for i, m in enumerate(fine_tunes(move_sinks))],
                            "compress_rate": rate, "dtype": "float32"})
        run_merge(cfg, out, progress=False)
    return branchmerge.load(out, dtype="float32")


def interleaved(fns: dict[str, callable], repeat: int) -> dict[str, float]:
    """Median seconds of each of ``fns``, timed in turn round after round (a machine's drift hits all alike)."""
    for fn in fns.values():
        fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def select(g, sel):
    """The group's selection ``sel``: rows (a list of branch ids), one branch id, or None (a dense model)."""
    if g is None:
        return contextlib.nullcontext()
    return g.state.select(**({"branch": sel} if isinstance(sel, int) else {"rows": sel}))


def decode_step(model, ids: torch.Tensor, g=None, sel=None):
    """One decode step after a prefill of ``ids`` under the selection (each step adds a token to the cache: a
    sliding-window cache cannot drop one again; a few steps more of context are noise)."""
    with select(g, sel), torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    nxt = ids[:, -1:]

    def step():
        with select(g, sel), torch.no_grad():
            model(nxt, cache=cache, use_cache=True)
    return step


def prefill_of(model, ids: torch.Tensor, g=None, sel=None):
    def run():
        with select(g, sel), torch.no_grad():
            model(ids)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=64, help="prefill tokens timed per row")
    ap.add_argument("--rate", type=float, default=0.9)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    torch.manual_seed(1)
    ids = torch.randint(3, SHAPE["vocab_size"], (8, args.context))
    one, mixed = [0] * 8, [0, 1, 2, 0, 1, 2, 0, 1]
    dense = GraniteSWAForCausalLM.from_pretrained(fine_tunes(True)[0], dtype=torch.float32).eval()
    short = ids[:, :args.prefill]
    steps, prefills = {"dense": decode_step(dense, ids)}, {"dense": prefill_of(dense, short)}
    labels = {"dense": ("dense fine-tune (transformers)", "—")}
    for moved in (False, True):
        g = next(iter(bundle(moved, args.rate).groups.values()))
        sinks = "per branch" if moved else "shared"
        for label, sel in (("one branch", one), ("mixed over 3", mixed)):
            key = f"{sinks} {label}"
            steps[key], prefills[key] = decode_step(g.model, ids, g, sel), prefill_of(g.model, short, g, sel)
            labels[key] = (f"bundle r={args.rate}, {label}", sinks)
        if moved:  # what a model per branch did before: each branch's rows a batch of its own, one after another
            parts = [[r for r, m in enumerate(mixed) if m == i] for i in range(3)]
            apart = [decode_step(g.model, ids[part], g, i) for i, part in enumerate(parts)]
            apart_pre = [prefill_of(g.model, short[part], g, i) for i, part in enumerate(parts)]
            steps["apart"] = lambda fns=apart: [fn() for fn in fns]
            prefills["apart"] = lambda fns=apart_pre: [fn() for fn in fns]
            labels["apart"] = (f"bundle r={args.rate}, a batch per branch (3+3+2 rows, in turn)", sinks)
    step_t, prefill_t = interleaved(steps, args.repeat), interleaved(prefills, args.repeat)
    rows = [(*labels[k], step_t[k], prefill_t[k]) for k in labels]
    base_step, base_prefill = rows[0][2], rows[0][3]
    print(f"Granite-SWA at SmolLM2-135M's shape, batch 8, context {args.context} (prefill {args.prefill}), float32, "
          f"{torch.get_num_threads()} threads; medians of {args.repeat}, interleaved\n")
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
