"""Mamba-2 and Falcon-H1 branches mixed in one batch: what running the mixers per branch on their rows costs.

A Mamba-2 model of mamba2-130m's shape (24 layers, hidden 768, 24 heads of 64, state 128), or a Falcon-H1
model of Falcon-H1-0.5B's layer shape (hidden 1024; attention, Mamba-2 mixer and MLP side by side in every
layer; 12 of its 36 layers by default), with random weights, and three "fine-tunes" of it: every block
weight moved by a rank-16 delta, and each mixer's own ``A_log``,
``D`` and ``dt_bias`` moved too (so each branch's mixers differ: a batch mixing branches runs each mixer once
per branch present, on its rows and those rows of the cache, `runtime/mixers.py`). Timed in one run,
interleaved: a decode step after a prefill (conv and SSM states in the cache), batch 8, one branch and mixed
over the 3 branches, against the dense fine-tune under transformers at the same batch and against what the
group did before (each branch a model of its own: its rows a batch of their own, one after another); then a
prefill of 64 tokens per row.

    python bench/mixers.py [--family mamba2|falcon_h1] [--layers N] [--prefill 64] [--rate 0.9] [--repeat 9]
                           [--projections-only]
"""

from __future__ import annotations

import argparse
import shutil

import torch
from transformers import FalconH1Config, FalconH1ForCausalLM, Mamba2Config, Mamba2ForCausalLM

import branchmerge
from _common import CACHE, random_fine_tunes
from branchmerge.config import parse_config
from branchmerge.merge import run_merge
from sinks import decode_step, interleaved, prefill_of

FAMILIES = {  # model class, config class, shape, default layers, what the shape is
    "mamba2": (Mamba2ForCausalLM, Mamba2Config, dict(
        vocab_size=50288, hidden_size=768, state_size=128, num_heads=24, head_dim=64, expand=2, n_groups=1,
        conv_kernel=4, chunk_size=256, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True),
        24, "Mamba-2 at mamba2-130m's shape"),
    "falcon_h1": (FalconH1ForCausalLM, FalconH1Config, dict(
        vocab_size=32784, hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1,
        mamba_d_conv=4, mamba_chunk_size=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0), 12, "Falcon-H1 at Falcon-H1-0.5B's layer shape"),
}


def fine_tunes(family: str, layers: int, own: bool = True) -> list:
    """Three fine-tunes of one random base (saved once under bench/.cache); without ``own``, the mixers' own
    parameters left as the base's (a LoRA fine-tune's projections only)."""
    model_cls, config_cls, shape, _, _ = FAMILIES[family]
    root = CACHE / f"mixers-{family}-{layers}{'' if own else '-projections'}"
    names = [root / f"ft{i}" for i in range(3)]
    if all((n / "config.json").is_file() for n in names):
        return names
    torch.manual_seed(0)
    base = model_cls(config_cls(**shape, num_hidden_layers=layers)).eval()
    def move(name: str, p: torch.Tensor, g: torch.Generator) -> None:
        if own and name.rpartition(".")[2] in ("A_log", "D", "dt_bias"):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    random_fine_tunes(base, names, move)
    return names


def bundle(family: str, layers: int, rate: float, own: bool = True):
    out = CACHE / f"mixers-{family}-{layers}{'' if own else '-projections'}-r{rate}"
    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        cfg = parse_config({"branches": [{"name": f"b{i}", "model": str(m)}
                                         for i, m in enumerate(fine_tunes(family, layers, own))],
                            "compress_rate": rate, "dtype": "float32"})
        run_merge(cfg, out, progress=False)
    return branchmerge.load(out, dtype="float32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="mamba2")
    ap.add_argument("--layers", type=int, default=None, help="layers (default: 24 for mamba2, 12 for falcon_h1)")
    ap.add_argument("--context", type=int, default=128, help="tokens per row before the timed decode step")
    ap.add_argument("--prefill", type=int, default=64, help="prefill tokens timed per row")
    ap.add_argument("--rate", type=float, default=0.9)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--projections-only", action="store_true",
                    help="fine-tunes that move only 2-D weights (a LoRA's): the mixers run once per mixed batch")
    args = ap.parse_args()
    model_cls, _, shape, layers, what = FAMILIES[args.family]
    layers = args.layers or layers
    torch.manual_seed(1)
    ids = torch.randint(3, shape["vocab_size"], (8, args.context))
    one, mixed = [0] * 8, [0, 1, 2, 0, 1, 2, 0, 1]
    own = not args.projections_only
    dense = model_cls.from_pretrained(fine_tunes(args.family, layers, own)[0], dtype=torch.float32).eval()
    b = bundle(args.family, layers, args.rate, own)
    g = next(iter(b.groups.values()))
    assert g is b.runtime_group("b1"), "the group should run in one model"
    short = ids[:, :args.prefill]
    steps, prefills = {"dense": decode_step(dense, ids)}, {"dense": prefill_of(dense, short)}
    labels = {"dense": "dense fine-tune (transformers)"}
    for label, sel in (("one branch", one), ("mixed over 3, in one model", mixed)):
        steps[label], prefills[label] = decode_step(g.model, ids, g, sel), prefill_of(g.model, short, g, sel)
        labels[label] = f"bundle r={args.rate}, {label}"
    parts = [[r for r, m in enumerate(mixed) if m == i] for i in range(3)]  # what a model per branch did before
    apart = [decode_step(g.model, ids[part], g, i) for i, part in enumerate(parts)]
    apart_pre = [prefill_of(g.model, short[part], g, i) for i, part in enumerate(parts)]
    steps["apart"] = lambda: [fn() for fn in apart]
    prefills["apart"] = lambda: [fn() for fn in apart_pre]
    labels["apart"] = f"bundle r={args.rate}, a batch per branch (3+3+2 rows, in turn)"
    step_t, prefill_t = interleaved(steps, args.repeat), interleaved(prefills, args.repeat)
    print(f"{what} ({layers} layers{'' if own else ', fine-tunes of the projections only'}), batch 8, context {args.context} (prefill "
          f"{args.prefill}), float32, {torch.get_num_threads()} threads; medians of {args.repeat}, interleaved\n")
    print("| model | decode step ms | vs dense | prefill ms | vs dense |\n|---|---|---|---|---|")
    for k, label in labels.items():
        print(f"| {label} | {step_t[k] * 1e3:.1f} | {step_t[k] / step_t['dense']:.2f}× | {prefill_t[k] * 1e3:.0f} | "
              f"{prefill_t[k] / prefill_t['dense']:.2f}× |")
    m = "mixed over 3, in one model"
    print(f"\nmixed in one model vs a batch per branch in turn: decode {step_t['apart'] / step_t[m]:.2f}× faster, "
          f"prefill {prefill_t['apart'] / prefill_t[m]:.2f}×; vs one branch's batch: decode "
          f"{step_t[m] / step_t['one branch']:.2f}×, prefill {prefill_t[m] / prefill_t['one branch']:.2f}×")


if __name__ == "__main__":
    main()
