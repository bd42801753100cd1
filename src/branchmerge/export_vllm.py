"""Export a bundle for vLLM: one shared base plus one PEFT LoRA adapter per branch, or dense folders.

A branch's weight is ``W_i = s_i (W̄ + U_i V_i)``. The base holds ``s̄ W̄`` (``s̄`` the mean scale), so
the exact difference ``W_i − s̄ W̄ = (s_i − s̄) W̄ + s_i U_i V_i`` is full-rank whenever the scales differ.
Two ways to carry it, both measured per tensor (relative error against ``W_i``):

* ``scale: refactor`` (default) — a rank-``k + extra_rank`` rSVD of the exact difference (``lora_B``
  ``[out, r]``, ``lora_A`` ``[r, in]``); exact when the scales agree;
* ``scale: ignore`` — ``lora_A = V_i``, ``lora_B = s_i U_i`` as stored, dropping ``(s_i − s̄) W̄``.

Tensors a LoRA cannot carry (embeddings, lm_head, norms, biases that differ between branches) go into
the base as the branches' mean; their error per branch is reported too. ``per_branch: lora`` carries
differing embeddings and lm_head as LoRAs of rank ``embed_rank`` on ``embed_tokens`` (and ``lm_head``,
tied or not) — PEFT and vLLM load them (with tied embeddings, use the adapter unmerged: merging both into
the one tied tensor would add the difference twice) — while norms and biases stay averaged; ``per_branch: refuse`` stops instead. ``mode: dense`` writes one plain
folder per branch (exact).

Writes ``OUT/base`` (``base-GROUP`` for several groups), ``OUT/adapters/BRANCH`` (``adapter_config.json``
with ``rank_pattern``/``alpha_pattern`` so every module's scaling is 1, and ``adapter_model.safetensors``),
standalone branches as ``OUT/standalone/BRANCH``, ``OUT/export_report.json``, ``OUT/serve_vllm.sh`` (the
``vllm serve`` line) and ``OUT/gateway.yaml`` (for ``branchmerge gateway``).
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from branchmerge.common import DTYPES, dtype_name, json_dumps
from branchmerge.compress import low_rank_factors, relative_error, tensor_seed
from branchmerge.errors import BranchmergeError
from branchmerge.export import write_branch
from branchmerge.io.bundle import BundleReader, key_mean, key_scales, key_shared
from branchmerge.io.writer import atomic_output_dir

logger = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values


def vllm_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that covers ``rank``.

    Raises:
        BranchmergeError: ``rank`` is above vLLM's largest.
    """
    for r in VLLM_LORA_RANKS:
        if rank <= r:
            return r
    raise BranchmergeError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]}): "
                           "merge with a higher compress_rate or a smaller budget, or export with --mode dense")


def export_vllm(bundle: str | Path, out: str | Path, *, mode: str = "lora", scale: str = "refactor",
                extra_rank: int = 0, per_branch: str = "mean", embed_rank: int = 64, dtype: str | None = None,
                force: bool = False,
                port: int = 8000, progress: bool = True) -> dict[str, Any]:
    """Export ``bundle`` to ``out`` (see the module docstring); returns the report also written there.

    Raises:
        BranchmergeError: bad options, an unsupported layout (transposed layers in ``lora`` mode), a rank
            above vLLM's limit, ``per_branch: refuse`` with tensors that differ, or ``out`` exists.
    """
    if mode not in ("lora", "dense"):
        raise BranchmergeError(f"--mode must be lora or dense, got {mode!r}")
    if scale not in ("refactor", "ignore"):
        raise BranchmergeError(f"--scale must be refactor or ignore, got {scale!r}")
    if per_branch not in ("mean", "lora", "refuse"):
        raise BranchmergeError(f"--per-branch must be mean, lora or refuse, got {per_branch!r}")
    if not 1 <= embed_rank <= 512:
        raise BranchmergeError(f"--embed-rank must be in [1, 512], got {embed_rank}")
    if not 0 <= extra_rank <= 512:
        raise BranchmergeError(f"--extra-rank must be in [0, 512], got {extra_rank}")
    reader = BundleReader(bundle)
    dt = dtype_name(dtype, default=reader.manifest.dtype)
    out = Path(out)
    where = out.expanduser().resolve()  # absolute in the launch lines and gateway.yaml: they run from anywhere
    report: dict[str, Any] = {"mode": mode, "bundle": str(reader.path.resolve()), "dtype": dt, "groups": {}, "launch": []}
    with atomic_output_dir(out, force=force, inputs=[reader.path]) as tmp:
        lora_groups = [g for g, info in reader.groups.items() if not info.standalone] if mode == "lora" else []
        for gname, info in reader.groups.items():
            if gname in lora_groups:
                base = "base" if len(lora_groups) == 1 else f"base-{gname}"
                report["groups"][gname] = _export_group(reader, gname, tmp, base, scale, extra_rank, per_branch,
                                                        embed_rank, dt, progress)
            else:
                sub = "standalone" if mode == "lora" else "."
                for b in info.branches:
                    (tmp / sub / b).mkdir(parents=True)
                    write_branch(reader, b, tmp / sub / b, dtype=dt, progress=progress)
                    report["groups"].setdefault(gname, {"dense": {}})["dense"][b] = str(where / sub / b)
        report["launch"], gateway = _launch(report, where, dt, port)
        (tmp / "serve_vllm.sh").write_text("#!/bin/sh\n# generated by branchmerge export-vllm\n"
                                           + "\n".join(report["launch"]) + "\n")
        (tmp / "gateway.yaml").write_text(gateway)
        (tmp / "export_report.json").write_text(json_dumps(report))
    return report


