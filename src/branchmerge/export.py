"""Export one branch of a bundle as a plain Hugging Face folder (``summarize``: :mod:`branchmerge.io.summary`)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from branchmerge.architectures import Architecture, float32_tensors, registry
from branchmerge.common import DTYPES, dtype_name
from branchmerge.errors import BundleError
from branchmerge.io.bundle import BundleReader
from branchmerge.io.models import fused_experts
from branchmerge.io.card import CARD, branch_card
from branchmerge.io.summary import summarize
from branchmerge.io.hf import finish_hf_shards, write_hf_config
from branchmerge.io.writer import ShardWriter, atomic_output_dir

logger = logging.getLogger(__name__)

__all__ = ["export_branch", "summarize", "write_branch"]  # summarize: the public name, as before


def export_branch(
    bundle: str | Path,
    branch: str,
    out: str | Path,
    *,
    dtype: str | Any = None,
    force: bool = False,
    max_shard_bytes: int = 2 << 30,
    progress: bool = True,
    model_card: bool = True,
) -> Path:
    """Write ``branch`` as an HF folder that ``AutoModelForCausalLM.from_pretrained`` loads (with
    ``model_card``, and a ``README.md`` saying where it came from).

    Compressed weights become dense ``s_i · (W̄ + U_i V_i)``; embeddings, norms, config and tokenizer
    are the branch's own. ``dtype`` (a name, an alias such as ``bf16``, or a torch dtype) defaults to the
    bundle's storage dtype. Side files are copied by the names the manifest lists, which are validated
    to be plain file names (never a path out of the bundle or into another folder).

    Raises:
        BranchNotFoundError: unknown branch. BundleError: corrupt bundle. BranchmergeError: ``out`` exists.
    """
    reader = BundleReader(bundle)
    reader.branch(branch)
    out = Path(out)
    with atomic_output_dir(out, force=force, inputs=[reader.path]) as tmp:
        write_branch(reader, branch, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress)
        if model_card:
            m = reader.manifest
            info = m.branches[branch]
            errors = [r.rel_error.get(branch, 0.0) for r in m.tensors[info.group].values() if r.role == "compressed"]
            given = {b.get("name"): b.get("model") for b in m.config.get("branches", [])}
            source = str(given.get(branch, info.source))
            (tmp / CARD).write_text(branch_card(out.name, reader.path.name, branch, source, max(errors, default=None),
                                                m.config))
    logger.debug("exported branch %s to %s", branch, out)
    return out


def write_branch(reader: BundleReader, branch: str, folder: Path, *, dtype: str | Any = None,
                 max_shard_bytes: int = 2 << 30, progress: bool = True,
                 tensors: Any = None) -> None:
    """Write ``branch`` as an HF folder into the existing ``folder`` (see :func:`export_branch`);
    ``tensors`` replaces the branch's ``(name, tensor)`` stream (an export that edits weights)."""
    info = reader.branch(branch)
    name_dt = dtype_name(dtype, default=reader.manifest.dtype)
    torch_dtype = DTYPES[name_dt]
    writer = ShardWriter(folder, max_shard_bytes, prefix="model")
    n = len(reader.manifest.tensors[info.group])
    stream = tensors if tensors is not None else reader.iter_branch_tensors(branch)
    arch = registry().get(reader.groups[info.group].architecture)
    if arch is not None and arch.experts is not None and arch.experts.stacked:
        stream = stack_experts(arch, stream, info.hf_config)
    fp32 = float32_tensors(info.hf_config, torch_dtype)  # (routers transformers keeps in float32)
    for name, tensor in tqdm(stream, total=n, desc=f"export {branch}", disable=not progress):
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if fp32(name) else torch_dtype)
        writer.add(name, tensor)
    writer.close()
    finish_hf_shards(folder, writer)
    src = reader.branch_dir(branch)
    for fname in info.files:  # plain names (validated by the manifest), copied as regular files only
        f = src / fname
        if fname != "config.json" and f.is_file() and not f.is_symlink():
            shutil.copyfile(f, folder / fname)
    write_hf_config(folder, info.hf_config, name_dt)


_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")


def stack_experts(arch: Architecture, tensors: Iterable[tuple[str, torch.Tensor]],
                  hf_config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` with each layer's per-expert projections stacked again as the architecture's checkpoints
    hold them (``experts.stacked``: GraniteMoE, gpt-oss, Llama 4; the layout as :func:`fused_experts` reads
    it), under the checkpoint's names. A layer's experts are held until its last one arrives (one layer at a
    time).

    Raises:
        BundleError: a layer lacks some of its ``E`` experts' tensors (``E`` from the config).
    """
    spec = arch.experts
    assert spec is not None
    fused = fused_experts(spec)
    n = next((hf_config[k] for k in _EXPERT_COUNTS if isinstance(hf_config.get(k), int)), None)
    params = {what for f in fused.values() for _, what in f.parts}
    per_expert = sum(len(f.parts) for f in fused.values())
    held: dict[str, dict[tuple[int, str, str], torch.Tensor]] = {}
    for name, t in tensors:
        module, e, proj, param = (name.rsplit(".", 3) + ["", "", ""])[:4]
        if not (e.isdigit() and proj in spec.projections and param in params
                and arch.matches(spec.module, arch.param_path(module))):
            yield name, t
            continue
        got = held.setdefault(module, {})
        got[int(e), proj, param] = t
        if n is not None and len(got) == per_expert * n:
            got = held.pop(module)
            try:
                out = {p: torch.stack([f.join([got[e, proj, what] for proj, what in f.parts]) for e in range(n)])
                       for p, f in fused.items()}
            except KeyError as err:
                e_, proj_, what_ = err.args[0]
                raise BundleError(f"{module}: expert {e_} lacks its {proj_} {what_}") from None
            path = arch.param_path(module)
            for p, stacked in out.items():
                yield arch.checkpoint_path(f"{path}.{p}"), stacked.contiguous()
    for module, got in held.items():
        raise BundleError(f"{module}: {len(got)} expert tensors for a config of {n} experts "
                          f"({per_expert * n if n else '?'} expected): the experts cannot be stacked")
