"""The branch merge: input folders → bundle folder, one tensor (across N models) at a time.

Peak memory grows with the largest tensor, not with model size or N: each compressed tensor is read in
two passes (scales and running mean first, then each branch's difference), and shards are written as
they fill.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from branchmerge import __version__
from branchmerge.common import json_dumps, resolve_device, resolve_dtype
from branchmerge.architectures import FALLBACK, Architecture, float32_tensors, for_hf_config
from branchmerge.compress import (
    compress_difference,
    normalize,
    rank_for,
    relative_error,
    tensor_seed,
)
from branchmerge.config import BranchConfig, MergeConfig
from branchmerge.errors import ConfigError, ModelInputError
from branchmerge.io.bundle import FORMAT, FORMAT_VERSION, key_part, write_manifest
from branchmerge.io.card import CARD, bundle_card
from branchmerge.io.summary import summarize
from branchmerge.io.adapters import LoraSource, open_model
from branchmerge.io.models import ModelSource
from branchmerge.io.writer import ShardWriter, atomic_output_dir, check_output, copy_side_files
from branchmerge.merge.budget import merge_with_budget
from branchmerge.merge.lora import lora_base, lora_tensor
from branchmerge.merge.parts import check_shapes, keep_tensor, role_of, store_factors, write_mean

logger = logging.getLogger(__name__)

# config.json fields that must agree for models to share one compressed group
_SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads")


@dataclass
class _Group:
    name: str
    sources: list[ModelSource]
    arch: Architecture
    standalone: bool
    lora_base: ModelSource | None = None  # adapters of one base, stored as exact factors (merge.lora)
    float32: Callable[[str], bool] = lambda name: False  # tensors transformers keeps in float32 at the dtype
    linear: set[str] | None = None  # (the fallback rule) plain nn.Linear modules: only their weights compress


def run_branch_merge(config: MergeConfig, out: str | Path, *, force: bool = False, progress: bool = True,
                     check_load: bool = True, model_card: bool = True) -> dict[str, Any]:
    """Merge the config's models into a bundle at ``out`` and return its manifest.

    With ``check_load``, the finished bundle is loaded (configs, then one forward of a tiny input per
    branch) before it is renamed into place, so a bundle that cannot run is never left behind.

    Raises:
        ModelInputError: an input is missing, corrupt, or incompatible with its group.
        ConfigError: the config asks for something this method cannot do.
        BranchmergeError: ``out`` exists and ``force`` is false, or would destroy an input.
        BundleError: the written bundle does not load.
    """
    out = Path(out)
    inputs = config.inputs()
    check_output(out, force=force, inputs=inputs)  # before opening any input; atomic_output_dir checks again
    groups = open_groups(config)
    dtype = resolve_dtype(config.dtype)
    device = resolve_device(config.device)

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"branchmerge {__version__}",
        "config": config.model_dump(mode="json"),
        "dtype": config.dtype,
        "branches": {},
        "groups": {},
        "tensors": {},
    }
    total = sum(len(g.sources[0].names()) for g in groups)
    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        writer = ShardWriter(tmp, config.max_shard_bytes)
        if config.budget is not None:
            n_comp = sum(role_of(g, t, g.sources[0].shape(t)) == "compress" for g in groups for t in g.sources[0].names())
            bar = tqdm(total=total + n_comp, desc="merging", unit="step", disable=not progress)
            manifest["tensors"], manifest["allocation"] = merge_with_budget(
                groups, config, writer, dtype, device, tmp, bar)
        else:
            bar = tqdm(total=total, desc="merging", unit="tensor", disable=not progress)
        for g in groups:
            if config.budget is None:
                records: dict[str, Any] = {}
                for tensor in g.sources[0].names():
                    bar.set_postfix_str(f"{g.name}: {tensor}", refresh=False)
                    records[tensor] = _merge_tensor(g, tensor, config, writer, dtype, device)
                    bar.update()
                manifest["tensors"][g.name] = records
            manifest["groups"][g.name] = {
                "branches": [s.name for s in g.sources],
                "architecture": g.arch.name,
                "standalone": g.standalone,
                "transposed": g.arch.transposed,
                **({"lora_base": str(g.lora_base.path)} if g.lora_base is not None else {}),
            }
            for s in g.sources:
                dest = tmp / "branches" / s.name
                files = copy_side_files(s.side_files(), dest)
                (dest / "config.json").write_text(json_dumps(s.hf_config))
                manifest["branches"][s.name] = {
                    "group": g.name,
                    "standalone": g.standalone,
                    "source": str(s.path),
                    "source_bytes": s.nbytes(),
                    "source_params": s.numel(),
                    "architectures": s.hf_config.get("architectures", []),
                    "hf_config": s.hf_config,
                    "files": ["config.json", *files],
                }
        bar.close()
        writer.close()
        manifest["shards"] = writer.shards
        manifest["weight_map"] = writer.weight_map
        manifest["total_bytes"] = writer.total_bytes
        write_manifest(tmp, manifest)
        (tmp / "merge_config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        if check_load:
            from branchmerge.runtime.check import check_bundle_loads

            check_bundle_loads(tmp)
        if model_card:
            card = bundle_card(Path(out).name, summarize(tmp, verify=False), config.model_dump(mode="json"))
            (tmp / CARD).write_text(card)
    logger.debug("wrote bundle %s (%.1f MB in %d shards)", out, writer.total_bytes / 1e6, len(writer.shards))
    return manifest


def open_groups(config: MergeConfig) -> list[_Group]:
    """Open every input and check that each compressed group is compatible.

    Raises:
        ModelInputError: naming the branches, fields or tensors that disagree.
    """
    out = []
    for gname, members in config.groups().items():
        sources = [open_model(b.name, b.model, b.revision, b.base, default_base=config.base_model) for b in members]
        standalone = members[0].standalone
        arch = for_hf_config(sources[0].hf_config, source=str(sources[0].path))
        if not standalone:
            _check_compatible(gname, members, sources)
        base = lora_base(sources) if config.lora == "exact" and not standalone else None
        if base is not None and config.budget is not None:
            raise ConfigError(f"group {gname!r} holds LoRA adapters of one base, which `lora: exact` keeps as they "
                              "are; a `budget` compresses them as merged models: add `lora: merged`")
        if base is not None:
            logger.info("group %r: LoRA adapters of %s, kept as exact factors over it", gname, base.path)
        elif config.lora == "exact" and not standalone and any(isinstance(s, LoraSource) for s in sources):
            logger.warning("group %r holds LoRA adapters with a full fine-tune or with adapters of another base: "
                           "all are compressed as merged models; a `group` of their own keeps adapters of one base "
                           "exact", gname)
        fp32 = float32_tensors(sources[0].hf_config, resolve_dtype(config.dtype))
        linear = None
        if arch is FALLBACK and not standalone:
            from branchmerge.io.skeleton import plain_linear_modules

            linear = plain_linear_modules(sources[0].hf_config)
        out.append(_Group(gname, sources, arch, standalone, base, fp32, linear))
    return out


def _check_compatible(group: str, members: list[BranchConfig], sources: list[ModelSource]) -> None:
    ref = sources[0]
    hint = "set `standalone: true` on one of them, or give it another `group`"
    for b, s in zip(members[1:], sources[1:]):
        a_ref, a = ref.hf_config.get("architectures"), s.hf_config.get("architectures")
        if a_ref != a:
            raise ModelInputError(
                f"branches {ref.name!r} ({a_ref}) and {b.name!r} ({a}) have different architectures and "
                f"cannot share group {group!r}: {hint}"
            )
        for f in _SHAPE_FIELDS:
            if ref.hf_config.get(f) != s.hf_config.get(f):
                raise ModelInputError(
                    f"branches {ref.name!r} and {b.name!r} differ in {f} ({ref.hf_config.get(f)} vs "
                    f"{s.hf_config.get(f)}) and cannot share group {group!r}: {hint}"
                )
        missing = set(ref.names()) ^ set(s.names())
        if missing:
            name = sorted(missing)[0]
            holder, lacker = (ref.name, b.name) if name in ref.weight_map else (b.name, ref.name)
            raise ModelInputError(
                f"tensor {name} is in branch {holder!r} but missing from branch {lacker!r} "
                f"({len(missing)} tensor(s) differ) in group {group!r}"
            )


def _merge_tensor(
    g: _Group, tensor: str, config: MergeConfig, writer: ShardWriter, dtype: torch.dtype, device: torch.device
) -> dict[str, Any]:
    shapes = [s.shape(tensor) for s in g.sources]
    role = role_of(g, tensor, shapes[0])
    check_shapes(g, tensor, shapes)
    if role == "compress":
        if g.lora_base is not None:
            rec = lora_tensor(g, g.lora_base, tensor, shapes[0], config, writer, dtype, device)
            if rec is not None:
                return rec
        return _compress_tensor(g, tensor, shapes[0], config, writer, dtype, device)
    return keep_tensor(g, tensor, writer, dtype)


def _compress_tensor(
    g: _Group,
    tensor: str,
    shape: tuple[int, ...],
    config: MergeConfig,
    writer: ShardWriter,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Any]:
    """Two passes over the N models: (1) scales and the normalized mean, (2) each difference."""
    esize = torch.empty((), dtype=dtype).element_size()
    first = write_mean(g, tensor, shape, writer, dtype, device)
    if isinstance(first, dict):  # frozen layer, or a group of one: stored once
        return first
    scales, mean, mean_q = first
    rate = config.rate_for(tensor)
    rank = rank_for(shape, rate)
    bits = int(config.factor_bits)  # "mixed" needs a budget (config validation)
    nbytes = mean_q.numel() * esize + 4 * len(scales)
    errors: dict[str, float] = {}
    dense = False
    for s, scale in zip(g.sources, scales):
        w_hat = normalize(s.get(tensor).to(device), scale)
        gen = torch.Generator(device=device).manual_seed(tensor_seed(config.rsvd.seed, s.name, tensor))
        diff = compress_difference(
            w_hat, mean, rank, oversample=config.rsvd.oversample, n_iter=config.rsvd.n_iter, generator=gen
        )
        diff = diff.to(dtype) if diff.u is None else diff
        if diff.dense is not None:
            dense = True
            writer.add(key_part(s.name, tensor, "delta"), diff.dense)
            nbytes += diff.dense.numel() * esize
        elif diff.u is not None:
            b, diff = store_factors(writer, s.name, tensor, diff.u, diff.v, [(bits, rank)], config.group_size, dtype)
            nbytes += b
        # error of what is actually stored (in the storage dtype), relative to ‖Ŵ_i‖ = 1
        errors[s.name] = relative_error(diff.apply(mean_q), w_hat) if scale > 0 else 0.0
        del w_hat, diff
    rec = {
        "role": "compressed",
        "shape": list(shape),
        "compress_rate": rate,
        "rank": rank,
        "dense": dense,
        "rel_error": errors,
        "bytes": nbytes,
    }
    if bits != 16 and not dense and rank > 0:
        rec.update(bits=[[bits, rank]], group_size=config.group_size)
    return rec
