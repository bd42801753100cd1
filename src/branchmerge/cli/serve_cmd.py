"""`branchmerge serve`: an OpenAI-compatible HTTP server over a bundle."""

from __future__ import annotations

from pathlib import Path

import typer


def serve_cmd(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="BRANCHMERGE_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' on /v1/*."),
    pipelines: Path | None = typer.Option(None, "--pipelines", help="Pipelines YAML (default: BUNDLE/pipelines.yaml)."),
    max_batch: int = typer.Option(16, "--max-batch", help="Most requests gathered into one generate call (1 = no batching)."),
    wait_ms: float = typer.Option(10.0, "--batch-wait-ms", help="How long the first request waits for others."),
    max_tokens_limit: int = typer.Option(2048, "--max-tokens-limit", help="Largest max_tokens accepted."),
    device: str = typer.Option("cpu", "--device"),
    dtype: str | None = typer.Option(None, "--dtype"),
) -> None:
    """Serve GET /v1/models, POST /v1/chat/completions and /v1/completions (streaming too) and /health."""
    import uvicorn

    import branchmerge
    from branchmerge.server import create_app
    from branchmerge.staged import load_pipelines

    bundle = branchmerge.load(bundle_dir, device=device, dtype=dtype)
    pipes = None
    if pipelines is not None:
        pipes = load_pipelines(pipelines)
        pipes.check_branches(bundle.branch_names)
    app = create_app(bundle, api_key=api_key, max_batch=max_batch, wait_ms=wait_ms,
                     max_tokens_limit=max_tokens_limit, pipelines=pipes)
    uvicorn.run(app, host=host, port=port, log_level="info")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
