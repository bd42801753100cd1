"""Build a mixture of experts with branchmerge and with mergekit-moe from the same config, side by side: the
embedded skills family (base + fine-tunes, Llama layout), two and four experts, as a Mixtral and as a
Qwen2-MoE with a shared expert (mergekit 0.1.5 writes that one's experts one tensor each; they are stacked
into transformers 5's fused layout, ours, before comparing). Every tensor is compared;
the routers exactly for `cheap_embed`, by cosine per expert and layer for `hidden` (mergekit runs its base
in bfloat16, ours in float32; for `hidden_avg` mergekit also averages over the padding, ours over each
prompt's own tokens, so that mode is not compared).

    PYTHONPATH=/tmp/mkpkgs python bench/moe_vs_mergekit.py
"""

from __future__ import annotations

import re
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


def fused(tensors: dict) -> dict:
    """mergekit's per-expert tensors (``mlp.experts.{e}.gate_proj.weight``…) stacked as transformers 5 reads
    them (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj`` ``[E, H, I]``)."""
    out, per = {}, {}
    for k, v in tensors.items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", k)
        if m:
            per.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = v
        else:
            out[k] = v
    for pre, experts in per.items():
        ordered = [experts[e] for e in sorted(experts)]
        out[f"{pre}.gate_up_proj"] = torch.stack([torch.cat([w["gate_proj"], w["up_proj"]]) for w in ordered])
        out[f"{pre}.down_proj"] = torch.stack([w["down_proj"] for w in ordered])
    return out


def main() -> None:
    fam = build_family(progress=True)
    cases = [("mixtral", "cheap_embed", SKILLS[:2]), ("mixtral", "cheap_embed", SKILLS),
             ("mixtral", "hidden", SKILLS[:2]), ("mixtral", "hidden", SKILLS),
             ("qwen", "cheap_embed", SKILLS[:2]), ("qwen", "hidden", SKILLS[:2]), ("qwen", "hidden", SKILLS)]
    print("| output | gate_mode | experts | tensors | experts & rest: max abs diff | routers: max abs diff | "
          "routers: min cosine |")
    print("|---|---|---|---|---|---|---|")
    for i, (arch, mode, skills) in enumerate(cases):
        cfg = {"base_model": str(fam["base"]), "gate_mode": mode, "dtype": "float32", "experts_per_token": 2,
               "architecture": arch,
               "experts": [{"source_model": str(fam[s]), "positive_prompts": PROMPTS.get(s, [s + " x="])}
                           for s in skills]}
        if arch == "qwen":  # the base as the shared expert, gated by prompts of every skill
            cfg["shared_experts"] = [{"source_model": str(fam["base"]),
                                      "positive_prompts": [p[0] for p in PROMPTS.values()]}]
        path = CACHE / f"moe-{i}.yml"
        path.write_text(yaml.safe_dump(cfg))
        ours, theirs = CACHE / f"moe-ours-{i}", CACHE / f"moe-mk-{i}"
        claim_output(ours)
        build_moe(load_moe_config(path), ours, force=True, progress=False)
        shutil.rmtree(theirs, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "mergekit.scripts.moe", str(path), str(theirs), "--device", "cpu"],
                       check=True, capture_output=True)
        a, b = load_all(ours), fused(load_all(theirs))
        assert set(a) == set(b), sorted(set(a) ^ set(b))
        gates = [k for k in a if k.endswith(("mlp.gate.weight", "mlp.shared_expert_gate.weight"))]
        rest = max(float((a[k] - b[k]).abs().max()) for k in a if k not in gates)
        gate_diff = max(float((a[k] - b[k]).abs().max()) for k in gates)
        cos = min(float(torch.nn.functional.cosine_similarity(a[k], b[k], dim=-1).min()) for k in gates)
        print(f"| {arch} | {mode} | {len(skills)} | {len(a)} | {rest:.2e} | {gate_diff:.2e} | {cos:.4f} |", flush=True)


if __name__ == "__main__":
    main()
