"""`route`, `router build` and `router eval`: the training-free router from the terminal."""

from __future__ import annotations

import json
from pathlib import Path

import typer

router_app = typer.Typer(help="Build and evaluate a bundle's training-free router.", no_args_is_help=True,
                        rich_markup_mode=None)


def route_cmd(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle folder with a router."),
    question: str = typer.Argument(..., help="The question to route."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Print the branch a question is routed to and every branch's score."""
    import branchmerge
    from branchmerge.errors import BranchmergeError

    bundle = branchmerge.load(bundle_dir)
    if bundle.router is None:
        raise BranchmergeError(f"bundle {bundle_dir} has no router; build one with `branchmerge router build`")
    names, scores = bundle.router.scores([question])
    per = {b: float(s) for b, s in zip(bundle.branch_names, scores[0].tolist())}
    if as_json:
        typer.echo(json.dumps({"branch": names[0], "scores": per}))
        return
    typer.echo(f"branch: {names[0]}")
    for b, s in sorted(per.items(), key=lambda kv: -kv[1]):
        typer.echo(f"  {b:<20} {s:.4f}")


@router_app.command("build")
def build_cmd(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle folder."),
    config: Path = typer.Argument(..., metavar="ROUTER.yaml", help="Samples per branch, embedder, template."),
) -> None:
    """Embed the representative samples once and store them in BUNDLE/router/."""
    from branchmerge.front import build_bundle_router
    from branchmerge.router import load_router_config
    from branchmerge.runtime.bundle import load as load_without_router

    cfg = load_router_config(config)
    bundle = load_without_router(bundle_dir)  # a stored router is replaced, so it need not load
    r = build_bundle_router(bundle, cfg)
    typer.echo(f"router built: {len(r.sample_branch)} samples for {len(cfg.samples)} branches in {bundle_dir}/router")


@router_app.command("eval")
def eval_cmd(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle folder with a router."),
    data: Path = typer.Argument(..., metavar="DATA.jsonl", help='Lines of {"question": ..., "branch": ...}.'),
    png: Path | None = typer.Option(None, "--png", help="Confusion-matrix picture (default: DATA.confusion.png)."),
    no_baselines: bool = typer.Option(False, "--no-baselines", help="Skip input-only and MiniLM comparisons."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Accuracy, confusion matrix and latency of the router; compared with input-only and MiniLM embeddings."""
    import branchmerge
    from branchmerge.evaluate import confusion_png, evaluate_router, read_labelled

    rows = read_labelled(data)
    bundle = branchmerge.load(bundle_dir)
    res = evaluate_router(bundle, rows, baselines=not no_baselines)
    out = confusion_png(res["confusion"], res["branches"], png or data.with_suffix(".confusion.png"))
    if as_json:
        typer.echo(json.dumps({**res, "png": str(out)}))
        return
    typer.echo(f"router accuracy: {res['accuracy']:.3f} on {res['n']} questions; {res['latency_ms']:.1f} ms/question")
    width = max(len(b) for b in res["branches"]) + 2
    typer.echo("confusion (rows: true, columns: routed):")
    typer.echo(" " * width + "".join(f"{b[:8]:>9}" for b in res["branches"]))
    for b, row in zip(res["branches"], res["confusion"]):
        typer.echo(f"{b:<{width}}" + "".join(f"{v:>9}" for v in row))
    for name, acc in res["baselines"].items():
        typer.echo(f"baseline {name}: {acc:.3f}")
    typer.echo(f"confusion matrix picture: {out}")


def register(app: typer.Typer) -> None:
    app.command("route")(route_cmd)
    app.add_typer(router_app, name="router")
