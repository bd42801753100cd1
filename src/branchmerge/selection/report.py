"""The selection report: a Markdown table of every candidate, the choice and why, and a picture of
accuracy against memory with the chosen set marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_report(result: dict[str, Any], out: Path, esize: int) -> Path:
    domains, cands, choice = result["domains"], result["candidates"], result["choice"]
    lines = [f"# Model selection: budget {result['budget_gb']} GB, {result['dtype']}", "",
             "| candidate | group | " + " | ".join(domains) + " | gain over base | params (M) | MB at dtype | "
             "peak RSS (MB, process incl. imports) | chosen |", "|---|---|" + "---|" * len(domains) + "---|---|---|---|---|"]
    for name, c in cands.items():
        gain = c.get("gain_over_base")
        gain_s = ", ".join(f"{d} {v:+.2f}" for d, v in gain.items()) if gain else "-"
        label = name + (f" ({c['tuned_for']})" if c.get("tuned_for") else "")
        lines.append(f"| {label} | {c['group']} | " + " | ".join(f"{c['domain_accuracy'][d]:.3f}" for d in domains)
                     + f" | {gain_s} | {c['params'] / 1e6:.2f} | {c['params'] * esize / 1e6:.1f} | "
                     f"{c['peak_rss_mb']:.0f} | {'✓' if name in choice['members'] else ''} |")
    lines += ["", f"**Chosen**: {', '.join(choice['members'])} at r={choice['rate']}: predicted "
              f"{choice['bytes'] / 1e6:.1f} MB, score {choice['score']:.3f} (summed per-domain best accuracy).", ""]
    for name, why in choice["dropped"].items():
        lines.append(f"- {name} left out: {why}")
    for name, err in result["errors"].items():
        lines.append(f"- {name} could not be measured: {err}")
    r = result.get("routing") or {}
    if r.get("curve"):
        lines += ["", f"## Routing ({r['test_items']} held-out questions; samples from dev items only)", "",
                  "| samples per branch | routing accuracy |", "|---|---|"]
        lines += [f"| {c}{' (recommended)' if int(c) == r['recommended'] else ''} | {a:.3f} |"
                  for c, a in r["curve"].items()]
    v = result.get("verify")
    if v:
        lines += ["", "## The merged bundle", "",
                  f"Stored {v['bundle_bytes'] / 1e6:.1f} MB (predicted {v['predicted_bytes'] / 1e6:.1f} MB), held "
                  f"{v['memory_bytes'] / 1e6:.1f} MB in memory, budget {result['budget_gb'] * 1e3:.1f} MB.", "",
                  "| task | oracle branch | auto (router) |", "|---|---|---|"]
        lines += [f"| {t} | {v['oracle'][t]:.3f} | {v['auto'][t]:.3f} |" for t in v["oracle"]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(result, out / "select.png", esize)
    return out / "report.md"


def _plot(result: dict[str, Any], path: Path, esize: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    chosen = set(result["choice"]["members"])
    for name, c in result["candidates"].items():
        x = c["params"] * esize / 1e9
        y = sum(c["domain_accuracy"].values()) / len(c["domain_accuracy"])
        ax.scatter([x], [y], marker="*" if name in chosen else "o", s=160 if name in chosen else 50,
                   color="tab:red" if name in chosen else "tab:gray")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axvline(result["budget_gb"], ls="--", color="tab:blue", label=f"budget {result['budget_gb']} GB")
    ax.set_xlabel(f"GB at {result['dtype']} (one dense model)")
    ax.set_ylabel("mean accuracy over domains")
    ax.set_title(f"candidates; chosen (★) as one bundle: {result['choice']['bytes'] / 1e9:.3f} GB at "
                 f"r={result['choice']['rate']}")
    ax.legend(loc="best")
    ax.margins(x=0.15, y=0.1)  # room for the labels at the edges
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
