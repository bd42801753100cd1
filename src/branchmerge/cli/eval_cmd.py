"""`branchmerge lm-eval BUNDLE --branch NAME -- <lm_eval arguments>`: lm-evaluation-harness in process."""

from __future__ import annotations

from pathlib import Path

import typer


def lm_eval_cmd(
    ctx: typer.Context,
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    branch: str = typer.Option("auto", "--branch", "-b", help="Branch to evaluate, or 'auto' (the router picks "
                               "per request)."),
    dtype: str | None = typer.Option(None, "--dtype", help="Compute dtype (default: float32)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences scored per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
) -> None:
    """Run lm-evaluation-harness on a branch of BUNDLE with the in-process `branchmerge` backend.

    Everything after `--` goes to lm_eval's `run` command, e.g.
    `branchmerge lm-eval demo_out/bundle-r0.95 --branch rev -- --tasks mmlu --limit 20`.
    """
    from branchmerge.harness import run_cli

    run_cli(str(bundle), branch, list(ctx.args), dtype=dtype, batch_size=batch_size, device=device)


def register(app: typer.Typer) -> None:
    app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(lm_eval_cmd)
