"""Check that our baselines agree with mergekit's output for the same inputs: the embedded skills family
(base + 4 fine-tunes). `linear`, `ties` and `task_arithmetic` with scalar parameters; `ties` with a
density gradient and filters, and `slerp` (the base and one fine-tune) with mergekit's example
gradients per filter (parameters resolved per tensor as mergekit resolves them); then every
deterministic method mergekit has; per-model parameters, slices, and fine-tunes whose vocabularies differ
(tokenizer merging: the output vocabulary's tensors compared token by token) (the random ones, DARE and DELLA, draw from torch's global generator
there and from a per-tensor seed here, so they cannot agree entry for entry).

    python bench/baselines_vs_mergekit.py

mergekit runs as ``python -m mergekit.scripts.run_yaml`` (the `bench` extra installs it; or put it on
``PYTHONPATH``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from _common import CACHE
from branchmerge.config import parse_config
from branchmerge.family import SKILLS, build_family
from branchmerge.merge.collapse import run_baseline_merge
from branchmerge.io.writer import claim_output

GRADIENT_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},  # mergekit's README example
              {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]
CASES = {  # label: (method, parameters)
    "linear": ("linear", {}),
    "ties": ("ties", {"density": 0.5}),
    "task_arithmetic": ("task_arithmetic", {}),
    "ties, density gradient + filter": ("ties", {"density": [{"filter": "mlp", "value": [0.2, 0.9]},
                                                              {"value": [0.7, 0.3, 0.5]}]}),
    "slerp, t gradients per filter": ("slerp", {"t": GRADIENT_T}),
    "breadcrumbs (density 0.8, gamma 0.05)": ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    "breadcrumbs_ties (density 0.7, gamma 0.02, rescale)": ("breadcrumbs_ties", {"density": 0.7, "gamma": 0.02,
                                                                                 "rescale": True, "normalize": True}),
    "model_stock": ("model_stock", {}),
    "model_stock, filter_wise": ("model_stock", {"filter_wise": True}),
    "sce (select_topk 0.5)": ("sce", {"select_topk": 0.5}),
    "sce (select_topk 1)": ("sce", {}),
    "nuslerp of two fine-tunes' task vectors (weights 1, 2)": ("nuslerp", {}),
    "nuslerp of two models, row-wise, no base": ("nuslerp", {"nuslerp_flatten": False}),
    "multislerp of four task vectors (weights 1..4)": ("multislerp", {}),
    "karcher mean of four models": ("karcher", {}),
    "nearswap (t 0.001)": ("nearswap", {"t": 0.001}),
    "arcee_fusion": ("arcee_fusion", {}),
}
PAIRWISE = {"slerp", "nearswap", "arcee_fusion"}  # the base and one fine-tune
NO_BASE = {"linear", "karcher"}
WEIGHTED = {"nuslerp", "multislerp"}  # mergekit requires their per-model weight; given 1, 2, … here
UNWEIGHTED = {"slerp", "model_stock", "sce", "karcher", "nearswap", "arcee_fusion"}  # (no weight parameter)


def load_all(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def as_mergekit(fam: dict, label: str, method: str, params: dict) -> dict:
    """One of CASES as a mergekit config."""
    base = None if method in NO_BASE or "no base" in label else str(fam["base"])
    skills = SKILLS[:1] if method in PAIRWISE else SKILLS[:2] if method == "nuslerp" else SKILLS
    weights = [float(j + 1) if method in WEIGHTED else 1.0 for j in range(len(skills))]
    mk = {
        "models": [{"model": str(fam[s]), "parameters": {} if method in UNWEIGHTED else {"weight": w}}
                   for s, w in zip(skills, weights)],
        "merge_method": method,
        "dtype": "float32",
        "parameters": params,
    }
    if base:
        mk["base_model"] = base
        if method in PAIRWISE:
            mk["models"].insert(0, {"model": base})
    return mk


def per_model_cases(fam: dict) -> dict[str, dict]:
    """mergekit configs whose models each give their own parameters (read by ``parse_config`` as they are)."""
    m = [str(fam[s]) for s in SKILLS[:3]]
    readme = {  # mergekit README's TIES example, with three of our fine-tunes in place of its models
        "models": [{"model": m[0], "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                   {"model": m[1], "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                   {"model": m[2], "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5},
                                                                                {"value": 0}]}}],
        "merge_method": "ties", "base_model": str(fam["base"]),
        "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float32"}
    crumbs = {
        "models": [{"model": m[0], "parameters": {"density": 0.9, "gamma": 0.01, "weight": 0.5}},
                   {"model": m[1], "parameters": {"density": 0.6, "gamma": [0.0, 0.1], "weight": 1.0}},
                   {"model": m[2], "parameters": {"density": 0.8, "gamma": 0.05, "weight": 0.7}}],
        "merge_method": "breadcrumbs_ties", "base_model": str(fam["base"]), "dtype": "float32"}
    base = str(fam["base"])
    franken = {"merge_method": "passthrough", "dtype": "float32",
               "slices": [{"sources": [{"model": m[0], "layer_range": [0, 3]}]},
                          {"sources": [{"model": m[1], "layer_range": [1, 4]}]}]}
    upscale = {"merge_method": "passthrough", "dtype": "float32",  # depth up-scaling, attention out scaled
               "slices": [{"sources": [{"model": m[0], "layer_range": [0, 3]}]},
                          {"sources": [{"model": m[0], "layer_range": [1, 4], "parameters": {
                              "scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]}]}
    per_slice = {"merge_method": "slerp", "base_model": base, "dtype": "float32",
                 "parameters": {"t": 0.3},
                 "slices": [{"sources": [{"model": base, "layer_range": [0, 2]}, {"model": m[0], "layer_range": [0, 2]}]},
                            {"sources": [{"model": base, "layer_range": [1, 4]}, {"model": m[1], "layer_range": [1, 4]}],
                             "parameters": {"t": [0.0, 0.5, 1.0]}}]}
    return {"mergekit README's TIES example (per-model densities, weight gradient and filter)": readme,
            "breadcrumbs_ties, per-model density and gamma": crumbs,
            "slices: passthrough frankenmerge (a 0-3 + b 1-4)": franken,
            "slices: depth up-scaling, o_proj scaled in the second copy": upscale,
            "slices: slerp per slice, t gradient over the second": per_slice}


def grown(fam: dict, skill: str, added: list[str], seed: int) -> Path:
    """A copy of ``skill``'s fine-tune whose tokenizer adds ``added`` (special tokens) and whose embeddings and
    head grow by as many rows (random, seeded): a fine-tune that added chat or tool tokens."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    out = CACHE / f"grown-{skill}-{'-'.join(t.strip('<|>') for t in added)}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(fam[skill], out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_tokens(added, special_tokens=True)
    tok.save_pretrained(out)
    sd, g = load_all(out), torch.Generator().manual_seed(seed)
    cfg = json.loads((out / "config.json").read_text())
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in sd:
            w = sd[k]
            sd[k] = torch.cat([w, torch.randn(len(tok) - w.shape[0], w.shape[1], generator=g) * w.std()])
    cfg["vocab_size"] = len(tok)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def vocabulary_cases(fam: dict) -> dict[str, dict]:
    """mergekit configs over fine-tunes whose vocabularies differ (tokenizer merging)."""
    chat = str(grown(fam, SKILLS[0], ["<|im_start|>", "<|im_end|>"], 1))
    tool = str(grown(fam, SKILLS[1], ["<tool>", "<|im_end|>"], 2))
    base = str(fam["base"])
    return {
        "vocabularies: linear, tokenizer_source union": {
            "merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
            "models": [{"model": chat, "parameters": {"weight": 1.0}}, {"model": tool, "parameters": {"weight": 0.5}}]},
        "vocabularies: ties over the base, union": {
            "merge_method": "ties", "base_model": base, "dtype": "float32", "tokenizer_source": "union",
            "parameters": {"density": 0.7},
            "models": [{"model": chat, "parameters": {"weight": 1.0}}, {"model": tool, "parameters": {"weight": 1.0}}]},
        "vocabularies: tokenizer block (forced, model_token and zero rows, pad to 16)": {
            "merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
            "models": [{"model": chat, "parameters": {"weight": 0.6}}, {"model": tool, "parameters": {"weight": 0.4}}],
            "tokenizer": {"source": "union", "pad_to_multiple_of": 16, "tokens": {
                "<|im_start|>": {"source": chat, "force": True},
                "<tool>": {"source": {"kind": "model_token", "model": chat, "token": "<|im_end|>"}},
                "<new>": {"source": {"kind": "zero"}}}}},
        "vocabularies: slerp, tokenizer_source base (the grown model)": {
            "merge_method": "slerp", "base_model": chat, "dtype": "float32", "tokenizer_source": "base",
            "parameters": {"t": 0.3}, "models": [{"model": chat}, {"model": tool}]},
        "vocabularies: slices (chat 0-3 + tool 1-4), union": {
            "merge_method": "passthrough", "dtype": "float32", "tokenizer_source": "union",
            "slices": [{"sources": [{"model": chat, "layer_range": [0, 3]}]},
                       {"sources": [{"model": tool, "layer_range": [1, 4]}]}]},
    }


def by_token(a: dict, b: dict, ours: Path, theirs: Path) -> None:
    """Put the vocabulary tensors' rows of ``a`` (ours) and ``b`` (mergekit's) in one token order: mergekit adds
    the non-base models' tokens in the order of a Python set (it varies from run to run)."""
    import torch
    from transformers import AutoTokenizer

    va, vb = (AutoTokenizer.from_pretrained(f).get_vocab() for f in (ours, theirs))
    if va == vb or set(va) != set(vb):
        return
    order = sorted(va)
    ia, ib = torch.tensor([va[t] for t in order]), torch.tensor([vb[t] for t in order])
    rows = json.loads((ours / "config.json").read_text())["vocab_size"]
    for k in set(a) & set(b):
        if a[k].dim() == 2 and a[k].shape[0] == rows and a[k].shape == b[k].shape and "layers." not in k:
            a[k] = torch.cat([a[k][ia], a[k][len(va):]])
            b[k] = torch.cat([b[k][ib], b[k][len(vb):]])


def compare(i: int, label: str, ours_cfg: dict, mk: dict) -> None:
    ours = CACHE / f"ours-baseline-{i}"
    theirs = CACHE / f"mergekit-baseline-{i}"
    claim_output(ours)  # this cache's own output, whichever version wrote it
    run_baseline_merge(parse_config(ours_cfg), ours, force=True, progress=False)
    cfg_path = CACHE / f"mergekit-baseline-{i}.yaml"
    cfg_path.write_text(yaml.safe_dump(mk))
    shutil.rmtree(theirs, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg_path), str(theirs),
                    "--allow-crimes"], check=True, capture_output=True)
    a, b = load_all(ours), load_all(theirs)
    by_token(a, b, ours, theirs)
    common = sorted(set(a) & set(b))
    assert common, "no tensors in common"
    max_abs = max(float((a[k] - b[k]).abs().max()) for k in common)
    max_rel = max(float((a[k] - b[k]).norm() / max(b[k].norm(), 1e-12)) for k in common)
    for key in ("num_hidden_layers", "vocab_size"):
        got = [json.loads((f / "config.json").read_text())[key] for f in (ours, theirs)]
        assert got[0] == got[1], f"{label}: {key} {got[0]} here, {got[1]} in mergekit's"
    print(f"| {label} | {len(common)}/{len(b)} | {max_abs:.2e} | {max_rel:.2e} |", flush=True)


def main() -> None:
    fam = build_family(progress=True)  # the shared cache (make demo and the tests build the same)
    print("| method | tensors | max abs diff | max rel diff (Frobenius) |")
    print("|---|---|---|---|")
    for i, (label, (method, params)) in enumerate(CASES.items()):
        mk = as_mergekit(fam, label, method, params)
        models = [e for e in mk["models"] if e["model"] != mk.get("base_model")]
        ours = {"branches": [{"name": f"m{j}", "model": e["model"], "weight": e["parameters"].get("weight", 1.0)}
                             for j, e in enumerate(models)],
                "method": method, "base_model": mk.get("base_model"), "dtype": "float32", "parameters": params}
        compare(i, label, ours, mk)
    extra = {**per_model_cases(fam), **vocabulary_cases(fam)}
    for j, (label, mk) in enumerate(extra.items()):
        compare(len(CASES) + j, label, dict(mk), mk)  # (parse_config reads the mergekit config itself)


if __name__ == "__main__":
    sys.exit(main())
