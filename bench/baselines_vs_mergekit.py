"""Check that our baselines agree with mergekit's output for the same inputs: the embedded skills family
(base + 4 fine-tunes). `linear`, `ties` and `task_arithmetic` with scalar parameters; `ties` with a
density gradient and filters, and `slerp` (the base and one fine-tune) with mergekit's example
gradients per filter (parameters resolved per tensor as mergekit resolves them).

    python bench/baselines_vs_mergekit.py

mergekit runs as ``python -m mergekit.scripts.run_yaml`` (the `bench` extra installs it; or put it on
``PYTHONPATH``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from _common import CACHE
from branchmerge.config import parse_config
from branchmerge.family import SKILLS, build_family
from branchmerge.merge.collapse import run_baseline_merge
from branchmerge.io.writer import claim_output

GRADIENT_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},  # mergekit's README example
              {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]
CASES = {  # label: (method, parameters)
    "linear": ("linear", {}),
    "ties": ("ties", {"density": 0.5}),
    "task_arithmetic": ("task_arithmetic", {}),
    "ties, density gradient + filter": ("ties", {"density": [{"filter": "mlp", "value": [0.2, 0.9]},
                                                              {"value": [0.7, 0.3, 0.5]}]}),
    "slerp, t gradients per filter": ("slerp", {"t": GRADIENT_T}),
    "breadcrumbs (density 0.8, gamma 0.05)": ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    "breadcrumbs_ties (density 0.7, gamma 0.02, rescale)": ("breadcrumbs_ties", {"density": 0.7, "gamma": 0.02,
                                                                                 "rescale": True, "normalize": True}),
    "model_stock": ("model_stock", {}),
    "model_stock, filter_wise": ("model_stock", {"filter_wise": True}),
}


def load_all(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    fam = build_family(progress=True)  # the shared cache (make demo and the tests build the same)
    print("| method | tensors | max abs diff | max rel diff (Frobenius) |")
    print("|---|---|---|---|")
    for i, (label, (method, params)) in enumerate(CASES.items()):
        ours = CACHE / f"ours-baseline-{i}"
        theirs = CACHE / f"mergekit-baseline-{i}"
        base = None if method == "linear" else str(fam["base"])
        skills = SKILLS[:1] if method == "slerp" else SKILLS  # (slerp: the base and one other model)
        cfg = parse_config({
            "branches": [{"name": s, "model": str(fam[s])} for s in skills],
            "method": method, "base_model": base, "dtype": "float32", "parameters": params,
        })
        claim_output(ours)  # this cache's own output, whichever version wrote it
        run_baseline_merge(cfg, ours, force=True, progress=False)
        weight = {} if method in ("slerp", "model_stock") else {"weight": 1.0}
        mk = {
            "models": [{"model": str(fam[s]), "parameters": weight} for s in skills],
            "merge_method": method,
            "dtype": "float32",
            "parameters": params,
        }
        if base:
            mk["base_model"] = base
            if method == "slerp":
                mk["models"].insert(0, {"model": base})
        cfg_path = CACHE / f"mergekit-baseline-{i}.yaml"
        cfg_path.write_text(yaml.safe_dump(mk))
        shutil.rmtree(theirs, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg_path), str(theirs),
                        "--allow-crimes"], check=True, capture_output=True)
        a, b = load_all(ours), load_all(theirs)
        common = sorted(set(a) & set(b))
        assert common, "no tensors in common"
        max_abs = max(float((a[k] - b[k]).abs().max()) for k in common)
        max_rel = max(float((a[k] - b[k]).norm() / max(b[k].norm(), 1e-12)) for k in common)
        print(f"| {label} | {len(common)}/{len(b)} | {max_abs:.2e} | {max_rel:.2e} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
