"""Fidelity evaluation on the skills family: per-skill exact-match accuracy against bytes held.

Compares the base, the original fine-tunes (one per skill, the N-model system), baseline merges
(one collapsed model), and branch bundles at several compress rates; renders a Markdown table and a
Pareto picture (mean accuracy against bytes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from branchmerge.config import parse_config
from branchmerge.family import SKILLS, accuracy, hf_generate

logger = logging.getLogger(__name__)

BASELINES = ("linear", "task_arithmetic", "ties", "dare_ties")
DEFAULT_RATES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0)


@dataclass
class Row:
    label: str
    kind: str  # "base", "fine-tunes", "baseline", "branch"
    bytes: int
    accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _hf_row(label: str, kind: str, folder: Path, n: int) -> Row:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    gen: Callable[[list[str]], list[str]] = lambda ps: hf_generate(model, ps)  # noqa: E731
    return Row(label, kind, _weights_bytes(folder), {s: accuracy(gen, s, n) for s in SKILLS})


def fidelity_rows(
    family: dict[str, Path],
    work: Path,
    *,
    rates: tuple[float, ...] = DEFAULT_RATES,
    baselines: tuple[str, ...] = BASELINES,
    n: int = 100,
    params: dict | None = None,
    progress: bool = True,
) -> list[Row]:
    """Merge the family every way and measure each result on every skill (oracle branch choice)."""
    import branchmerge
    from branchmerge.export import summarize
    from branchmerge.merge import run_merge
    from transformers import AutoModelForCausalLM

    work = Path(work)
    steps = 2 + len(baselines) + len(rates)
    bar = tqdm(total=steps, desc="fidelity", disable=not progress)
    rows = [_hf_row("base", "base", family["base"], n)]
    bar.update()
    fts = {s: AutoModelForCausalLM.from_pretrained(family[s]).eval() for s in SKILLS}
    rows.append(Row("fine-tunes (4 models)", "fine-tunes", sum(_weights_bytes(family[s]) for s in SKILLS),
                    {s: accuracy(lambda ps, s=s: hf_generate(fts[s], ps), s, n) for s in SKILLS}))
    bar.update()
    branches = [{"name": s, "model": str(family[s])} for s in SKILLS]
    for method in baselines:
        cfg = parse_config({"branches": branches, "method": method, "base_model": str(family["base"]),
                            "dtype": "float32", "parameters": (params or {}).get(method, {"density": 0.5}
                                                                                if "ties" in method else {})})
        out = work / f"merge-{method}"
        run_merge(cfg, out, force=True, progress=False)
        rows.append(_hf_row(method, "baseline", out, n))
        bar.update()
    for r in rates:
        cfg = parse_config({"branches": branches, "compress_rate": r, "dtype": "float32"})
        out = work / f"bundle-r{r}"
        run_merge(cfg, out, force=True, progress=False)
        bundle = branchmerge.load(out, verify=False)
        acc = {s: accuracy(lambda ps, s=s: bundle.generate(ps, s, max_new_tokens=12), s, n) for s in SKILLS}
        rows.append(Row(f"branchmerge r={r}", "branch", summarize(out, verify=False)["bundle_bytes"], acc))
        bar.update()
    bar.close()
    return rows


def markdown_table(rows: list[Row]) -> str:
    ft = next((r for r in rows if r.kind == "fine-tunes"), None)
    head = "| model | MB | " + " | ".join(SKILLS) + " | mean | kept vs fine-tunes (worst skill) |"
    lines = [head, "|" + "---|" * (len(SKILLS) + 4)]
    for r in rows:
        kept = ""
        if ft is not None:
            kept = f"{min(r.accuracy[s] / ft.accuracy[s] if ft.accuracy[s] else 1.0 for s in SKILLS):.0%}"
        cells = " | ".join(f"{r.accuracy[s]:.2f}" for s in SKILLS)
        lines.append(f"| {r.label} | {r.bytes / 1e6:.2f} | {cells} | {r.mean:.3f} | {kept} |")
    return "\n".join(lines)


def pareto_plot(rows: list[Row], path: str | Path, title: str = "skills family: accuracy vs memory") -> Path:
    """Mean exact-match accuracy against bytes held, one marker per model or merge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = {"base": ("s", "tab:gray"), "fine-tunes": ("*", "tab:green"), "baseline": ("o", "tab:red"),
              "branch": ("D", "tab:blue")}
    branch = sorted((r for r in rows if r.kind == "branch"), key=lambda r: r.bytes)
    if branch:
        ax.plot([r.bytes / 1e6 for r in branch], [r.mean for r in branch], "-", color="tab:blue", alpha=0.5)
    stacked = 0  # baselines share one x (one model's bytes): stack their labels upwards
    for r in rows:
        marker, color = styles[r.kind]
        ax.scatter(r.bytes / 1e6, r.mean, marker=marker, color=color, s=90 if marker == "*" else 45, zorder=3)
        offset = (5, 4)
        if r.kind == "baseline":
            offset, stacked = (8, 6 + 11 * stacked), stacked + 1
        ax.annotate(r.label.replace("branchmerge ", ""), (r.bytes / 1e6, r.mean), textcoords="offset points",
                    xytext=offset, fontsize=7, color=color if r.kind == "baseline" else "black")
    ax.set_xlabel("bytes held (MB)")
    ax.set_ylabel(f"mean exact-match accuracy over {len(SKILLS)} skills")
    ax.set_ylim(-0.03, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], marker=m, color=c, linestyle="", label=k) for k, (m, c) in styles.items()],
              loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
