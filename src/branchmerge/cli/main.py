"""The `branchmerge` command line. Each command lives in its own module and calls the library."""

from __future__ import annotations

import logging
import os
import sys

# transformers' own "Loading weights" bars on every command are noise (with cursor escapes in logs); our
# long steps have their own bars. Set before transformers is imported; a user's own setting wins.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import typer

from branchmerge.errors import BranchmergeError

app = typer.Typer(
    name="branchmerge",
    help=(
        "Merge fine-tuned LLMs into one branched model: a shared normalized average per weight plus "
        "each model's difference as low-rank factors (W_i ≈ s_i·(W̄ + U_i V_i)), then run, route and "
        "serve every branch from one process."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags without a `<bool>` metavar, wrapped like click's
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only log warnings and errors."),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    if "transformers" in sys.modules and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        from transformers.utils import logging as hf_logging  # imported before us (tests, notebooks)

        hf_logging.disable_progress_bar()


def _register() -> None:
    from branchmerge.cli import (batch_cmd, bundle_cmds, env_cmd, eval_cmd, merge_cmd, router_cmds, run_cmds,
                                 select_cmd, serve_cmd)

    merge_cmd.register(app)
    bundle_cmds.register(app)
    run_cmds.register(app)
    router_cmds.register(app)
    serve_cmd.register(app)
    batch_cmd.register(app)
    eval_cmd.register(app)
    select_cmd.register(app)
    env_cmd.register(app)


_register()


def main() -> None:
    """Console entry point: user errors print one clear message and exit with status 1."""
    try:
        app()
    except BranchmergeError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(1)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
