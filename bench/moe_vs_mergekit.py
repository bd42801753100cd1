"""Build a Mixtral MoE with branchmerge and with mergekit-moe from the same config, side by side: the
embedded skills family (base + fine-tunes, Llama layout), two and four experts. Every tensor is compared;
the routers exactly for `cheap_embed`, by cosine per expert and layer for `hidden` (mergekit runs its base
in bfloat16, ours in float32; for `hidden_avg` mergekit also averages over the padding, ours over each
prompt's own tokens, so that mode is not compared).

    PYTHONPATH=/tmp/mkpkgs python bench/moe_vs_mergekit.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file

from _common import CACHE
from branchmerge.family import SKILLS, build_family
from branchmerge.moe import build_moe, load_moe_config
from branchmerge.io.writer import claim_output

PROMPTS = {"rev": ["rev hello=", "rev abc="], "add": ["add 2+3=", "add 17+4="], "dup": ["dup ab=", "dup xyz="],
           "recall": ["key zz=", "key ab="], "shift": ["shift abc=", "shift xy="]}


def load_all(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    fam = build_family(progress=True)
    cases = [("cheap_embed", SKILLS[:2]), ("cheap_embed", SKILLS), ("hidden", SKILLS[:2]), ("hidden", SKILLS)]
    print("| gate_mode | experts | tensors | experts & rest: max abs diff | routers: max abs diff | "
          "routers: min cosine |")
    print("|---|---|---|---|---|---|")
    for i, (mode, skills) in enumerate(cases):
        cfg = {"base_model": str(fam["base"]), "gate_mode": mode, "dtype": "float32", "experts_per_token": 2,
               "experts": [{"source_model": str(fam[s]), "positive_prompts": PROMPTS.get(s, [s + " x="])}
                           for s in skills]}
        path = CACHE / f"moe-{i}.yml"
        path.write_text(yaml.safe_dump(cfg))
        ours, theirs = CACHE / f"moe-ours-{i}", CACHE / f"moe-mk-{i}"
        claim_output(ours)
        build_moe(load_moe_config(path), ours, force=True, progress=False)
        shutil.rmtree(theirs, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "mergekit.scripts.moe", str(path), str(theirs), "--device", "cpu"],
                       check=True, capture_output=True)
        a, b = load_all(ours), load_all(theirs)
        assert set(a) == set(b), sorted(set(a) ^ set(b))
        rest = max(float((a[k] - b[k]).abs().max()) for k in a if not k.endswith("mlp.gate.weight"))
        gates = [k for k in a if k.endswith("mlp.gate.weight")]
        gate_diff = max(float((a[k] - b[k]).abs().max()) for k in gates)
        cos = min(float(torch.nn.functional.cosine_similarity(a[k], b[k], dim=-1).min()) for k in gates)
        print(f"| {mode} | {len(skills)} | {len(a)} | {rest:.2e} | {gate_diff:.2e} | {cos:.4f} |", flush=True)


if __name__ == "__main__":
    main()
