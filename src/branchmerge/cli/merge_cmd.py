"""`branchmerge merge CONFIG -o OUT`."""

from __future__ import annotations

from pathlib import Path

import typer


def merge(
    config: Path = typer.Argument(..., help="YAML merge config (branches, compress_rate, rsvd, dtype, device)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output bundle folder (written atomically)."),
    compress_rate: float | None = typer.Option(
        None, "--compress-rate", "-r", help="Override compress_rate r in [0,1]; rank k = round((1-r)·min(m,n))."
    ),
    device: str | None = typer.Option(None, "--device", help="Where the SVDs run: cpu, cuda, cuda:N."),
    dtype: str | None = typer.Option(None, "--dtype", help="Storage dtype: float32, float16, bfloat16."),
    method: str | None = typer.Option(None, "--method", help="Override the merge method (see `methods`)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
) -> None:
    """Merge the models of CONFIG into a branched bundle at OUT."""
    from branchmerge.config import load_config
    from branchmerge.export import summarize
    from branchmerge.merge import run_merge

    cfg = load_config(config, compress_rate=compress_rate, device=device, dtype=dtype, method=method)
    run_merge(cfg, out, force=force, progress=not no_progress)
    if cfg.method == "branch":
        s = summarize(out, verify=False)
        typer.echo(
            f"bundle {out}: {len(s['branches'])} branches, {s['bundle_bytes'] / 1e6:.1f} MB "
            f"({s['ratio']:.2f}× the {s['input_bytes'] / 1e6:.1f} MB of inputs)"
        )
    else:
        typer.echo(f"merged model written to {out}")


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
