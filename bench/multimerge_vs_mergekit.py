"""Multi-stage merges, side by side with ``mergekit-multimerge`` on the same YAML: the embedded skills family
(base + 4 fine-tunes). Stage `pair` is a TIES merge of two fine-tunes over the base; stage `trio` a
task-arithmetic merge of `pair` and a third fine-tune; the final merge a linear one of `trio` and the
fourth. Every tensor of every stage is compared; then each tool is rerun on its finished outputs (both skip
what exists) and once more after the final merge's weights change (ours rebuilds only that merge; mergekit's
lazy mode sees only that the folder exists, so it keeps the stale one).

    python bench/multimerge_vs_mergekit.py        (mergekit from the `bench` extra, or on PYTHONPATH)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from _common import CACHE
from branchmerge.family import SKILLS, build_family


def load_all(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def docs(fam, last_weight: float) -> list[dict]:
    rev, shift, dup, recall = (str(fam[s]) for s in SKILLS)
    base = str(fam["base"])
    return [
        {"name": "pair", "merge_method": "ties", "base_model": base, "dtype": "float32",
         "parameters": {"density": 0.5},
         "models": [{"model": rev, "parameters": {"weight": 1.0}}, {"model": shift, "parameters": {"weight": 1.0}}]},
        {"name": "trio", "merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
         "models": [{"model": "pair", "parameters": {"weight": 0.6}}, {"model": dup, "parameters": {"weight": 0.4}}]},
        {"merge_method": "linear", "dtype": "float32",
         "models": [{"model": "trio", "parameters": {"weight": 1.0}},
                    {"model": recall, "parameters": {"weight": last_weight}}]},
    ]


def mergekit(cfg, inter, out) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mergekit.scripts.multimerge", str(cfg), "-I", str(inter), "--out-path",
                    str(out), "--lazy"], check=True, capture_output=True)
    return time.perf_counter() - t


def ours(cfg, inter, out) -> tuple[float, list[str]]:
    """``branchmerge multimerge`` as a command too (both timings include starting Python and the imports)."""
    t = time.perf_counter()
    run = subprocess.run([str(Path(sys.executable).with_name("branchmerge")), "multimerge", str(cfg), "-I", str(inter),
                          "-o", str(out), "--force", "--no-progress"], check=True, capture_output=True, text=True)
    return time.perf_counter() - t, [line.split(": ")[1].split()[0] for line in run.stdout.splitlines()]


def main() -> None:
    fam = build_family(progress=True)
    cfg = CACHE / "multimerge.yml"
    cfg.write_text(yaml.safe_dump_all(docs(fam, 0.5), sort_keys=False))
    root = CACHE / "multimerge"
    shutil.rmtree(root, ignore_errors=True)
    mi, mo, oi, oo = root / "mk-inter", root / "mk-out", root / "our-inter", root / "our-out"
    t_mk = mergekit(cfg, mi, mo)
    t_ours, st = ours(cfg, oi, oo)
    print("| stage | tensors | max abs diff |\n|---|---|---|")
    for name, a, b in (("pair", oi / "pair", mi / "pair"), ("trio", oi / "trio", mi / "trio"), ("final", oo, mo)):
        x, y = load_all(a), load_all(b)
        assert set(x) == set(y), sorted(set(x) ^ set(y))
        print(f"| {name} | {len(x)} | {max(float((x[k] - y[k]).abs().max()) for k in x):.2e} |")
    print(f"\nfirst run: ours {t_ours:.2f} s ({', '.join(st)}), mergekit {t_mk:.2f} s")
    t_mk2 = mergekit(cfg, mi, mo)
    t_ours2, st2 = ours(cfg, oi, oo)
    print(f"rerun, nothing changed: ours {t_ours2:.2f} s ({', '.join(st2)}), mergekit {t_mk2:.2f} s")
    cfg.write_text(yaml.safe_dump_all(docs(fam, 2.0), sort_keys=False))
    before = load_all(mo)
    mergekit(cfg, mi, mo)
    _, st3 = ours(cfg, oi, oo)
    stale = all(bool((before[k] == v).all()) for k, v in load_all(mo).items())
    diff = max(float((v - load_all(oo)[k]).abs().max()) for k, v in load_all(mo).items())
    print(f"after the final merge's weight changed: ours {', '.join(st3)}; mergekit's final output "
          f"{'unchanged (stale)' if stale else 'rebuilt'}; max abs diff between the two finals {diff:.2e}")


if __name__ == "__main__":
    main()
