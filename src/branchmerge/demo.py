"""`make demo`: the main job on the embedded default, no downloads.

Builds (or reuses) the embedded family of tiny fine-tunes, merges it into a bundle, prints what the
bundle holds, and answers a few prompts per branch.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no transformers loading bars between our own

from rich.console import Console
from rich.table import Table

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="Working folder (family, bundle, plots).")
    p.add_argument("--compress-rate", type=float, default=0.95)
    p.add_argument("--family", type=Path, default=None,
                   help="Where the family is built once and reused (default: ~/.cache/branchmerge/family-vN).")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    t0 = time.perf_counter()

    import branchmerge
    from branchmerge.config import parse_config
    from branchmerge.export import summarize
    from branchmerge.family import SKILLS, build_family, router_config, sample_prompts
    from branchmerge.front import build_bundle_router
    from branchmerge.io.writer import claim_output

    family = build_family(args.family, progress=True)
    console.print(f"[bold]family[/bold] ready in {family['base'].parent} ({time.perf_counter() - t0:.0f}s)")
    from branchmerge.evaluate import fidelity_rows, markdown_table, pareto_plot

    rows = fidelity_rows(family, args.out / "fidelity", rates=(0.0, 0.9, args.compress_rate, 0.99, 1.0),
                         baselines=("linear", "ties"), n=50, progress=True)
    console.print("[bold]fidelity[/bold]: exact-match accuracy per skill (oracle branch) and bytes held")
    console.print(markdown_table(rows), soft_wrap=True)
    plot = pareto_plot(rows, args.out / "fidelity.png")
    console.print(f"Pareto picture written to {plot}")
    bundle_dir = args.out / f"bundle-r{args.compress_rate}"
    cfg = parse_config({
        "branches": [{"name": s, "model": str(family[s])} for s in SKILLS],
        "compress_rate": args.compress_rate,
        "dtype": "float32",
    })
    claim_output(bundle_dir)  # the demo's own output, whichever version wrote it
    branchmerge.run_merge(cfg, bundle_dir, force=True, progress=True)
    s = summarize(bundle_dir)
    console.print(
        f"[bold]bundle[/bold] {bundle_dir}: {len(s['branches'])} branches, {s['bundle_bytes'] / 1e6:.2f} MB "
        f"vs {s['input_bytes'] / 1e6:.2f} MB for the separate fine-tunes ({s['ratio']:.2f}×)",
        soft_wrap=True,
    )
    bundle = branchmerge.load(bundle_dir)
    build_bundle_router(bundle, router_config(family["base"]))
    table = Table(title=f"answers with branch='auto' (routed) at r={args.compress_rate}")
    for col in ("skill", "prompt", "expected", "answer", "answered by"):
        table.add_column(col)
    pairs = [(skill, p, e) for skill in SKILLS for p, e in sample_prompts(skill, 3, seed=123)]
    prompts = [p for _, p, _ in pairs]
    branches = bundle.resolve_branches(prompts, "auto")  # the router picks; one mixed batch answers all
    answers = bundle.generate(prompts, branches, max_new_tokens=24)
    for (skill, prompt, expected), got, branch in zip(pairs, answers, branches):
        mark = "[green]✓[/green]" if got.strip() == expected else "[red]✗[/red]"
        table.add_row(skill, prompt, expected, f"{got.strip()} {mark}", branch)
    console.print(table)
    console.print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    console.print(f"\n[bold]bundle:[/bold] {bundle_dir.resolve()}  (router in {bundle_dir / 'router'})\nnext:",
                  soft_wrap=True)
    for cmd in (f"branchmerge inspect {bundle_dir}", f'branchmerge generate {bundle_dir} "rev hello=" --branch rev',
                f'branchmerge route {bundle_dir} "dup abc="', f"branchmerge chat {bundle_dir} --branch auto",
                f"branchmerge serve {bundle_dir}   # OpenAI API on http://127.0.0.1:8000/v1"):
        console.print(f"  {cmd}", soft_wrap=True, highlight=False)
    console.print("(activate the environment first: . .venv/bin/activate)")


if __name__ == "__main__":
    main()