def _export_group(reader: BundleReader, group: str, tmp: Path, base: str, scale: str, extra_rank: int,
                  per_branch: str, embed_rank: int, dt: str, progress: bool) -> dict[str, Any]:
    info = reader.groups[group]
    if info.transposed:
        raise BranchmergeError(f"group {group!r} ({info.architecture}) stores transposed (Conv1D) layers; "
                               "the LoRA export does not handle them: use --mode dense")
    from branchmerge.architectures import registry

    arch = registry().get(info.architecture)
    if arch is not None and arch.experts:
        raise BranchmergeError(f"group {group!r} ({info.architecture}) is a mixture of experts; the LoRA export "
                               "writes adapters for linear layers only, not for vLLM's fused experts or its "
                               "routers: use --mode dense")
    members = info.branches
    records = reader.manifest.tensors[group]
    grown = {b: rec.shape_of(b)[0] for rec in records.values() if rec.shapes for b in members}
    if grown:
        sizes = ", ".join(f"{b!r} {v}" for b, v in grown.items())
        raise BranchmergeError(f"group {group!r}: its branches' vocabularies differ in size ({sizes} tokens); one "
                               "vLLM base with a LoRA per branch needs one vocabulary (vLLM's LoRAs cannot add "
                               "tokens): use --mode dense")
    torch_dt = DTYPES[dt]
    rep: dict[str, Any] = {"base": base, "branches": {b: {"tensors": {}, "base_tensors": {}} for b in members}}
    differing: list[str] = []
    vocab_mean: dict[str, torch.Tensor] = {}  # with per_branch "lora": the mean embeddings / lm_head, kept

    def own(tensor: str, b: str) -> torch.Tensor:
        return reader.own(b, tensor)

    def base_stream():
        for tensor, rec in records.items():
            if rec.role == "compressed":
                s = reader.get(key_scales(group, tensor)).float()
                yield tensor, reader.get(key_mean(group, tensor)).float() * float(s.mean())
            elif rec.role == "shared":
                yield tensor, reader.get(key_shared(group, tensor))
            else:
                copies = [own(tensor, b) for b in members]
                mean = torch.stack([c.float() for c in copies]).mean(0) if copies[0].is_floating_point() else copies[0]
                if any(not torch.equal(c, copies[0]) for c in copies[1:]):
                    differing.append(tensor)
                    if per_branch == "lora" and tensor in ("model.embed_tokens.weight", "lm_head.weight"):
                        vocab_mean[tensor] = mean
                    for b, c in zip(members, copies):
                        rep["branches"][b]["base_tensors"][tensor] = relative_error(mean, c)
                yield tensor, mean

    (tmp / base).mkdir()
    write_branch(reader, members[0], tmp / base, dtype=dt, progress=progress, tensors=base_stream())
    if differing and per_branch == "refuse":
        worst = max(((t, e) for b in members for t, e in rep["branches"][b]["base_tensors"].items()),
                    key=lambda x: x[1])
        raise BranchmergeError(f"group {group!r}: {len(differing)} per-branch tensor(s) differ between branches "
                               f"(e.g. {worst[0]}, relative difference from their mean {worst[1]:.3g}) and a LoRA "
                               "adapter cannot carry them; use --per-branch mean (measured) or --mode dense")
    comp = [t for t, r in records.items() if r.role == "compressed"]
    tied = bool(reader.hf_config(members[0]).get("tie_word_embeddings", False))
    vocab = [t for t in differing if t in vocab_mean]
    tensors: dict[str, dict[str, torch.Tensor]] = {b: {} for b in members}
    ranks: dict[str, dict[str, int]] = {b: {} for b in members}

    def add(b: str, module: str, a: torch.Tensor, bb: torch.Tensor, kind: str = "lora") -> None:
        """``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]`` of one module (``kind="embedding"``: PEFT's
        ``lora_embedding_A`` ``[r, vocab]`` and ``lora_embedding_B`` ``[hidden, r]``)."""
        key = f"base_model.model.{module}"
        names = ((f"{key}.lora_A.weight", f"{key}.lora_B.weight") if kind == "lora" else
                 (f"{key}.lora_embedding_A", f"{key}.lora_embedding_B"))
        tensors[b][names[0]], tensors[b][names[1]] = a.to(torch_dt).contiguous(), bb.to(torch_dt).contiguous()
        ranks[b][module] = a.shape[0]

    for t in tqdm(comp, desc="adapters", disable=not progress):  # W̄ and the scales read once per tensor
        rec = records[t]
        scales = reader.get(key_scales(group, t)).float()
        s_bar = float(scales.mean())
        mean = reader.get(key_mean(group, t)).float()
        m, n = mean.shape
        for idx, b in enumerate(members):
            s_b = float(scales[idx])
            d = reader.difference(b, t)
            w_b = d.apply(mean) * s_b  # [out, in]
            if scale == "ignore" and d.u is not None:
                lb, la = d.u.float() * s_b, d.v.float()
            else:
                k = min(min(m, n), (min(m, n) if rec.dense else (rec.rank or 0)) + extra_rank)
                if k == 0:
                    rep["branches"][b]["tensors"][t] = relative_error(s_bar * mean, w_b)
                    continue
                gen = torch.Generator().manual_seed(tensor_seed(0, b, t, "export-vllm"))
                lb, la = low_rank_factors(w_b - s_bar * mean, k, n_iter=4, generator=gen)
            rep["branches"][b]["tensors"][t] = relative_error(s_bar * mean + lb @ la, w_b)
            add(b, t.removesuffix(".weight"), la, lb)
    for t in vocab:  # embeddings / lm_head: a LoRA on the embedding (and on the head, tied or not)
        for b in members:
            mine = own(t, b).float()
            gen = torch.Generator().manual_seed(tensor_seed(0, b, t, "export-vllm"))
            lo, hi = low_rank_factors(mine - vocab_mean[t], min(embed_rank, *mine.shape), n_iter=4,
                                      generator=gen)  # [vocab, r], [r, hidden]
            rep["branches"][b]["base_tensors"][t] = relative_error(vocab_mean[t] + lo @ hi, mine)
            if t == "model.embed_tokens.weight":
                add(b, "model.embed_tokens", lo.T, hi.T, kind="embedding")
            if t == "lm_head.weight" or tied:
                add(b, "lm_head", hi, lo)
    max_rank = 0
    for b in members:
        r = max(ranks[b].values(), default=1)
        max_rank = max(max_rank, r)
        vllm_rank(r)  # refuse ranks vLLM cannot load, naming the limit
        adir = tmp / "adapters" / b
        adir.mkdir(parents=True)
        save_file(tensors[b], str(adir / "adapter_model.safetensors"))
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": f"../../{base}",
               "r": r, "lora_alpha": r, "rank_pattern": ranks[b], "alpha_pattern": ranks[b],
               "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks[b]}), "lora_dropout": 0.0,
               "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
               "use_rslora": False, "use_dora": False, "init_lora_weights": True}
        (adir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        br = rep["branches"][b]
        br["rank"] = r
        br["max_rel_weight_error"] = max([*br["tensors"].values(), *br["base_tensors"].values(), 0.0])
        br["max_rel_error_lora_tensors"] = max(br["tensors"].values(), default=0.0)
    rep["max_lora_rank"] = vllm_rank(max_rank)
    rep["per_branch_tensors_in_base"] = differing
    return rep


def _launch(report: dict[str, Any], out: Path, dt: str, port: int) -> tuple[list[str], str]:
    """``vllm serve`` lines (one server per base or dense folder) and a gateway config pointing at them."""
    lines, upstreams, branches = [], {}, {}
    for gname, g in report["groups"].items():
        if "base" in g:
            mods = " ".join(shlex.quote(f"{b}={out / 'adapters' / b}") for b in g["branches"])
            lines.append(f"vllm serve {shlex.quote(str(out / g['base']))} --served-model-name {gname} --dtype {dt} "
                         f"--enable-lora --max-lora-rank {g['max_lora_rank']} --max-loras {len(g['branches'])} "
                         f"--lora-modules {mods} --port {port}")
            upstreams[gname] = {"base_url": f"http://127.0.0.1:{port}/v1"}
            branches.update({b: {"upstream": gname, "model": b} for b in g["branches"]})
            port += 1
        for b, path in g.get("dense", {}).items():
            lines.append(f"vllm serve {shlex.quote(path)} --served-model-name {b} --dtype {dt} --port {port}")
            upstreams[b] = {"base_url": f"http://127.0.0.1:{port}/v1"}
            branches[b] = {"upstream": b, "model": b}
            port += 1
    gateway = {"upstreams": upstreams, "branches": branches, "router": report["bundle"]}
    import yaml

    return lines, "# generated by branchmerge export-vllm: branchmerge gateway gateway.yaml\n" + yaml.safe_dump(
        gateway, sort_keys=False)
