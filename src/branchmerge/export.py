"""Export one branch of a bundle as a plain Hugging Face folder, and summarize a bundle."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from branchmerge.common import DTYPES, dtype_name
from branchmerge.io.bundle import BundleReader
from branchmerge.io.hf import finish_hf_shards, write_hf_config
from branchmerge.io.writer import ShardWriter, atomic_output_dir

logger = logging.getLogger(__name__)


def export_branch(
    bundle: str | Path,
    branch: str,
    out: str | Path,
    *,
    dtype: str | Any = None,
    force: bool = False,
    max_shard_bytes: int = 2 << 30,
    progress: bool = True,
) -> Path:
    """Write ``branch`` as an HF folder that ``AutoModelForCausalLM.from_pretrained`` loads.

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
    for name, tensor in tqdm(stream, total=n, desc=f"export {branch}", disable=not progress):
        writer.add(name, tensor.to(torch_dtype) if tensor.is_floating_point() else tensor)
    writer.close()
    finish_hf_shards(folder, writer)
    src = reader.branch_dir(branch)
    for fname in info.files:  # plain names (validated by the manifest), copied as regular files only
        f = src / fname
        if fname != "config.json" and f.is_file() and not f.is_symlink():
            shutil.copyfile(f, folder / fname)
    write_hf_config(folder, info.hf_config, name_dt)


def summarize(bundle: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Branches, groups, ranks, bytes vs the inputs and reconstruction errors, as plain data."""
    reader = BundleReader(bundle, verify=verify)
    m = reader.manifest
    groups = {}
    for gname, g in m.groups.items():
        recs = m.tensors[gname]
        comp = {k: r for k, r in recs.items() if r.role == "compressed"}
        errors = {b: max((r.rel_error.get(b, 0.0) for r in comp.values()), default=0.0) for b in g.branches}
        mean_err = {
            b: (sum(r.rel_error.get(b, 0.0) for r in comp.values()) / len(comp)) if comp else 0.0
            for b in g.branches
        }
        ranks = sorted({r.rank for r in comp.values() if r.rank is not None})
        groups[gname] = {
            "branches": g.branches,
            "architecture": g.architecture,
            "standalone": g.standalone,
            "tensors": len(recs),
            "compressed": len(comp),
            "shared": sum(r.role == "shared" for r in recs.values()),
            "per_branch": sum(r.role == "per_branch" for r in recs.values()),
            "deduplicated": sum(bool(r.same_as) for r in recs.values()),
            "dense_deltas": sum(r.dense for r in comp.values()),
            "ranks": ranks,
            "bytes": sum(r.bytes for r in recs.values()),
            "max_rel_error": errors,
            "mean_rel_error": mean_err,
            "input_bytes": sum(m.branches[b].source_bytes for b in g.branches),
            "factor_bits": sorted({b for r in comp.values() for b, c in (r.bits or []) if c}) or [16],
            "tensor_records": {k: {"role": r.role, "shape": r.shape, "rank": r.rank, "dense": r.dense,
                                   "bits": r.bits, "bytes": r.bytes,
                                   "max_rel_error": max(r.rel_error.values(), default=None)}
                               for k, r in recs.items()},
        }
    input_bytes = sum(b.source_bytes for b in m.branches.values())
    at_dtype = sum(b.source_params for b in m.branches.values()) * DTYPES[m.dtype].itemsize
    return {
        "path": str(reader.path),
        "format_version": m.format_version,
        "dtype": m.dtype,
        "compress_rate": m.config.get("compress_rate"),
        "branches": {n: {"group": b.group, "standalone": b.standalone, "source": b.source}
                     for n, b in m.branches.items()},
        "groups": groups,
        "bundle_bytes": m.total_bytes,
        "input_bytes": input_bytes,
        "ratio": m.total_bytes / input_bytes if input_bytes else None,
        "input_bytes_at_dtype": at_dtype,  # the inputs stored as the bundle stores them (float32 → bf16 is 2×)
        "ratio_at_dtype": m.total_bytes / at_dtype if at_dtype else None,
        "shards": len(m.shards),
        "allocation": m.allocation,
    }
