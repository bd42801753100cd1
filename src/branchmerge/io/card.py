"""Model cards: the ``README.md`` a merge writes into its output, as mergekit does (``--no-model-card``: none).

The card says what the folder is and how to use it, for a person and for a model hub: YAML front matter
(``library_name``, ``tags``, ``base_model``: the input models as the config named them) and the merge
config that made it, so the merge can be run again. Every value comes from the config or the written
output; text from them is escaped where Markdown would read it as structure.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

import yaml

CARD = "README.md"


def _cell(value: Any) -> str:
    """A Markdown table cell: pipes escaped, line breaks and backticks flattened."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ").replace("`", "'")


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _front(sources: list[str], tags: list[str], library: str) -> str:
    meta = {"library_name": library, "tags": tags, "base_model": sources}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _config_block(config: dict[str, Any]) -> str:
    return "```yaml\n" + yaml.safe_dump(config, sort_keys=False, allow_unicode=True).replace("```", "'''") + "```\n"


def bundle_card(name: str, summary: dict[str, Any], config: dict[str, Any]) -> str:
    """The card of a branched bundle.

    Args:
        name: the bundle's folder name (its title).
        summary: :func:`branchmerge.export.summarize` of the written bundle.
        config: the merge config as plain data (``MergeConfig.model_dump(mode="json")``).
    """
    branches = config.get("branches", [])
    models = [str(m) for b in branches for m in (b.get("base"), b.get("model")) if m] + (
        [str(config["base_model"])] if config.get("base_model") else [])  # (an adapter's base, then the adapter)
    lines = [_front(list(dict.fromkeys(models)), ["branchmerge", "merge", "branched"], "branchmerge"),
             f"# {_cell(name)}\n",
             f"A branched model made with branchmerge from {len(summary['branches'])} models. Each model is a "
             "*branch*: in a group of one architecture every weight matrix is stored once as the mean of the "
             "models' normalized weights, plus each branch's difference from it as low-rank factors "
             "(W_i ≈ s_i·(W̄ + U_i V_i)); embeddings, norms and biases stay per branch. A question runs on the "
             "branch it names, or on the one a router picks.\n",
             "## Branches\n",
             "| branch | group | architecture | source | largest relative error of a compressed weight |",
             "|---|---|---|---|---|"]
    given = {x.get("name"): x.get("model") for x in branches}  # the source as the config named it
    for b, info in summary["branches"].items():
        g = summary["groups"][info["group"]]
        err = g["max_rel_error"].get(b)
        lines.append(f"| {_cell(b)} | {_cell(info['group'])}{' (standalone)' if info['standalone'] else ''} | "
                     f"{_cell(g['architecture'])} | {_cell(given.get(b, info['source']))} | "
                     f"{'-' if not err else f'{err:.4f}'} |")
    rate = summary.get("compress_rate")
    how = "ranks chosen under a byte budget" if summary.get("allocation") else f"compress rate r = {rate}"
    lines += ["", "## Size\n",
              f"{_mb(summary['bundle_bytes'])} in {summary['shards']} shard(s), {summary['dtype']}, {how}; the "
              f"inputs take {_mb(summary['input_bytes'])}"
              + (f" ({summary['ratio']:.2f}×)" if summary.get("ratio") else "") + ".\n",
              "| group | architecture | branches | compressed tensors | ranks | size |", "|---|---|---|---|---|---|"]
    for gname, g in summary["groups"].items():
        ranks = g["ranks"]
        rank_s = "-" if not ranks else (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}")
        lines.append(f"| {_cell(gname)} | {_cell(g['architecture'])} | {_cell(', '.join(g['branches']))} | "
                     f"{g['compressed']} | {rank_s} | {_mb(g['bytes'])} |")
    first = next(iter(summary["branches"]), "BRANCH")
    q = shlex.quote
    lines += ["", "## Use\n", "```python", "import branchmerge", "",
              f"bundle = branchmerge.load({json.dumps(name)})",
              f"print(bundle.generate(\"What is 2 + 2?\", branch={json.dumps(first)})[0])",
              "# branch=\"auto\" lets the router pick, once `branchmerge router build` made one",
              "```\n", "```bash", f"branchmerge inspect {q(name)}    # branches, ranks, errors, bytes",
              f"branchmerge generate {q(name)} \"What is 2 + 2?\" --branch {q(first)}",
              f"branchmerge serve {q(name)}      # an OpenAI-compatible server", "```\n",
              "The bundle's shards are checked against the sha256 sums in `manifest.json` when it loads.\n",
              "## Merge configuration\n", "`merge_config.yaml`, which `branchmerge merge` can run again:\n",
              _config_block(config)]
    return "\n".join(lines)


def merged_card(name: str, method: str, config: dict[str, Any]) -> str:
    """The card of a folder merged into one model with a baseline method (linear, TIES, DARE…)."""
    sources = [str(b.get("model")) for b in config.get("branches", [])]
    base = config.get("base_model")
    lines = [_front(sources + ([str(base)] if base else []), ["branchmerge", "merge", method], "transformers"),
             f"# {_cell(name)}\n",
             f"One model merged with branchmerge's `{_cell(method)}` method from {len(sources)} models"
             + (f", relative to the base model `{_cell(base)}`" if base else "") + ". It loads as any Hugging "
             "Face model (`AutoModelForCausalLM.from_pretrained`).\n",
             "## Models\n", "| model | weight |", "|---|---|"]
    lines += [f"| {_cell(b.get('model'))} | {_cell(b.get('weight', 1.0))} |" for b in config.get("branches", [])]
    lines += ["", "## Merge configuration\n", _config_block(config)]
    return "\n".join(lines)


def branch_card(name: str, bundle: str, branch: str, source: str, max_error: float | None,
                config: dict[str, Any]) -> str:
    """The card of one branch exported from a bundle as a plain Hugging Face folder."""
    lines = [_front([source], ["branchmerge", "merge", "branch-export"], "transformers"), f"# {_cell(name)}\n",
             f"Branch `{_cell(branch)}` of the branchmerge bundle `{_cell(bundle)}`, written back as one dense "
             "model: each compressed weight is s·(W̄ + U V) again. It loads as any Hugging Face model "
             "(`AutoModelForCausalLM.from_pretrained`).\n",
             f"- made from: `{_cell(source)}`",
             "- largest relative error of a compressed weight against that model: "
             + ("none (no compressed weights)" if not max_error else f"{max_error:.4f}"), "",
             "## The bundle's merge configuration\n", _config_block(config)]
    return "\n".join(lines)
