"""Check that our `linear`, `ties` (and `task_arithmetic`) baselines agree with mergekit's output
for the same inputs: the embedded skills family (base + 4 fine-tunes).

    python bench/baselines_vs_mergekit.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from _common import CACHE, VENV_BIN
from branchmerge.config import parse_config
from branchmerge.family import SKILLS, build_family
from branchmerge.merge.collapse import run_baseline_merge
from branchmerge.io.writer import claim_output

PARAMS = {"linear": {}, "ties": {"density": 0.5}, "task_arithmetic": {}}


def load_all(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    fam = build_family(progress=True)  # the shared cache (make demo and the tests build the same)
    print("| method | tensors | max abs diff | max rel diff (Frobenius) |")
    print("|---|---|---|---|")
    for method, params in PARAMS.items():
        ours = CACHE / f"ours-{method}"
        theirs = CACHE / f"mergekit-{method}"
        base = None if method == "linear" else str(fam["base"])
        cfg = parse_config({
            "branches": [{"name": s, "model": str(fam[s])} for s in SKILLS],
            "method": method, "base_model": base, "dtype": "float32", "parameters": params,
        })
        claim_output(ours)  # this cache's own output, whichever version wrote it
        run_baseline_merge(cfg, ours, force=True, progress=False)
        mk = {
            "models": [{"model": str(fam[s]), "parameters": {"weight": 1.0, **params}} for s in SKILLS],
            "merge_method": method,
            "dtype": "float32",
        }
        if base:
            mk["base_model"] = base
        cfg_path = CACHE / f"mergekit-{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(mk))
        subprocess.run([str(VENV_BIN / "mergekit-yaml"), str(cfg_path), str(theirs), "--allow-crimes"],
                       check=True, capture_output=True)
        a, b = load_all(ours), load_all(theirs)
        common = sorted(set(a) & set(b))
        assert common, "no tensors in common"
        max_abs = max(float((a[k] - b[k]).abs().max()) for k in common)
        max_rel = max(float((a[k] - b[k]).norm() / max(b[k].norm(), 1e-12)) for k in common)
        print(f"| {method} | {len(common)}/{len(b)} | {max_abs:.2e} | {max_rel:.2e} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
