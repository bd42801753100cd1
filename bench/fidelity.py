"""Fidelity benchmark on the embedded skills family (the project's main quality benchmark).

Per-skill exact-match accuracy (greedy generate, 100 held-out prompts per skill) for the base, each
original fine-tune, each baseline merge (linear, task_arithmetic, ties, dare_ties, dare_linear,
breadcrumbs_ties, model_stock, della, sce, karcher, multislerp), and branchmerge at
r ∈ {0, 0.5, 0.8, 0.9, 0.95, 0.99, 1}, with the bytes each needs. Writes bench/fidelity.md and the
Pareto picture bench/fidelity.png.

    python bench/fidelity.py
"""

from __future__ import annotations

import argparse
import time

from _common import CACHE, ROOT
from branchmerge.evaluate import BASELINES, fidelity_rows, markdown_table, pareto_plot
from branchmerge.family import SKILLS, build_family, router_config, sample_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=100, help="held-out prompts per skill")
    args = ap.parse_args()
    t0 = time.perf_counter()
    fam = build_family(progress=True)  # the shared cache (make demo and the tests build the same)
    t_fam = time.perf_counter() - t0
    more = ("dare_linear", "breadcrumbs_ties", "model_stock", "della", "sce", "karcher", "multislerp")  # (mergekit's
    # other methods; make demo runs the first four)
    rows = fidelity_rows(fam, CACHE / "fidelity", n=args.n, baselines=(*BASELINES, *more),
                         params={"breadcrumbs_ties": {"density": 0.9, "gamma": 0.01}})
    table = markdown_table(rows)
    (ROOT / "fidelity.md").write_text(table + "\n")
    pareto_plot(rows, ROOT / "fidelity.png")
    print(table)
    ft = next(r for r in rows if r.kind == "fine-tunes")
    by = {r.label: r for r in rows}
    r0, r95, lin = by["branchmerge r=0.0"], by["branchmerge r=0.95"], by["linear"]
    print(f"\nfamily build/reuse {t_fam:.0f}s; total {time.perf_counter() - t0:.0f}s")
    print(f"r=0 equals the fine-tunes: {r0.accuracy == ft.accuracy}")
    kept = {s: r95.accuracy[s] / ft.accuracy[s] for s in SKILLS}
    print("r=0.95 keeps " + ", ".join(f"{s} {k:.0%}" for s, k in kept.items())
          + f" (target ≥ 95% each: {'met' if min(kept.values()) >= 0.95 else 'NOT met'})")
    import branchmerge
    from branchmerge.evaluate import evaluate_router
    from branchmerge.front import build_bundle_router

    bundle = branchmerge.load(CACHE / "fidelity" / "bundle-r0.95")
    build_bundle_router(bundle, router_config(fam["base"]))
    res = evaluate_router(bundle, [(p, s) for s in SKILLS for p, _ in sample_prompts(s, 100, seed=5)])
    print(f"router on the family (400 held-out prompts): template phrase {res['accuracy']:.3f} "
          f"(target ≥ 0.98), " + ", ".join(f"{k} {v:.3f}" for k, v in res["baselines"].items())
          + f"; {res['latency_ms']:.1f} ms/question")
    lost = {s: ft.accuracy[s] - lin.accuracy[s] for s in SKILLS}
    print("linear loses " + ", ".join(f"{s} {100 * v:.0f} pts" for s, v in lost.items())
          + f" (target ≥ 30 pts on ≥ 2 skills: {'met' if sum(v >= 0.30 for v in lost.values()) >= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
