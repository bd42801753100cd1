"""`branchmerge select SELECT.yaml -o OUT`: choose what to merge for a memory budget."""

from __future__ import annotations

from pathlib import Path

import typer


def select_cmd(
    config: Path = typer.Argument(..., help="Candidates, tasks and budget (see branchmerge.selection.config)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for merge.yaml, router.yaml, report.md, select.png "
                             "and the evaluation cache (re-runs reuse it)."),
    budget_gb: float | None = typer.Option(None, "--budget-gb", help="Override budget_gb."),
    verify: bool = typer.Option(False, "--verify", help="Also merge the choice, build its router and evaluate the "
                                "bundle (oracle branch and auto)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
) -> None:
    """Measure each candidate on each task (lm-evaluation-harness) and its memory, then choose the branches
    and compress rate that maximize the summed per-domain best accuracy within the budget."""
    from branchmerge.errors import ConfigError
    from branchmerge.selection.choose import NothingFits
    from branchmerge.selection.config import load_select_config
    from branchmerge.selection.run import run_select

    cfg = load_select_config(config, budget_gb=budget_gb)
    try:
        res = run_select(cfg, out, verify=verify, progress=not no_progress)
    except NothingFits as e:
        raise ConfigError(str(e)) from None
    ch = res["choice"]
    typer.echo(f"chosen: {', '.join(ch['members'])} at r={ch['rate']} ({ch['bytes'] / 1e9:.3f} GB predicted, "
               f"budget {cfg.budget_gb} GB)")
    for name, why in ch["dropped"].items():
        typer.echo(f"  left out {name}: {why}")
    for name, err in res["errors"].items():
        typer.echo(f"  could not measure {name}: {err}")
    typer.echo(f"wrote {out / 'merge.yaml'}, {out / 'router.yaml'}, {out / 'report.md'}, {out / 'select.png'}")


def register(app: typer.Typer) -> None:
    app.command("select")(select_cmd)
