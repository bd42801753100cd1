"""`branchmerge merge CONFIG -o OUT`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from branchmerge.cli import mergekit_flags


def merge(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML merge config (branches, compress_rate, rsvd, dtype, device)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output bundle folder (written atomically); or the "
                                    "second argument, as mergekit-yaml's."),
    compress_rate: float | None = typer.Option(
        None, "--compress-rate", "-r", help="Override compress_rate r in [0,1]; rank k = round((1-r)·min(m,n))."
    ),
    budget: str | None = typer.Option(
        None, "--budget", help="Override budget: a fraction of a dense branch (0.05 → budget.branch_bytes) or a "
        "size for the whole bundle (2GB → budget.total_bytes); exclusive with compress_rate."),
    factor_bits: str | None = typer.Option(None, "--factor-bits", help="Override factor_bits: 16, 8, 4 or mixed."),
    device: str | None = typer.Option(None, "--device", help="Where the SVDs run: cpu, cuda, cuda:N."),
    dtype: str | None = typer.Option(None, "--dtype", help="Storage dtype: float32, float16, bfloat16."),
    method: str | None = typer.Option(None, "--method", help="Override the merge method (see `methods`)."),
    lora: str | None = typer.Option(None, "--lora", help="Override lora: exact (adapters of one base keep their "
                                    "own factors over it: exact, base + adapters in size) or merged (compress them "
                                    "as merged models, like full fine-tunes)."),
    force: bool = typer.Option(False, "--force", help=("Replace OUT if it is an earlier branchmerge output or "
                                                       "empty (never a file, other files or an input).")),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    model_card: bool = typer.Option(True, "--model-card/--no-model-card",
                                    help="Write a README.md model card into OUT (what it is, how to use it, "
                                         "the config)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print ranks, bytes per part and the output size from "
                                 "the inputs' shapes alone; write nothing."),
) -> None:
    """Merge the models of CONFIG into a branched bundle at OUT.

    A branch's model is a Hugging Face folder or a PEFT LoRA adapter folder (with `base:`, or `model:
    BASE+ADAPTER`), read one tensor at a time.

    The bundle is written to a temporary folder, loaded once to check that every branch runs, then
    renamed into place: a failed or interrupted merge leaves nothing behind.

    mergekit-yaml's flags work: OUT as the second argument, --cuda, --out-shard-size 5B, --random-seed N,
    --write-model-card/--no-write-model-card; --lazy-unpickle, --allow-crimes, --copy-tokenizer and the like
    are accepted and change nothing; --trust-remote-code is refused.
    """
    from branchmerge.config import load_config
    from branchmerge.export import summarize
    from branchmerge.merge import run_merge

    bud = None
    if budget is not None:
        try:
            bud = {"branch_bytes": float(budget)}
        except ValueError:
            bud = {"total_bytes": budget}
    bits = int(factor_bits) if factor_bits is not None and factor_bits.isdigit() else factor_bits
    mk = mergekit_flags.parse(ctx)
    out = mergekit_flags.output(mk, out)
    mk = replace(mk, device=device or mk.device)  # (--device over --cuda)
    cfg = mk.apply(load_config(config, compress_rate=compress_rate, dtype=dtype, method=method, budget=bud,
                               factor_bits=bits, lora=lora))
    if dry_run:
        return _print_plan(cfg)
    run_merge(cfg, out, force=force, progress=not no_progress, model_card=mk.card(model_card))
    if cfg.method == "branch":
        s = summarize(out, verify=False)
        typer.echo(
            f"bundle {out}: {len(s['branches'])} branches, {s['bundle_bytes'] / 1e6:.1f} MB "
            f"({s['ratio']:.2f}× the {s['input_bytes'] / 1e6:.1f} MB of inputs; {s['ratio_at_dtype']:.2f}× "
            f"their {s['input_bytes_at_dtype'] / 1e6:.1f} MB at {s['dtype']})"
        )
        typer.echo(f"next: branchmerge inspect {out}  |  branchmerge generate {out} \"PROMPT\" --branch "
                   f"{next(iter(s['branches']))}")
    else:
        typer.echo(f"merged model written to {out}")


def _print_plan(cfg) -> None:
    from branchmerge.cli._out import console, mb, table
    from branchmerge.errors import ConfigError
    from branchmerge.merge.plan import plan_merge

    if cfg.method != "branch":
        raise ConfigError("--dry-run plans branch merges; baseline methods write one model of the inputs' size")
    p = plan_merge(cfg)
    how = f"r={p['compress_rate']}" if p["compress_rate"] is not None else "ranks by budget"
    t = table(f"dry run: {how}, {p['dtype']} (upper bounds: identical tensors are stored once)",
              ["group", "branches", "compressed", "per-branch", "ranks", "W̄ MB", "U,V MB", "dense Δ MB",
               "per-branch MB", "total MB", "input MB"])
    for name, g in p["groups"].items():
        r = g["ranks"]
        t.add_row(name + (" (standalone)" if g["standalone"] else ""), ", ".join(g["branches"]), str(g["compressed"]),
                  str(g["per_branch"]), "-" if not r else str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}",
                  *(mb(g["parts"][k]) for k in ("mean", "factors", "dense_deltas", "per_branch")), mb(g["bytes"]),
                  mb(g["input_bytes"]))
    c = console()
    c.print(t)
    if p["factor_budget_bytes"] is not None:
        fb = p["factor_budget_bytes"]
        c.print(f"budget leaves {mb(fb)} MB for factors, allocated by the spectra at merge time" if fb >= 0 else
                f"[red]the budget is {mb(-fb)} MB short of what the bundle needs before any factor[/red] (if no "
                "per-branch tensor turns out identical across branches)")
    c.print(f"bundle ≈ {mb(p['bundle_bytes'])} MB: {p['ratio']:.3f}× the inputs ({mb(p['input_bytes'])} MB), "
            f"{p['ratio_at_dtype']:.3f}× the inputs at {p['dtype']} ({mb(p['input_bytes_at_dtype'])} MB)")


def moe(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="A mergekit-moe YAML: base_model, experts (source_model, "
                                  "positive_prompts, negative_prompts), shared_experts, gate_mode, "
                                  "experts_per_token, architecture (mixtral, qwen, qwen3), dtype."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (written atomically); or the second "
                                    "argument, as mergekit-moe's."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is an earlier branchmerge output."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    model_card: bool = typer.Option(True, "--model-card/--no-model-card", help="Write a README.md model card."),
) -> None:
    """Build a mixture of experts from fine-tunes of one base (as mergekit-moe): each fine-tune's MLPs become
    an expert of every layer, the routers start from the experts' prompts. Writes a Mixtral (Llama/Mistral
    inputs), a Qwen2-MoE (one shared expert; Llama/Mistral/Qwen2 inputs) or a Qwen3-MoE (Qwen3 inputs).

    mergekit-moe's flags work as merge's (OUT as the second argument, --out-shard-size, --random-seed, ...);
    the gates are computed on the CPU in float32 whatever --device says."""
    from branchmerge.moe import build_moe, load_moe_config

    mk = mergekit_flags.parse(ctx)
    out = mergekit_flags.output(mk, out)
    cfg = load_moe_config(config)
    if mk.seed is not None:
        cfg = cfg.model_copy(update={"seed": mk.seed})
    rep = build_moe(cfg, out, force=force, progress=not no_progress, model_card=mk.card(model_card),
                    max_shard_bytes=mk.shard_bytes or 1 << 30)
    shared = " and a shared expert" if rep["shared_experts"] else ""
    typer.echo(f"wrote {out}: {rep['architecture']}, {rep['experts']} experts{shared} in each of {rep['layers']} "
               f"layers ({rep['dtype']})")


def multimerge(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="A multi-document YAML (mergekit-multimerge's format): each document "
                                  "a merge config, with `name:` for an intermediate (INTERMEDIATE_DIR/NAME) or "
                                  "without for the final merge (--out); a model field holding another "
                                  "document's name reads that merge's output."),
    intermediate_dir: Path = typer.Option(..., "--intermediate-dir", "-I", help="Folder of the named merges' "
                                          "outputs (and of their fingerprints, in .stages/)."),
    out: Path | None = typer.Option(None, "--out", "-o", "--out-path", help="Output of the final (unnamed) merge."),
    lazy: bool = typer.Option(True, "--lazy/--no-lazy", help="Skip a merge whose output exists and was built from "
                              "the same config and inputs (--no-lazy: run every merge)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it is an earlier branchmerge output "
                               "(intermediates are replaced when stale without it)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the merges in the order they run and which are "
                                 "up to date; write nothing."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    model_card: bool = typer.Option(True, "--model-card/--no-model-card", help="Write a README.md model card "
                                    "into each output."),
) -> None:
    """Run merges that feed one another, in dependency order: a merge's output can be a model of the next,
    e.g. a TIES merge of two code fine-tunes as one branch of a bundle. A rerun skips what is up to date.

    mergekit's merge flags work as merge's (--cuda, --out-shard-size, --random-seed, ...), for every merge."""
    from branchmerge.multimerge import plan, run_multimerge, to_build

    mk = mergekit_flags.parse(ctx, takes_out=False)
    if dry_run:
        stages = plan(config, intermediate_dir, out, mk.apply)
        todo = to_build(stages, intermediate_dir, lazy=lazy)
        for i, st in enumerate(stages, 1):
            reads = f" (reads {', '.join(sorted(st.needs))})" if st.needs else ""
            state = "to build" if st.name in todo else "up to date"
            typer.echo(f"{i}. {st.label}: {state}, {st.config.method} of {len(st.config.branches)} models → "
                       f"{st.out}{reads}")
        return
    for r in run_multimerge(config, intermediate_dir, out, lazy=lazy, force=force, progress=not no_progress,
                            model_card=mk.card(model_card), adjust=mk.apply):
        typer.echo(f"{r['name']}: {r['status']} → {r['out']}")


def register(app: typer.Typer) -> None:
    app.command("merge", context_settings=mergekit_flags.EXTRA_ARGS)(merge)
    app.command("moe", context_settings=mergekit_flags.EXTRA_ARGS)(moe)
    app.command("multimerge", context_settings=mergekit_flags.EXTRA_ARGS)(multimerge)
