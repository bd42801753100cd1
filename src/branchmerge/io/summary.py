"""A bundle described as plain data (branches, groups, ranks, bytes vs the inputs, reconstruction errors):
what ``branchmerge inspect`` prints and a model card (:mod:`.card`) shows. Read from the manifest alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from branchmerge.common import DTYPES
from branchmerge.io.bundle import BundleReader


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
            "lora_base": g.lora_base,
            "tensors": len(recs),
            "compressed": len(comp),
            "shared": sum(r.role == "shared" for r in recs.values()),
            "per_branch": sum(r.role == "per_branch" for r in recs.values()),
            "deduplicated": sum(bool(r.same_as or r.patches) for r in recs.values()),  # stored once or as rows
            "dense_deltas": sum(r.dense for r in comp.values()),
            "ranks": ranks,
            "bytes": sum(r.bytes for r in recs.values()),
            "max_rel_error": errors,
            "mean_rel_error": mean_err,
            "input_bytes": sum(m.branches[b].source_bytes for b in g.branches),
            "vocab_sizes": {b: m.branches[b].hf_config.get("vocab_size") for b in g.branches},
            "factor_bits": sorted({b for r in comp.values() for b, c in (r.bits or []) if c}) or [16],
            "tensor_records": {k: {"role": r.role, "shape": r.shape, "rank": r.rank, "dense": r.dense,
                                   "bits": r.bits, "bytes": r.bytes,
                                   "max_rel_error": max(r.rel_error.values(), default=None),
                                   **({"shapes": r.shapes} if r.shapes else {})}
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
